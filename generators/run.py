"""``train``: a training set and a config in, a model directory out.

This is the screenful that wires the pieces: open and check the set
(:mod:`generators.data`), build the networks (:mod:`generators.nets`), take
steps (:class:`generators.train.Trainer`), checkpoint and resume
(:mod:`generators.checkpoint`), and save (:mod:`generators.export`).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from synthgate.errors import UsageError

from . import checkpoint, seeds
from .config import TrainConfig
from .data import PixelSource, TrainingSet, open_training_set


@dataclass(frozen=True)
class TrainResult:
    """What a training run did (``info`` is the model's ``synthgate.json``)."""

    model: Path
    steps: int
    steps_run: int
    resumed_from: int | None
    final_loss: float
    epsilon_spent: float | None
    seconds: float
    history: tuple[dict, ...]
    info: dict = field(repr=False)


def train(real: str | Path, out: str | Path, config: TrainConfig, *, device: str = "auto",
          checkpoint_dir: str | Path | None = None, resume: bool = False, keep_checkpoints: bool = False,
          overwrite: bool = False, progress: bool | None = None, log: Callable[[str], None] | None = None,
          log_every: int | None = None, skip_unreadable: bool = False) -> TrainResult:
    """Train a diffusion model on the image set ``real`` and save it to ``out``.

    Parameters
    ----------
    real
        The training image set (a folder; see :mod:`generators.data` for the rules).
    out
        The model directory to write (refused if it exists, unless ``overwrite``).
    config
        The run's settings.
    device
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (under ``accelerate launch``
        each process gets its own GPU).
    checkpoint_dir, resume, keep_checkpoints
        Where checkpoints go (default ``OUT-checkpoints``); continue from the
        newest one there; keep them after the model is saved.
    log, log_every
        A callback for one-line progress reports, and how often (steps).
    """
    import torch

    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError("already exists; choose a new model folder or pass --overwrite", out)
    if config.vae is not None:
        from .nets import vae_folder

        vae_folder(config.vae)  # a mistyped --vae fails now, not after decoding the whole set
    folder = Path(checkpoint_dir) if checkpoint_dir else checkpoint.default_folder(out)
    accelerator, precision = _accelerator(config, device)
    main = accelerator.is_main_process
    training = open_training_set(real, config.resolution, _conditioning_mode(config), skip_unreadable=skip_unreadable,
                                 progress=progress if main else False, condition_columns=config.condition_columns)
    vae, space, fetch = _model_space(training, config, accelerator.device)
    state, resumed_from = _resume_state(folder, config, training, resume, log if main else None)

    from .nets import build_denoiser, build_scheduler
    from .train import Trainer

    with torch.random.fork_rng(devices=[]):  # the initial weights follow from the seed, global RNG untouched
        torch.manual_seed(seeds.derive_seed(config.seed, "init"))
        unet = build_denoiser(config, space.channels, space.size,
                              None if training.classes is None else len(training.classes), training.attributes)
    noise_scheduler = build_scheduler(config, space.latent)
    trainer = Trainer(config, unet, noise_scheduler, len(training), accelerator=accelerator, state=state)
    targets = None if training.targets is None else torch.as_tensor(training.targets)

    def next_batch():
        idx = trainer.next_indices()
        x0 = torch.as_tensor(fetch(idx), device=accelerator.device)
        labels = None if targets is None else targets[torch.as_tensor(idx, dtype=torch.long)].to(accelerator.device)
        return x0, labels

    def save_checkpoint(done: int) -> None:
        state = trainer.state_dict()  # on every process: it gathers each one's generator
        if main:
            checkpoint.save(folder, done, {"config": config.to_dict(), "training_sha256": training.images.digest,
                                           **state})

    start = trainer.step_count
    seconds = train_loop(trainer, config, accelerator, next_batch, save_checkpoint, progress=progress, log=log,
                         log_every=log_every)

    info = _info(config, training, space, trainer, precision, accelerator, resumed_from, seconds, vae)
    if main:
        from .export import save_model

        save_model(out, trainer.final_unet(), noise_scheduler, vae, info, overwrite=overwrite)
    return finish(out, trainer, config, accelerator, folder, keep_checkpoints, start, resumed_from, seconds, info)


def finish(out: Path, trainer, config: TrainConfig, accelerator, folder: Path, keep_checkpoints: bool, start: int,
           resumed_from, seconds: float, info: dict) -> TrainResult:
    """After the model is saved: drop the checkpoints (unless kept), wait for every process, sum up the run."""
    if accelerator.is_main_process and not keep_checkpoints and folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    last = trainer.history[-1] if trainer.history else {}
    return TrainResult(out, config.steps, config.steps - start, resumed_from, float(last.get("loss", np.nan)),
                       trainer.epsilon(), seconds, tuple(trainer.history), info)


def train_loop(trainer, config: TrainConfig, accelerator, next_batch: Callable, save_checkpoint: Callable, *,
               progress: bool | None, log: Callable[[str], None] | None, log_every: int | None) -> float:
    """Step ``trainer`` to ``config.steps`` with progress, log lines and checkpoints; returns the seconds taken.

    ``next_batch()`` gives ``(x0, conditioning)`` for the next step; ``save_checkpoint(step)`` runs on
    every process (it may gather) and saves on the main one.
    """
    from synthgate.progress import Progress

    main = accelerator.is_main_process
    log_every = log_every or max(1, config.steps // 50)
    start, began, window = trainer.step_count, time.perf_counter(), []
    with Progress(config.steps - start, desc="train", unit="step", enabled=progress if main else False) as bar:
        while trainer.step_count < config.steps:
            window.append(trainer.step(*next_batch()))
            done = trainer.step_count
            if done % log_every == 0 or done == config.steps:
                entry = trainer.record(window)
                window = []
                bar.update(0, **_postfix(entry))
                if log and main:
                    log(_log_line(entry, config.steps, (done - start) / (time.perf_counter() - began)))
            bar.update(1)
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
                save_checkpoint(done)
                accelerator.wait_for_everyone()
    return time.perf_counter() - began


def _accelerator(config: TrainConfig, device: str):
    """An ``accelerate.Accelerator`` on the chosen device, and the precision actually used."""
    import torch
    from accelerate import Accelerator

    from synthgate.device import resolve_device

    dev = resolve_device(device)
    precision = config.mixed_precision
    if config.dp is not None or dev.type != "cuda":
        precision = "no"  # opacus' per-sample gradients stay in fp32; CPU autocast buys nothing here
    elif precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "no"
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return Accelerator(cpu=dev.type == "cpu", mixed_precision=precision), precision


def _model_space(training: TrainingSet, config: TrainConfig, device):
    """The VAE (or ``None``), the denoiser's space, and ``fetch(indices) -> array`` in that space."""
    from .nets import Space, encode, latent_space, load_vae

    pixels = PixelSource(training)
    if config.vae is None:
        return None, Space(training.geometry.channels, config.resolution, False), pixels
    vae = load_vae(config.vae, device)
    space = latent_space(vae, training.geometry.channels, config.resolution)
    from .denoisers import get_denoiser

    get_denoiser(config.architecture).check_size(config, space.size, "latent size")  # before encoding the set
    # The VAE is frozen and public: encode once, train on the latent means.
    chunks = [encode(vae, pixels(idx), space.scaling_factor)
              for idx in np.array_split(np.arange(len(pixels)), max(1, len(pixels) // 256))]
    latents = np.concatenate(chunks)
    return vae, space, lambda idx: latents[np.asarray(idx, dtype=np.int64)]


def _resume_state(folder: Path, config: TrainConfig, training: TrainingSet, resume: bool, log):
    if not resume:
        return None, None
    found = checkpoint.list_checkpoints(folder)
    if not found:
        if log:
            log(f"no checkpoint in {folder}; starting from step 0")
        return None, None
    state = checkpoint.load(found[-1], config.to_dict(), training.images.digest)
    if log:
        log(f"resuming from {found[-1]} (step {state['step']})")
    return state, int(state["step"])


def _conditioning_mode(config: TrainConfig) -> str:
    """``config.conditioning``, except that ``auto`` means ``none`` for an architecture without classes."""
    from .denoisers import get_denoiser

    if config.conditioning == "auto" and get_denoiser(config.architecture).refuse_classes:
        return "none"
    return config.conditioning


def _conditioning(training: TrainingSet) -> dict:
    if training.attributes is not None:
        return {**training.attributes.to_dict(), "labels": None}
    if training.classes is None:
        return {"type": "none", "labels": None}
    return {"type": "class", "labels": list(training.classes)}


def _postfix(entry: dict) -> dict:
    out = {"loss": f"{entry['loss']:.4f}"}
    if "epsilon" in entry:
        out["eps"] = f"{entry['epsilon']:.2f}"
    return out


def _log_line(entry: dict, steps: int, rate: float) -> str:
    eps = f" epsilon {entry['epsilon']:.3f}" if "epsilon" in entry else ""
    return f"step {entry['step']}/{steps} loss {entry['loss']:.4f}{eps} {rate:.2f} steps/s"


def _info(config: TrainConfig, training: TrainingSet, space, trainer, precision: str, accelerator,
          resumed_from, seconds: float, vae) -> dict:
    """``synthgate.json`` (DESIGN.md's model-directory contract)."""
    from synthgate.provenance import versions

    dp = None
    if trainer.private is not None:
        dp = trainer.private.describe()
        dp["epsilon_history"] = [[h["step"], h["epsilon"]] for h in trainer.history if "epsilon" in h]
    from .nets import denoiser_info

    return {
        "kind": "latent" if space.latent else "pixel",
        "architecture": denoiser_info(config.architecture),
        "resolution": config.resolution,
        "image_channels": training.geometry.channels,
        "bit_depth": training.bit_depth,
        "conditioning": _conditioning(training),
        "prediction_type": config.prediction_type,
        "vae": None if vae is None else {
            "scaling_factor": space.scaling_factor, "source": str(Path(config.vae).resolve()),
            "latent_channels": space.channels, "latent_size": space.size, "in_channels": space.vae_in_channels},
        "training_set": training.describe(),
        "seed": config.seed,
        "steps": config.steps,
        "dp": dp,
        "training": {
            "history": list(trainer.history), "device": str(accelerator.device),
            "processes": accelerator.num_processes, "mixed_precision": precision,
            "resumed_from": resumed_from, "seconds_this_run": round(seconds, 3),
        },
        "config": config.to_dict(),
        "versions": versions(*(("opacus",) if dp else ())),
    }
