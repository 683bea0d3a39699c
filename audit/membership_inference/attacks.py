"""Membership-inference score functions.

Every function here returns *scores oriented so that higher means "more
likely a member"* (the paper's statistic negated where the paper says lower
means member), one score per image.  They work on arrays and on any object
with the :class:`generators.model.DiffusionModel` interface
(``predict_eps``, ``alphas_cumprod``, ``device``), so they are tested on
hand-made inputs and hand-made models.

Scenario 1 (only synthetic images are released):

- :func:`nearest_distance` -- distance to the closest synthetic record (DCR),
  in pixel space (the check uses :mod:`audit.tiled`'s exact search) or in a
  feature space (:class:`RandomConvFeatures`, or open_clip weights).
- :func:`density_ratio_scores` -- DOMIAS: ``log p_synthetic(x) - log
  p_reference(x)`` with Gaussian KDEs in a low-dimensional PCA space.

Scenario 2 (the model is released):

- :func:`loss_scores` -- Carlini et al. 2023's loss threshold at chosen
  timesteps, averaged over noise draws, every (image, timestep, draw) row of
  a chunk in one batched forward pass.
- :func:`pia_scores` -- PIA (Kong et al. 2024): the model's own epsilon at
  t = 0 builds a deterministic x_t; the score is ``-sum |eps_0 - eps_t|^p``.
- :func:`secmi_scores` -- SecMI (Duan et al. 2023): the error of a
  deterministic DDIM round trip at ``t_sec`` after DDIM inversion to it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


# ------------------------------------------------------------------ scenario 1


class RandomConvFeatures:
    """A fixed, randomly initialised convolutional feature map: an embedding that needs no weights.

    Three 3x3 convolutions (He-normal weights drawn from ``generator``), each
    followed by ReLU and 2x2 average pooling, on the image resized to
    ``size`` x ``size`` and scaled to [-1, 1]; the flattened output is
    L2-normalised.  Random convolutional features keep local structure
    (edges, texture, layout) and are invariant to pixel noise below their
    pooling scale, which is what a distance to the closest synthetic record
    needs beyond raw pixels.

    Parameters
    ----------
    channels
        Image channels (1 or 3).
    generator
        ``torch.Generator`` that fixes the weights (the audit seed).
    device
        Where the features are computed.
    size, widths
        Input side and output channels of each layer (output dimension
        ``widths[-1] * (size / 8) ** 2``).
    """

    def __init__(self, channels: int, generator, device="cpu", size: int = 32, widths: Sequence[int] = (32, 64, 64)):
        import torch

        self.size = int(size)
        self.device = torch.device(device)
        self.weights = []
        fan_in = channels
        for w in widths:
            weight = torch.randn((w, fan_in, 3, 3), generator=generator) * (2.0 / (fan_in * 9)) ** 0.5
            self.weights.append(weight.to(self.device))
            fan_in = w
        self.name = "random_conv"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """``(N, D)`` float32 L2-normalised features of ``(N, C, H, W)`` images in [0, 1]."""
        import torch
        import torch.nn.functional as F

        x = torch.as_tensor(batch, dtype=torch.float32, device=self.device)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        x = x * 2.0 - 1.0
        with torch.no_grad():
            for w in self.weights:
                x = F.avg_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2)
        return F.normalize(x.flatten(1), dim=1).cpu().numpy()


def nearest_distance(queries: np.ndarray, refs: np.ndarray, block: int = 1024) -> np.ndarray:
    """Euclidean distance from each query row to its nearest reference row (exact, in blocks)."""
    import torch

    q = torch.as_tensor(np.asarray(queries, np.float32))
    r = torch.as_tensor(np.asarray(refs, np.float32))
    if len(r) == 0:
        return np.full(len(q), np.inf)
    out = np.empty(len(q), np.float64)
    for s in range(0, len(q), block):
        d = torch.cdist(q[s:s + block].double(), r.double())
        out[s:s + block] = d.min(dim=1).values.numpy()
    return out


def nearest_rms(queries: np.ndarray, ref_batches, device="cpu", block: int = 256) -> np.ndarray:
    """RMS pixel distance from each query image to its nearest reference image (distance to closest record).

    ``queries`` is ``(Q, C, H, W)``; ``ref_batches`` yields ``(R, C, H, W)``
    chunks (a streamed image set).  Candidates are ranked by float32 products
    (``|b|^2 - 2ab``, one matrix product per chunk) and the winner's distance
    in each chunk is recomputed from the pixel difference in float64, so the
    returned distance is exact for the image it names and can exceed the true
    minimum only when float32 rounding reorders near-ties.  For a whole-image
    RMS this is far cheaper than a pruned search, whose pooled lower bound
    prunes little on noisy images.
    """
    import torch

    q = torch.as_tensor(np.asarray(queries, np.float32), device=device).flatten(1)
    best = torch.full((q.shape[0],), float("inf"), dtype=torch.float64, device=device)
    for batch in ref_batches:
        r = torch.as_tensor(np.asarray(batch, np.float32), device=device).flatten(1)
        rn = (r.double() ** 2).sum(1).float()
        for s in range(0, q.shape[0], block):
            qb = q[s:s + block]
            j = torch.addmm(rn[None, :], qb, r.T, alpha=-2.0).argmin(1)
            exact = (qb.double() - r[j].double()).square().sum(1)
            best[s:s + block] = torch.minimum(best[s:s + block], exact)
    return (best / q.shape[1]).sqrt().cpu().numpy()


def pca_basis(features: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the ``dims`` leading principal directions ``(D, dims)`` of ``features`` (exact).

    Eigen-decomposes whichever of the Gram (N x N) and covariance (D x D)
    matrices is smaller, with torch's LAPACK (numpy's bundled OpenBLAS was
    measured 30x slower on these machines).
    """
    import torch

    x = torch.as_tensor(np.asarray(features, np.float64))
    mean = x.mean(0)
    xc = x - mean
    dims = int(min(dims, x.shape[1], max(x.shape[0] - 1, 1)))
    if x.shape[0] <= x.shape[1]:
        vals, vecs = torch.linalg.eigh(xc @ xc.T)
        top = vecs[:, -dims:].flip(1)
        basis = xc.T @ top / vals[-dims:].flip(0).clamp_min(1e-30).sqrt()
    else:
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        basis = vecs[:, -dims:].flip(1)
    return mean.numpy(), basis.numpy()


def loo_bandwidth(z: np.ndarray, factors=(1.0, 0.5, 0.25, 0.125), max_points: int = 2000) -> float:
    """Scott's KDE bandwidth factor times the multiplier with the best leave-one-out log-likelihood.

    ``z`` is ``(dims, n)`` as ``scipy.stats.gaussian_kde`` takes it; at most
    ``max_points`` evenly spaced points are used for the choice.
    """
    import torch

    z = np.asarray(z, np.float64)
    d, n = z.shape
    scott = n ** (-1.0 / (d + 4))
    sub = z[:, np.linspace(0, n - 1, min(n, max_points)).round().astype(int)]
    m = sub.shape[1]
    if m < 3:
        return scott
    chol = np.linalg.cholesky(np.cov(z) + 1e-12 * np.eye(d))
    w = torch.as_tensor(np.linalg.solve(chol, sub).T)  # whitened, so the kernel is isotropic
    d2 = torch.cdist(w, w).square()
    d2.fill_diagonal_(float("inf"))
    best, best_ll = scott, -np.inf
    for f in factors:
        h = scott * f
        # log of the mean kernel over the other points, up to terms equal for every point
        ll = float((torch.logsumexp(-0.5 * d2 / h**2, dim=1) - d * np.log(h)).mean())
        if ll > best_ll:
            best, best_ll = h, ll
    return best


def density_ratio_scores(queries: np.ndarray, synthetic: np.ndarray, reference: np.ndarray,
                         dims: int = 5, basis: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """DOMIAS score ``log p_G(x) - log p_R(x)`` (van Breugel et al. 2023, Eq. 2).

    ``p_G`` is a Gaussian KDE of the synthetic set and ``p_R`` one of the
    reference set of real non-members, both in the ``dims`` leading principal
    components of the *synthetic* features (a projection the attacker can fit
    from what is released; pass ``basis`` from :func:`pca_basis` to reuse
    one).  DOMIAS applies density estimation to low-dimensional embeddings of
    images, never to raw pixels.  DOMIAS' ``kde`` estimator uses Scott's
    bandwidth, which smooths away exactly the tight clusters a memorising
    generator leaves around its training images; here each density's
    bandwidth is Scott's times the factor in ``bandwidths`` with the best
    leave-one-out likelihood on that density's own data (a choice the
    attacker can make without any member).

    Raises ``ValueError`` when a set is too small for a non-singular KDE in
    ``dims`` dimensions.
    """
    from scipy.stats import gaussian_kde

    synthetic = np.asarray(synthetic, np.float64)
    reference = np.asarray(reference, np.float64)
    queries = np.asarray(queries, np.float64)
    mean, vecs = basis if basis is not None else pca_basis(synthetic, dims)
    dims = vecs.shape[1]
    for what, arr in (("synthetic", synthetic), ("reference", reference)):
        if len(arr) <= dims + 1:
            raise ValueError(f"the {what} set has {len(arr)} images; a {dims}-dimensional density needs at least "
                             f"{dims + 2}")

    def proj(a):
        return ((a - mean) @ vecs).T

    try:
        zg, zr = proj(synthetic), proj(reference)
        p_g = gaussian_kde(zg, bw_method=loo_bandwidth(zg))
        p_r = gaussian_kde(zr, bw_method=loo_bandwidth(zr))
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"a density in {dims} dimensions is singular on these features ({exc})") from exc
    zq = proj(queries)
    return p_g.logpdf(zq) - p_r.logpdf(zq)


# ------------------------------------------------------------------ scenario 2


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
