"""Differentially private training: DP-SGD through opacus, with DPDM noise multiplicity.

The pieces, each small:

- :func:`check_compatible` refuses model parts opacus cannot train privately
  (BatchNorm and friends), naming them.
- :func:`contiguous_conv_inputs` works around an opacus defect that silently
  zeroes per-sample gradients (see its docstring).
- :func:`fold_noise_multiplicity` turns opacus' per-row gradients of a batch
  repeated K times into one gradient per example, before clipping.
- :class:`PrivateTraining` wires ``PrivacyEngine`` (Poisson sampling, the
  noise multiplier for the target epsilon, the accountant), runs one private
  step, and saves/restores the accountant for ``--resume``.

Notes
-----
Abadi et al. 2016 (DP-SGD); opacus (Yousefpour et al. 2021); noise
multiplicity from DPDM (Dockhorn et al. 2022): each example's loss is the
mean over K noise draws, and the gradient of that mean is what is clipped,
so the sensitivity and the privacy cost are those of K = 1 while the
gradient variance drops.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

from synthgate.errors import UsageError

from .config import DPConfig


def check_compatible(module) -> None:
    """Raise :class:`UsageError` naming every submodule opacus cannot train privately."""
    from opacus.validators import ModuleValidator

    bad = []
    for name, sub in module.named_modules():
        if next(sub.children(), None) is not None:
            continue  # leaves only: the validator walks children itself
        errors = ModuleValidator.validate(sub, strict=False)
        if errors:
            bad.append(f"{name or type(sub).__name__} ({type(sub).__name__}: {str(errors[0]).split('.')[0]})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise UsageError("differentially private training cannot handle " + "; ".join(bad[:3]) + more +
                         "; replace them (e.g. BatchNorm -> GroupNorm) or train without --dp-epsilon")


def contiguous_conv_inputs(module) -> list:
    """Make every Conv2d see a contiguous (NCHW) input; returns the hook handles.

    opacus' conv per-sample gradient (``opacus.utils.tensor_utils.unfold2d``)
    unfolds its input with ``as_strided`` assuming NCHW-contiguous memory.
    diffusers' attention blocks hand the next ResNet block a channels-last
    view, and for that conv opacus 1.6 returns per-sample gradients of zero
    without any error: the layer would be trained on noise alone.  A
    contiguous copy of the input gives the exact gradients (tested against
    per-example autograd).
    """
    import torch

    def hook(_module, args):
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    return [m.register_forward_pre_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def fold_noise_multiplicity(params, k: int) -> None:
    """Average opacus' per-row gradients over each example's ``k`` consecutive rows.

    The batch was repeated with ``repeat_interleave(k)``, so rows
    ``i*k .. i*k+k-1`` belong to example ``i``.  With opacus' ``"mean"``
    reduction each row's grad sample is the gradient of that row's own loss,
    so their mean is the gradient of the example's K-averaged loss -- one
    per-sample gradient per example, which is what gets clipped.
    """
    import torch

    if k == 1:
        return
    for p in params:
        g = p.grad_sample
        if isinstance(g, list):
            g = torch.cat(g, 0)
        p.grad_sample = g.reshape(g.shape[0] // k, k, *g.shape[1:]).mean(1)


class PrivateTraining:
    """opacus' engine, private optimizer and Poisson sampler for one run.

    Parameters
    ----------
    unet, optimizer
        The network and its (ordinary) optimizer; they are wrapped here.
    n_examples, batch_size, steps
        Poisson sampling rate ``q = 1 / ceil(n / batch_size)`` (opacus' rule),
        over ``steps`` steps.
    dp
        The budget and clipping bound.
    noise_multiplicity
        K (see :func:`fold_noise_multiplicity`).
    sample_generator, noise_generator
        Sources of the Poisson sampling and of the Gaussian noise (their
        states go into checkpoints).
    noise_multiplier
        Given when resuming (the sigma chosen by the first run); otherwise it
        is chosen for the target epsilon.
    """

    def __init__(self, unet, optimizer, *, n_examples: int, batch_size: int, steps: int, dp: DPConfig,
                 noise_multiplicity: int, sample_generator, noise_generator, noise_multiplier: float | None = None):
        import torch
        from opacus import PrivacyEngine

        check_compatible(unet)
        self.dp = dp
        self.k = noise_multiplicity
        self._hooks = contiguous_conv_inputs(unet)
        index_loader = torch.utils.data.DataLoader(_Indices(n_examples), batch_size=batch_size)
        self.sample_rate = 1.0 / len(index_loader)
        with warnings.catch_warnings():
            # secure_rng is recorded in synthgate.json; RDP's "optimal order is the largest alpha" is a
            # looser but still valid bound
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            self.engine = PrivacyEngine(accountant=dp.accountant)
            common = dict(module=unet, optimizer=optimizer, data_loader=index_loader, max_grad_norm=dp.max_grad_norm,
                          poisson_sampling=True, grad_sample_mode="hooks", noise_generator=noise_generator)
            try:
                if noise_multiplier is None:
                    # opacus derives the step count as int(epochs / q); the half step keeps it exact
                    self.module, self.optimizer, self.loader = self.engine.make_private_with_epsilon(
                        target_epsilon=dp.epsilon, target_delta=dp.delta, epochs=(steps + 0.5) * self.sample_rate,
                        **common)
                else:  # resuming: the sigma of the first run (make_private_with_epsilon ignores prior spend)
                    self.module, self.optimizer, self.loader = self.engine.make_private(
                        noise_multiplier=noise_multiplier, **common)
            except ValueError as exc:
                if "budget is too low" not in str(exc):
                    raise
                raise UsageError(f"--dp-epsilon {dp.epsilon} cannot be reached in {steps} steps at sampling rate "
                                 f"{self.sample_rate:.3g} (the noise needed is beyond opacus' limit); "
                                 "allow a larger epsilon, fewer steps or a smaller batch") from exc
        self.noise_multiplier = float(self.optimizer.noise_multiplier)
        self.loader.batch_sampler.generator = sample_generator
        self.expected_batch_size = self.optimizer.expected_batch_size
        self._batches = None

    # ----------------------------------------------------------- sampling

    def next_indices(self):
        """The next Poisson batch (each example in independently with probability q; may be empty)."""
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                return next(self._batches)[0]
            except StopIteration:
                self._batches = None

    # --------------------------------------------------------------- step

    def step(self, per_example_loss: Callable, x0, labels) -> float:
        """Clip, accumulate, noise and apply one private update; returns the mean loss.

        ``per_example_loss(module, x0, labels)`` returns one loss per
        example, each already averaged over its K noise draws (rows of a
        ``repeat_interleave(K)`` batch).  Physical chunks (``dp.physical_batch_size``)
        accumulate clipped gradients; noise is added once, on the last.
        """
        import torch

        n = len(x0)
        if n == 0:  # Poisson sampling can draw nobody: the step still adds noise and is accounted
            for p in self.optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            self.optimizer.step()
            self.optimizer.zero_grad()
            return float("nan")
        size = self.dp.physical_batch_size or n
        starts = list(range(0, n, size))
        total = 0.0
        for i, start in enumerate(starts):
            xs = x0[start:start + size]
            ys = None if labels is None else labels[start:start + size]
            losses = per_example_loss(self.module, xs, ys)
            with warnings.catch_warnings():  # opacus' hooks fire on outputs: the inputs need no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.mean().backward()
            fold_noise_multiplicity(self.optimizer.params, self.k)
            self.optimizer.signal_skip_step(do_skip=i < len(starts) - 1)
            self.optimizer.step()
            self.optimizer.zero_grad()
            total += float(losses.detach().sum())
        return total / n

    # ---------------------------------------------------------- accounting

    def epsilon(self) -> float:
        """Epsilon spent so far at the configured delta (0 before the first step)."""
        if len(self.engine.accountant) == 0:
            return 0.0
        with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha": a looser, still valid bound
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(self.engine.accountant.get_epsilon(delta=self.dp.delta))

    def state_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "accountant": dict(self.engine.accountant.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        self.engine.accountant.load_state_dict(state["accountant"])

    def describe(self) -> dict:
        """The ``dp`` block of ``synthgate.json``."""
        return {
            "epsilon_target": self.dp.epsilon, "delta": self.dp.delta, "epsilon_spent": self.epsilon(),
            "accountant": self.dp.accountant, "max_grad_norm": self.dp.max_grad_norm,
            "noise_multiplier": self.noise_multiplier, "noise_multiplicity": self.k,
            "sample_rate": self.sample_rate, "expected_batch_size": self.expected_batch_size,
            "sampling": "poisson", "clipping": "flat, per example", "secure_rng": False,
            "history": [list(h) for h in self.engine.accountant.history],
            "library": "opacus",
        }

    def unwrap(self):
        """The plain network (hooks removed) for saving."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with contextlib.suppress(AttributeError):
            return self.module._module
        return self.module


class _Indices:
    """A dataset of example indices: the sampler picks indices, the trainer fetches the pixels."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import torch

        return (torch.tensor(i),)  # a tuple: opacus reads the sample structure from dataset[0]
