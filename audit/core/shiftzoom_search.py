"""Exact neighbours under the shift/zoom distance of :mod:`audit.core.shiftzoom`, proven by a lower bound.

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
so it is proven).  :meth:`ExactCopySearch.search` (k nearest) first
evaluates a few candidates ranked by the distance to the orbit's centre,
takes the k-th exact distance as the radius and calls ``within``.
:meth:`ExactCopySearch.search_grouped` (the nearest, and the nearest outside
its group) takes as the radius the nearest evaluated candidate outside the
best candidate's group, which bounds both, and calls ``within``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from audit.core.shiftzoom import CopyMetric
from audit.core.tiled import Neighbours, SearchStats

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Absolute slack on squared distances (feature norms are RMS values of [0, 1] images, so squared
#: norms are at most 0.25 per channel): float32 rounding of ``|a|^2 + |b|^2 - 2ab`` over 64-dimensional
#: features stays below 1e-6; the bound is lowered by this, so it stays a bound.
BOUND_SLACK = 1e-5
#: Transforms whose float32 squared distance is within this share of the squared norms of the best one's are
#: recomputed in float64 (float32 rounds a product of unit-scale features to ~1e-7 relative).
EXACT_RTOL = 1e-6


@dataclass
class CopySearchStats(SearchStats):
    """:class:`audit.core.tiled.SearchStats` plus the bound's group count and the decision fallbacks."""

    groups: int = 0
    proxy_pairs: int = 0
    refine_pairs: int = 0
    fallbacks: int = 0
    seconds: dict = field(default_factory=dict)

    def tick(self, stage: str, t0: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def to_dict(self) -> dict:
        return super().to_dict() | {"groups": self.groups, "proxy_pairs": self.proxy_pairs,
                                    "refine_pairs": self.refine_pairs, "fallbacks": self.fallbacks,
                                    "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def _nonzero(mask) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a 2-D boolean tensor's true entries, row-major (as ``torch.nonzero``).

    On a CPU a flat ``np.flatnonzero`` is about 10x faster than ``torch.nonzero`` or ``np.nonzero`` on a
    (64, 4096) mask with 0.3 % true -- measured at 3.6 ms against 0.4 ms, five times the bound's product
    itself, which made the one-group bound run at 40 % of a bare product's speed (bench/copy_scale.py).
    """
    if mask.device.type == "cpu":
        flat = np.flatnonzero(mask.numpy())
        return flat // mask.shape[1], flat % mask.shape[1]
    rows, cols = mask.nonzero(as_tuple=True)
    return rows.cpu().numpy(), cols.cpu().numpy()


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
            return torch.zeros((0, len(self.metric.orbit_items), self.metric.layout.dim), device=self.metric.device)
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
        return self._proxy_ranked(orbits, exclude, at_least)[0]

    def _proxy_ranked(self, orbits, exclude, at_least: int = 1):
        """:meth:`_proxy`'s ``(indices, squared distances to the centre)`` (a shard's answer, merged by distance)."""
        torch = self._torch
        t0 = time.perf_counter()
        q = orbits.shape[0]
        k = min(max(self.initial, at_least), self.n_refs - (1 if exclude is not None else 0))
        invert = self.metric.layout.transforms.invert
        # the centre of the orbit as it is; an inverted orbit's centre is its negative, so the nearer of the two
        # is the one with the larger |<c, f>|
        centre = orbits[:, :len(self.metric.items)].mean(1) if invert else orbits.mean(1)
        cn = (centre * centre).sum(1)
        best = torch.full((q, 0), float("inf"), device=orbits.device)
        idx = torch.zeros((q, 0), dtype=torch.long, device=orbits.device)
        for s in range(0, self.n_refs, self.ref_block * 4):
            e = min(s + self.ref_block * 4, self.n_refs)
            if invert:
                d = self.rn[s:e][None, :] - 2.0 * (centre @ self.rf[s:e].T).abs() + cn[:, None]
            else:
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
        return idx, best

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
            # one group (the identity test): no minimum to take, one pass over the product fewer
            keep = (v if g == 1 else v.reshape(q, g, e - s).amin(1)) <= 0.0
            if exclude is not None:
                for row, ref in enumerate(exclude):
                    if ref is not None and s <= ref < e:
                        keep[row, ref - s] = False
            rows, cols = _nonzero(keep)
            cols = cols + s
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

        float32 products over all transforms rank them per reference; every
        transform within float32 rounding of the best (``EXACT_RTOL`` of the
        squared norms involved) is recomputed in float64 by direct
        differences, and the smallest is the distance.  Recomputing only the
        float32 winner was not enough: on a near-copy (``D`` = 0.0068) a
        transform float32 ranked second was the true minimum by 5e-7
        (``bench/copy_scale.py``, 1,000 x 10,000), so the reported distance
        was 7e-5 too large, relative.
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
        on = (orbit_q * orbit_q).sum(1)
        d = torch.addmm(self.rn[idx][:, None], f, orbit_q.T, alpha=-2.0)  # (n, |T|) minus |orbit|^2
        d += on[None, :]
        near = d <= d.amin(1, keepdim=True) + EXACT_RTOL * (self.rn[idx][:, None] + on[None, :])
        rows, cols = near.nonzero(as_tuple=True)
        sq = (orbit_q[cols].double() - f[rows].double()).square_().sum(1)
        best = torch.full((len(refs),), float("inf"), dtype=torch.float64, device=sq.device)
        best.scatter_reduce_(0, rows, sq, reduce="amin")
        out = best.sqrt_().cpu().numpy()
        self.stats.tick("exact", t0)
        return out

    def matched(self, orbit_q, ref: int) -> tuple[int, float]:
        """``(index, D)``: which of :attr:`metric.orbit_items` brings the query nearest to reference ``ref``."""
        lay = self.metric.layout
        diff = (orbit_q.double() - self.rf[int(ref)].double()[None]).square_()  # (|T|, D)
        if lay.grid > 1:
            th, tw = lay.tile
            per = diff.reshape(len(diff), lay.channels, lay.grid, th, lay.grid, tw).sum(dim=(1, 3, 5)).flatten(1)
            d = per.amax(1) * lay.tiles
        else:
            d = diff.sum(1)
        i = int(d.argmin())
        return i, float(d[i].sqrt())

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

    # ------------------------------------------------------- training groups

    def outside_bound(self, orbits, known: list[Evaluated], labels, exclude=None) -> np.ndarray:
        """Per query, ``U2g``: an exact distance that bounds the grouped second distance from above.

        With ``a`` the best evaluated reference, ``U2g`` is the smallest
        evaluated distance among references outside ``a``'s group.  Whatever
        group the true nearest ``n1`` is in, ``d2g <= U2g``: if it is ``a``'s,
        the reference behind ``U2g`` is outside it; if not, ``a`` itself is
        outside it and ``D(a) <= U2g``.  A query whose evaluated references
        all share one group first gets one reference outside it (the nearest
        to its orbit's centre, a ranking only), so ``U2g`` is finite unless
        every reference is in one group.
        """
        lab = np.asarray(labels)
        need = [i for i, kn in enumerate(known) if not np.isfinite(kn.outside(lab)[1])]
        if need:
            self._add_outside(orbits, known, lab, exclude, need)
        return np.array([kn.outside(lab)[1] for kn in known]) if known else np.zeros(0)

    def _add_outside(self, orbits, known: list[Evaluated], labels: np.ndarray, exclude, rows: list[int]) -> None:
        torch = self._torch
        t0 = time.perf_counter()
        lab = torch.as_tensor(labels, device=self.rf.device)
        for i in rows:
            best = known[i].ranked(1)[0]
            j, _ = self._outside_candidate(orbits[i], lab, int(labels[best[0]]) if len(best) else None,
                                           None if exclude is None else exclude[i])
            if j >= 0:
                known[i].add([j], self._exact(orbits[i], np.array([j])))
        self.stats.proxy_pairs += len(rows) * self.n_refs
        self.stats.tick("proxy", t0)

    def _outside_candidate(self, orbit, lab, group: int | None, excluded) -> tuple[int, float]:
        """The reference nearest to ``orbit``'s centre outside group ``group`` (``lab``: a label per reference,
        a tensor) and other than ``excluded``: ``(index, |f|^2 - 2 c . f)`` (a ranking, ties to the lower index),
        ``(-1, inf)`` when there is none."""
        torch = self._torch
        centre = orbit.mean(0)
        d = self.rn - 2.0 * (self.rf @ centre)  # ranking by the distance to the centre
        mask = lab == group if group is not None else torch.zeros_like(lab, dtype=torch.bool)
        if excluded is not None:
            mask[int(excluded)] = True
        d = d.masked_fill(mask, float("inf"))
        j = int(d.argmin())
        v = float(d[j])
        return (j, v) if np.isfinite(v) else (-1, float("inf"))

    def search_grouped(self, queries, labels, exclude=None) -> Neighbours:
        """The exact nearest reference and the exact nearest outside its group, per query (both proven).

        ``labels[r]`` is reference ``r``'s group (a patient, or near-duplicates
        of each other).  With ``U2g`` from :meth:`outside_bound`, every
        reference within ``U2g`` is evaluated (:meth:`within`; the rest have a
        lower bound above it).  The nearest has ``d1 <= U2g``, so it is among
        them; the nearest outside its group has ``d2g <= U2g``, so it is too.
        ``indices[:, 1]``/``distances[:, 1]`` are that reference and ``d2g``
        (``-1``/``inf`` when every reference is in one group).
        """
        orbits = self.orbits(queries)
        q = orbits.shape[0]
        self.stats.queries += q
        lab = np.asarray(labels)
        exclude = None if exclude is None else list(exclude)
        known = self._initial(orbits, exclude, 2)
        u2 = self.outside_bound(orbits, known, lab, exclude)
        known = self.within(radius=u2, exclude=exclude, orbits=orbits, known=known)
        idx = np.full((q, 2), -1, np.int64)
        dist = np.full((q, 2), np.inf)
        for i, kn in enumerate(known):
            i1, d1 = kn.ranked(1)
            idx[i, 0], dist[i, 0] = i1[0], d1[0]
            idx[i, 1], dist[i, 1] = kn.outside(lab, int(i1[0]))
        return Neighbours(idx, dist, u2, 2)


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

    def outside(self, labels: np.ndarray, ref: int | None = None) -> tuple[int, float]:
        """The nearest evaluated reference outside ``ref``'s group (default: the best evaluated's): ``(index,
        distance)``, ``(-1, inf)`` when there is none."""
        i, d = self._all()
        if not len(i):
            return -1, np.inf
        g = labels[i[0] if ref is None else ref]
        other = np.nonzero(labels[i] != g)[0]
        return (int(i[other[0]]), float(d[other[0]])) if len(other) else (-1, np.inf)

    def ranked(self, k: int | None = None):
        i, d = self._all()
        return (i, d) if k is None else (i[:k], d[:k])
