"""``train``: a training set and a config in, a model directory out.

This is the screenful that wires the pieces: open and check the set
(:mod:`generators.data`), build the networks (:mod:`generators.nets`), take
steps (:class:`generators.train.Trainer`), checkpoint and resume
(:mod:`generators.checkpoint`), and save (:mod:`generators.export`).

What every trainer shares around its steps is public here, for
:mod:`generators.text2image.train` too: a :class:`TrainingRun` (the
accelerator, the checkpoint folder and the settings a checkpoint must match;
resuming, the step loop, finishing), the space the denoiser works in
(:func:`model_space`) and the model's ``synthgate.json`` (:func:`model_info`).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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


@dataclass(frozen=True)
class TrainingRun:
    """One training run's surroundings: where it writes, what runs it, what its checkpoints must match.

    Attributes
    ----------
    out
        The model directory it will write.
    checkpoints
        The folder of its checkpoints (default ``OUT-checkpoints``).
    accelerator, precision
        The ``accelerate.Accelerator`` and the mixed precision actually used
        (see :func:`accelerator_for`).
    settings
        What its checkpoints record as the config and a resume must match:
        ``config.to_dict()``, plus whatever else decides what is learned
        (text-to-image fine-tuning adds its ``text`` settings).
    """

    out: Path
    checkpoints: Path
    accelerator: Any
    precision: str
    settings: dict

    @classmethod
    def start(cls, out: str | Path, config: TrainConfig, *, device: str = "auto",
              checkpoint_dir: str | Path | None = None, settings: dict | None = None) -> "TrainingRun":
        """The accelerator on ``device`` and the checkpoint folder of a run writing ``out``."""
        out = Path(out)
        folder = Path(checkpoint_dir) if checkpoint_dir else checkpoint.default_folder(out)
        accelerator, precision = accelerator_for(config, device)
        return cls(out, folder, accelerator, precision, config.to_dict() if settings is None else settings)

    @property
    def main(self) -> bool:
        """Whether this is the process that logs and writes files."""
        return self.accelerator.is_main_process

    def resume_state(self, training_sha256: str, resume: bool, log: Callable[[str], None] | None):
        """``(state, step)`` of the newest checkpoint when resuming (checked against the settings and set), else ``(None, None)``."""
        if not resume:
            return None, None
        log = log if self.main else None
        found = checkpoint.list_checkpoints(self.checkpoints)
        if not found:
            if log:
                log(f"no checkpoint in {self.checkpoints}; starting from step 0")
            return None, None
        state = checkpoint.load(found[-1], self.settings, training_sha256)
        if log:
            log(f"resuming from {found[-1]} (step {state['step']})")
        return state, int(state["step"])

    def save_checkpoint(self, step: int, training_sha256: str, state: dict) -> None:
        """Write ``state`` as the checkpoint of ``step`` (main process only; gather ``state`` on every one first)."""
        if self.main:
            checkpoint.save(self.checkpoints, step, {"config": self.settings, "training_sha256": training_sha256,
                                                     **state})

    def loop(self, trainer, config: TrainConfig, next_batch: Callable, save_checkpoint: Callable, *,
             progress: bool | None, log: Callable[[str], None] | None, log_every: int | None) -> float:
        """Step ``trainer`` to ``config.steps`` with progress, log lines and checkpoints; returns the seconds taken.

        ``next_batch()`` gives ``(x0, conditioning)`` for the next step; ``save_checkpoint(step)`` runs on
        every process (it may gather) and saves on the main one.
        """
        from synthgate.progress import Progress

        main, accelerator = self.main, self.accelerator
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

    def finish(self, trainer, config: TrainConfig, *, keep_checkpoints: bool, start: int, resumed_from: int | None,
               seconds: float, info: dict) -> TrainResult:
        """After the model is saved: drop the checkpoints (unless kept), wait for every process, sum up the run."""
        if self.main and not keep_checkpoints and self.checkpoints.is_dir():
            # only our own step-*.pt files, then the folder if nothing else is left in it: a --checkpoint-dir naming
            # the training set (or any folder) was once deleted whole (red team)
            for f in checkpoint.list_checkpoints(self.checkpoints):
                f.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.checkpoints.rmdir()
        self.accelerator.wait_for_everyone()
        last = trainer.history[-1] if trainer.history else {}
        return TrainResult(self.out, config.steps, config.steps - start, resumed_from, float(last.get("loss", np.nan)),
                           trainer.epsilon(), seconds, tuple(trainer.history), info)


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

    refuse_existing(out, overwrite)
    if config.vae is not None:
        from .nets import vae_folder

        vae_folder(config.vae)  # a mistyped --vae fails now, not after decoding the whole set
    run = TrainingRun.start(out, config, device=device, checkpoint_dir=checkpoint_dir)
    training = open_training_set(real, config.resolution, _conditioning_mode(config), skip_unreadable=skip_unreadable,
                                 progress=progress if run.main else False, condition_columns=config.condition_columns)
    vae, space, fetch = model_space(training, config, run.accelerator.device)
    digest = training.images.digest
    state, resumed_from = run.resume_state(digest, resume, log)

    from .nets import build_denoiser, build_scheduler
    from .train import Trainer

    with torch.random.fork_rng(devices=[]):  # the initial weights follow from the seed, global RNG untouched
        torch.manual_seed(seeds.derive_seed(config.seed, "init"))
        unet = build_denoiser(config, space.channels, space.size,
                              None if training.classes is None else len(training.classes), training.attributes)
    noise_scheduler = build_scheduler(config, space.latent)
    trainer = Trainer(config, unet, noise_scheduler, len(training), accelerator=run.accelerator, state=state)
    targets = None if training.targets is None else torch.as_tensor(training.targets)
    device = run.accelerator.device

    def next_batch():
        idx = trainer.next_indices()
        x0 = torch.as_tensor(fetch(idx), device=device)
        labels = None if targets is None else targets[torch.as_tensor(idx, dtype=torch.long)].to(device)
        return x0, labels

    def save_checkpoint(done: int) -> None:
        run.save_checkpoint(done, digest, trainer.state_dict())  # state_dict on every process: it gathers

    start = trainer.step_count
    seconds = run.loop(trainer, config, next_batch, save_checkpoint, progress=progress, log=log, log_every=log_every)

    info = model_info(config, training, space, trainer, run, resumed_from, seconds, vae)
    if run.main:
        from .export import save_model

        save_model(run.out, trainer.final_unet(), noise_scheduler, vae, info, overwrite=overwrite)
    return run.finish(trainer, config, keep_checkpoints=keep_checkpoints, start=start, resumed_from=resumed_from,
                      seconds=seconds, info=info)


def refuse_existing(out: str | Path, overwrite: bool) -> None:
    """Refuse to train into an existing model folder unless ``overwrite``."""
    if Path(out).exists() and not overwrite:
        raise UsageError("already exists; choose a new model folder or pass --overwrite", Path(out))


def accelerator_for(config: TrainConfig, device: str):
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


def model_space(training: TrainingSet, config: TrainConfig, device):
    """The VAE (or ``None``), the denoiser's space, and ``fetch(indices) -> array`` in that space."""
    from .denoisers import get_denoiser
    from .nets import Space, encode, latent_space, load_vae

    pixels = PixelSource(training)
    if config.vae is None:
        return None, Space(training.geometry.channels, config.resolution, False), pixels
    vae = load_vae(config.vae, device)
    space = latent_space(vae, training.geometry.channels, config.resolution)
    get_denoiser(config.architecture).check_size(config, space.size, "latent size")  # before encoding the set
    # The VAE is frozen and public: encode once, train on the latent means.
    chunks = [encode(vae, pixels(idx), space.scaling_factor)
              for idx in np.array_split(np.arange(len(pixels)), max(1, len(pixels) // 256))]
    latents = np.concatenate(chunks)
    return vae, space, lambda idx: latents[np.asarray(idx, dtype=np.int64)]


def model_info(config: TrainConfig, training: TrainingSet, space, trainer, run: TrainingRun, resumed_from,
               seconds: float, vae) -> dict:
    """``synthgate.json`` (DESIGN.md's model-directory contract)."""
    from synthgate.provenance import versions

    from .nets import denoiser_info

    dp = None
    if trainer.private is not None:
        dp = trainer.private.describe()
        dp["epsilon_history"] = [[h["step"], h["epsilon"]] for h in trainer.history if "epsilon" in h]
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
            "history": list(trainer.history), "device": str(run.accelerator.device),
            "processes": run.accelerator.num_processes, "mixed_precision": run.precision,
            "resumed_from": resumed_from, "seconds_this_run": round(seconds, 3),
        },
        "config": config.to_dict(),
        "versions": versions(*(("opacus",) if dp else ())),
    }


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


__all__ = ["TrainResult", "TrainingRun", "train", "refuse_existing", "accelerator_for", "model_space", "model_info"]
