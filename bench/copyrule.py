"""A copy rule that tolerates small shifts and zooms, with an exact (proven) search.

Distance
--------
An image is normalised by ``phi``: its *central region* (the part every
transform below keeps inside the image) is averaged over ``pooled x pooled``
near-equal blocks (8 x 8 by default: a low-pass that makes the distance
tolerate noise, JPEG, blur and the sub-pixel residue of a zoom), then the
mean of each tile of a ``grid x grid`` grid is removed per channel
(brightness, and locally contrast or gamma).  For a query ``q`` and a
reference ``r``

    D(q, r) = min over transforms T of  max over tiles t of  RMS_t(phi(T q) - phi(r)),

Carlini's tiled normalised L2 on normalised images, minimised over a set of
transforms of the query: integer shifts ``dy, dx`` in ``[-s, s]`` and zooms
``z`` about the centre (``T q (p) = q(c + z (p - c) + d)``, bilinear).  With
no transform (``Transforms(0, (1.0,))``) the central region is the whole
image.

Statistic and rule
------------------
``ratio(q) = sqrt(max(d1^2 - b, m b, f^2) / max(d2^2 - b, m b, f^2))`` with
``d1 <= d2`` the two smallest distances: the nearest/second-nearest ratio of
Lowe (2004), used for copy detection as a score normalised by the distances
to other references (Douze et al. 2021, DISC21; Pizzi et al. 2022, SSCD).
``b`` is the query's own noise energy after pooling (noise variance by
Immerkaer 1996 divided by the block size, capped at ``d1^2``), subtracted
from both squared distances because independent noise adds it to every one
of them; ``m b`` (``m = 2 / sqrt(dof)``, 0.25 for 8 x 8) keeps a difference
smaller than the noise's own fluctuation from counting as evidence; ``f`` is
a floor at the 8-bit quantisation level, so two flat images give ratio 1
(no evidence) rather than 0/0.  A copy is much nearer its source than
anything else; an unseen image that merely resembles the training set
(textures, flat backgrounds) is about as near its second-nearest as its
nearest.

:class:`CopyRatioRule` runs two such tests -- the plain distance on the whole
image (``identity``) and the shift/zoom distance on the central region
(``shift_zoom``) -- and flags an image when either ratio is below its
threshold.  Each threshold is a conformal quantile of the holdout's ratios at
``alpha / 2``, so an unseen image exchangeable with the holdout is flagged
with probability at most ``alpha`` (union bound).

Lower bound and exact search
----------------------------
Features are ``phi`` flattened and scaled so that Euclidean norms are RMS
values.  For the whole-image RMS the bound needs only the triangle
inequality: for a group ``G`` of transforms with centre
``c_G(q) = mean_{T in G} phi(T q)`` and radius
``e_G(q) = max_{T in G} ||phi(T q) - c_G(q)||``,

    ||phi(T q) - phi(r)|| >= ||c_G(q) - phi(r)|| - e_G(q)      for every T in G,

so ``LB(q, r) = min_G (||c_G(q) - phi(r)|| - e_G(q))`` never exceeds
``min_T ||phi(T q) - phi(r)||``, which never exceeds ``D`` (the RMS over all
tiles is at most the worst tile's).  A reference is pruned for radius
``theta`` when ``||c_G - f||^2 > (theta + e_G)^2`` for every group -- one
matrix product of ``(G, D + 1)`` augmented centres with the references, no
square root.  One group (one product per pair) is the one-pass bound;
measured on real crops it prunes only about 79 % of the pairs at the
decision radius, because shifting a textured image by 3 pixels moves it
further than its second-nearest neighbour lies.  Nine groups of 3 x 3
neighbouring shifts prune about 97 %; a second pass on the survivors with
the groups split by zoom (27) leaves about 0.8 % for the exact distance.

:meth:`ExactCopySearch.within` returns every reference within a per-query
radius (exact distances; every other reference has a bound above the radius,
so it is proven).  ``search`` (k nearest) first evaluates a few candidates
ranked by the distance to the orbit's centre, takes the k-th exact distance
as the radius and calls ``within``; :func:`decide_ratio` uses the smaller
radius that the ratio test needs (about ``tau`` times the second distance)
and falls back to the proven two nearest only where that does not settle the
decision.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from audit.tiled import Neighbours, SearchStats

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Absolute slack on squared distances (feature norms are RMS values of [0, 1] images, so squared
#: norms are at most 0.25 per channel): float32 rounding of ``|a|^2 + |b|^2 - 2ab`` over 64-dimensional
#: features stays below 1e-6; the bound is lowered by this, so it stays a bound.
BOUND_SLACK = 1e-5
#: Distances below this are "no difference" for the ratio: about the RMS of 8-bit quantisation noise
#: (1 / 255 / sqrt(12)) after averaging over a pooled block of ~40 pixels.
RATIO_FLOOR = 2e-4


@dataclass(frozen=True)
class Transforms:
    """The transforms a copy may have undergone: integer shifts and zooms about the centre."""

    max_shift: int = 3
    scales: tuple[float, ...] = (0.95, 1.0, 1.05)

    def __post_init__(self):
        if self.max_shift < 0:
            raise ValueError("max_shift must be >= 0")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError("scales must be positive and non-empty")

    def items(self) -> list[tuple[float, int, int]]:
        """``(zoom, dy, dx)`` of every transform; the identity first."""
        s = self.max_shift
        out = [(1.0, 0, 0)]
        for z in sorted(set(self.scales) | {1.0}):
            for dy in range(-s, s + 1):
                for dx in range(-s, s + 1):
                    if (z, dy, dx) != (1.0, 0, 0):
                        out.append((float(z), dy, dx))
        return out

    def groups(self, shift_group: int = 3, split_zoom: bool = False) -> list[list[int]]:
        """Indices of :meth:`items` in groups of neighbouring shifts (and zooms, unless ``split_zoom``)."""
        s = self.max_shift
        n = max(1, math.ceil((2 * s + 1) / shift_group))
        start = -s - (n * shift_group - (2 * s + 1)) // 2  # centre the groups: {-3,-2},{-1,0,1},{2,3}

        def g(d):
            return min(n - 1, max(0, (d - start) // shift_group))

        keys: dict[tuple, list[int]] = {}
        for i, (z, dy, dx) in enumerate(self.items()):
            keys.setdefault((g(dy), g(dx), z if split_zoom else 0), []).append(i)
        return list(keys.values())


def _margin(n: int, transforms: Transforms) -> int:
    """Pixels to leave at each end of an axis of ``n`` so that every transform reads inside the image.

    A transform reads ``u = c + z (i - c) + d`` for output pixel ``i``
    (``c = (n - 1) / 2``); it stays inside ``[0, n - 1]`` when the margin
    ``m`` satisfies ``z ((n - 1) / 2 - m) + s <= (n - 1) / 2``.
    """
    if transforms.max_shift == 0 and set(transforms.scales) <= {1.0}:
        return 0
    half = (n - 1) / 2
    zmax = max(max(transforms.scales), 1.0)
    need = half - (half - transforms.max_shift) / zmax
    return max(0, math.ceil(need - 1e-9))


def edges(n: int, parts: int) -> list[int]:
    """Split ``range(n)`` into ``parts`` contiguous pieces as evenly as possible."""
    return [(i * n) // parts for i in range(parts + 1)]


@dataclass(frozen=True)
class CopyLayout:
    """Geometry of the copy distance for images of one size.

    Parameters
    ----------
    height, width, channels
        Image geometry (channels are compared jointly, as in Carlini's distance).
    pooled
        Side of the low-pass image (the shorter side; the longer one in
        proportion, rounded to a multiple of ``grid``).
    grid
        Tiles per side; each tile's mean is removed per channel and the
        distance is the worst tile's RMS difference (``grid=1``: the RMS over
        the whole central region).
    transforms
        The shift and zoom set.
    margin
        Pixels left out at each side (default: the least the transforms need).
    """

    height: int
    width: int
    channels: int = 1
    pooled: int = 8
    grid: int = 1
    transforms: Transforms = field(default_factory=Transforms)
    margin: int | None = None

    def __post_init__(self):
        if self.pooled < 1 or self.grid < 1 or self.pooled % self.grid:
            raise ValueError(f"pooled ({self.pooled}) must be a positive multiple of grid ({self.grid})")
        need = max(_margin(self.height, self.transforms), _margin(self.width, self.transforms))
        if self.margin is not None and self.margin < need:
            raise ValueError(f"margin {self.margin} is smaller than the {need} pixels the transforms need")
        _, h, _, w = self.central
        ph, pw = self.pooled_shape
        if h < ph or w < pw:
            raise ValueError(f"a {self.height} x {self.width} image leaves a {h} x {w} central region for shifts of "
                             f"{self.transforms.max_shift} px and zooms up to {max(self.transforms.scales)}: too "
                             f"small to pool to {ph} x {pw}")

    @property
    def central(self) -> tuple[int, int, int, int]:
        """``(top, height, left, width)`` of the central region in input pixels."""
        if self.margin is not None:
            mh = mw = self.margin
        else:
            mh, mw = _margin(self.height, self.transforms), _margin(self.width, self.transforms)
        return mh, self.height - 2 * mh, mw, self.width - 2 * mw

    @property
    def pooled_shape(self) -> tuple[int, int]:
        _, h, _, w = self.central
        short, g = min(h, w), self.grid
        ph = self.pooled if h == short else max(g, round(self.pooled * h / short / g) * g)
        pw = self.pooled if w == short else max(g, round(self.pooled * w / short / g) * g)
        return ph, pw

    @property
    def tile(self) -> tuple[int, int]:
        ph, pw = self.pooled_shape
        return ph // self.grid, pw // self.grid

    @property
    def tiles(self) -> int:
        return self.grid * self.grid

    @property
    def dim(self) -> int:
        ph, pw = self.pooled_shape
        return self.channels * ph * pw

    @property
    def block_pixels(self) -> float:
        """Input pixels averaged into one pooled value (on average)."""
        _, h, _, w = self.central
        ph, pw = self.pooled_shape
        return h * w / (ph * pw)

    def pool_matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` averaging matrices: ``rows @ central @ cols.T`` is the low-pass image."""
        _, h, _, w = self.central
        mats = []
        for n, p in zip((h, w), self.pooled_shape):
            e = edges(n, p)
            m = np.zeros((p, n))
            for i in range(p):
                m[i, e[i]:e[i + 1]] = 1.0 / (e[i + 1] - e[i])
            mats.append(m)
        return mats[0], mats[1]


def interpolation_matrix(n: int, start: int, size: int, zoom: float, shift: int) -> np.ndarray:
    """``(size, n)`` linear-interpolation weights reading ``u = c + zoom (i - c) + shift`` for ``i`` in the span.

    Rows of a pure shift are unit vectors (the pixels themselves).
    """
    c = (n - 1) / 2
    u = c + zoom * (np.arange(start, start + size) - c) + shift
    u = np.clip(u, 0.0, n - 1.0)
    lo = np.minimum(np.floor(u).astype(int), n - 2) if n > 1 else np.zeros(size, int)
    frac = u - lo
    m = np.zeros((size, n))
    m[np.arange(size), lo] += 1.0 - frac
    if n > 1:
        m[np.arange(size), lo + 1] += frac
    return m


class CopyMetric:
    """Normalisation, transforms and exact distances on one device.

    Features are ``(N, D)`` rows (``D = C * ph * pw``), scaled by
    ``1 / sqrt(D)`` so that Euclidean norms are RMS values.  A transform
    followed by pooling is linear and separable (bilinear interpolation along
    rows, then along columns), so ``phi(T x)`` is ``M_T x N_T^T`` with
    ``M_T = pool_rows @ interp_rows(T)``: the orbit of an image costs two
    small matrix products per transform, never a resampled image.
    """

    def __init__(self, layout: CopyLayout, device="cpu"):
        import torch

        self.layout = layout
        self.device = torch.device(device)
        self.items = layout.transforms.items()
        top, h, left, w = layout.central
        prow, pcol = layout.pool_matrices()
        s = layout.transforms.max_shift
        shifts = list(range(-s, s + 1))
        self._zooms = sorted({z for z, _, _ in self.items})
        ph, pw = layout.pooled_shape
        # per zoom: every row shift stacked ((2s+1) * ph, H) and every column shift ((2s+1) * pw, W), so one
        # pair of matrix products gives all (2s+1)^2 shifted, pooled images of that zoom at once
        rows = [np.concatenate([prow @ interpolation_matrix(layout.height, top, h, z, d) for d in shifts])
                for z in self._zooms]
        cols = [np.concatenate([pcol @ interpolation_matrix(layout.width, left, w, z, d) for d in shifts])
                for z in self._zooms]
        self._rows = torch.as_tensor(np.stack(rows), dtype=torch.float32, device=self.device)  # (Z, S*ph, H)
        self._cols = torch.as_tensor(np.stack(cols), dtype=torch.float32, device=self.device)  # (Z, S*pw, W)
        n_s = len(shifts)
        # position of every item in the (zoom, dy, dx) grid the products produce
        self._perm = torch.as_tensor([self._zooms.index(z) * n_s * n_s + (dy + s) * n_s + (dx + s)
                                      for z, dy, dx in self.items], device=self.device)
        ident = self._zooms.index(1.0) if 1.0 in self._zooms else None
        self._id_rows = self._rows[ident, s * ph:(s + 1) * ph] if ident is not None else None
        self._id_cols = self._cols[ident, s * pw:(s + 1) * pw] if ident is not None else None
        self._scale = 1.0 / math.sqrt(layout.dim)

    def _normalise(self, p) -> torch.Tensor:
        """Remove each tile's mean per channel from pooled images ``(..., C, ph, pw)``; flatten and scale."""
        lay = self.layout
        lead = p.shape[:-3]
        c, ph, pw = p.shape[-3:]
        th, tw = lay.tile
        t = p.reshape(-1, c, lay.grid, th, lay.grid, tw)
        t = t - t.mean(dim=(3, 5), keepdim=True)
        return t.reshape(*lead, c * ph * pw) * self._scale

    def features(self, x) -> torch.Tensor:
        """``phi(x)`` of images ``(N, C, H, W)`` in [0, 1]: ``(N, D)`` (the identity transform)."""
        import torch

        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if self._id_rows is None:  # a zoom set without 1.0: the identity is not a transform
            lay = self.layout
            top, h, left, w = lay.central
            prow, pcol = (torch.as_tensor(m, dtype=torch.float32, device=self.device) for m in lay.pool_matrices())
            return self._normalise(prow @ x[:, :, top:top + h, left:left + w] @ pcol.T)
        return self._normalise(self._id_rows @ x @ self._id_cols.T)

    def orbit(self, x) -> torch.Tensor:
        """``phi(T x)`` for every transform: ``(N, |T|, D)``, in :meth:`Transforms.items` order."""
        import torch

        x = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        n, c = x.shape[:2]
        ph, pw = self.layout.pooled_shape
        n_s = 2 * self.layout.transforms.max_shift + 1
        out = []
        for zi in range(len(self._zooms)):
            y = self._rows[zi] @ x @ self._cols[zi].T  # (N, C, S*ph, S*pw): every shift pair of this zoom
            y = y.reshape(n, c, n_s, ph, n_s, pw).permute(0, 2, 4, 1, 3, 5)  # (N, S, S, C, ph, pw)
            out.append(y.reshape(n, n_s * n_s, c, ph, pw))
        grid = torch.cat(out, 1)  # (N, Z * S * S, C, ph, pw)
        return self._normalise(grid[:, self._perm])

    def distance_sq(self, orbit_q, ref) -> torch.Tensor:
        """Squared ``D`` between one query's orbit ``(|T|, D)`` and references ``(n, D)``, in float64: ``(n,)``."""
        lay = self.layout
        a = orbit_q.double()
        b = ref.double()
        if lay.grid == 1:
            d = (a * a).sum(1)[None, :] + (b * b).sum(1)[:, None] - 2.0 * (b @ a.T)  # (n, |T|)
            return d.clamp_min_(0.0).amin(1)
        c = lay.channels
        _ph, _pw = lay.pooled_shape
        th, tw = lay.tile
        diff = (a[None] - b[:, None]).square_()  # (n, |T|, D)
        t = diff.reshape(len(b), len(a), c, lay.grid, th, lay.grid, tw).sum(dim=(2, 4, 6)).flatten(2)
        return (t.amax(2) * lay.tiles).amin(1)  # features are scaled by 1/sqrt(D): a tile's mean square is tiles x sum

    def distance(self, orbit_q, ref) -> torch.Tensor:
        return self.distance_sq(orbit_q, ref).sqrt()


def brute_force(metric: CopyMetric, queries, references, chunk: int = 16) -> np.ndarray:
    """Every pair's exact ``D`` ``(Q, R)`` (float64): the baseline for tests and benchmarks."""
    import torch

    ref = metric.features(references).double()
    out = np.empty((len(queries), len(ref)))
    for s in range(0, len(queries), chunk):
        orb = metric.orbit(queries[s:s + chunk]).double()
        if metric.layout.grid == 1:
            d = ((orb * orb).sum(-1)[:, :, None] + (ref * ref).sum(1)[None, None, :]
                 - 2.0 * torch.einsum("qtd,rd->qtr", orb, ref))
            out[s:s + chunk] = d.clamp_min(0).amin(1).sqrt().cpu().numpy()
        else:
            for i in range(len(orb)):
                out[s + i] = metric.distance(orb[i], ref).cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------- search


@dataclass
class CopySearchStats(SearchStats):
    """:class:`audit.tiled.SearchStats` plus the bound's group count and the decision fallbacks."""

    groups: int = 0
    proxy_pairs: int = 0
    refine_pairs: int = 0
    fallbacks: int = 0
    seconds: dict = field(default_factory=dict)

    def tick(self, stage: str, t0: float) -> None:
        import time

        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict:
        return super().to_dict() | {"groups": self.groups, "proxy_pairs": self.proxy_pairs,
                                    "refine_pairs": self.refine_pairs, "fallbacks": self.fallbacks,
                                    "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


class ExactCopySearch:
    """Exact neighbours under :class:`CopyMetric`'s distance, proven by a lower bound.

    Parameters
    ----------
    metric
        The metric (its device does the work).
    ref_features
        ``(R, D)`` features of every reference (:meth:`CopyMetric.features`);
        the exact stage needs nothing else, so no image is reloaded.
    shift_group
        Neighbouring shifts per bound group along each axis (3: nine groups
        for shifts in ``[-3, 3]``; ``2 * max_shift + 1``: the one-pass bound).
    initial
        Candidates per query ranked by the distance to the orbit's centre
        whose exact distances set the first radius.
    """

    def __init__(self, metric: CopyMetric, ref_features, shift_group: int = 3, split_zoom: bool = False,
                 refine: bool = True, initial: int = 8, query_block: int = 64, ref_block: int = 4096):
        import torch

        self.metric = metric
        self.rf = torch.as_tensor(ref_features, dtype=torch.float32, device=metric.device).contiguous()
        self.rn = (self.rf.double() ** 2).sum(1).float()
        self.groups = metric.layout.transforms.groups(shift_group, split_zoom)
        # second, finer bound on the first one's survivors: the same shift groups split by zoom
        fine = metric.layout.transforms.groups(shift_group, True)
        self.fine_groups = fine if refine and len(fine) > len(self.groups) else None
        self.initial = initial
        self.query_block = query_block
        self.ref_block = ref_block
        self.stats = CopySearchStats(references=int(self.rf.shape[0]), groups=len(self.groups))
        self._torch = torch

    @property
    def n_refs(self) -> int:
        return int(self.rf.shape[0])

    # ------------------------------------------------------------ pieces

    def orbits(self, queries) -> torch.Tensor:
        """``(Q, |T|, D)`` orbits, block by block."""
        torch = self._torch
        queries = torch.as_tensor(queries, dtype=torch.float32, device=self.metric.device)
        if len(queries) == 0:
            return torch.zeros((0, len(self.metric.items), self.metric.layout.dim), device=self.metric.device)
        t0 = time.perf_counter()
        out = torch.cat([self.metric.orbit(queries[s:s + self.query_block])
                         for s in range(0, len(queries), self.query_block)])
        self.stats.tick("orbits", t0)
        return out

    def centres(self, orbits, groups=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Group centres ``(Q, G, D)`` and radii ``(Q, G)`` (radii rounded up for float32)."""
        torch = self._torch
        cs, es = [], []
        for g in self.groups if groups is None else groups:
            o = orbits[:, g].double()
            c = o.mean(1)
            cs.append(c)
            es.append((o - c[:, None]).norm(dim=-1).amax(1))
        c = torch.stack(cs, 1).float()
        e = torch.stack(es, 1)
        return c, (e * (1 + 1e-6) + 1e-7).float()

    def _proxy(self, orbits, exclude, at_least: int = 1):
        """The ``initial`` (at least ``at_least``) references nearest to each orbit's overall centre.

        A ranking, not a bound: it only sets the first radius.
        """
        torch = self._torch
        t0 = time.perf_counter()
        q = orbits.shape[0]
        k = min(max(self.initial, at_least), self.n_refs - (1 if exclude is not None else 0))
        centre = orbits.mean(1)
        cn = (centre * centre).sum(1)
        best = torch.full((q, 0), float("inf"), device=orbits.device)
        idx = torch.zeros((q, 0), dtype=torch.long, device=orbits.device)
        for s in range(0, self.n_refs, self.ref_block * 4):
            e = min(s + self.ref_block * 4, self.n_refs)
            d = torch.addmm(self.rn[s:e][None, :], centre, self.rf[s:e].T, alpha=-2.0) + cn[:, None]
            if exclude is not None:
                for row, ref in enumerate(exclude):
                    if ref is not None and s <= ref < e:
                        d[row, ref - s] = float("inf")
            cat_d = torch.cat([best, d], 1)
            cat_i = torch.cat([idx, torch.arange(s, e, device=orbits.device).expand(q, -1)], 1)
            best, order = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
            idx = torch.gather(cat_i, 1, order)
        self.stats.proxy_pairs += q * self.n_refs
        self.stats.tick("proxy", t0)
        return idx

    def _survivors(self, centres, radii, radius, exclude) -> list[np.ndarray]:
        """Per query, the references whose bound is <= ``radius`` (all others are proven farther)."""
        torch = self._torch
        t0 = time.perf_counter()
        q, g, d = centres.shape
        out: list[list[np.ndarray]] = [[] for _ in range(q)]
        r = torch.as_tensor(np.array(radius, np.float32), device=centres.device)
        # prune (q, ref) when for every group ||c_G - f||^2 > (radius + e_G)^2 (+ slack), i.e.
        # |f|^2 - 2 c_G . f - kappa_G > 0 with kappa_G = (radius + e_G)^2 - |c_G|^2 + slack
        kappa = (r[:, None] + radii) ** 2 - (centres.double() ** 2).sum(-1).float() + BOUND_SLACK
        lhs = torch.cat([-2.0 * centres, -kappa[:, :, None]], 2).reshape(q * g, d + 1)
        for s in range(0, self.n_refs, self.ref_block):
            e = min(s + self.ref_block, self.n_refs)
            rhs = torch.cat([self.rf[s:e], torch.ones((e - s, 1), device=centres.device)], 1)
            v = torch.addmm(self.rn[s:e][None, :], lhs, rhs.T)  # (q * g, n)
            keep = v.reshape(q, g, e - s).amin(1) <= 0.0
            if exclude is not None:
                for row, ref in enumerate(exclude):
                    if ref is not None and s <= ref < e:
                        keep[row, ref - s] = False
            rows, cols = torch.nonzero(keep, as_tuple=True)
            rows, cols = rows.cpu().numpy(), cols.cpu().numpy() + s
            if len(rows):
                splits = np.searchsorted(rows, np.arange(q + 1))
                for i in range(q):
                    if splits[i + 1] > splits[i]:
                        out[i].append(cols[splits[i]:splits[i + 1]])
        self.stats.bound_pairs += q * self.n_refs
        self.stats.tick("bound", t0)
        return [np.concatenate(o) if o else np.zeros(0, np.int64) for o in out]

    def _refine(self, centres, radii, radius: float, refs: np.ndarray) -> np.ndarray:
        """The ``refs`` whose finer-grouped bound (one query, ``(G, D)`` centres) is still <= ``radius``."""
        torch = self._torch
        t0 = time.perf_counter()
        self.stats.refine_pairs += len(refs)
        idx = torch.as_tensor(refs, device=self.rf.device)
        f = self.rf[idx]
        kappa = (radius + radii) ** 2 - (centres.double() ** 2).sum(-1).float() + BOUND_SLACK  # (G,)
        v = torch.addmm(self.rn[idx][:, None], f, centres.T, alpha=-2.0) - kappa[None, :]  # (n, G)
        out = refs[(v.amin(1) <= 0.0).cpu().numpy()]
        self.stats.tick("refine", t0)
        return out

    def _exact(self, orbit_q, refs: np.ndarray) -> np.ndarray:
        """Exact distances of one query to ``refs``.

        float32 products over all transforms pick the best per reference,
        which is recomputed in float64 by direct differences (a transform that
        float32 mis-ranks lies within float32 rounding, ~1e-7 of the squared
        norms, of the minimum).
        """
        torch = self._torch
        if len(refs) == 0:
            return np.zeros(0)
        t0 = time.perf_counter()
        self.stats.exact_pairs += len(refs)
        lay = self.metric.layout
        idx = torch.as_tensor(refs, device=self.rf.device)
        f = self.rf[idx]
        if lay.grid > 1:
            out = self.metric.distance(orbit_q, f).cpu().numpy()
            self.stats.tick("exact", t0)
            return out
        d = torch.addmm(self.rn[idx][:, None], f, orbit_q.T, alpha=-2.0)  # (n, |T|) minus |orbit|^2
        d += (orbit_q * orbit_q).sum(1)[None, :]
        best = d.argmin(1)
        diff = orbit_q[best].double() - f.double()
        out = diff.square_().sum(1).sqrt_().cpu().numpy()
        self.stats.tick("exact", t0)
        return out

    # --------------------------------------------------------------- API

    def within(self, queries=None, radius=None, exclude=None, orbits=None,
               known: list[Evaluated] | None = None) -> list[Evaluated]:
        """Every reference with ``D <= radius[q]``, with its exact distance, per query.

        Every reference left out has a lower bound above the radius (proven).
        ``known`` carries exact distances already computed (kept in the
        result even beyond the radius).
        """
        orbits = self.orbits(queries) if orbits is None else orbits
        q = orbits.shape[0]
        radius = np.array(np.broadcast_to(np.asarray(radius, np.float64), (q,)))
        known = [Evaluated() for _ in range(q)] if known is None else known
        self.stats.rounds += 1
        for s in range(0, q, self.query_block):
            block = slice(s, min(s + self.query_block, q))
            c, e = self.centres(orbits[block])
            ex = None if exclude is None else exclude[block]
            fine = None if self.fine_groups is None else self.centres(orbits[block], self.fine_groups)
            for i, cand in enumerate(self._survivors(c, e, radius[block], ex)):
                qi = s + i
                new = known[qi].unseen(cand)
                if fine is not None and len(new):
                    new = self._refine(fine[0][i], fine[1][i], float(radius[qi]), new)
                known[qi].add(new, self._exact(orbits[qi], new))
        return known

    def _initial(self, orbits, exclude, k: int) -> list[Evaluated]:
        """Exact distances of each query's proxy-ranked candidates (enough for the k-th)."""
        known = [Evaluated() for _ in range(orbits.shape[0])]
        for s in range(0, orbits.shape[0], self.query_block):
            block = slice(s, min(s + self.query_block, orbits.shape[0]))
            cand = self._proxy(orbits[block], None if exclude is None else exclude[block], k).cpu().numpy()
            for i, row in enumerate(cand):
                known[s + i].add(row, self._exact(orbits[s + i], row))
        return known

    def search(self, queries, k: int = 1, exclude=None, radius: float | None = None) -> Neighbours:
        """The exact ``k`` nearest references of each query (all ``k`` proven).

        ``exclude[q]`` is a reference index to ignore (the query itself in a
        search of a set against itself) or ``None``.  With ``radius``, every
        reference within it is also evaluated (``bound >= radius``).
        """
        orbits = self.orbits(queries)
        q = orbits.shape[0]
        self.stats.queries += q
        k = max(1, min(k, self.n_refs - (1 if exclude is not None else 0)))
        exclude = None if exclude is None else list(exclude)
        known = self._initial(orbits, exclude, k)
        theta = np.array([kn.kth(k) for kn in known]) if q else np.zeros(0)
        if radius is not None:
            theta = np.maximum(theta, radius)
        known = self.within(radius=theta, exclude=exclude, orbits=orbits, known=known)
        idx = np.zeros((q, k), np.int64)
        dist = np.zeros((q, k))
        for i, kn in enumerate(known):
            idx[i], dist[i] = kn.ranked(k)
        return Neighbours(idx, dist, theta, k)


class Evaluated:
    """One query's exactly evaluated references: indices and distances, ranked on demand."""

    def __init__(self):
        self._idx: list[np.ndarray] = []
        self._dist: list[np.ndarray] = []
        self._cache = None

    def add(self, idx, dist) -> None:
        if len(idx):
            self._idx.append(np.asarray(idx, np.int64))
            self._dist.append(np.asarray(dist, np.float64))
            self._cache = None

    def _all(self):
        if self._cache is None:
            i = np.concatenate(self._idx) if self._idx else np.zeros(0, np.int64)
            d = np.concatenate(self._dist) if self._dist else np.zeros(0)
            order = np.lexsort((i, d))  # by distance, ties by index
            self._cache = i[order], d[order]
        return self._cache

    def __len__(self) -> int:
        return len(self._all()[0])

    def unseen(self, cand: np.ndarray) -> np.ndarray:
        i, _ = self._all()
        return cand[~np.isin(cand, i)] if len(i) else cand

    def kth(self, k: int) -> float:
        d = self._all()[1]
        return float(d[k - 1]) if len(d) >= k else np.inf

    def as_dict(self) -> dict[int, float]:
        i, d = self._all()
        return {int(a): float(b) for a, b in zip(i, d)}

    def ranked(self, k: int | None = None):
        i, d = self._all()
        return (i, d) if k is None else (i[:k], d[:k])


# ------------------------------------------------------------------------------------------ statistic


def noise_sigma(x) -> np.ndarray:
    """Standard deviation of white noise in each image ``(N, C, H, W)`` (Immerkaer 1996), channels averaged.

    ``sigma = sqrt(pi / 2) * mean |x * M| / 6`` with the 3 x 3 mask
    ``M = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]]``, which cancels locally
    linear structure.  Texture and edges also contribute, so it is an upper
    estimate on detailed images.
    """
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(x, dtype=torch.float64)
    n, c, h, w = x.shape
    if h < 3 or w < 3:
        return np.zeros(n)
    m = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)
    r = F.conv2d(x.reshape(n * c, 1, h, w), m[None, None])
    s = math.sqrt(math.pi / 2) * r.abs().mean(dim=(1, 2, 3)) / 6.0
    return s.reshape(n, c).mean(1).numpy()


def noise_bias(layout: CopyLayout, sigma: np.ndarray) -> np.ndarray:
    """Expected squared-distance contribution of white noise ``sigma`` after ``phi``.

    A pooled value averages ``block_pixels`` pixels (variance ``sigma^2 /
    block_pixels``); removing a tile's mean keeps ``1 - 1 / n_tile`` of it.
    """
    th, tw = layout.tile
    return np.asarray(sigma, np.float64) ** 2 / layout.block_pixels * (1.0 - 1.0 / (th * tw))


def noise_margin(layout: CopyLayout) -> float:
    """Fraction of the noise energy below which a debiased distance counts as zero.

    A squared distance carrying noise energy ``b`` over ``dof`` pooled values
    fluctuates by about ``b sqrt(2 / dof)``; a difference smaller than about
    1.4 of those (``2 / sqrt(dof)``, 0.25 for an 8 x 8 image) is no evidence,
    so the debiased distance is floored there.  Without this floor a noisy but
    novel flat image (``d1^2`` and ``d2^2`` both about ``b``) gets a ratio near
    0; measured on real crops, this floor brought false alarms on novel crops
    with noise 0.05 from 1.5-2 % back to the clean-image level.
    """
    th, tw = layout.tile
    dof = layout.channels * layout.tiles * (th * tw - 1)
    return 2.0 / math.sqrt(max(dof, 1))


def ratio_statistic(d1, d2, bias=0.0, floor: float = RATIO_FLOOR, margin: float = 0.0) -> np.ndarray:
    """``sqrt(max(d1^2 - b, m b, f^2) / max(d2^2 - b, m b, f^2))`` with ``b = min(noise, d1^2)``.

    The nearest over the second-nearest distance with the query's own noise
    energy removed from both (:func:`noise_bias`), ``m`` the
    :func:`noise_margin` and ``f`` the quantisation floor.  The noise removed
    is capped at ``d1^2``: no more noise can be common to all distances than
    the smallest holds, and the texture that the noise estimate mistakes for
    noise on detailed images then cannot erase a copy's evidence.
    Non-decreasing in ``d1`` and non-increasing in ``d2`` (what
    :func:`decide_ratio` relies on; a property test checks it).
    """
    d1 = np.asarray(d1, np.float64)
    d2 = np.asarray(d2, np.float64)
    b = np.minimum(np.asarray(bias, np.float64), d1 ** 2)
    low = np.maximum(margin * b, floor ** 2)
    a = np.maximum(d1 ** 2 - b, low)
    c = np.maximum(d2 ** 2 - b, low)
    return np.sqrt(a / c)


def smallest_d1(d2, tau: float, bias, floor: float = RATIO_FLOOR, margin: float = 0.0,
                steps: int = 60) -> np.ndarray:
    """The smallest ``theta`` with ``ratio(theta, d2) >= tau`` (bisection; the ratio is non-decreasing in ``d1``).

    Since the ratio is also non-increasing in ``d2``, ``d1 >= theta`` and
    ``d2 <= d2_given`` prove ``ratio >= tau``.  Rounded up by a relative
    1e-9, so the returned value itself satisfies the inequality.
    """
    d2 = np.asarray(d2, np.float64)
    bias = np.broadcast_to(np.asarray(bias, np.float64), d2.shape)
    lo = np.zeros_like(d2)
    hi = d2.copy()  # ratio(d2, d2) = 1 >= tau
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        ok = ratio_statistic(mid, d2, bias, floor, margin) >= tau
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    return np.minimum(hi * (1 + 1e-9), d2)


@dataclass(frozen=True)
class ConformalThreshold:
    """``flag when statistic < tau``; ``tau`` is the ``k``-th smallest of ``n`` holdout values.

    An image exchangeable with the holdout is flagged with probability at
    most ``k / (n + 1)`` (``level``); when ``n`` is too small for the asked
    ``alpha``, ``k = 1`` and ``level > alpha`` (``note`` says so).
    """

    tau: float
    k: int
    n: int
    alpha: float
    level: float
    note: str


def conformal_threshold(values, alpha: float) -> ConformalThreshold:
    v = np.sort(np.asarray(values, np.float64))
    n = len(v)
    if n == 0:
        raise ValueError("a conformal threshold needs at least one holdout value")
    k = math.floor(alpha * (n + 1))
    if k >= 1:
        return ConformalThreshold(float(v[k - 1]), k, n, alpha, k / (n + 1),
                                  f"{k}-th smallest of {n} holdout values (false-alarm rate <= {k / (n + 1):.4f})")
    return ConformalThreshold(float(v[0]), 1, n, alpha, 1 / (n + 1),
                              f"{n} holdout images cannot resolve alpha {alpha:g}: smallest value used "
                              f"(false-alarm rate <= {1 / (n + 1):.4f}; >= {math.ceil(1 / alpha - 1)} needed)")


# ------------------------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class RatioDecision:
    """One test's proven decision per query.

    ``flagged`` is exact.  ``nearest``/``d1`` are the nearest reference and
    its distance where ``d1_exact`` (always for flagged images), otherwise the
    best reference found and an upper bound (the true ``d1`` exceeds
    ``radius``).  ``ratio_low <= ratio <= ratio_high`` brackets the statistic
    (equal where it was computed exactly).
    """

    flagged: np.ndarray
    nearest: np.ndarray
    d1: np.ndarray
    d1_exact: np.ndarray
    ratio_low: np.ndarray
    ratio_high: np.ndarray
    radius: np.ndarray
    tau: float


def decide_ratio(search: ExactCopySearch, queries, tau: float, bias, floor: float = RATIO_FLOOR,
                 margin: float = 0.0, exclude=None) -> RatioDecision:
    """Flag queries whose ratio statistic is ``< tau``, proven, without the exact two nearest of every query.

    With ``U2`` the second-smallest exact distance among a few candidates
    (so ``d2 <= U2``), any query with ``d1 >= theta`` has ratio ``>= tau``,
    where ``theta = smallest_d1(U2)`` (about ``tau U2``); so only
    references within ``theta`` (about ``tau`` times the second distance)
    matter, and :meth:`ExactCopySearch.within` finds all of them.  Where the
    second distance then is still only bracketed and the bracket straddles
    ``tau``, the query falls back to a proven two-nearest search.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau {tau} must be in (0, 1]")
    orbits = search.orbits(queries)
    q = orbits.shape[0]
    search.stats.queries += q
    bias = np.array(np.broadcast_to(np.asarray(bias, np.float64), (q,)))
    exclude = None if exclude is None else list(exclude)
    known = search._initial(orbits, exclude, 2)
    u2 = np.array([kn.kth(2) for kn in known])
    fin = np.isfinite(u2)
    theta = np.full(q, np.inf)
    theta[fin] = smallest_d1(u2[fin], tau, bias[fin], floor, margin)
    known = search.within(radius=theta, exclude=exclude, orbits=orbits, known=known)

    flagged = np.zeros(q, bool)
    d1_exact = np.zeros(q, bool)
    nearest = np.full(q, -1, np.int64)
    d1 = np.full(q, np.inf)
    lo = np.zeros(q)
    hi = np.ones(q)
    fallback = []
    for i, kn in enumerate(known):
        idx, dist = kn.ranked(2)
        nearest[i], d1[i] = idx[0], dist[0]
        e1 = dist[0]
        e2 = dist[1] if len(dist) > 1 else np.inf
        if e1 > theta[i]:  # every reference is farther than theta: ratio >= tau
            lo[i] = tau
            continue
        d1_exact[i] = True
        if e2 <= theta[i]:
            lo[i] = hi[i] = float(ratio_statistic(e1, e2, bias[i], floor, margin))
            flagged[i] = hi[i] < tau
            continue
        lo[i] = float(ratio_statistic(e1, e2, bias[i], floor, margin))  # d2 <= e2
        hi[i] = float(ratio_statistic(e1, theta[i], bias[i], floor, margin))  # d2 > theta
        if lo[i] >= tau:
            continue
        if hi[i] < tau:
            flagged[i] = True
            continue
        fallback.append(i)
    if fallback:
        # the second distance is only bracketed: evaluate everything within the second-nearest found
        search.stats.fallbacks += len(fallback)
        fb = np.asarray(fallback)
        done = search.within(radius=np.array([known[i].kth(2) for i in fallback]),
                             exclude=None if exclude is None else [exclude[i] for i in fallback],
                             orbits=orbits[torch_index(fb)], known=[known[i] for i in fallback])
        for i, kn in zip(fallback, done):
            idx, dist = kn.ranked(2)
            r = float(ratio_statistic(dist[0], dist[1], bias[i], floor, margin))
            lo[i] = hi[i] = r
            flagged[i] = r < tau
            nearest[i], d1[i] = idx[0], dist[0]
    return RatioDecision(flagged, nearest, d1, d1_exact, lo, hi, theta, float(tau))


# ------------------------------------------------------------------------------------------------ rule

#: The two tests of :class:`CopyRatioRule`: the plain distance on the whole image, and the distance
#: minimised over shifts of up to 3 px and zooms of 0.95 / 1.05 on the central region.
COMPONENTS = {
    "identity": Transforms(0, (1.0,)),
    "shift_zoom": Transforms(3, (0.95, 1.0, 1.05)),
}


@dataclass(frozen=True)
class RuleDecision:
    """:class:`CopyRatioRule`'s verdict: ``flagged`` is the union of the components' proven decisions."""

    flagged: np.ndarray
    components: dict
    thresholds: dict
    alpha: float


class CopyRatioRule:
    """Union of ratio tests, each calibrated on a holdout at ``alpha / len(components)``.

    Parameters
    ----------
    height, width, channels
        Image geometry.
    alpha
        False-alarm level on unseen images exchangeable with the holdout.
    components
        Names in :data:`COMPONENTS` (or ``{name: Transforms}``).
    pooled, grid
        :class:`CopyLayout` settings shared by the components.
    debias
        Subtract the query's own noise energy from both distances.
    noise_floor
        Floor the debiased distances at :func:`noise_margin` of the noise
        energy (keeps noisy flat novel images from looking like copies).

    Notes
    -----
    Lowe 2004 (ratio test); Douze et al. 2021 (DISC21) and Pizzi et al. 2022
    (SSCD) for score normalisation by other references in copy detection;
    Immerkaer 1996 (noise variance); Vovk et al. 2005 / Angelopoulos & Bates
    2021 (conformal quantile).
    """

    def __init__(self, height: int, width: int, channels: int = 1, alpha: float = 0.005,
                 components=("identity", "shift_zoom"), pooled: int = 8, grid: int = 1, debias: bool = True,
                 noise_floor: bool = True, floor: float = RATIO_FLOOR, shift_group: int = 3, device="cpu"):
        if not 0 < alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        comps = components if isinstance(components, dict) else {c: COMPONENTS[c] for c in components}
        self.alpha = alpha
        self.debias = debias
        self.noise_floor = noise_floor
        self.floor = floor
        self.layouts = {name: CopyLayout(height, width, channels, pooled=pooled, grid=grid, transforms=t)
                        for name, t in comps.items()}
        self.metrics = {name: CopyMetric(lay, device) for name, lay in self.layouts.items()}
        self.shift_group = shift_group

    def bias(self, name: str, sigma) -> np.ndarray:
        return noise_bias(self.layouts[name], sigma) if self.debias else np.zeros(len(sigma))

    def margin(self, name: str) -> float:
        return noise_margin(self.layouts[name]) if self.noise_floor else 0.0

    def _ratio(self, name, nb, sigma) -> np.ndarray:
        return ratio_statistic(nb.distances[:, 0], nb.distances[:, 1], self.bias(name, sigma), self.floor,
                               self.margin(name))

    def fit(self, references, holdout, screen: float = 0.7) -> CopyRatioRule:
        """Index the references and set each test's threshold from the holdout's ratios.

        The conformal threshold is the ``k``-th smallest holdout ratio with
        ``k = floor(level (n + 1))``, so only the smallest ratios must be
        exact: a proven decision at ``screen`` finds every holdout image with
        a ratio below it (widening the screen if fewer than ``k``), and only
        those get the exact two-nearest search.  ``holdout_ratio_[name]``
        holds their exact ratios and ``screen`` for the others (a lower
        bound).
        """
        self.searches_ = {}
        self.thresholds_ = {}
        self.holdout_ratio_ = {}
        h_sigma = noise_sigma(holdout)
        n = len(holdout)
        level = self.alpha / len(self.metrics)
        k = max(1, math.floor(level * (n + 1)))
        for name, metric in self.metrics.items():
            feats = torch_cat_features(metric, references)
            search = ExactCopySearch(metric, feats, shift_group=self.shift_group)
            bias = self.bias(name, h_sigma)
            cut = screen
            while True:
                below = decide_ratio(search, holdout, cut, bias, self.floor, self.margin(name)).flagged
                if below.sum() >= k or cut >= 0.99:
                    break
                cut = min(0.99, cut + 0.1)
            r = np.full(n, cut)
            pick = np.nonzero(below)[0] if below.sum() >= k else np.arange(n)
            if len(pick):
                nb = search.search(holdout[pick], k=2)
                r[pick] = self._ratio(name, nb, h_sigma[pick])
            self.searches_[name] = search
            self.holdout_ratio_[name] = r
            self.thresholds_[name] = conformal_threshold(r, level)
        return self

    def decide(self, queries) -> RuleDecision:
        """Each test's proven decision on ``queries`` and their union (:meth:`fit` first)."""
        sigma = noise_sigma(queries)
        comps = {}
        flagged = np.zeros(len(queries), bool)
        for name, search in self.searches_.items():
            d = decide_ratio(search, queries, self.thresholds_[name].tau, self.bias(name, sigma), self.floor,
                             self.margin(name))
            comps[name] = d
            flagged |= d.flagged
        return RuleDecision(flagged, comps, dict(self.thresholds_), self.alpha)

    def ratios(self, queries) -> dict[str, np.ndarray]:
        """Every component's exact ratio (two nearest proven) -- for benchmarks and the holdout."""
        sigma = noise_sigma(queries)
        out = {}
        for name, search in self.searches_.items():
            nb = search.search(queries, k=2)
            out[name] = self._ratio(name, nb, sigma)
        return out


def torch_index(idx):
    import torch

    return torch.as_tensor(np.asarray(idx, np.int64))


def torch_cat_features(metric: CopyMetric, images, batch: int = 512):
    """Features of many images, batch by batch (bounded memory)."""
    import torch

    return torch.cat([metric.features(images[s:s + batch]) for s in range(0, len(images), batch)])
