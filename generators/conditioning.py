"""Conditioning on several ``metadata.csv`` columns at once (categorical and numeric).

The VinDr-Mammo latent-diffusion study conditioned its generator on the
diagnostic label and lesion information together.  Here each conditioning
column is declared as ``name`` (categorical) or ``name:numeric``:

- categorical: one learned embedding per value (values seen in training);
- numeric: standardised with the training mean and standard deviation, then
  a small MLP (a single number needs a non-linear map to steer a network).

The per-column vectors are summed into one conditioning vector of the
denoiser's timestep-embedding width, which the denoiser adds to its
timestep embedding (for a diffusers ``UNet2DModel``: ``class_embed_type=
"identity"``, the same place a class embedding goes).  The
:class:`AttributeEncoder` is trained with the denoiser and saved beside it in
``MODEL/condition/``.

The model keeps only aggregate statistics of its training attributes (values
and their counts per column, numeric mean / sd / range), never per-image
rows: attribute combinations are quasi-identifiers.  Attributes not fixed at
sampling time are drawn per image from these marginals, independently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from synthgate.errors import ConfigError, InputError, UsageError

KINDS = ("categorical", "numeric")


def parse_column(spec: str) -> tuple[str, str]:
    """``"birads"`` -> ``("birads", "categorical")``; ``"age:numeric"`` -> ``("age", "numeric")``."""
    name, _, kind = str(spec).partition(":")
    name, kind = name.strip(), (kind.strip() or "categorical")
    if not name:
        raise ConfigError(f"condition column {spec!r} has no name (use NAME or NAME:numeric)")
    if kind not in KINDS:
        raise ConfigError(f"condition column {spec!r}: kind {kind!r} must be `categorical` or `numeric`")
    if name in ("path", "patient_id", "split"):
        raise ConfigError(f"condition column {name!r} cannot be used (it is not an image attribute)")
    return name, kind


@dataclass(frozen=True)
class Column:
    """One conditioning column and what the training set taught about it."""

    name: str
    kind: str
    values: tuple[str, ...] = ()  # categorical: sorted distinct values (embedding index order)
    counts: tuple[int, ...] = ()  # categorical: images per value
    mean: float = 0.0  # numeric
    std: float = 1.0
    low: float = 0.0
    high: float = 0.0

    def to_dict(self) -> dict:
        if self.kind == "categorical":
            return {"name": self.name, "kind": self.kind, "values": list(self.values), "counts": list(self.counts)}
        return {"name": self.name, "kind": self.kind, "mean": self.mean, "std": self.std,
                "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Column":
        return cls(d["name"], d["kind"], tuple(d.get("values", ())), tuple(d.get("counts", ())),
                   float(d.get("mean", 0.0)), float(d.get("std", 1.0)), float(d.get("low", 0.0)),
                   float(d.get("high", 0.0)))

    def encode(self, value: str, where: str) -> float:
        """One cell -> the encoder's input (a value index, or the standardised number)."""
        if self.kind == "categorical":
            try:
                return float(self.values.index(str(value)))
            except ValueError:
                raise InputError(f"{self.name}={value!r} is not a value the model was trained on "
                                 f"({', '.join(self.values)})", where) from None
        number = _number(self.name, value, where)
        return (number - self.mean) / self.std


def _number(name: str, value: str, where) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number (the column is numeric)", where) from None
    if not math.isfinite(number):
        raise InputError(f"{name}={value!r} is not a finite number", where)
    return number


@dataclass(frozen=True)
class AttributeSpec:
    """The conditioning columns of a model, in encoder order."""

    columns: tuple[Column, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_dict(self) -> dict:
        return {"type": "attributes", "columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttributeSpec":
        return cls(tuple(Column.from_dict(c) for c in d["columns"]))

    @classmethod
    def learn(cls, specs: Sequence[str], rows: Sequence[Mapping[str, str | None]], keys: Sequence[str],
              where) -> "AttributeSpec":
        """Fit the columns ``specs`` to the training attribute ``rows`` (one per image, ``keys`` name them)."""
        columns = []
        for spec in specs:
            name, kind = parse_column(spec)
            cells = [row.get(name) for row in rows]
            missing = next((k for k, v in zip(keys, cells) if v in (None, "")), None)
            if missing is not None:
                raise InputError(f"conditioning on {name!r} needs it for every image, but {missing!r} has no "
                                 f"value (metadata.csv column {name!r})", where)
            if kind == "categorical":
                values, counts = np.unique(np.asarray([str(c) for c in cells]), return_counts=True)
                columns.append(Column(name, kind, tuple(str(v) for v in values), tuple(int(c) for c in counts)))
            else:
                numbers = np.asarray([_number(name, c, f"{where} ({k})") for k, c in zip(keys, cells)])
                std = float(numbers.std()) or 1.0  # a constant column: keep the scale finite
                columns.append(Column(name, kind, mean=float(numbers.mean()), std=std,
                                      low=float(numbers.min()), high=float(numbers.max())))
        if len({c.name for c in columns}) != len(columns):
            raise ConfigError("a condition column is named twice")
        return cls(tuple(columns))

    def encode_rows(self, rows: Sequence[Mapping[str, str | None]], where) -> np.ndarray:
        """Attribute rows -> ``(N, n_columns)`` float32 encoder inputs; a missing value is an error."""
        out = np.empty((len(rows), len(self.columns)), np.float32)
        for i, row in enumerate(rows):
            for j, col in enumerate(self.columns):
                value = row.get(col.name)
                if value in (None, ""):
                    raise InputError(f"no value for the conditioning attribute {col.name!r} (the model is "
                                     f"conditioned on {', '.join(self.names)})", where)
                out[i, j] = col.encode(value, where)
        return out

    def check_fixed(self, fixed: Mapping[str, str], where) -> dict[str, str]:
        """Validate ``--condition NAME=VALUE`` settings (known names, known values, numbers in range)."""
        by_name = {c.name: c for c in self.columns}
        out = {}
        for name, value in fixed.items():
            if name not in by_name:
                raise UsageError(f"--condition {name}={value}: the model is conditioned on "
                                 f"{', '.join(self.names)}, not {name!r}")
            col = by_name[name]
            col.encode(value, where)
            if col.kind == "numeric" and not col.low <= float(value) <= col.high:
                raise UsageError(f"--condition {name}={value} is outside the training range "
                                 f"[{col.low:g}, {col.high:g}]; the model never saw such a value")
            out[name] = str(value)
        return out

    def draw(self, fixed: Mapping[str, str], seed: int) -> dict[str, str]:
        """One image's attributes: ``fixed`` ones, the rest drawn from the training marginals."""
        rng = np.random.default_rng(seed)
        out = {}
        for col in self.columns:  # a draw per column, in order, so a fixed column does not shift the others
            if col.kind == "categorical":
                p = np.asarray(col.counts, float) / sum(col.counts)
                drawn = col.values[int(rng.choice(len(col.values), p=p))]
            else:
                drawn = f"{float(np.clip(rng.normal(col.mean, col.std), col.low, col.high)):.6g}"
            out[col.name] = fixed.get(col.name, drawn)
        return out


def build_encoder(spec: AttributeSpec, width: int):
    """A fresh :class:`AttributeEncoder` for ``spec`` producing ``width``-wide vectors."""
    return _encoder_class()(
        cardinalities=[len(c.values) if c.kind == "categorical" else 0 for c in spec.columns], width=width)


_CLASSES: dict[str, Any] = {}


def _encoder_class():
    """The encoder class (defined lazily so that importing this module does not import torch)."""
    if "encoder" in _CLASSES:
        return _CLASSES["encoder"]
    import torch
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin

    class AttributeEncoder(ModelMixin, ConfigMixin):
        """Sum of per-column embeddings: ``(B, n_columns)`` encoder inputs -> ``(B, width)``.

        ``cardinalities[j]`` is the number of values of categorical column
        ``j``, or 0 for a numeric column (standardised scalar -> 2-layer MLP).
        """

        config_name = "config.json"

        @register_to_config
        def __init__(self, cardinalities: Sequence[int] = (), width: int = 128):
            super().__init__()
            self.parts = torch.nn.ModuleList(
                torch.nn.Embedding(int(n), width) if n else
                torch.nn.Sequential(torch.nn.Linear(1, width), torch.nn.SiLU(), torch.nn.Linear(width, width))
                for n in cardinalities)

        def forward(self, cond):
            cond = cond.float()
            out = 0
            for j, (n, part) in enumerate(zip(self.config.cardinalities, self.parts)):
                out = out + (part(cond[:, j].long()) if n else part(cond[:, j:j + 1]))
            return out

    class AttributeConditioned(torch.nn.Module):
        """A denoiser driven by attribute vectors: ``net(x, t, class_labels=encoder(cond))``."""

        def __init__(self, net, encoder):
            super().__init__()
            self.net, self.encoder = net, encoder

        @property
        def config(self):
            return self.net.config

        @property
        def dtype(self):
            return self.net.dtype

        def forward(self, x, t, class_labels=None):
            if class_labels is None:
                raise InputError("the model is conditioned on attributes: give a value for each")
            return self.net(x, t, class_labels=self.encoder(class_labels).to(x.dtype))

    _CLASSES["encoder"], _CLASSES["wrapper"] = AttributeEncoder, AttributeConditioned
    return AttributeEncoder


def attribute_conditioned(net, encoder):
    """``net`` wrapped so that its conditioning input is the encoder's input rows."""
    _encoder_class()
    return _CLASSES["wrapper"](net, encoder)


def load_encoder(folder):
    """The saved :class:`AttributeEncoder` of a model directory's ``condition/`` folder."""
    return _encoder_class().from_pretrained(folder)


__all__ = ["AttributeSpec", "Column", "parse_column", "build_encoder", "attribute_conditioned", "load_encoder"]
