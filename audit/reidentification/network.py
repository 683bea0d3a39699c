"""The re-identification attacker's network: a metric-learning embedding trained on patient identity.

A torchvision CNN (built without downloaded weights, or initialised from a
local state dict) followed by a linear head to an ``embedding_dim`` vector;
images are compared by the cosine similarity of their L2-normalised
embeddings.  Training is metric learning with pytorch-metric-learning's
``MultiSimilarityLoss`` and ``MultiSimilarityMiner`` on batches of ``P``
identities x ``m`` views, each view under the augmentations a
re-identification attacker would use (pose: rotation, shift, scale;
exposure: contrast, brightness, gamma; detector noise), so the network learns
what stays constant about a patient across acquisitions.

An identity is a patient, or -- the image-level fallback -- a single image,
whose ``m`` views are then ``m`` augmentations of that one image.

Images enter as float ``NCHW`` in [0, 1] at any size and 1 or 3 channels;
:func:`prepare` brings them to the network's input once (``image_size``
square, 3 channels, 8-bit), the form that is both trained on and embedded, so
the two never differ.  Heavy imports stay inside the functions.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from synthgate.errors import InputError, MissingInputError, UsageError

#: ImageNet statistics: right for pretrained torchvision weights, harmless from scratch.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

#: ``compact`` backbone: a ResNet of torchvision ``BasicBlock``s, narrower and shallower than
#: resnet18, for 2-core CPUs (stage widths; one block per stage).
COMPACT_WIDTHS = (32, 64, 128, 256)

PRESETS: dict[str, dict[str, Any]] = {
    # 2 CPU cores, 2,000 images of 64 x 64: minutes (bench/reidentification.py measures it)
    # (``epochs`` is the most epochs: training stops earlier when validation stops improving, or at its step budget)
    "cpu": {"backbone": "compact", "image_size": 64, "embedding_dim": 128, "epochs": 100, "batch_size": 64,
            "views": 4, "lr": 2e-3},
    # Packhaeuser et al. 2022's backbone and input size class
    "gpu": {"backbone": "resnet50", "image_size": 224, "embedding_dim": 128, "epochs": 100, "batch_size": 128,
            "views": 4, "lr": 3e-4},
}

#: with early stopping an epoch is one pass over the training images, but at least this many steps: a set of 30
#: images would otherwise be validated after every single step, which measures noise
MIN_EPOCH_STEPS = 10

#: with early stopping, a plateau first lowers the learning rate (from the best weights) this many times, by
#: this factor each, before it ends training: the annealing that a schedule with a known end would give
LR_DROPS = 2
#: the rise of d' (genuine vs impostor separation) that counts as an improvement when the AUC held
DPRIME_DELTA = 0.05
LR_DROP_FACTOR = 0.1


@dataclass(frozen=True)
class NetworkConfig:
    """Everything that decides the trained network (and so its cache key)."""

    backbone: str
    image_size: int
    embedding_dim: int
    epochs: int  # the most epochs; early stopping (``patience``) usually ends training before
    batch_size: int
    views: int  # images (or augmented views) per identity in a batch
    lr: float
    weight_decay: float = 1e-4
    augment: bool = True
    backbone_weights: str | None = None
    backbone_weights_sha256: str | None = None
    patience: int = 0  # epochs without a validation improvement before training stops; 0 = train every epoch
    min_delta: float = 0.0  # the smallest rise of the validation AUC that counts as an improvement
    step_budget_per_image: float = 0.0  # optimizer steps per training image (0 = no step budget) ...
    min_step_budget: int = 0  # ... but never fewer than this many steps
    time_budget_per_image: float = 0.0  # seconds of training per training image (0 = no budget) ...
    min_time_budget: float = 0.0  # ... but never less than this many seconds

    def __post_init__(self):
        if self.image_size < 16:
            raise UsageError(f"reidentification: image_size {self.image_size} must be at least 16")
        if self.embedding_dim < 2 or self.epochs < 1 or self.lr <= 0:
            raise UsageError("reidentification: embedding_dim must be >= 2, epochs >= 1 and lr > 0")
        if min(self.patience, self.min_delta, self.step_budget_per_image, self.min_step_budget,
               self.time_budget_per_image, self.min_time_budget) < 0:
            raise UsageError("reidentification: patience, min_delta and the step and time budgets must not be "
                             "negative")
        if self.views < 2 or self.batch_size < 2 * self.views:
            raise UsageError(f"reidentification: views must be >= 2 and batch_size >= 2 x views "
                             f"(got views {self.views}, batch_size {self.batch_size})")

    @property
    def identities_per_batch(self) -> int:
        return self.batch_size // self.views

    def step_budget(self, n_images: int) -> int | None:
        """Optimizer steps allowed for ``n_images`` training images (``None``: no budget).

        A compute budget that grows with the set, counted in steps rather than
        seconds: the trained network (and so the verdict) is the same on a
        loaded machine as on an idle one.
        """
        if self.step_budget_per_image <= 0:
            return None
        return max(int(self.min_step_budget), int(math.ceil(self.step_budget_per_image * n_images)))

    def time_budget(self, n_images: int) -> float | None:
        """Seconds of training allowed for ``n_images`` training images (``None``: no budget)."""
        if self.time_budget_per_image <= 0:
            return None
        return max(self.min_time_budget, self.time_budget_per_image * n_images)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_config(preset: str, overrides: dict[str, Any]) -> NetworkConfig:
    """The preset's settings with every non-``None`` override applied."""
    if preset not in PRESETS:
        raise UsageError(f"reidentification: preset {preset!r} must be one of {', '.join(PRESETS)} (or auto)")
    values = dict(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    weights = values.get("backbone_weights")
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise MissingInputError("backbone weights file does not exist (a local torchvision state dict is "
                                    "needed: .safetensors, .pt or .pth)", path)
        from synthgate.fsutil import sha256_file

        values["backbone_weights"] = str(path.resolve())
        values["backbone_weights_sha256"] = sha256_file(path)
    for key in ("image_size", "embedding_dim", "epochs", "batch_size", "views", "patience", "min_step_budget"):
        if key in values:
            values[key] = int(values[key])
    for key in ("lr", "min_delta", "step_budget_per_image", "time_budget_per_image", "min_time_budget"):
        if key in values:
            values[key] = float(values[key])
    return NetworkConfig(**values)


# ------------------------------------------------------------------ the network


def _compact_backbone():
    import torch.nn as nn
    from torchvision.models.resnet import BasicBlock

    w = COMPACT_WIDTHS
    layers = [nn.Conv2d(3, w[0], 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU(inplace=True)]
    inplanes = w[0]
    for i, width in enumerate(w):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or inplanes != width:
            down = nn.Sequential(nn.Conv2d(inplanes, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
        layers.append(BasicBlock(inplanes, width, stride, down))
        inplanes = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), inplanes


def _last_linear(model) -> tuple[str, Any]:
    import torch.nn as nn

    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise UsageError(f"reidentification: backbone {type(model).__name__} has no classifier layer to replace")
    return found[-1]


def _replace(model, dotted: str, new) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def build_backbone(cfg: NetworkConfig):
    """``(backbone, feature_dim)``: the classifier of a torchvision model replaced by the identity.

    ``cfg.backbone`` is ``compact`` or any torchvision classification model
    name (``resnet18``, ``resnet50``, ``densenet121``, ...), always built with
    ``weights=None``; local weights, when given, are loaded afterwards.
    """
    import torch.nn as nn

    if cfg.backbone == "compact":
        model, dim = _compact_backbone()
        head = None
    else:
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)
        if cfg.backbone not in names:
            import difflib

            near = difflib.get_close_matches(cfg.backbone, names + ["compact"], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise UsageError(f"reidentification: backbone {cfg.backbone!r} is not a torchvision classification "
                             f"model{hint}; use compact, resnet18, resnet50, ...")
        model = torchvision.models.get_model(cfg.backbone, weights=None)
        head, linear = _last_linear(model)
        dim = linear.in_features
        _replace(model, head, nn.Identity())
    if cfg.backbone_weights:
        load_backbone_weights(model, cfg.backbone_weights, head)
    return model, dim


def load_backbone_weights(model, path: str | Path, head: str | None) -> None:
    """Load a local state dict into ``model`` (its classifier ``head``, replaced, is ignored).

    ``.safetensors`` files are read with safetensors, anything else with
    ``torch.load(weights_only=True)``: never arbitrary pickles.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise many kinds
        raise InputError(f"cannot read backbone weights ({' '.join(str(exc).split())[:200]})", path) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError("backbone weights are not a state dict", path)
    if head:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes differ
        first = " ".join(str(exc).split())[:200]
        raise InputError(f"backbone weights do not fit the {type(model).__name__} backbone ({first})", path) from exc
    if result.missing_keys or result.unexpected_keys:
        what = (f"missing {', '.join(result.missing_keys[:3])}" if result.missing_keys
                else f"unexpected {', '.join(result.unexpected_keys[:3])}")
        raise InputError(f"backbone weights do not fit the {type(model).__name__} backbone ({what})", path)


def build_network(cfg: NetworkConfig, generator=None):
    """Backbone + linear embedding head; initialised from ``generator`` without touching global RNG state."""
    import torch
    import torch.nn as nn

    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, dim = build_backbone(cfg)
        return nn.Sequential(backbone, nn.Linear(dim, cfg.embedding_dim))


def prepare(batch: np.ndarray, cfg: NetworkConfig):
    """Images ``(N, C, H, W)`` float in [0, 1] -> uint8 tensor ``(N, C, S, S)``: the network's input form.

    Kept at 8 bits and at the images' own channel count (gray is expanded to
    3 channels only on the way into the network) so a training set held in
    memory costs ``S * S`` bytes per gray image.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(batch, dtype=torch.float32)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {x.shape[1]}")
    s = cfg.image_size
    if tuple(x.shape[2:]) != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    return torch.round(x.clamp(0, 1) * 255).to(torch.uint8)


def _normalise(x):
    import torch

    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(x, generator):
    """The attacker's augmentations, per image: pose, exposure and noise (``x`` float in [0, 1]).

    Ranges cover how one patient's radiographs differ between acquisitions
    (a few degrees of rotation, some shift and magnification, exposure and
    detector noise); flips are not used (they change anatomy's handedness).
    """
    import torch
    import torch.nn.functional as F

    n, dev = x.shape[0], x.device

    def u(lo, hi):
        return (torch.rand(n, generator=generator) * (hi - lo) + lo).to(dev)

    angle, scale = u(-10, 10) * math.pi / 180, u(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, u(-0.08, 0.08)], 1), torch.stack([sin, cos, u(-0.08, 0.08)], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    view = (n, 1, 1, 1)
    contrast, brightness, gamma = u(0.8, 1.2).view(view), u(-0.08, 0.08).view(view), u(0.8, 1.25).view(view)
    x = ((x - 0.5) * contrast + 0.5 + brightness).clamp(1e-6, 1) ** gamma
    noise = torch.randn(x.shape, generator=generator).to(dev) * u(0.0, 0.03).view(view)
    return (x + noise).clamp(0, 1)


def forward(model, images_u8, device, generator=None, augmented: bool = False):
    """Embeddings (not normalised) of uint8 prepared images, optionally augmented first."""
    x = images_u8.to(device).float() / 255.0
    if augmented:
        x = augment(x, generator)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return model(_normalise(x))


def embed(model, images_u8, device, batch_size: int = 256, generator=None, augmented: bool = False) -> np.ndarray:
    """L2-normalised embeddings (float32 numpy) of prepared images, in eval mode."""
    import torch
    import torch.nn.functional as F

    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(images_u8), batch_size):
            e = forward(model, images_u8[s:s + batch_size], device, generator, augmented)
            out.append(F.normalize(e.float(), dim=1).cpu())
    if not out:
        return np.zeros((0, model[-1].out_features), np.float32)
    return torch.cat(out).numpy()


# ------------------------------------------------------------------ training


class IdentityBatches:
    """Batches of ``P`` identities x ``m`` images each (drawn with replacement when an identity has fewer).

    An identity with one image contributes ``m`` copies of it, which the
    augmentation turns into ``m`` different views.
    """

    def __init__(self, identities: np.ndarray, per_batch: int, views: int, rng: np.random.Generator):
        identities = np.asarray(identities)
        self.groups = [np.flatnonzero(identities == v) for v in np.unique(identities)]
        if len(self.groups) < 2:
            raise ValueError("metric learning needs at least two identities")
        self.per_batch = min(per_batch, len(self.groups))
        self.views = views
        self.rng = rng

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        chosen = self.rng.choice(len(self.groups), self.per_batch, replace=False)
        idx, labels = [], []
        for c in chosen:
            g = self.groups[c]
            idx.append(self.rng.choice(g, self.views, replace=len(g) < self.views))
            labels.append(np.full(self.views, c))
        return np.concatenate(idx), np.concatenate(labels)


def validation_scores(model, images_u8, ids: np.ndarray, device, seed: int,
                      batch_size: int = 256) -> tuple[float, float]:
    """``(AUC, d')`` of verification on validation identities: all genuine vs all impostor pairs (cosine).

    Two images of one identity form a genuine pair; when no identity has two
    images, each image is paired with an augmented view of itself (drawn with
    the same ``seed`` every epoch, so epochs are compared on the same pairs).
    ``d'`` (difference of the genuine and impostor mean similarities over
    their pooled standard deviation) still ranks epochs once a few
    validation identities are separated perfectly (AUC 1).
    """
    import torch

    from audit.core.stats import roc_auc

    ids = np.asarray(ids)
    a = embed(model, images_u8, device, batch_size)
    if (np.unique(ids, return_counts=True)[1] >= 2).any():
        iu, ju = np.triu_indices(len(ids), 1)
        scores, genuine = np.einsum("nd,nd->n", a[iu], a[ju]), ids[iu] == ids[ju]
    else:
        b = embed(model, images_u8, device, batch_size, torch.Generator().manual_seed(seed), augmented=True)
        scores, genuine = (b @ a.T).ravel(), (ids[:, None] == ids[None, :]).ravel()
    g, i = scores[genuine].astype(np.float64), scores[~genuine].astype(np.float64)
    spread = math.sqrt((g.var() + i.var()) / 2)
    dprime = float((g.mean() - i.mean()) / spread) if spread > 0 else 0.0
    return roc_auc(scores, genuine), dprime


def train_network(images_u8, identities: np.ndarray, cfg: NetworkConfig, device, generator, rng,
                  progress: bool | None = None, validation: tuple[Any, np.ndarray] | None = None):
    """Train the embedding network; returns ``(model, history)``.

    ``validation`` is ``(images, identities)`` of identities the network does
    not train on.  With it and ``cfg.patience > 0``, training stops once the
    verification AUC on them has not risen by more than ``cfg.min_delta``
    (nor, the AUC held, their ``d'`` by more than ``DPRIME_DELTA``) for
    ``cfg.patience`` epochs at the lowest learning rate (see Notes), and the
    weights of the best epoch are kept;
    otherwise it runs ``cfg.epochs`` epochs.  Either way it stops at the
    step budget (``cfg.step_budget``: whole epochs, the same on any machine)
    and, when one is set, at the wall-clock time budget (``cfg.time_budget``,
    checked after each epoch; it makes the network depend on the machine's
    speed and load).

    Notes
    -----
    Multi-similarity loss with its pair miner (Wang et al. 2019, as
    implemented in pytorch-metric-learning) on cosine similarity, AdamW.  With
    early stopping the learning rate warms up over the first epoch and then
    stays constant (the end is not known in advance) until the validation
    AUC plateaus, when it is lowered ``LR_DROPS`` times tenfold (from the best
    weights) before a last plateau stops training; with a fixed number of
    epochs it follows a one-cycle schedule.  The validation identities are
    neither the unseen patients the check is judged on nor its positive
    controls, so choosing the epoch on them leaves those honest.  Packhaeuser
    et al. 2022 train a Siamese verification network (BCE on pairs) and a
    retrieval network (contrastive loss), with early stopping on a validation
    split; a metric-learning embedding serves both verification (pair
    similarity) and retrieval (nearest training images) with one network.
    """
    import copy
    import time

    import torch
    from pytorch_metric_learning import losses, miners

    from synthgate.progress import progress_bar

    model = build_network(cfg, generator).to(device)
    batches = IdentityBatches(identities, cfg.identities_per_batch, cfg.views, rng)
    early = validation is not None and cfg.patience > 0 and len(np.unique(validation[1])) >= 2
    steps_per_epoch = max(MIN_EPOCH_STEPS if early else 1, math.ceil(len(identities) / cfg.batch_size))
    epochs = cfg.epochs
    steps_allowed = cfg.step_budget(len(identities))
    if steps_allowed is not None:  # whole epochs, so the last one is validated
        epochs = min(epochs, max(1, math.ceil(steps_allowed / steps_per_epoch)))
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = None if early else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                                    pct_start=0.2)
    lr_scale, drops = 1.0, 0
    loss_fn, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    budget = cfg.time_budget(len(identities))
    val_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if early else 0
    history: list[float] = []
    curve: list[float] = []
    separation: list[float] = []
    best, best_sep, best_epoch, best_state, since = -math.inf, -math.inf, 0, None, 0
    stopped = (f"reached the most epochs ({cfg.epochs})" if epochs == cfg.epochs else
               f"step budget of {steps_allowed} steps reached ({epochs} epochs of {steps_per_epoch} steps)")
    epoch_loss = 0.0
    start = time.perf_counter()
    model.train()
    bar = progress_bar(range(total), desc="reid: train network", unit="step", enabled=progress)
    for step in bar:
        idx, labels = batches()
        if early:  # warm up over the first epoch, then constant until a plateau lowers it
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_scale * min(1.0, (step + 1) / steps_per_epoch)
        emb = forward(model, images_u8[torch.as_tensor(idx)], device, generator, augmented=cfg.augment)
        labels_t = torch.as_tensor(labels, device=device)
        loss = loss_fn(emb, labels_t, miner(emb, labels_t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        epoch_loss += float(loss.detach())
        if (step + 1) % steps_per_epoch:
            continue
        history.append(round(epoch_loss / steps_per_epoch, 5))
        epoch_loss = 0.0
        epoch = len(history)
        if early:
            auc, sep = validation_scores(model, validation[0], validation[1], device, val_seed)
            model.train()
            curve.append(round(auc, 5))
            separation.append(round(sep, 4))
            # a higher AUC, or -- the AUC held -- a clearly wider separation (at AUC 1 only d' still moves)
            if auc > best + cfg.min_delta or (auc >= best and sep > best_sep + DPRIME_DELTA):
                best, best_sep, best_epoch, since = max(auc, best), sep, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since += 1
            if since >= cfg.patience and drops < LR_DROPS:  # a plateau: go on from the best weights, slower
                drops, lr_scale, since = drops + 1, lr_scale * LR_DROP_FACTOR, 0
                model.load_state_dict(best_state)
            elif since >= cfg.patience:
                stopped = (f"validation AUC did not improve for {cfg.patience} epochs (after lowering the learning "
                           f"rate {LR_DROPS} times)")
                break
        if budget is not None and time.perf_counter() - start >= budget:
            stopped = f"time budget of {budget:.0f} s reached"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    out = {"loss_per_epoch": history, "steps": len(history) * steps_per_epoch, "steps_per_epoch": steps_per_epoch,
           "epochs_run": len(history), "max_epochs": cfg.epochs, "stopped": stopped,
           "step_budget": steps_allowed, "time_budget_s": None if budget is None else round(budget, 1),
           "train_seconds": round(time.perf_counter() - start, 2),
           "images": int(len(identities)), "identities": int(len(np.unique(identities))), "device": str(device)}
    if early:
        out.update({"validation_auc_per_epoch": curve, "validation_dprime_per_epoch": separation, "lr_drops": drops, "best_epoch": best_epoch,
                    "best_validation_auc": round(best, 5),
                    "validation_images": int(len(validation[1])),
                    "validation_identities": int(len(np.unique(validation[1])))})
    else:
        out["early_stopping"] = ("off (patience 0)" if cfg.patience <= 0 else
                                 "off: no identities could be set aside to validate on")
    return model, out


# ------------------------------------------------------------------ cache


WEIGHTS_FILE = "network.safetensors"
META_FILE = "network.json"
CACHE_PURPOSE = "re-identification network cache"


def save_network(folder: Path, model, meta: dict) -> None:
    """Write weights then metadata, each atomically; the metadata file marks a complete entry."""
    from safetensors.torch import save_file

    from synthgate.fsutil import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".network.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, folder / WEIGHTS_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    atomic_write_json(folder / META_FILE, meta)
    from synthgate.cache import seal_folder

    seal_folder(folder, CACHE_PURPOSE)


def load_network(folder: Path | None, cfg: NetworkConfig, device):
    """``(model, meta)`` from a complete, authenticated cache entry for ``cfg``, else ``None`` (retrain).

    An entry whose files were changed after this installation wrote them (a
    network swapped for one that never matches anyone would make the check
    pass) does not verify and is retrained.
    """
    if folder is None or not (folder / META_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        return None
    from safetensors.torch import load_file

    from synthgate.cache import folder_is_sealed

    if not folder_is_sealed(folder, CACHE_PURPOSE):
        return None

    try:
        meta = json.loads((folder / META_FILE).read_text())
        same = {k: v for k, v in cfg.to_dict().items() if k != "backbone_weights"}  # the file may have moved
        if {k: v for k, v in meta.get("config", {}).items() if k != "backbone_weights"} != same:
            return None
        model = build_network(replace(cfg, backbone_weights=None))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
    except (OSError, ValueError, RuntimeError, KeyError):
        return None
    return model.to(device).eval(), meta
