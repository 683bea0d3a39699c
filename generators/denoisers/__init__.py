"""The denoiser registry: every network ``synthgate train`` can train, by name.

An architecture is one :class:`Denoiser` value: its name (``--architecture``,
``TrainConfig.architecture``, ``synthgate.json["architecture"]["name"]``),
the typed block of its own settings (``config["swin"]``), how to build it
from a :class:`~generators.config.TrainConfig`, where its weights go in a
model directory and which class loads them, what it refuses (DP, attribute
or class conditioning, each with a one-line reason) and the presets it
contributes.  The config, the network builder, the exporter, the loader and
the CLI all read this registry; none of them names an architecture.

Nothing here imports torch.  A spec names its network class as
``"module:Class"`` and builds it in a function that imports the heavy
libraries inside (as :mod:`audit.base` registers checks), and the built-in
specs are registered as ``"module:ATTRIBUTE"`` strings imported on first use,
so ``synthgate train --help`` lists architectures and presets instantly.

Adding an architecture is one module and one registration::

    # generators/denoisers/toy.py  (torch-free: the network lives elsewhere)
    from generators.denoisers import Denoiser

    def build(config, *, channels, size, num_classes, cond_dim):
        from generators.toy_net import ToyNet  # an nn.Module with diffusers' ModelMixin/ConfigMixin
        return ToyNet(channels=channels)

    TOY = Denoiser(name="toy", folder="toy", network="generators.toy_net:ToyNet", build=build,
                   refuse_attributes="...", refuse_classes="...")

and ``"toy": "generators.denoisers.toy:TOY"`` in :data:`_REGISTRY` (or
``register_denoiser(TOY)`` from code that is imported before the run).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from synthgate.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from generators.config import TrainConfig


def check_settings_size(config: "TrainConfig", size: int, where: str) -> None:
    """The default size check: the settings block's own ``check_size(size, where)``, if it has one."""
    check = getattr(config.arch_settings, "check_size", None)
    if check is not None:
        check(size, where)


def check_pixel_resolution(config: "TrainConfig") -> None:
    """The default config check: a pixel model's resolution passes its size check (latent sizes: at training)."""
    if config.vae is None:
        get_denoiser(config.architecture).check_size(config, config.resolution, "resolution")


@dataclass(frozen=True)
class Denoiser:
    """One denoiser architecture, as the registry knows it.

    Attributes
    ----------
    name
        The architecture's name: a Python identifier; also the key of its
        settings block in a config.
    folder
        The model directory's subfolder that holds the saved network
        (``unet``, ``denoiser``, ``transformer``).
    network
        The class of the saved network, or its ``"module:Class"`` path
        (imported only when a model is loaded); its ``from_pretrained(folder)``
        loads the weights and the path is recorded in
        ``synthgate.json["architecture"]["class"]``.
    build
        ``build(config, *, channels, size, num_classes, cond_dim)`` -> a fresh
        network for ``channels x size x size`` inputs, called as
        ``net(x_t, t, class_labels=None).sample``.  ``num_classes`` is the
        number of classes of a class-conditional model (else ``None``);
        ``cond_dim`` is the width of the attribute-conditioning vector the
        network must accept in ``class_labels`` (else ``None``; the vector
        comes from an encoder wrapped around the network, see
        :mod:`generators.conditioning`).  Heavy imports go inside.
    settings
        A frozen dataclass holding the architecture's own settings (the
        config's nested block named after it; filled with its defaults
        when the architecture is chosen without it), or ``None`` (no block).
    condition_width
        ``condition_width(config)`` -> ``cond_dim`` for attribute
        conditioning (the width of the network's timestep embedding);
        needed unless ``refuse_attributes``.
    check_size
        ``check_size(config, size, where)``: raise
        :class:`~synthgate.errors.ConfigError` for a side the network cannot
        take; called with the latent size once a VAE is read, and when the
        network is built.  Default: the settings block's ``check_size``.
    check_config
        ``check_config(config)``: architecture-specific checks when a config
        is built.  Default: :func:`check_pixel_resolution`.
    refuse_dp, refuse_attributes, refuse_classes
        ``None`` when the architecture supports DP-SGD training, attribute
        conditioning, class conditioning; otherwise the one-line reason a
        config asking for it is refused with.  An architecture refusing
        classes trains unconditionally under ``conditioning: auto``.
    presets
        ``--preset`` name -> settings (``architecture`` is added).
    ddpm_pipeline
        Saved as a diffusers ``DDPMPipeline`` (``model_index.json`` and
        ``unet/``), which only a ``UNet2DModel`` can be; otherwise the
        network and the schedule are saved side by side.
    """

    name: str
    folder: str
    network: str | type
    build: Callable[..., Any]
    settings: type | None = None
    condition_width: Callable[["TrainConfig"], int] | None = None
    check_size: Callable[["TrainConfig", int, str], None] = check_settings_size
    check_config: Callable[["TrainConfig"], None] = check_pixel_resolution
    refuse_dp: str | None = None
    refuse_attributes: str | None = None
    refuse_classes: str | None = None
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ddpm_pipeline: bool = False

    def __post_init__(self):
        if not self.name.isidentifier():
            raise ValueError(f"denoiser name {self.name!r} must be a Python identifier")
        if not self.folder or "/" in self.folder or self.folder in (".", ".."):
            raise ValueError(f"denoiser {self.name!r}: folder {self.folder!r} must be one folder name")
        if self.refuse_attributes is None and self.condition_width is None:
            raise ValueError(f"denoiser {self.name!r}: give condition_width (attribute conditioning) or "
                             "refuse_attributes")
        object.__setattr__(self, "presets", {name: {"architecture": self.name, **dict(settings)}
                                             for name, settings in self.presets.items()})

    @property
    def class_path(self) -> str:
        """``"module:Class"`` of the saved network."""
        if isinstance(self.network, str):
            return self.network
        return f"{self.network.__module__}:{self.network.__qualname__}"

    def network_class(self) -> type:
        """The saved network's class (imports its module)."""
        if not isinstance(self.network, str):
            return self.network
        module, _, name = self.network.partition(":")
        return getattr(importlib.import_module(module), name)

    def load(self, folder):
        """The saved network in ``folder`` (always this spec's class, never one named by the folder's files)."""
        return self.network_class().from_pretrained(folder)

    def info(self) -> dict:
        """``synthgate.json["architecture"]``: the name, its folder, and the class that loads it."""
        return {"name": self.name, "folder": self.folder, "class": self.class_path}


#: name -> spec, or ``"module:ATTRIBUTE"`` of one (imported on first use); the order is the listing order.
_REGISTRY: dict[str, Denoiser | str] = {
    "unet": "generators.denoisers.unet:UNET",
    "swin": "generators.denoisers.swin:SWIN",
    "dit": "generators.denoisers.dit:DIT",
}


def _resolve(name: str) -> Denoiser:
    entry = _REGISTRY[name]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        if not isinstance(entry, Denoiser) or entry.name != name:
            raise TypeError(f"{_REGISTRY[name]} is not the Denoiser {name!r}")
        _REGISTRY[name] = entry
    return entry


def architectures() -> tuple[str, ...]:
    """The registered architecture names, in registration order."""
    return tuple(_REGISTRY)


def denoisers() -> tuple[Denoiser, ...]:
    """Every registered spec, in registration order."""
    return tuple(_resolve(name) for name in _REGISTRY)


def get_denoiser(name: str) -> Denoiser:
    """The spec registered as ``name``; :class:`ConfigError` naming the allowed ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"architecture {name!r} must be one of " + ", ".join(f"`{a}`" for a in _REGISTRY))
    return _resolve(name)


def settings_blocks() -> tuple[str, ...]:
    """Names of the architectures that have a settings block (the config keys they own)."""
    return tuple(spec.name for spec in denoisers() if spec.settings is not None)


def presets() -> dict[str, dict[str, Any]]:
    """Every preset of every registered architecture: name -> settings."""
    out: dict[str, dict[str, Any]] = {}
    for spec in denoisers():
        out.update(spec.presets)
    return out


def register_denoiser(spec: Denoiser | str, name: str | None = None) -> None:
    """Register an architecture: a :class:`Denoiser`, or with ``name`` the ``"module:ATTRIBUTE"`` of one.

    Raises
    ------
    ValueError
        The name, or one of its presets, is taken, or the name is a
        training setting or an attribute of ``TrainConfig`` (the settings
        block is a config key, read as ``config.NAME``).
    """
    from generators.config import TrainConfig  # light; here because the config reads this registry

    if isinstance(spec, Denoiser):
        name = spec.name
    elif name is None:
        raise ValueError("register_denoiser('module:ATTRIBUTE') needs the name it registers")
    if name in _REGISTRY:
        raise ValueError(f"denoiser {name!r} is already registered ({', '.join(_REGISTRY)})")
    if name in TrainConfig.setting_names():
        raise ValueError(f"denoiser name {name!r} is a training setting; choose another")
    if hasattr(TrainConfig, name):  # config.NAME must reach the settings block
        raise ValueError(f"denoiser name {name!r} clashes with TrainConfig.{name}; choose another")
    if isinstance(spec, Denoiser):
        taken = sorted(set(spec.presets) & set(presets()))
        if taken:
            raise ValueError(f"denoiser {name!r}: preset {taken[0]!r} is already defined")
    _REGISTRY[name] = spec


def unregister_denoiser(name: str) -> None:
    """Remove an architecture (tests, plugins being unloaded); unknown names are an error."""
    if name not in _REGISTRY:
        raise ValueError(f"denoiser {name!r} is not registered ({', '.join(_REGISTRY)})")
    del _REGISTRY[name]


__all__ = ["Denoiser", "register_denoiser", "unregister_denoiser", "get_denoiser", "architectures", "denoisers",
           "settings_blocks", "presets", "check_settings_size", "check_pixel_resolution"]
