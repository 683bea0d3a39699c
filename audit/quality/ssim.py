"""Structural similarity (SSIM), pairwise and nearest-within-a-set.

SSIM as Wang et al. 2004 define and implement it: local statistics under an
11 x 11 Gaussian window (sigma 1.5, normalised), constants ``C1 = (K1 L)^2``,
``C2 = (K2 L)^2`` with ``K1 = 0.01``, ``K2 = 0.03`` and ``L = 1`` for data in
[0, 1], population (not sample) variances, the map evaluated only where the
window fits inside the image ("valid"), and its mean over positions (and
over channels for colour images).  This is scikit-image's
``structural_similarity(a, b, data_range=1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``: that function filters the whole
image and then crops ``(11 - 1) / 2`` pixels from each border before
averaging, which leaves exactly the valid positions.  ``tests/test_fidelity.py``
pins the two equal (to 1e-12 on random images and on scikit-image's own
photographs and fundus scan; nearest-SSIM in float32 to 1e-5).

Kept rather than calling scikit-image: nearest-SSIM compares every query
with every image of a set, and ``structural_similarity`` works one pair at a
time, filtering both images' local means and variances again for every
pair (five Gaussian filters per pair).  Here each image's moments are
filtered once and only the product image per pair, batched as matrix
products in torch.  Measured on one CPU thread at the check's size (128 x
128, gray; ``bench/field_libraries.py --only ssim``): 1.0 ms per pair here,
3.2 ms with scikit-image (3.1x), i.e. about 8 against 26 minutes for the
default 100 queries against 5,000 images; torch also uses every core (and a
GPU, when the inputs are on one), scikit-image one core.  torchmetrics'
batched SSIM is no alternative: it averages the map over reflect-padded
borders too, where scikit-image keeps only valid positions (1e-3 apart on
random 64 x 64 images), and ran 11x slower than this per pair.
"""
from __future__ import annotations

import numpy as np

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian whose outer product is the SSIM window."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


class SSIM:
    """Pairwise SSIM of ``(N, C, H, W)`` images in [0, 1] (torch; follows the inputs' device).

    Notes
    -----
    Wang, Bovik, Sheikh & Simoncelli 2004, "Image quality assessment: from
    error visibility to structural similarity", IEEE TIP 13(4).
    """

    def __init__(self, data_range: float = 1.0, window: int = WINDOW, sigma: float = SIGMA):
        self.c1 = (K1 * data_range) ** 2
        self.c2 = (K2 * data_range) ** 2
        self.window = window
        self.g = gaussian_window(window, sigma)
        self._bands: dict = {}

    def _filter(self, x):
        """Valid Gaussian filtering of ``(..., H, W)`` as two matrix products (banded matrices).

        On a CPU, ``G_h @ x @ G_w^T`` with dense banded ``G`` runs as large
        matrix multiplications and is far faster than an 11-tap convolution
        over single-channel images, though it does more arithmetic.
        """
        gh = self._band(x.shape[-2], x)
        gw = self._band(x.shape[-1], x)
        return gh @ (x @ gw.T)

    def _band(self, n: int, x):
        import torch

        key = (n, x.dtype, x.device)
        if key not in self._bands:
            m = np.zeros((n - self.window + 1, n))
            for i in range(m.shape[0]):
                m[i, i:i + self.window] = self.g
            self._bands[key] = torch.as_tensor(m, dtype=x.dtype, device=x.device)
        return self._bands[key]

    def moments(self, x):
        """Local means and variances, ``(mu, sigma^2)``, each ``(N, C, H-10, W-10)``."""
        if min(x.shape[-2:]) < self.window:
            raise ValueError(f"SSIM needs images of at least {self.window} x {self.window} pixels, got "
                             f"{tuple(x.shape[-2:])}")
        mu = self._filter(x)
        return mu, (self._filter(x * x) - mu * mu)

    def paired(self, a, b):
        """SSIM of ``a[i]`` with ``b[i]`` for every ``i``: ``(N,)``."""
        mu_a, var_a = self.moments(a)
        mu_b, var_b = self.moments(b)
        cov = self._filter(a * b) - mu_a * mu_b
        return self._index(mu_a, mu_b, var_a, var_b, cov).flatten(1).mean(1)

    def _index(self, mu_a, mu_b, var_a, var_b, cov):
        num = (2 * mu_a * mu_b + self.c1) * (2 * cov + self.c2)
        den = (mu_a * mu_a + mu_b * mu_b + self.c1) * (var_a + var_b + self.c2)
        return num / den

    def matrix(self, q, r, block_pairs: int = 128):
        """SSIM of every query against every reference: ``(len(q), len(r))``.

        ``block_pairs`` pairs are filtered at once: 128 keeps a block's product
        images in cache on a CPU, and ran 1.7-2.5x faster than 2,048 (64 to
        256 pixels a side, one thread); the results do not depend on it.
        """
        import torch

        mq, vq = self.moments(q)
        mr, vr = self.moments(r)
        out = torch.empty(len(q), len(r), dtype=torch.float64, device=q.device)
        rb = max(1, min(len(r), block_pairs))
        qb = max(1, block_pairs // rb)
        for i in range(0, len(q), qb):
            qs = slice(i, i + qb)
            for j in range(0, len(r), rb):
                rs = slice(j, j + rb)
                prod = (q[qs, None] * r[None, rs]).flatten(0, 1)  # (nq * nr, C, H, W)
                cross = self._filter(prod).view(q[qs].shape[0], r[rs].shape[0], *mq.shape[1:])
                cov = cross - mq[qs, None] * mr[None, rs]
                s = self._index(mq[qs, None], mr[None, rs], vq[qs, None], vr[None, rs], cov)
                out[qs, rs] = s.flatten(2).mean(2).double()
        return out


def nearest_ssim(x, queries, block_pairs: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """For each query index, the highest SSIM to any *other* image of ``x`` and which one it is.

    ``x`` is ``(N, C, H, W)``; ``queries`` indices into it.  Every query is
    compared with every image of the set (exact, no candidate pruning).
    """
    import torch

    metric = SSIM()
    q = torch.as_tensor(np.asarray(queries, np.int64))
    best = torch.full((len(q),), -np.inf, dtype=torch.float64)
    arg = torch.zeros(len(q), dtype=torch.long)
    step = 256
    for j in range(0, len(x), step):
        s = metric.matrix(x[q].float(), x[j:j + step].float(), block_pairs)
        own = q[:, None] == torch.arange(j, j + s.shape[1])[None]
        s[own] = -np.inf  # an image is not its own nearest neighbour
        v, a = s.max(1)
        better = v > best
        best[better], arg[better] = v[better], a[better] + j
    return best.numpy(), arg.numpy()
