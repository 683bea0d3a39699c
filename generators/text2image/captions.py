"""Captions for text-to-image fine-tuning: templates over ``metadata.csv`` columns, and caption dropout.

A caption template is a ``str.format`` string over an image's label and its
other ``metadata.csv`` values (``"Chest X-ray showing {label}"``).  During
training each image's caption is replaced by the empty prompt with
probability ``caption_dropout`` (:class:`CaptionDropout`), so that one
network learns both the conditional and the unconditional noise prediction.

Notes
-----
Ho & Salimans 2022 (classifier-free guidance); Cui et al. 2024/25 (MediSyn):
captions built from labels, dropped 10% of the time.
"""
from __future__ import annotations

import string
from typing import Sequence

from synthgate.errors import ConfigError, InputError

from .. import seeds


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a caption template uses, in order of first use."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"--caption-template {template!r} is not a valid template ({exc})") from exc
    names: list[str] = []
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conv:
            raise ConfigError(f"--caption-template {template!r}: {{{name}}} must be a plain column name "
                              "such as {label}")
        if name not in names:
            names.append(name)
    return tuple(names)


def check_template_columns(template: str, columns: Sequence[str], source) -> None:
    """Refuse a template naming a column the set's ``metadata.csv`` does not have."""
    available = ["label", *[c for c in columns if c not in ("path", "label")]]
    unknown = [f for f in template_fields(template) if f not in available]
    if unknown:
        raise InputError(f"--caption-template uses column {unknown[0]!r}, which metadata.csv does not have "
                         f"(columns: {', '.join(available)})", source)


def build_captions(template: str, records) -> list[str]:
    """One caption per image record: ``template`` filled with its label and ``metadata.csv`` values.

    Raises
    ------
    InputError
        An image lacks a value for a column the template uses.
    """
    names = template_fields(template)
    out = []
    for r in records:
        values = r.values()
        for name in names:
            if values.get(name) in (None, ""):
                raise InputError(f"image {r.key!r} has no value for column {name!r}, which the caption template "
                                 f"{template!r} uses")
        out.append(template.format(**{n: values[n] for n in names}))
    return out


class CaptionDropout:
    """Seeded Bernoulli draws: which captions of a batch are replaced by the empty prompt.

    Its generator state goes into checkpoints, so a resumed run drops the
    same captions as an uninterrupted one.
    """

    def __init__(self, rate: float, seed: int):
        self.rate, self.generator = rate, seeds.generator(seed)

    def draw(self, n: int):
        """A boolean mask of ``n`` entries, each ``True`` with probability ``rate``."""
        import torch

        return torch.rand(n, generator=self.generator) < self.rate

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


__all__ = ["template_fields", "check_template_columns", "build_captions", "CaptionDropout"]
