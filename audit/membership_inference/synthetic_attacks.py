"""Scenario 1 (only the synthetic images are released): attacks that see the synthetic set, not the model.

Every score is oriented so that higher means "more likely a member".

- :class:`PixelDCR`, :class:`EmbeddingDCR` -- distance to the closest
  synthetic record in pixel space (exact) or a feature space
  (:class:`RandomConvFeatures`, or open_clip weights);
- :class:`Domias` -- DOMIAS (van Breugel et al. 2023): ``log p_synthetic(x) -
  log p_reference(x)`` with Gaussian KDEs in a low-dimensional PCA space,
  cross-fitted against a patient-disjoint reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np

from .registry import MembershipAttack


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
            best[s:s + block] = torch.minimum(best[s:s + block], squared_distances(qb, r, j))
    return (best / q.shape[1]).sqrt().cpu().numpy()


#: rows of the float64 recomputation done at once on a CPU: a whole block of 256 rows of a 256 x 256 image
#: in float64 is 128 MB per temporary, which went through memory several times and cost 3.6 times the ranking
#: product itself (bench/privacy_scale.py); 8 rows stay in cache and give the same sums (each row is reduced
#: on its own)
EXACT_ROWS = 8


def squared_distances(qb, r, j):
    """``sum((qb[i] - r[j[i]])**2)`` per row in float64 (the exact recomputation of :func:`nearest_rms`)."""
    import torch

    if qb.device.type != "cpu":
        return (qb.double() - r[j].double()).square().sum(1)
    out = torch.empty(qb.shape[0], dtype=torch.float64, device=qb.device)
    for s in range(0, qb.shape[0], EXACT_ROWS):
        d = qb[s:s + EXACT_ROWS].double()
        d.sub_(r[j[s:s + EXACT_ROWS]])
        out[s:s + EXACT_ROWS] = d.square_().sum(1)
    return out


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


# ------------------------------------------------------------------ registered attacks


@dataclass(frozen=True)
class SyntheticView:
    """What scenario-1 attacks see: evaluated images (members, then non-members) against the released set.

    ``q_emb`` / ``s_emb`` / ``p_emb`` are embeddings of the evaluated, synthetic
    and planted images; ``refs`` the two holdout folds' embeddings (each
    image is scored against the other fold's, ``fold``); ``d_pix`` /
    ``d_plant`` the exact pixel distances to the closest synthetic and
    planted image.
    """

    q_emb: np.ndarray
    s_emb: np.ndarray
    p_emb: np.ndarray
    refs: tuple[np.ndarray, np.ndarray]
    fold: np.ndarray
    d_pix: np.ndarray
    d_plant: np.ndarray


class SyntheticAttack(MembershipAttack):
    """An attack on the released synthetic set: ``scores`` on it, ``planted_scores`` with the planted copies."""

    scenario: ClassVar[int] = 1
    needs: ClassVar[tuple[str, ...]] = ("synthetic", "holdout")

    def scores(self, view: SyntheticView) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def planted_scores(self, view: SyntheticView) -> dict[str, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


class PixelDCR(SyntheticAttack):
    name = "dcr_pixel"
    reference = "distance to closest record in pixel space; 'The DCR Delusion' (2025) on its limits"

    def cost(self) -> dict:
        return {"exact pixel distances": "every evaluated image to every synthetic image (pruned search)"}

    def scores(self, view):
        return {self.name: -view.d_pix}

    def planted_scores(self, view):
        return {self.name: -np.minimum(view.d_pix, view.d_plant)}


class EmbeddingDCR(SyntheticAttack):
    name = "dcr_embedding"
    reference = "distance to closest record in a feature space"

    def cost(self) -> dict:
        return {"embedding distances": "every evaluated image to every synthetic image"}

    def scores(self, view):
        return {self.name: -nearest_distance(view.q_emb, view.s_emb)}

    def planted_scores(self, view):
        d = nearest_distance(view.q_emb, view.s_emb)
        return {self.name: -np.minimum(d, nearest_distance(view.q_emb, view.p_emb))}


class Domias(SyntheticAttack):
    name = "domias"
    reference = ("van Breugel et al. 2023, Membership Inference Attacks against Synthetic Data through Overfitting "
                 "Detection (DOMIAS, AISTATS)")

    def cost(self) -> dict:
        return {"kernel density estimates": f"{self.settings.density_dims}-d PCA, synthetic and reference"}

    def _scores(self, view, synthetic):
        basis = pca_basis(view.s_emb, self.settings.density_dims)  # one projection, fitted on what is released
        out = np.empty(len(view.q_emb))
        for f in (0, 1):
            rows = view.fold == f
            if rows.any():
                out[rows] = density_ratio_scores(view.q_emb[rows], synthetic, view.refs[1 - f], basis=basis)
        return out

    def scores(self, view):
        return {self.name: self._scores(view, view.s_emb)}

    def planted_scores(self, view):
        return {self.name: self._scores(view, np.concatenate([view.s_emb, view.p_emb]))}
