"""A pooled, mean-removed image distance minimised over small shifts and zooms of the query.

An image is normalised by ``phi``: its *central region* (the part every
transform below keeps inside the image) is averaged over ``pooled x pooled``
near-equal blocks (8 x 8 by default: a low-pass that makes the distance
tolerate noise, JPEG, blur and the sub-pixel residue of a zoom), then the
mean of each tile of a ``grid x grid`` grid is removed per channel
(brightness, and locally contrast or gamma).  For a query ``q`` and a
reference ``r``

    D(q, r) = min over transforms T of  max over tiles t of  RMS_t(phi(T q) - phi(r)),

Carlini et al.'s (2023) tiled normalised L2 on normalised images, minimised
over a set of transforms of the query: integer shifts ``dy, dx`` in
``[-s, s]`` and zooms ``z`` about the centre (``T q (p) = q(c + z (p - c) +
d)``, bilinear).  With no transform (``Transforms(0, (1.0,))``) the central
region is the whole image.  RGB channels are compared jointly, each with its
own mean removed.

A transform followed by pooling is linear and separable, so the whole orbit
``{phi(T q)}`` of a query costs two small matrix products per zoom
(:meth:`CopyMetric.orbit`), never a resampled image.  The exact search over
this distance is :class:`audit.core.shiftzoom_search.ExactCopySearch`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from audit.core.tiled import edges

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class Transforms:
    """The transforms a copy may have undergone: integer shifts and zooms about the centre."""

    max_shift: int = 3
    scales: tuple[float, ...] = (0.95, 1.0, 1.05)
    invert: bool = False
    """Also every transform of the query with its intensities inverted (``1 - q``; after the tile mean is removed,
    ``-phi(T q)``): a copy exported without its DICOM MONOCHROME1 inversion, or inverted on purpose.  The orbit
    then holds :meth:`items` twice, as they are and inverted (:meth:`orbit_items`)."""

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

    def orbit_items(self) -> list[tuple[float, int, int, bool]]:
        """``(zoom, dy, dx, inverted)`` of every member of the orbit: :meth:`items`, then inverted when ``invert``."""
        base = self.items()
        return [(*t, False) for t in base] + ([(*t, True) for t in base] if self.invert else [])

    def groups(self, shift_group: int = 3, split_zoom: bool = False) -> list[list[int]]:
        """Indices of :meth:`orbit_items` in groups of neighbouring shifts (and zooms, unless ``split_zoom``); the
        inverted half in groups of its own (a group holding ``f`` and ``-f`` would have its centre at 0)."""
        out = self._groups(shift_group, split_zoom)
        if self.invert:
            n = len(self.items())
            out += [[i + n for i in g] for g in out]
        return out

    def _groups(self, shift_group: int, split_zoom: bool) -> list[list[int]]:
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
        self.orbit_items = layout.transforms.orbit_items()  # items, and inverted when the transforms invert
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
        """``phi(T x)`` for every transform: ``(N, |T|, D)``, in :meth:`Transforms.orbit_items` order."""
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
        orbit = self._normalise(grid[:, self._perm])
        if self.layout.transforms.invert:
            # phi is linear and removes each tile's mean, so phi(T (1 - x)) = -phi(T x): inverting costs nothing
            orbit = torch.cat([orbit, -orbit], 1)
        return orbit

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


def grouped_two(full: np.ndarray, labels) -> tuple[np.ndarray, np.ndarray]:
    """From every pair's distance ``(Q, R)``: each query's nearest reference and the nearest outside its group.

    ``labels[r]`` is reference ``r``'s group; ties go to the lower index.
    ``(indices, distances)``, both ``(Q, 2)``; ``-1``/``inf`` where every
    reference is in the nearest's group.  The baseline for tests and benchmarks.
    """
    full = np.asarray(full, np.float64)
    labels = np.asarray(labels)
    q, r = full.shape
    order = np.lexsort((np.broadcast_to(np.arange(r), full.shape), full), axis=1)
    first = order[:, 0]
    idx = np.full((q, 2), -1, np.int64)
    dist = np.full((q, 2), np.inf)
    idx[:, 0], dist[:, 0] = first, full[np.arange(q), first]
    for i in range(q):
        other = order[i][labels[order[i]] != labels[first[i]]]
        if len(other):
            idx[i, 1], dist[i, 1] = other[0], full[i, other[0]]
    return idx, dist
