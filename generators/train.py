"""Train a denoising diffusion model on an image set.

:func:`diffusion_loss` is the DDPM objective (Ho et al. 2020) with K noise
draws per image; :class:`Trainer` holds one run's network, optimiser, EMA,
data sampler and, under DP, its privacy engine, and takes one step at a
time; :func:`train` wires them to a training set and a model directory
(see :mod:`generators.run`).  The same code runs on a laptop CPU and, through
``accelerate``, on one or many GPUs (``accelerate launch -m synthgate.cli
train ...``), in bf16 when the GPU has it.
"""
from __future__ import annotations

import math

import numpy as np

from synthgate.errors import UsageError

from . import seeds
from .config import TrainConfig


def diffusion_loss(unet, noise_scheduler, x0, labels, k: int, generator):
    """Per-example DDPM loss, each the mean over ``k`` independent (timestep, noise) draws.

    Rows are laid out with ``repeat_interleave(k)`` (example ``i`` owns rows
    ``i*k .. i*k+k-1``), the layout :func:`generators.dp.fold_noise_multiplicity`
    expects.  The target follows the scheduler's ``prediction_type``.

    Notes
    -----
    Ho et al. 2020 (DDPM, the simple loss: uniform timesteps, MSE to the
    noise); v-prediction from Salimans & Ho 2022; K draws per example from
    DPDM (Dockhorn et al. 2022, ``score_losses.py``: repeat, reshape to
    ``[B, K]``, mean over K).
    """
    import torch

    xk = x0.repeat_interleave(k, 0)
    yk = None if labels is None else labels.repeat_interleave(k, 0)
    noise = torch.randn(xk.shape, generator=generator, device=xk.device, dtype=xk.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(xk),), generator=generator,
                      device=xk.device)
    noisy = noise_scheduler.add_noise(xk, noise, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(xk, noise, t)
    else:  # "sample": predict x0
        target = xk
    out = unet(noisy, t, class_labels=yk).sample
    rows = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    return rows.view(-1, k).mean(1)


class EpochSampler:
    """Shuffled epochs of fixed-size batches (the non-private data order)."""

    def __init__(self, n: int, batch_size: int, generator):
        self.n, self.batch_size, self.generator = n, min(batch_size, n), generator
        self.perm, self.pos = None, 0

    def next_indices(self):
        import torch

        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
        out = self.perm[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return out

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], int(state["pos"])


class Trainer:
    """One run's trainable state, advanced by :meth:`step`.

    Parameters
    ----------
    config
        The run's settings.
    unet, noise_scheduler
        A fresh denoiser (from :func:`generators.nets.build_denoiser`) and its schedule.
    n_examples
        Size of the training set (for sampling).
    accelerator
        An ``accelerate.Accelerator`` (device, mixed precision, processes).
    state
        A checkpoint to continue from (see :meth:`state_dict`).
    """

    def __init__(self, config: TrainConfig, unet, noise_scheduler, n_examples: int, *, accelerator, state=None):
        import torch
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.config, self.noise_scheduler, self.accelerator = config, noise_scheduler, accelerator
        device, rank = accelerator.device, accelerator.process_index
        if config.batch_size < accelerator.num_processes:
            raise UsageError(f"batch size {config.batch_size} is smaller than the {accelerator.num_processes} "
                             "processes sharing it")
        self.unet = unet.to(device).train()
        if state is not None:
            self.unet.load_state_dict(state["unet"])
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        warmup = min(config.lr_warmup_steps, config.steps)
        name = "cosine" if config.lr_schedule == "cosine" else "constant_with_warmup" if warmup else "constant"
        self.lr_scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=warmup,
                                          num_training_steps=config.steps)
        self.ema = EMAModel(self.trainable(), decay=config.ema_decay) if config.ema_decay > 0 else None
        self.diffusion_generator = seeds.generator(seeds.derive_seed(config.seed, f"diffusion:{rank}"), device)
        self.history: list[dict] = []
        self.step_count = 0
        self.private = None
        if config.dp is not None:
            if accelerator.num_processes > 1:
                raise UsageError("differentially private training runs in one process; launch it without "
                                 "several processes (multi-GPU DP is not supported)")
            from .dp import PrivateTraining

            self.private = PrivateTraining(
                self.unet, self.optimizer, n_examples=n_examples, batch_size=config.batch_size, steps=config.steps,
                dp=config.dp, noise_multiplicity=config.noise_multiplicity,
                sample_generator=seeds.generator(seeds.secret_seed(config.seed, "dp:sampling")),
                noise_generator=seeds.generator(seeds.secret_seed(config.seed, "dp:noise"), device),
                noise_multiplier=None if state is None else state["private"]["noise_multiplier"])
            self.model = self.private.module
        else:
            self.sampler = EpochSampler(n_examples, config.batch_size,
                                        seeds.generator(seeds.derive_seed(config.seed, "data-order")))
            self.model, self.prepared_optimizer = accelerator.prepare(self.unet, self.optimizer)
        if state is not None:
            self._load(state)

    def trainable(self) -> list:
        """The parameters that train (all of them, except frozen base weights under LoRA): what the EMA follows."""
        return [p for p in self.unet.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ data

    def next_indices(self) -> np.ndarray:
        """This process's share of the next batch (a Poisson batch under DP)."""
        if self.private is not None:
            return self.private.next_indices().numpy()
        idx = self.sampler.next_indices().numpy()
        return idx[self.accelerator.process_index::self.accelerator.num_processes]

    # ------------------------------------------------------------------ step

    def _per_example_loss(self, module, x0, labels):
        return diffusion_loss(module, self.noise_scheduler, x0, labels, self.config.noise_multiplicity,
                              self.diffusion_generator)

    def step(self, x0, labels=None):
        """One optimisation step on ``x0`` (model space) and ``labels``; returns the detached mean loss."""
        import torch

        if self.private is not None:
            loss = torch.tensor(self.private.step(self._per_example_loss, x0, labels))
        else:
            with self.accelerator.autocast():
                loss = self._per_example_loss(self.model, x0, labels).mean()
            self.accelerator.backward(loss)
            if self.config.grad_clip:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.prepared_optimizer.step()
            self.prepared_optimizer.zero_grad(set_to_none=True)
            loss = loss.detach()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.trainable())
        self.step_count += 1
        return loss

    def epsilon(self) -> float | None:
        return None if self.private is None else self.private.epsilon()

    def record(self, losses: list) -> dict:
        """Append a history entry for the steps since the last one."""
        import torch

        values = torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in losses]).numpy()
        entry = {"step": self.step_count,
                 "loss": float(np.nanmean(values)) if np.isfinite(values).any() else math.nan,
                 "lr": float(self.lr_scheduler.get_last_lr()[0])}
        if self.private is not None:
            entry["epsilon"] = self.private.epsilon()
        self.history.append(entry)
        return entry

    # ----------------------------------------------------------- persistence

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly."""
        gens = [self.diffusion_generator.get_state()]
        if self.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            gens = gather_object(gens)
        state = {
            "unet": self.unet.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "diffusion_generators": gens, "history": list(self.history), "steps_done": self.step_count,
        }
        if self.private is not None:
            state["private"] = {**self.private.state_dict(),
                                "sample_generator": self.private.loader.batch_sampler.generator.get_state(),
                                "noise_generator": self.private.optimizer.generator.get_state()}
        else:
            state["sampler"] = self.sampler.state_dict()
        return state

    def _load(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if len(state["diffusion_generators"]) != self.accelerator.num_processes:
            raise UsageError(f"the checkpoint was made by {len(state['diffusion_generators'])} process(es); resume "
                             f"it with as many (now {self.accelerator.num_processes})")
        self.diffusion_generator.set_state(state["diffusion_generators"][self.accelerator.process_index])
        self.history = list(state["history"])
        self.step_count = int(state["steps_done"])
        if self.private is not None:
            self.private.load_state_dict(state["private"])
            self.private.loader.batch_sampler.generator.set_state(state["private"]["sample_generator"])
            self.private.optimizer.generator.set_state(state["private"]["noise_generator"])
        else:
            self.sampler.load_state_dict(state["sampler"])

    def final_unet(self):
        """The plain network carrying the weights to save (the EMA when enabled), in eval mode."""
        unet = self.private.unwrap() if self.private is not None else self.accelerator.unwrap_model(self.model)
        if self.ema is not None:
            self.ema.copy_to([p for p in unet.parameters() if p.requires_grad])
        return unet.eval()
