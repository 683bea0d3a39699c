"""Precision, recall, density and coverage (Naeem et al. 2020) and a feature space that needs no download.

Given real features ``X`` (N) and synthetic ("fake") features ``Y`` (M),
with ``NND_k(x)`` the distance from ``x`` to its k-th nearest *other* point
of its own set:

- precision: share of fakes inside some real ball ``B(X_i, NND_k(X_i))``;
- recall: share of reals inside some fake ball ``B(Y_j, NND_k(Y_j))``;
- density: ``1/(kM) sum_j #{i : Y_j in B(X_i, NND_k(X_i))}`` (1 on average
  for identical distributions; above 1 when fakes crowd the real modes);
- coverage: share of reals whose ball holds at least one fake.

Membership is a strict ``<``.  The scores are computed by the authors' own
package, ``prdc`` (:class:`PRDCReference` says what it adds).

Feature space: a randomly initialised convolutional network, fixed by the
audit seed (:func:`random_cnn_features`).  Random-weight embeddings are a
recognised choice for evaluating generative models away from ImageNet (Lee,
Kim & Lee 2023); they need no download and have never seen natural images,
so they do not import ImageNet's notion of similarity into radiographs.  The
classifier's own penultimate features were the alternative; they would tie
fidelity to the labels and to the utility check's training, and see only
what separates the classes.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PRDC:
    """The four scores, the ``k`` they were computed with and the set sizes."""

    precision: float
    recall: float
    density: float
    coverage: float
    k: int
    n_real: int
    n_fake: int

    def as_dict(self) -> dict:
        return {"precision": self.precision, "recall": self.recall, "density": self.density,
                "coverage": self.coverage}


class PRDCReference:
    """Real features with their k-NN radii, compared against several fake sets.

    The scores are the authors' own package, ``prdc.compute_prdc`` (Naeem et
    al.); the radii and the real-ball memberships behind the bootstrap come
    from the same package's ``prdc.prdc.compute_nearest_neighbour_distances``
    and ``compute_pairwise_distance`` (module functions it does not list in
    ``__all__``; ``tests/test_fidelity.py`` pins them against the definitions).
    ``compute_prdc`` recomputes the real radii on every call: at the sizes
    the fidelity check uses (reference up to 2,500 256-d features, compared
    sets up to 1,250) a check's four calls take under 5 s
    (``bench/field_libraries.py --only prdc``), against minutes for
    nearest-SSIM.  Like the package, it needs ``k + 2`` points per set (the
    k-th neighbour is taken as the (k+1)-th smallest distance including the
    point itself, by ``argpartition`` at ``k + 1``).

    Notes
    -----
    Naeem, Oh, Uh, Choi & Yoo 2020, "Reliable Fidelity and Diversity Metrics
    for Generative Models", ICML (density and coverage); precision and recall
    as in Kynkäänniemi et al. 2019, NeurIPS.
    """

    def __init__(self, real: np.ndarray, k: int = 5):
        from prdc.prdc import compute_nearest_neighbour_distances

        self.real = _points(real, k, "real")
        self.k = int(k)
        self.radii = compute_nearest_neighbour_distances(self.real, self.k)

    def inside(self, fake: np.ndarray) -> np.ndarray:
        """``(N, M)`` booleans: fake ``j`` lies inside real ball ``i`` (strictly, as ``compute_prdc`` counts)."""
        from prdc.prdc import compute_pairwise_distance

        return compute_pairwise_distance(self.real, np.asarray(fake, np.float64)) < self.radii[:, None]

    def score(self, fake: np.ndarray) -> PRDC:
        from prdc import compute_prdc

        fake = _points(fake, self.k, "fake")
        with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the set sizes; stdout may be JSON
            s = compute_prdc(self.real, fake, self.k)
        return PRDC(precision=float(s["precision"]), recall=float(s["recall"]), density=float(s["density"]),
                    coverage=float(s["coverage"]), k=self.k, n_real=len(self.real), n_fake=len(fake))

    def bootstrap(self, fake: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Precision and density on fakes resampled with replacement.

        Both are means over fakes, so the bootstrap applies.  Coverage and
        recall get no interval: a resample holds fewer distinct fakes, which
        lowers coverage systematically (and repeated points make the fakes'
        own radii zero), so their percentile intervals would be biased.
        """
        hits = self.inside(fake).sum(0)
        m = len(hits)
        draws = hits[rng.integers(0, m, (n_boot, m))]
        return {"precision": (draws > 0).mean(1), "density": draws.mean(1) / self.k}


def _points(x: np.ndarray, k: int, which: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if len(x) < k + 2:
        raise ValueError(f"need at least k + 2 = {k + 2} {which} points for the k-th neighbour radius, got {len(x)}")
    return x


def random_cnn_features(x, seed: int, normalizer=None, batch_size: int = 256, device=None) -> np.ndarray:
    """Features of ``(N, C, H, W)`` images from a randomly initialised CNN fixed by ``seed``.

    Four 3 x 3 convolutions (32, 64, 128, 128 channels) with ReLU, average
    pooling between them, then global average and global max pooling
    concatenated (256 dimensions).  No normalisation layers: batch
    statistics would make one image's features depend on its batch mates.
    """
    import torch
    import torch.nn as nn

    device = device or torch.device("cpu")
    c = x.shape[1]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        layers = []
        for cin, cout in ((c, 32), (32, 64), (64, 128), (128, 128)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            if cout != 128 or cin != 128:
                layers.append(nn.AvgPool2d(2))
        net = nn.Sequential(*layers).to(device).eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(device).float()
            if normalizer is not None:
                xb = normalizer(xb, c)
            h = net(xb)
            out.append(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1).double().cpu())
    return torch.cat(out).numpy()
