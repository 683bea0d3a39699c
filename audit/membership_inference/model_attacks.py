"""Scenario 2 (the model is released): attacks that query the diffusion model.

Every score is oriented so that higher means "more likely a member".  The
functions work on any object with the :class:`generators.model.DiffusionModel`
interface (``predict_eps``, ``alphas_cumprod``, ``device``), so they are tested
on hand-made inputs and hand-made models.

- :class:`LossAttack` -- Carlini et al. 2023's loss threshold at chosen
  timesteps, averaged over noise draws, every (image, timestep, draw) row of
  a chunk in one batched forward pass;
- :class:`PiaAttack` -- PIA (Kong et al. 2024): the model's own epsilon at
  t = 0 builds a deterministic x_t; the score is ``-sum |eps_0 - eps_t|^p``;
- :class:`SecmiAttack` -- SecMI (Duan et al. 2023): the error of a
  deterministic DDIM round trip at ``t_sec`` after DDIM inversion to it;
- :class:`SimaAttack` -- SimA (Rao et al. 2025): the norm of the model's
  noise prediction on the *clean* image; the score points toward the
  training images near it, so it is small at (memorised) members -- one
  query per timestep;
- :class:`PfamiAttack` -- PFAMI (Fu et al. 2024), probabilistic fluctuation:
  how much the loss rises when the image is moved a little (centre crops
  resized back; the paper's strengths run 0.95 ... 0.7, the default here
  0.95 ... 0.8).  A memorised image sits in a local
  minimum of the loss and its neighbours do not; an image that is merely
  easy to denoise stays easy when cropped, so the image's own difficulty
  cancels (the attack calibrates itself).  The image and its neighbours
  share every noise draw, so the difference carries no noise of its own;
- :class:`MirrorAttack` -- the same fluctuation with the image's mirror
  images as neighbours (the noise mirrored too): for a model that learnt
  the population rather than the images, a mirror image is exactly as easy
  to denoise, so the difference isolates memorisation (unless the trainer
  used flips as augmentation: then the mirrors were trained on as well and
  the attack is weak, which the selection half sees).

PIA and SecMI also run reversed (``*_rev``): on small overfit models their
statistic separates members the other way round (measured on this project's
control models), and an attacker who calibrates on a shadow model would use
whichever direction works.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np

from .registry import MembershipAttack


def auto_batch_rows(device, values_per_row: int) -> int:
    """Rows per forward pass: large batches on a GPU; on a CPU about 64k input values per pass.

    Measured with ``bench/mia.py`` on 2 shared cores: at 32x32 rows of 64
    beat one pass per (image, timestep) by 2x, while 256 rows of 64x64
    images ran 1.8x *slower* than that naive loop (activations fall out of
    cache); a CPU convolution is compute-bound, so beyond the per-call
    overhead batching gains nothing there.
    """
    if getattr(device, "type", str(device)) == "cuda":
        return 256
    return max(1, 65536 // max(int(values_per_row), 1))


def _coef(model, t):
    a = model.alphas_cumprod[t].view(-1, *([1] * 3)).float()
    return a.sqrt(), (1.0 - a).sqrt()


def _labels(class_labels, rows):
    return None if class_labels is None else class_labels[rows]


def loss_scores(model, x0, class_labels, timesteps: Sequence[int], draws: int, generator,
                batch_rows: int = 256) -> np.ndarray:
    """Loss-threshold attack (Carlini et al. 2023, Sec. 5.2): ``-E_eps ||eps - eps_theta(x_t, t)||^2``.

    Parameters
    ----------
    model
        A :class:`~generators.model.DiffusionModel`.
    x0
        ``(N, C, H, W)`` images already in model space (``model.to_model_space``).
    class_labels
        ``(N,)`` class indices on the model's device, or ``None``.
    timesteps, draws
        Every image is noised at each timestep with ``draws`` noise draws;
        the per-pixel mean squared error is averaged over the draws.
    generator
        CPU ``torch.Generator`` for the noise (the same numbers on any device).
    batch_rows
        (image, timestep, draw) rows per forward pass: all rows of a chunk
        go through the network together instead of one pass per timestep.

    Returns
    -------
    ``(N, len(timesteps))`` scores, higher = more likely a member.
    """
    import torch

    n, n_t = x0.shape[0], len(timesteps)
    per_image = n_t * draws
    img = torch.arange(n, device=x0.device).repeat_interleave(per_image)
    tt = torch.as_tensor(list(timesteps), device=x0.device).repeat_interleave(draws).repeat(n)
    losses = torch.empty(n * per_image, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(img), batch_rows):
            rows, t = img[s:s + batch_rows], tt[s:s + batch_rows]
            x = x0[rows]
            eps = torch.randn(x.shape, generator=generator).to(x.device)
            a, b = _coef(model, t)
            pred = model.predict_eps(a * x + b * eps, t, _labels(class_labels, rows))
            losses[s:s + batch_rows] = (pred.float() - eps).square().flatten(1).mean(1).double().cpu()
    return -losses.view(n, n_t, draws).mean(2).numpy()


def pia_scores(model, x0, class_labels, timesteps: Sequence[int], p: float = 4.0,
               batch_rows: int = 256) -> np.ndarray:
    """PIA (Kong et al., ICLR 2024): ``-sum_i |eps_0,i - eps_theta(x_t, t)_i|^p``.

    ``eps_0 = eps_theta(x_0, 0)`` (the model queried on the clean image at
    timestep 0) is the proximal initialisation: ``x_t = sqrt(abar_t) x_0 +
    sqrt(1 - abar_t) eps_0`` deterministically.  As in the official code the
    p-th powers are summed without a root (monotone in the l_p norm) and
    ``p = 4`` by default.  Cost: one query for ``eps_0`` plus one per
    timestep, the timestep queries of a chunk batched together.

    Returns ``(N, len(timesteps))`` scores, higher = more likely a member in
    the paper's direction.
    """
    import torch

    n, n_t = x0.shape[0], len(timesteps)
    eps0 = torch.empty_like(x0)
    out = torch.empty(n * n_t, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, n, batch_rows):
            rows = torch.arange(s, min(s + batch_rows, n), device=x0.device)
            zero = torch.zeros(len(rows), dtype=torch.long, device=x0.device)
            eps0[rows] = model.predict_eps(x0[rows], zero, _labels(class_labels, rows)).to(x0.dtype)
        img = torch.arange(n, device=x0.device).repeat_interleave(n_t)
        tt = torch.as_tensor(list(timesteps), device=x0.device).repeat(n)
        for s in range(0, len(img), batch_rows):
            rows, t = img[s:s + batch_rows], tt[s:s + batch_rows]
            a, b = _coef(model, t)
            e0 = eps0[rows]
            et = model.predict_eps(a * x0[rows] + b * e0, t, _labels(class_labels, rows))
            out[s:s + batch_rows] = (e0 - et.float()).abs().pow(p).flatten(1).sum(1).double().cpu()
    return -out.view(n, n_t).numpy()


def ddim_step(model, x, t_from: int, t_to: int, class_labels=None):
    """One deterministic DDIM step from ``t_from`` to ``t_to`` (either direction), as SecMI defines it."""
    import torch

    t = torch.full((x.shape[0],), int(t_from), dtype=torch.long, device=x.device)
    eps = model.predict_eps(x, t, class_labels).float()
    abar = model.alphas_cumprod
    a_from, a_to = abar[int(t_from)].float(), abar[int(t_to)].float()
    x0_hat = (x - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0_hat + (1.0 - a_to).sqrt() * eps


def secmi_scores(model, x0, class_labels, t_sec: int = 100, k: int = 10, batch_rows: int = 256) -> np.ndarray:
    """SecMI_stat (Duan et al., ICML 2023): ``-||x~_{t-k} - x^_{t-k}||^2`` at ``t = t_sec``.

    Deterministic DDIM inversion from ``x_0`` through ``k, 2k, ..., t_sec - k``
    gives ``x~``; one step forward to ``t_sec`` and one back gives ``x^``.
    The squared error of that round trip (summed over pixels, as the
    official code) is lower for members.  Cost: ``t_sec / k + 1`` queries per
    image, sequential in t, batched over images.

    Returns ``(N,)`` scores, higher = more likely a member in the paper's
    direction.
    """
    import torch

    n = x0.shape[0]
    out = torch.empty(n, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, n, batch_rows):
            rows = torch.arange(s, min(s + batch_rows, n), device=x0.device)
            labels = _labels(class_labels, rows)
            x = x0[rows]
            for t in range(0, t_sec - k, k):
                x = ddim_step(model, x, t, t + k, labels)
            back = ddim_step(model, ddim_step(model, x, t_sec - k, t_sec, labels), t_sec, t_sec - k, labels)
            out[s:s + len(rows)] = (x - back).square().flatten(1).sum(1).double().cpu()
    return -out.numpy()


def sima_scores(model, x0, class_labels, timesteps: Sequence[int], p: float = 4.0,
                batch_rows: int = 256) -> np.ndarray:
    """SimA (Rao, Qu and Moyer 2025): ``-sum_i |eps_theta(x_0, t)_i|^p`` on the clean image.

    The model is queried on ``x_0`` itself at timestep ``t`` (no noise
    added): the expected denoiser output points to a kernel-weighted mean
    of the training images near ``x_0`` (bandwidth set by ``t``), so its
    norm is small where ``x_0`` is (close to) a training image.  As in the
    authors' code the p-th powers are summed (``p = 4``).  One query per
    timestep, batched over (image, timestep) rows.

    Returns ``(N, len(timesteps))`` scores, higher = more likely a member.
    """
    import torch

    n, n_t = x0.shape[0], len(timesteps)
    img = torch.arange(n, device=x0.device).repeat_interleave(n_t)
    tt = torch.as_tensor(list(timesteps), device=x0.device).repeat(n)
    out = torch.empty(n * n_t, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, len(img), batch_rows):
            rows, t = img[s:s + batch_rows], tt[s:s + batch_rows]
            eps = model.predict_eps(x0[rows], t, _labels(class_labels, rows))
            out[s:s + batch_rows] = eps.float().abs().pow(p).flatten(1).sum(1).double().cpu()
    return -out.view(n, n_t).numpy()


def centre_crop_resize(x, strength: float):
    """The centre ``strength`` of every image (side rounded to whole pixels), resized back bilinearly."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * strength)), max(1, round(w * strength))
    top, left = (h - ch) // 2, (w - cw) // 2
    return F.interpolate(x[..., top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)


MIRRORS = ("flip_h", "flip_v", "rot180")


def mirror(x, kind: str):
    """``x`` flipped left-right (``flip_h``), upside down (``flip_v``) or both (``rot180``)."""
    dims = {"flip_h": (-1,), "flip_v": (-2,), "rot180": (-2, -1)}[kind]
    return x.flip(dims)


def crop_neighbours(strengths: Sequence[float]) -> list:
    """PFAMI's neighbours: centre crops resized back; the noise is not moved (a resampled noise is not N(0, I))."""
    return [(lambda x, s=float(s): centre_crop_resize(x, s), None) for s in strengths]


def mirror_neighbours(kinds: Sequence[str] = MIRRORS) -> list:
    """Mirror images as neighbours, the noise mirrored with them: the same image content and difficulty."""
    return [((lambda x, k=k: mirror(x, k)),) * 2 for k in kinds]


def fluctuation_scores(model, x0, class_labels, timesteps: Sequence[int], neighbours: list, draws: int,
                       generator, batch_rows: int = 256) -> np.ndarray:
    """Probabilistic fluctuation (PFAMI, Fu et al. 2024), loss form: ``mean_k L(T_k x, t) - L(x, t)``.

    ``L`` is the denoising loss of :func:`loss_scores` (``-log p`` up to
    constants, as in PFAMI's diffusion variant); ``neighbours`` are pairs
    ``(T_image, T_noise)``: the k-th neighbour is ``T_image(x)`` noised with
    ``T_noise(eps)`` (``None``: the same ``eps``).  For every (image,
    timestep, draw) one noise tensor is drawn and used for the image *and*
    all its neighbours (common random numbers), so the difference measures
    the image, not the noise.  Cost: ``(1 + len(neighbours)) *
    len(timesteps) * draws`` queries per image.

    Returns ``(N, len(timesteps))`` scores, higher = more likely a member.
    """
    import torch

    n, n_t, n_v = x0.shape[0], len(timesteps), 1 + len(neighbours)
    flat = torch.stack([x0] + [f(x0) for f, _ in neighbours], 1).reshape(n * n_v, *x0.shape[1:])
    img = torch.arange(n, device=x0.device).repeat_interleave(n_v)
    weight = torch.tensor([-1.0] + [1.0 / (n_v - 1)] * (n_v - 1), dtype=torch.float64).repeat(n)
    diff = torch.zeros(n, n_t, dtype=torch.float64)
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            a, b = _coef(model, torch.full((1,), int(t), device=x0.device))
            for _ in range(draws):
                eps = torch.randn(x0.shape, generator=generator).to(x0.device)
                # (image, variant) rows in the order of ``flat``: each variant's own view of the image's noise
                noise = torch.stack([eps] + [eps if g is None else g(eps) for _, g in neighbours], 1)
                noise = noise.reshape(n * n_v, *x0.shape[1:])
                loss = torch.empty(n * n_v, dtype=torch.float64)
                for s in range(0, n * n_v, batch_rows):
                    rows = slice(s, s + batch_rows)
                    e = noise[rows]
                    tt = torch.full((len(e),), int(t), device=x0.device)
                    pred = model.predict_eps(a * flat[rows] + b * e, tt, _labels(class_labels, img[rows]))
                    loss[rows] = (pred.float() - e).square().flatten(1).mean(1).double().cpu()
                diff[:, j] += (loss * weight).view(n, n_v).sum(1) / draws
    return diff.numpy()


def pfami_scores(model, x0, class_labels, timesteps: Sequence[int], strengths: Sequence[float], draws: int,
                 generator, batch_rows: int = 256) -> np.ndarray:
    """PFAMI with its own perturbation: centre crops of strength ``strengths`` (e.g. 0.95 ... 0.7) resized back."""
    return fluctuation_scores(model, x0, class_labels, timesteps, crop_neighbours(strengths), draws, generator,
                              batch_rows)


# ------------------------------------------------------------------ registered attacks


class ModelAttack(MembershipAttack):
    """An attack that queries the model: ``batch_scores`` on a batch of images in model space."""

    scenario: ClassVar[int] = 2
    needs: ClassVar[tuple[str, ...]] = ("model", "holdout")

    #: the settings key its timesteps come from (named when one is outside the model's schedule)
    timestep_setting: ClassVar[str] = ""

    def timesteps(self) -> list[int]:
        """Timesteps the attack queries (checked against the model's schedule before any work): the value of its
        ``timestep_setting``, a list or one timestep."""
        if not self.timestep_setting:
            return []
        value = getattr(self.settings, self.timestep_setting)
        return [int(t) for t in value] if isinstance(value, (list, tuple)) else [int(value)]

    def passes_per_image(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self) -> dict:
        return {"forward_passes_per_image": self.passes_per_image()}

    def batch_scores(self, model, x0, class_labels, generator, rows: int) -> dict[str, np.ndarray]:
        raise NotImplementedError  # pragma: no cover - abstract


class LossAttack(ModelAttack):
    name = "loss"
    timestep_setting = "timesteps"
    reference = "Carlini et al. 2023, Extracting Training Data from Diffusion Models: loss threshold"

    def passes_per_image(self):
        return len(self.settings.timesteps) * self.settings.noise_draws

    def batch_scores(self, model, x0, class_labels, generator, rows):
        ts = self.timesteps()
        sc = loss_scores(model, x0, class_labels, ts, self.settings.noise_draws, generator, rows)
        return {f"loss_t{t}": sc[:, j] for j, t in enumerate(ts)}


class PiaAttack(ModelAttack):
    name = "pia"
    timestep_setting = "pia_timesteps"
    reference = "Kong et al. 2024, PIA: proximal initialization (ICLR)"

    def passes_per_image(self):
        return 1 + len(self.settings.pia_timesteps)

    def batch_scores(self, model, x0, class_labels, generator, rows):
        ts = self.timesteps()
        sc = pia_scores(model, x0, class_labels, ts, self.settings.pia_p, rows)
        out = {}
        for j, t in enumerate(ts):
            out[f"pia_t{t}"], out[f"pia_t{t}_rev"] = sc[:, j], -sc[:, j]
        return out


class SecmiAttack(ModelAttack):
    name = "secmi"
    timestep_setting = "secmi_t"
    reference = "Duan et al. 2023, SecMI: step-wise posterior estimation error (ICML)"

    def passes_per_image(self):
        return self.settings.secmi_t // self.settings.secmi_k + 1

    def batch_scores(self, model, x0, class_labels, generator, rows):
        t = self.settings.secmi_t
        sc = secmi_scores(model, x0, class_labels, t, self.settings.secmi_k, rows)
        return {f"secmi_t{t}": sc, f"secmi_t{t}_rev": -sc}


class SimaAttack(ModelAttack):
    name = "sima"
    timestep_setting = "sima_timesteps"
    reference = "Rao, Qu and Moyer 2025, Score-based Membership Inference on Diffusion Models (SimA)"

    def passes_per_image(self):
        return len(self.settings.sima_timesteps)

    def batch_scores(self, model, x0, class_labels, generator, rows):
        ts = self.timesteps()
        sc = sima_scores(model, x0, class_labels, ts, self.settings.sima_p, rows)
        return {f"sima_t{t}": sc[:, j] for j, t in enumerate(ts)}


class PfamiAttack(ModelAttack):
    name = "pfami"
    timestep_setting = "pfami_timesteps"
    reference = ("Fu et al. 2024, Probabilistic Fluctuation based Membership Inference Attack for Diffusion Models "
                 "(PFAMI)")

    def passes_per_image(self):
        s = self.settings
        return (1 + len(s.pfami_strengths)) * len(s.pfami_timesteps) * s.pfami_draws

    def batch_scores(self, model, x0, class_labels, generator, rows):
        s, ts = self.settings, self.timesteps()
        sc = pfami_scores(model, x0, class_labels, ts, s.pfami_strengths, s.pfami_draws, generator, rows)
        return {f"pfami_t{t}": sc[:, j] for j, t in enumerate(ts)}


class MirrorAttack(ModelAttack):
    name = "mirror"
    timestep_setting = "mirror_timesteps"
    reference = ("PFAMI's probabilistic fluctuation (Fu et al. 2024) with mirror images as the neighbours "
                 "(synthgate): the same content and difficulty, never trained on unless the trainer flipped")

    def passes_per_image(self):
        s = self.settings
        return (1 + len(MIRRORS)) * len(s.mirror_timesteps) * s.pfami_draws

    def batch_scores(self, model, x0, class_labels, generator, rows):
        s, ts = self.settings, self.timesteps()
        sc = fluctuation_scores(model, x0, class_labels, ts, mirror_neighbours(), s.pfami_draws, generator, rows)
        return {f"mirror_t{t}": sc[:, j] for j, t in enumerate(ts)}
