"""The training configuration: a typed schema that round-trips exactly.

A :class:`TrainConfig` holds every setting that changes what is learned
(network, noise schedule, optimisation, DP, seed).  It is checked entirely
when it is built, before any heavy work; it serialises to a plain dict
(:meth:`TrainConfig.to_dict`) that :meth:`TrainConfig.from_dict` reads back to
an equal object, and it travels with every model in ``synthgate.json``.
Unknown keys are an error with a "did you mean" hint.

Presets: ``tiny`` (32 x 32, a 1M-parameter UNet without attention; trains
in minutes on 2 CPU cores) and ``base`` (128 x 128, the diffusers DDPM
example's 6-level UNet with attention, sized for one GPU); the transformer
denoisers have ``swin-tiny`` / ``swin-base`` (:mod:`generators.swin`) and
``dit-tiny`` / ``dit-base`` (diffusers' ``DiTTransformer2DModel``).  The
architecture's own settings live in a nested :class:`SwinConfig` or
:class:`DiTConfig`; the UNet's stay at the top level (as before).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from synthgate.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
CONDITIONING = ("auto", "none", "class", "attributes")
LR_SCHEDULES = ("constant", "cosine")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
ACCOUNTANTS = ("prv", "rdp")
ARCHITECTURES = ("unet", "swin", "dit")


@dataclass(frozen=True)
class SwinConfig:
    """The Swin-UNet denoiser (:class:`generators.swin.SwinUNetDenoiser`).

    Attributes
    ----------
    patch_size
        Pixels (or latent cells) per token side: the token grid is
        ``size / patch_size``.
    embed_dim
        Token width at the first level; it doubles at every patch merging.
    depths, num_heads
        Swin blocks and attention heads per level (encoder and decoder alike);
        the last level is the bottleneck.  ``embed_dim * 2**i`` must be
        divisible by ``num_heads[i]``.
    window_size
        Side of the attention windows; it must divide the token grid of every
        level whose grid is at least that large (a smaller grid is one window).
    mlp_ratio
        Width of the blocks' MLP relative to the token width.
    """

    patch_size: int = 2
    embed_dim: int = 32
    depths: tuple[int, ...] = (2, 2, 2)
    num_heads: tuple[int, ...] = (2, 4, 8)
    window_size: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        for name in ("patch_size", "embed_dim", "window_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"swin.{name} {getattr(self, name)} must be at least 1")
        if not self.depths or any(d < 1 for d in self.depths):
            raise ConfigError(f"swin.depths {list(self.depths)} must be one or more positive block counts")
        if len(self.num_heads) != len(self.depths):
            raise ConfigError(f"swin.num_heads has {len(self.num_heads)} entries but swin.depths has "
                              f"{len(self.depths)} levels")
        for i, heads in enumerate(self.num_heads):
            width = self.embed_dim * 2 ** i
            if heads < 1 or width % heads:
                raise ConfigError(f"swin.num_heads[{i}] = {heads} must divide the level's width {width} "
                                  f"(swin.embed_dim * 2**{i})")
        if not self.mlp_ratio > 0:
            raise ConfigError(f"swin.mlp_ratio {self.mlp_ratio} must be > 0")

    def check_size(self, size: int, where: str = "resolution") -> None:
        """Refuse a ``size`` the patching, merging and windows do not tile exactly."""
        if size % self.patch_size:
            raise ConfigError(f"swin.patch_size {self.patch_size} must divide the {where} {size}")
        grid = size // self.patch_size
        levels = len(self.depths)
        if grid % 2 ** (levels - 1):
            raise ConfigError(f"the token grid {grid} ({where} {size} / swin.patch_size {self.patch_size}) must be "
                              f"divisible by {2 ** (levels - 1)} for {levels} levels (swin.depths)")
        for i in range(levels):
            g = grid // 2 ** i
            if g >= self.window_size and g % self.window_size:
                raise ConfigError(f"swin.window_size {self.window_size} does not divide the {g} x {g} token grid "
                                  f"of level {i} ({where} {size})")


@dataclass(frozen=True)
class DiTConfig:
    """diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023).

    Attributes
    ----------
    patch_size
        Pixels (or latent cells) per token side.
    num_layers, num_attention_heads, attention_head_dim
        Transformer depth, heads, and width per head (hidden size is their
        product with one another: ``heads * head_dim``).
    """

    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"dit.{f.name} {getattr(self, f.name)} must be at least 1")

    def check_size(self, size: int, where: str = "resolution") -> None:
        if size % self.patch_size:
            raise ConfigError(f"dit.patch_size {self.patch_size} must divide the {where} {size}")


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
        if not self.epsilon > 0:
            raise ConfigError(f"dp.epsilon {self.epsilon} must be > 0")
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
        The denoiser: ``unet`` (diffusers ``UNet2DModel``, the settings
        above), ``swin`` (settings in ``swin``) or ``dit`` (settings in ``dit``).
    swin, dit
        :class:`SwinConfig` / :class:`DiTConfig`; filled with the defaults
        when the architecture is chosen without them, refused for another
        architecture.
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
    swin: SwinConfig | None = None
    dit: DiTConfig | None = None
    vae: str | None = None
    dp: DPConfig | None = None
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        if isinstance(self.condition_columns, str):
            object.__setattr__(self, "condition_columns", (self.condition_columns,))
        object.__setattr__(self, "condition_columns", tuple(str(c) for c in self.condition_columns))
        if isinstance(self.dp, Mapping):
            object.__setattr__(self, "dp", _build(DPConfig, self.dp, "dp"))
        _choice("architecture", self.architecture, ARCHITECTURES)
        for name, cls in (("swin", SwinConfig), ("dit", DiTConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                value = _build(cls, value, name)
            if value is None and self.architecture == name:
                value = cls()
            if value is not None and self.architecture != name:
                raise ConfigError(f"{name} settings were given but architecture is {self.architecture!r}")
            object.__setattr__(self, name, value)
        self._validate()

    @property
    def arch_settings(self) -> SwinConfig | DiTConfig | None:
        """The nested settings of a transformer architecture (``None`` for the UNet)."""
        return getattr(self, self.architecture, None)

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
        if self.architecture == "unet" and self.resolution % 2 ** (len(self.block_out_channels) - 1):
            raise ConfigError(f"resolution {self.resolution} must be divisible by "
                              f"{2 ** (len(self.block_out_channels) - 1)} ({len(self.block_out_channels)} levels)")
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
        if self.arch_settings is not None and self.vae is None:  # latent sizes are checked when the VAE is read
            self.arch_settings.check_size(self.resolution)
        if self.dp is not None and self.architecture == "swin":
            raise ConfigError(DP_REFUSED_SWIN)

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
        if self.conditioning == "attributes" and self.architecture == "dit":
            raise ConfigError("conditioning `attributes` is for the unet and swin architectures: DiT's adaLN-Zero "
                              "embeds class indices only (use --conditioning class, or --architecture unet|swin)")

    # ------------------------------------------------------------ round trip

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict that :meth:`from_dict` turns back into an equal config."""
        out = dataclasses.asdict(self)
        out["block_out_channels"] = list(self.block_out_channels)
        out["attention"] = list(self.attention)
        out["condition_columns"] = list(self.condition_columns)
        if out["swin"] is not None:
            out["swin"] = {k: list(v) if isinstance(v, tuple) else v for k, v in out["swin"].items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None) -> "TrainConfig":
        """Build a config from a dict, refusing unknown keys (with a hint)."""
        try:
            return _build(cls, data, "config")
        except ConfigError as exc:
            if source is not None and exc.path is None:
                raise ConfigError(exc.message, source) from exc
            raise

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some fields changed (validated again)."""
        return _build(type(self), {**self.to_dict(), **changes}, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# Measured, see tests/test_generators_transformers.py::test_dp_swin_is_refused_and_opacus_really_fails.
DP_REFUSED_SWIN = (
    "dp: opacus cannot train architecture 'swin' privately: it refuses timm's WindowAttention (its "
    "relative_position_bias_table is indexed through a buffer; opacus 1.6 rejects such layers in hooks and "
    "functorch modes), and the window partition folds windows into the batch dimension; use 'dit' or 'unet'")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        listed = ", ".join(f"`{a}`" for a in allowed)
        raise ConfigError(f"{name} {value!r} must be one of {listed}")


def _build(cls, data: Mapping[str, Any], what: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{what} must be a mapping of settings, not {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown {what} setting {key!r}{hint}")
    try:
        return cls(**dict(data))
    except TypeError as exc:  # e.g. a list where a number belongs
        raise ConfigError(f"{what}: {exc}") from exc


PRESETS: dict[str, dict[str, Any]] = {
    # On phantoms it draws recognisable anatomy after 400 steps (measured; see the issue note).
    "tiny": {},
    # The diffusers unconditional DDPM example (train_unconditional.py) at 128 x 128.
    "base": {
        "resolution": 128,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "layers_per_block": 2,
        "attention": (False, False, False, False, True, False),
        "mid_attention": True,
        "norm_num_groups": 32,
        "learning_rate": 1e-4,
        "lr_schedule": "cosine",
        "lr_warmup_steps": 500,
        "weight_decay": 1e-6,
        "batch_size": 64,
        "steps": 50_000,
        "ema_decay": 0.9999,
    },
    # 32 x 32, 0.85M parameters: three levels (token grids 16, 8, 4) with 4 x 4 windows.
    "swin-tiny": {"architecture": "swin", "learning_rate": 5e-4, "lr_warmup_steps": 50},
    # 128 x 128: Swin-UNet's Swin-T layout (Cao et al. 2021: embed 96, depths 2-2-2-2, heads 3-6-12-24),
    # patch 2 and window 8 so the 64/32/16/8 token grids tile; optimisation as the UNet base preset.
    "swin-base": {
        "architecture": "swin", "resolution": 128,
        "swin": {"patch_size": 2, "embed_dim": 96, "depths": (2, 2, 2, 2), "num_heads": (3, 6, 12, 24),
                 "window_size": 8, "mlp_ratio": 4.0},
        "learning_rate": 1e-4, "lr_schedule": "cosine", "lr_warmup_steps": 500, "weight_decay": 1e-6,
        "batch_size": 64, "steps": 50_000, "ema_decay": 0.9999,
    },
    # 32 x 32, 0.39M parameters: 256 tokens of width 64, 4 layers.
    "dit-tiny": {"architecture": "dit", "learning_rate": 5e-4, "lr_warmup_steps": 50},
    # DiT-B/4 (Peebles & Xie 2023, Table 1: 12 layers, hidden 768, 12 heads) on 128 x 128 pixels (1,024
    # tokens); the paper's AdamW lr 1e-4 without weight decay, EMA 0.9999. In a VAE's latent space the
    # paper's patch 2 is the usual choice (dit.patch_size).
    "dit-base": {
        "architecture": "dit", "resolution": 128,
        "dit": {"patch_size": 4, "num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64},
        "learning_rate": 1e-4, "lr_warmup_steps": 0, "batch_size": 64, "steps": 100_000, "ema_decay": 0.9999,
    },
}


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
