"""A small image classifier trainer shared by the checks that need one (utility, and any later one).

Networks: ``small_cnn`` (ours: four convolutions, about 60k parameters,
fast on two CPU cores at 64 x 64) or any torchvision classification model
by name (``resnet18``, ``resnet50``, ``densenet121``, ...), always built
without downloaded weights; local weights come only from a file the user
names (``weights``), loaded with ``torch.load(weights_only=True)`` or
safetensors.  Every run is deterministic given its seed: the global torch
RNG is forked and seeded inside, never touched outside.

The trainer is deliberately plain -- Adam, cross-entropy, a fixed number of
optimizer steps, no early stopping (there is no validation set that is not
the test set) -- so that what differs between two trained classifiers is the
data they were trained on, which is what the utility check compares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from synthgate.errors import InputError, MissingInputError, UsageError
from synthgate.progress import progress_bar

#: Presets: ``cpu`` is sized for minutes on two cores; ``gpu`` is what the seed studies trained (ResNet-50).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"architecture": "small_cnn", "image_size": 64, "epochs": 15, "batch_size": 64, "lr": 5e-3,
            "weight_decay": 1e-4, "repeats": 3},
    "gpu": {"architecture": "resnet50", "image_size": 224, "epochs": 30, "batch_size": 64, "lr": 1e-3,
            "weight_decay": 1e-4, "repeats": 5},
}

#: ImageNet statistics, used when local torchvision weights were trained with them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TrainConfig:
    """How one classifier is trained (the same for every arm it is compared across)."""

    architecture: str = "small_cnn"
    image_size: int = 64
    epochs: int = 15
    batch_size: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    weights: str | None = None

    def __post_init__(self):
        if self.image_size < 8:
            raise UsageError(f"image_size {self.image_size} must be at least 8")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch_size must be at least 1")
        if not self.lr > 0:
            raise UsageError(f"lr {self.lr} must be positive")

    def steps_for(self, n_images: int) -> int:
        """Optimizer steps for ``epochs`` passes over ``n_images`` images."""
        return self.epochs * max(1, math.ceil(n_images / self.batch_size))


def resolve_preset(name: str, device, overrides: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The preset's settings with every non-``None`` override applied; ``auto`` follows the device."""
    if name == "auto":
        name = "gpu" if getattr(device, "type", str(device)) == "cuda" else "cpu"
    if name not in PRESETS:
        raise UsageError(f"preset {name!r} must be one of `auto`, {', '.join(f'`{p}`' for p in PRESETS)}")
    settings = dict(PRESETS[name])
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return name, settings


# ------------------------------------------------------------------ networks


def small_cnn(in_channels: int, n_classes: int, width: int = 16):
    """Four strided convolutions, batch norm, global average pooling, a linear head.

    The first convolution has stride 2 so 64 x 64 inputs cost what 32 x 32
    ones would; the receptive field (about 35 pixels at the last layer)
    still covers a lesion-sized blob at 64 x 64.
    """
    import torch.nn as nn

    def block(cin, cout, stride, k=3):
        return [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    w = width
    features = nn.Sequential(*block(in_channels, w, 2, 5), *block(w, 2 * w, 2), *block(2 * w, 4 * w, 2),
                             *block(4 * w, 4 * w, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
    return nn.Sequential(features, nn.Linear(4 * w, n_classes))


def build_model(architecture: str, n_classes: int, in_channels: int, weights: str | Path | None = None):
    """A classifier with ``n_classes`` outputs, randomly initialised or from a local weights file.

    torchvision models take 3 channels (gray images are replicated, as the
    weights expect); ``small_cnn`` takes the images' own channels.
    """
    if architecture == "small_cnn":
        model = small_cnn(in_channels, n_classes)
    else:
        import torchvision

        try:
            model = torchvision.models.get_model(architecture, weights=None, num_classes=n_classes)
        except ValueError as exc:
            raise UsageError(f"architecture {architecture!r} is neither `small_cnn` nor a torchvision "
                             f"classification model ({exc})") from exc
    if weights:
        load_weights(model, weights)
    return model


def model_channels(architecture: str, in_channels: int) -> int:
    return in_channels if architecture == "small_cnn" else 3


def read_state_dict(path: str | Path) -> dict:
    """A state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only``; no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError("weights file does not exist", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many kinds for a bad file
        raise InputError(f"cannot read weights ({' '.join(str(exc).split())[:200]})", path) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise InputError("is not a state dict (expected a mapping of parameter names to tensors)", path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model, path: str | Path) -> list[str]:
    """Load a local state dict; the classification head may differ in size and is then left random.

    Returns the names of the parameters left at their initial values (the
    head, when the weights have another number of classes).  Any other
    missing, extra or misshapen parameter is an error naming the file.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = _head_prefix(model)
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skipped = [k for k in mismatched + missing if head and k.startswith(head)]
    bad = [k for k in mismatched + missing + unexpected if k not in skipped]
    if bad:
        raise InputError(f"weights do not fit this architecture ({len(bad)} parameter(s) differ, "
                         f"e.g. {bad[0]!r})", path)
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return skipped


def _head_prefix(model) -> str | None:
    """Name prefix of the final linear layer (the part replaced for a new number of classes)."""
    import torch.nn as nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return None if last is None else last + "."


# -------------------------------------------------------------------- data


def load_images(ctx, imageset, size: int, indices=None, batch_size: int = 128):
    """A set's images at the audit geometry, resized (down only) to ``size`` per side, as float16 ``NCHW``."""
    import torch
    import torch.nn.functional as F

    geo = ctx.geometry
    target = (min(size, geo.height), min(size, geo.width))
    chunks = []
    n = len(imageset) if indices is None else len(indices)
    for _, batch in progress_bar(ctx.batches(imageset, batch_size, indices=indices), desc=f"loading {imageset.root.name} "
                                 "at the analysis size", unit="batch", total=-(-n // batch_size),
                                 enabled=ctx.progress):
        x = torch.from_numpy(batch)
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bilinear", antialias=True, align_corners=False)
        chunks.append(x.clamp_(0, 1).to(torch.float16))
    return torch.cat(chunks)


@dataclass(frozen=True)
class Normalizer:
    """Per-channel affine normalisation applied to every batch the network sees."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_images(cls, x) -> "Normalizer":
        xf = x.float()
        mean = xf.mean(dim=(0, 2, 3))
        std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(tuple(mean.tolist()), tuple(std.tolist()))

    def __call__(self, x, channels: int):
        import torch

        x = x.float()
        if x.shape[1] == 1 and channels == 3:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean, device=x.device)
        std = torch.tensor(self.std, device=x.device)
        if mean.numel() != x.shape[1]:
            mean, std = mean.mean().expand(x.shape[1]), std.mean().expand(x.shape[1])
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def normalizer_for(config: TrainConfig, real_images) -> Normalizer:
    """ImageNet statistics for local torchvision weights, else the real training images' own statistics.

    Every arm uses the same normaliser (from the real training set), so an
    intensity shift in the synthetic set is part of what is measured rather
    than normalised away.
    """
    if config.weights and config.architecture != "small_cnn":
        return Normalizer(IMAGENET_MEAN, IMAGENET_STD)
    return Normalizer.from_images(real_images)


# ---------------------------------------------------------------- training


@dataclass
class TrainedClassifier:
    """A trained network with what is needed to score new images."""

    model_: Any
    normalizer: Normalizer
    channels: int
    device: Any
    steps_: int
    final_loss_: float

    def predict_proba(self, x, batch_size: int = 256) -> np.ndarray:
        """Softmax class probabilities, ``(N, n_classes)`` float64."""
        import torch

        self.model_.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(x), batch_size):
                xb = self.normalizer(x[s:s + batch_size].to(self.device), self.channels)
                out.append(torch.softmax(self.model_(xb).float(), dim=1).cpu())
        return torch.cat(out).double().numpy()


def train_classifier(x, y, n_classes: int, config: TrainConfig, normalizer: Normalizer, seed: int,
                     device=None, steps: int | None = None) -> TrainedClassifier:
    """Train one classifier on images ``x`` (float16 ``NCHW``) and integer labels ``y``.

    ``steps`` optimizer steps (default: ``config.epochs`` passes over
    ``x``) of full mini-batches drawn from successive random permutations.
    Initialisation and batch order follow ``seed`` alone.

    Notes
    -----
    The "classification accuracy score" protocol (train on synthetic, test on
    real; Ravuri & Vinyals 2019), as the seed studies apply it to medical
    images (Hosseini & Serag 2025; MediSyn).
    """
    import torch
    import torch.nn.functional as F

    device = device or torch.device("cpu")
    n = len(x)
    if n == 0:
        raise InputError("no training images for this classifier")
    steps = config.steps_for(n) if steps is None else int(steps)
    batch = min(config.batch_size, n)
    channels = model_channels(config.architecture, x.shape[1])
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = build_model(config.architecture, n_classes, channels, config.weights).to(device)
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        model.train()
        order, pos, loss_v = torch.randperm(n, generator=gen), 0, float("nan")
        for _ in range(steps):
            if pos + batch > n:  # full batches only: BatchNorm needs more than one image
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + batch]
            pos += batch
            xb = normalizer(x[idx].to(device), channels)
            loss = F.cross_entropy(model(xb), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_v = float(loss.detach())
    if not math.isfinite(loss_v):
        raise FloatingPointError(f"classifier training diverged (loss {loss_v}); lower lr")
    return TrainedClassifier(model, normalizer, channels, device, steps, loss_v)
