"""The training configuration: a typed schema that round-trips exactly.

A :class:`TrainConfig` holds every setting that changes what is learned
(network, noise schedule, optimisation, DP, seed).  It is checked entirely
when it is built, before any heavy work; it serialises to a plain dict
(:meth:`TrainConfig.to_dict`) that :meth:`TrainConfig.from_dict` reads back to
an equal object, and it travels with every model in ``synthgate.json``.
Unknown keys are an error with a "did you mean" hint.

The denoiser is chosen by ``architecture``, a name in the registry of
:mod:`generators.denoisers`, which also contributes the presets
(:data:`PRESETS`): ``tiny`` (32 x 32, a 1M-parameter UNet without attention;
trains in minutes on 2 CPU cores) and ``base`` (128 x 128, the diffusers DDPM
example's 6-level UNet with attention, sized for one GPU); the transformer
denoisers have ``swin-tiny`` / ``swin-base`` (:mod:`generators.swin`) and
``dit-tiny`` / ``dit-base`` (diffusers' ``DiTTransformer2DModel``).  An
architecture's own settings live in a nested block named after it
(:class:`SwinConfig` in ``swin``, :class:`DiTConfig` in ``dit``), held as
:attr:`TrainConfig.arch_settings`; the UNet's stay at the top level (as before).
"""
from __future__ import annotations

import math

import dataclasses
import difflib
import json
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from synthgate.errors import ConfigError

from .denoisers import architectures, get_denoiser, presets, settings_blocks
from .denoisers.dit import DiTConfig
from .denoisers.swin import SwinConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONDITIONING = ("auto", "none", "class", "attributes")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy (DP-SGD through opacus) settings.

    Attributes
    ----------
    epsilon, delta
        The target budget for the whole run; the noise multiplier is chosen so
        that the accountant's epsilon after ``steps`` steps is at most
        ``epsilon``.
    max_grad_norm
        Per-example clipping bound C.
    accountant
        ``prv`` (opacus' default, tighter) or ``rdp``.
    physical_batch_size
        Examples per forward/backward pass (0: the whole Poisson batch).  Only
        memory changes; the update is the same.
    """

    epsilon: float
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    physical_batch_size: int = 0

    def __post_init__(self):
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):  # inf promised nothing and wrote invalid JSON
            raise ConfigError(f"dp.epsilon {self.epsilon} must be a finite number > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta {self.delta} must be in (0, 1)")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"dp.max_grad_norm {self.max_grad_norm} must be > 0")
        _choice("dp.accountant", self.accountant, ACCOUNTANTS)
        if self.physical_batch_size < 0:
            raise ConfigError(f"dp.physical_batch_size {self.physical_batch_size} must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run learns.

    Attributes
    ----------
    resolution
        Side of the square images the model is trained on; other sizes are
        resized to it (see :mod:`generators.data`).
    block_out_channels, layers_per_block, attention, mid_attention, norm_num_groups
        The UNet: channel width per resolution level, ResNet blocks per
        level, self-attention per level (one flag per level), attention in the
        middle block, GroupNorm groups (must divide every width).
    conditioning
        ``class`` (on the set's ``label``), ``attributes`` (on the
        ``condition_columns`` together), ``none``, or ``auto`` (class when
        every image has a label and there are at least two).
    condition_columns
        For ``attributes``: ``metadata.csv`` columns, each ``NAME``
        (categorical) or ``NAME:numeric`` (see :mod:`generators.conditioning`).
    num_train_timesteps, beta_schedule, prediction_type
        The DDPM noise schedule and what the network predicts.
    learning_rate, lr_schedule, lr_warmup_steps, weight_decay, batch_size, steps
        AdamW and its schedule; ``batch_size`` is the global (expected, under
        DP) number of examples per step.
    grad_clip
        Gradient-norm clipping without DP (0 disables; under DP the
        per-example bound ``dp.max_grad_norm`` applies instead).
    ema_decay
        Decay of the exponential moving average of the weights that is saved
        (0: save the raw weights).
    noise_multiplicity
        Noise draws (timestep and noise) per image per step, averaged into one
        loss per image (DPDM, Dockhorn et al. 2022).
    mixed_precision
        ``auto`` (bf16 on a GPU that has it, not under DP), ``no``, ``bf16``, ``fp16``.
    architecture
        The denoiser, a registered name (:mod:`generators.denoisers`):
        ``unet`` (diffusers ``UNet2DModel``, the settings above), ``swin``
        (settings in ``swin``) or ``dit`` (settings in ``dit``).
    arch_settings
        The architecture's own settings block (:class:`SwinConfig`,
        :class:`DiTConfig`, ...; ``None`` for one without, as the UNet),
        filled with its defaults when the architecture is chosen without it.
        In a dict (:meth:`to_dict`) it is the key named after the
        architecture (``"swin": {...}``), every other architecture's key
        ``None``; a block given for another architecture is refused.  Read
        it as ``config.arch_settings`` or ``config.swin`` / ``config.dit``
        (``None`` unless that is the architecture).
    blocks
        Init-only: settings blocks by architecture name, as a dict holds them
        (``{"swin": {...}}``); :meth:`from_dict` passes them here.
    vae
        Local folder of a diffusers ``AutoencoderKL``: train in its latent
        space (latent diffusion) instead of pixels.
    dp
        :class:`DPConfig`, or ``None`` for ordinary training.
    seed
        Every random choice of the run follows from it.
    checkpoint_every
        Save a resumable checkpoint every this many steps (0: never).
    """

    resolution: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, False)
    mid_attention: bool = False
    norm_num_groups: int = 8
    conditioning: str = "auto"
    condition_columns: tuple[str, ...] = ()
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 100
    weight_decay: float = 0.0
    batch_size: int = 32
    steps: int = 1000
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    noise_multiplicity: int = 1
    mixed_precision: str = "auto"
    architecture: str = "unet"
    arch_settings: Any = None
    vae: str | None = None
    dp: DPConfig | None = None
    seed: int = 0
    checkpoint_every: int = 0
    blocks: InitVar[Mapping[str, Any] | None] = None

    def __post_init__(self, blocks=None):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        if isinstance(self.condition_columns, str):
            object.__setattr__(self, "condition_columns", (self.condition_columns,))
        object.__setattr__(self, "condition_columns", tuple(str(c) for c in self.condition_columns))
        if isinstance(self.dp, Mapping):
            object.__setattr__(self, "dp", _build(DPConfig, self.dp, "dp"))
        _choice("architecture", self.architecture, architectures())
        object.__setattr__(self, "arch_settings", self._settings_block(blocks or {}))
        self._validate()

    def _settings_block(self, blocks: Mapping[str, Any]):
        """The architecture's settings from ``arch_settings`` or its block; other architectures' blocks refused."""
        spec = get_denoiser(self.architecture)
        value = self.arch_settings
        for name in settings_blocks():  # registration order: the first offending block is reported
            given = blocks.get(name)
            if isinstance(given, Mapping):
                given = _build(get_denoiser(name).settings, given, name)
            if given is not None and name != self.architecture:
                raise ConfigError(f"{name} settings were given but architecture is {self.architecture!r}")
            if given is not None:
                if value is not None and value != given:
                    raise ConfigError(f"{name} settings were given twice (arch_settings and {name})")
                value = given
        if spec.settings is None:
            if value is not None:
                raise ConfigError(f"architecture {self.architecture!r} has no settings block (got {value!r})")
            return None
        if isinstance(value, Mapping):
            value = _build(spec.settings, value, self.architecture)
        if value is None:
            value = spec.settings()
        if not isinstance(value, spec.settings):
            raise ConfigError(f"{self.architecture} settings must be a {spec.settings.__name__} or a mapping, "
                              f"not {type(value).__name__}")
        return value

    def __getattr__(self, name: str):
        # config.swin / config.dit: an architecture's block by its name (None unless it is the architecture)
        if not name.startswith("_") and name in settings_blocks():
            return self.arch_settings if name == self.architecture else None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The top-level keys of a config dict, besides the architectures' settings blocks."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "arch_settings")

    def _validate(self) -> None:
        if not 8 <= self.resolution <= 4096:
            raise ConfigError(f"resolution {self.resolution} must be between 8 and 4096")
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"block_out_channels {list(self.block_out_channels)} must be positive widths")
        if len(self.attention) != len(self.block_out_channels):
            raise ConfigError(f"attention has {len(self.attention)} flags but there are "
                              f"{len(self.block_out_channels)} levels (block_out_channels)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ConfigError(f"norm_num_groups {self.norm_num_groups} must divide every width in "
                              f"block_out_channels {list(self.block_out_channels)}")
        _choice("conditioning", self.conditioning, CONDITIONING)
        self._validate_condition_columns()
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("layers_per_block", "num_train_timesteps", "batch_size", "steps", "noise_multiplicity"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} {getattr(self, name)} must be at least 1")
        for name in ("lr_warmup_steps", "weight_decay", "grad_clip", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} {getattr(self, name)} must be >= 0")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate {self.learning_rate} must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay {self.ema_decay} must be in [0, 1)")
        spec = get_denoiser(self.architecture)
        spec.check_config(self)  # by default, a pixel model's size; latent sizes are checked when the VAE is read
        if self.dp is not None and spec.refuse_dp:
            raise ConfigError(spec.refuse_dp)
        if self.conditioning == "class" and spec.refuse_classes:
            raise ConfigError(spec.refuse_classes)

    def _validate_condition_columns(self) -> None:
        from .conditioning import parse_column

        names = [parse_column(c)[0] for c in self.condition_columns]
        if self.conditioning == "attributes" and not names:
            raise ConfigError("conditioning `attributes` needs condition_columns (e.g. --condition-on birads "
                              "--condition-on age:numeric)")
        if names and self.conditioning != "attributes":
            raise ConfigError(f"condition_columns {list(self.condition_columns)} need conditioning `attributes`")
        if len(set(names)) != len(names):
            raise ConfigError(f"condition_columns {list(self.condition_columns)} name a column twice")
        refusal = get_denoiser(self.architecture).refuse_attributes
        if self.conditioning == "attributes" and refusal:
            raise ConfigError(refusal)

    # ------------------------------------------------------------ round trip

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "arch_settings":  # one key per settings block, where the blocks always were
                for name in settings_blocks():
                    out[name] = _plain(dataclasses.asdict(value)) if name == self.architecture else None
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> "TrainConfig":
        """Build a config from a dict, refusing unknown keys (with a hint)."""
        try:
            return cls._from_mapping(data)
        except ConfigError as exc:
            if source is not None and exc.path is None:
                raise ConfigError(exc.message, source) from exc
            raise

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any]) -> "TrainConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"config must be a mapping of settings, not {type(data).__name__}")
        block_names = settings_blocks()
        _refuse_unknown(data, [*cls.setting_names(), *block_names], "config")
        settings = {k: v for k, v in data.items() if k not in block_names}
        blocks = {k: v for k, v in data.items() if k in block_names}
        try:
            return cls(**settings, blocks=blocks)
        except TypeError as exc:  # e.g. a list where a number belongs
            raise ConfigError(f"config: {exc}") from exc

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return type(self)._from_mapping({**self.to_dict(), **changes})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        listed = ", ".join(f"`{a}`" for a in allowed)
        raise ConfigError(f"{name} {value!r} must be one of {listed}")


def _plain(value):
    """Tuples as lists, all the way down (the JSON form of a settings block)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _refuse_unknown(data: Mapping[str, Any], names: list[str], what: str) -> None:
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown {what} setting {key!r}{hint}")


def _build(cls, data: Mapping[str, Any], what: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of settings, not {type(data).__name__}")
    _refuse_unknown(data, [f.name for f in dataclasses.fields(cls)], what)
    try:
        return cls(**dict(data))
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ConfigError(f"{what}: {exc}") from exc


class _Presets(Mapping):
    """Every registered architecture's presets (name -> settings), read live from the registry."""

    def __getitem__(self, name: str) -> dict[str, Any]:
        return presets()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(presets())

    def __len__(self) -> int:
        return len(presets())

    def __repr__(self) -> str:
        return f"PRESETS({list(self)})"


#: ``--preset`` name -> settings; each architecture contributes its own (:mod:`generators.denoisers`).
PRESETS: Mapping[str, dict[str, Any]] = _Presets()


def preset(name: str, **overrides) -> TrainConfig:
    """The named preset with some settings overridden."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} must be one of " + ", ".join(f"`{p}`" for p in PRESETS))
    return TrainConfig.from_dict({**PRESETS[name], **overrides})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a JSON or YAML file (a ``synthgate.json`` is accepted: its ``config``)."""
    from synthgate.errors import MissingInputError

    path = Path(path)
    if not path.is_file():
        raise MissingInputError("config file does not exist", path)
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        parse, errors = yaml.safe_load, (yaml.YAMLError,)
    else:
        parse, errors = json.loads, (ValueError,)
    try:
        data = parse(text)
    except errors as exc:
        raise ConfigError(f"cannot read the config ({' '.join(str(exc).split())})", path) from exc
    if isinstance(data, dict) and "config" in data and "resolution" not in data:
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError("must hold a mapping of settings", path)
    return data


__all__ = ["DPConfig", "SwinConfig", "DiTConfig", "TrainConfig", "PRESETS", "preset", "load_config_file"]
