"""The ratio copy rule: how much nearer a synthetic image is to its nearest training image than to the next.

Statistic
---------
``ratio(q) = sqrt(max(d1^2 - b, m b, f^2) / max(d2^2 - b, m b, f^2))`` with
``d1`` the distance from ``q`` to its nearest training image and ``d2`` to
the nearest training image *outside that image's group* under the shift/zoom
distance of :mod:`audit.core.shiftzoom`.  A group is one patient's images
and any training images that are near-duplicates of each other
(:meth:`CopyRatioRule.group`); without groups ``d2`` is the second-nearest.
Without grouping, a copy of a training image that has a near-duplicate (the
same patient scanned twice, a follow-up) is as near that sibling as its
source, ``d2 ~ d1`` and the copy is missed.  This is the nearest /
second-nearest ratio of Lowe (2004), used for copy detection as a score
normalised by the distances to other references (Douze et al. 2021, DISC21;
Pizzi et al. 2022, SSCD).  ``b`` is the query's own noise energy after
pooling (noise variance by Immerkaer 1996 divided by the block size, capped
at ``d1^2``), subtracted from both squared distances because independent
noise adds it to every one of them; ``m b`` (``m = 2 / sqrt(dof)``, 0.25 for
8 x 8) keeps a difference smaller than the noise's own fluctuation from
counting as evidence; ``f`` is a floor at the 8-bit quantisation level, so
two flat images give ratio 1 (no evidence) rather than 0/0.  A copy is much
nearer its source than anything else; an unseen image that merely resembles
the training set (textures, flat backgrounds) is about as near its
second-nearest as its nearest.

Rule
----
:class:`CopyRatioRule` runs two such tests -- the plain distance on the
whole image (``identity``) and the distance minimised over shifts and zooms
on the central region (``shift_zoom``) -- and flags an image when either
ratio is below its threshold.  Each threshold is a conformal quantile of the
holdout's ratios at ``alpha / 2`` (Vovk et al. 2005; Angelopoulos & Bates
2021), so an unseen image exchangeable with the holdout is flagged with
probability at most ``alpha`` (union bound).

Exact decisions
---------------
:func:`decide_ratio` proves every decision without the two nearest of every
query: the ratio is non-decreasing in ``d1`` and non-increasing in ``d2``, so
with ``U2 >= d2`` (the smallest exact distance among a few candidates
outside the best candidate's group) a query with ``d1 >= theta = smallest_d1(U2)`` (about
``tau U2``) cannot be flagged, and only references within ``theta`` matter;
:meth:`~audit.core.shiftzoom_search.ExactCopySearch.within` finds every one
of them (a proven lower bound excludes the rest), the nearest among them.
Where the grouped second distance is then still only bracketed and the bracket straddles ``tau``, the query
falls back to the proven two nearest.  So an image is flagged if and only if
its exact statistic is below the threshold.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from audit.core.shiftzoom import CopyLayout, CopyMetric, Transforms
from audit.core.shiftzoom_search import ExactCopySearch

from .ratio_statistic import (
    RATIO_FLOOR,
    ConformalThreshold,
    conformal_k,
    noise_bias,
    noise_margin,
    noise_sigma,
    ratio_statistic,
    ratio_threshold,
    smallest_d1,
)

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
                 margin: float = 0.0, exclude=None, labels=None) -> RatioDecision:
    """Flag queries whose ratio statistic is ``< tau``, proven, without the exact two nearest of every query.

    The second distance is the *grouped* one: the nearest reference outside
    the nearest's group (``labels[r]``, the training groups; ``None``: every
    reference its own group, the plain second-nearest).  With ``U2`` an exact
    distance that bounds it (:meth:`ExactCopySearch.outside_bound`, the
    nearest evaluated outside the best candidate's group), any query with
    ``d1 >= theta`` has ratio ``>= tau``, where ``theta = smallest_d1(U2)``
    (about ``tau U2``); so only references within ``theta`` matter, and
    :meth:`ExactCopySearch.within` finds all of them.  The nearest is then
    exact (it lies within ``theta``); where the grouped second distance lies
    beyond ``theta`` and its bracket straddles ``tau``, the query falls back
    to every reference within the nearest evaluated outside the nearest's
    group, which proves it.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"tau {tau} must be in (0, 1]")
    orbits = search.orbits(queries)
    q = orbits.shape[0]
    search.stats.queries += q
    bias = np.array(np.broadcast_to(np.asarray(bias, np.float64), (q,)))
    exclude = None if exclude is None else list(exclude)
    labels = np.arange(search.n_refs) if labels is None else np.asarray(labels)
    known = search._initial(orbits, exclude, 2)
    u2 = search.outside_bound(orbits, known, labels, exclude)
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
        idx, dist = kn.ranked(1)
        nearest[i], d1[i] = idx[0], dist[0]
        e1 = dist[0]
        if e1 > theta[i]:  # every reference is farther than theta: ratio >= tau
            lo[i] = tau
            continue
        d1_exact[i] = True
        e2 = kn.outside(labels, int(idx[0]))[1]  # d2g <= e2 (see outside_bound)
        if e2 <= theta[i]:
            lo[i] = hi[i] = float(ratio_statistic(e1, e2, bias[i], floor, margin))
            flagged[i] = hi[i] < tau
            continue
        lo[i] = float(ratio_statistic(e1, e2, bias[i], floor, margin))  # d2g <= e2
        hi[i] = float(ratio_statistic(e1, theta[i], bias[i], floor, margin))  # d2g > theta
        if lo[i] >= tau:
            continue
        if hi[i] < tau:
            flagged[i] = True
            continue
        fallback.append(i)
    if fallback:
        # the grouped second distance is only bracketed: evaluate everything within the best one found
        search.stats.fallbacks += len(fallback)
        fb = np.asarray(fallback)
        done = search.within(radius=np.array([known[i].outside(labels, int(nearest[i]))[1] for i in fallback]),
                             exclude=None if exclude is None else [exclude[i] for i in fallback],
                             orbits=orbits[torch_index(fb)], known=[known[i] for i in fallback])
        for i, kn in zip(fallback, done):
            idx, dist = kn.ranked(1)
            e2 = kn.outside(labels, int(idx[0]))[1]
            r = float(ratio_statistic(dist[0], e2, bias[i], floor, margin))
            lo[i] = hi[i] = r
            flagged[i] = r < tau
            nearest[i], d1[i] = idx[0], dist[0]
    return RatioDecision(flagged, nearest, d1, d1_exact, lo, hi, theta, float(tau))


# ------------------------------------------------------------------------------------------------ rule

#: The two tests of :class:`CopyRatioRule` by default: the plain distance on the whole image (as it is or inverted,
#: whichever is nearer), and the distance minimised over shifts of up to 3 px and zooms of 0.95 / 1.05 on the
#: central region.
COMPONENTS = {
    "identity": Transforms(0, (1.0,), invert=True),
    "shift_zoom": Transforms(3, (0.95, 1.0, 1.05)),
}

#: ``indices -> images (N, C, H, W)`` in [0, 1]: how the rule reads a set it does not hold in memory.
Loader = Callable[[np.ndarray], np.ndarray]


def training_groups(n: int, pairs=(), patients=None) -> np.ndarray:
    """A group label per training image: images joined by a near-duplicate pair or by one patient ID share one.

    Connected components of the graph whose edges are the ``pairs`` and
    every two images with the same (non-empty) entry of ``patients``; labels
    are ``0..G-1`` in order of each group's first image.
    """
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    first: dict = {}
    for i, p in enumerate(() if patients is None else patients):
        if p:
            j = first.setdefault(p, i)
            parent[find(i)] = find(j)
    for a, b in pairs:
        parent[find(int(a))] = find(int(b))
    roots = np.array([find(i) for i in range(n)], np.int64)
    _, labels = np.unique(roots, return_inverse=True)
    order = {}  # relabel by first appearance, so labels do not depend on union order
    return np.array([order.setdefault(r, len(order)) for r in labels], np.int64)


def components(max_shift: int = 3, zooms=(0.95, 1.0, 1.05), inverted: bool = False) -> dict[str, Transforms]:
    """The rule's tests: ``identity`` (with ``inverted``, the image as it is *or* with its intensities inverted,
    whichever is nearer: one test, so no share of the false-alarm rate is spent on it), plus ``shift_zoom`` unless
    the shifts and zooms are only the identity."""
    out = {"identity": Transforms(0, (1.0,), invert=inverted)}
    if max_shift > 0 or set(zooms) != {1.0}:
        out["shift_zoom"] = Transforms(max_shift, tuple(sorted({float(z) for z in zooms})))
    return out


def _source(images) -> tuple[int, Loader]:
    """``(n, loader)`` of an array, or a given ``(n, loader)`` pair."""
    if isinstance(images, tuple):
        return images
    x = np.asarray(images, np.float32)
    return len(x), lambda idx: x[np.asarray(idx, np.int64)]


@dataclass(frozen=True)
class RuleDecision:
    """:class:`CopyRatioRule`'s verdict: ``flagged`` is the union of the components' proven decisions."""

    flagged: np.ndarray
    components: dict
    thresholds: dict
    alpha: float


@dataclass(frozen=True)
class HoldoutRatios:
    """One test's statistic on the holdout: exact where ``exact``, else only ``>= screen`` (stored as ``screen``).

    ``d1_low <= d1 <= d1_high`` bracket each image's nearest distance (equal where it is known).
    """

    ratio: np.ndarray
    exact: np.ndarray
    d1_low: np.ndarray
    d1_high: np.ndarray
    screen: float


class CopyRatioRule:
    """Union of ratio tests, each calibrated on a holdout at ``alpha / len(components)``.

    Parameters
    ----------
    height, width, channels
        Image geometry (the analysis size: callers downsample first).
    alpha
        False-alarm level on unseen images exchangeable with the holdout.
    components
        Names in :data:`COMPONENTS` or ``{name: Transforms}`` (see :func:`components`).
    pooled, grid
        :class:`~audit.core.shiftzoom.CopyLayout` settings shared by the components.
    debias
        Subtract the query's own noise energy from both distances.
    noise_floor
        Floor the debiased distances at :func:`noise_margin` of the noise
        energy (keeps noisy flat novel images from looking like copies).
    chunk
        Images per step when a set is read through a loader.

    Notes
    -----
    Lowe 2004 (ratio test); Douze et al. 2021 (DISC21) and Pizzi et al. 2022
    (SSCD) for score normalisation by other references in copy detection;
    Immerkaer 1996 (noise variance); Vovk et al. 2005 / Angelopoulos & Bates
    2021 (conformal quantile).
    """

    def __init__(self, height: int, width: int, channels: int = 1, alpha: float = 0.005,
                 components=("identity", "shift_zoom"), pooled: int = 8, grid: int = 1, debias: bool = True,
                 noise_floor: bool = True, floor: float = RATIO_FLOOR, shift_group: int = 3, device="cpu",
                 chunk: int = 1024):
        if not 0 < alpha < 0.5:
            raise ValueError("alpha must be in (0, 0.5)")
        comps = components if isinstance(components, dict) else {c: COMPONENTS[c] for c in components}
        self.alpha = alpha
        self.debias = debias
        self.noise_floor = noise_floor
        self.floor = floor
        self.chunk = chunk
        self.layouts = {name: CopyLayout(height, width, channels, pooled=pooled, grid=grid, transforms=t)
                        for name, t in comps.items()}
        self.metrics = {name: CopyMetric(lay, device) for name, lay in self.layouts.items()}
        self.shift_group = shift_group

    @property
    def level(self) -> float:
        """Each test's share of ``alpha`` (Bonferroni)."""
        return self.alpha / len(self.metrics)

    def bias(self, name: str, sigma) -> np.ndarray:
        return noise_bias(self.layouts[name], sigma) if self.debias else np.zeros(len(sigma))

    def margin(self, name: str) -> float:
        return noise_margin(self.layouts[name]) if self.noise_floor else 0.0

    def statistic(self, name: str, d1, d2, sigma) -> np.ndarray:
        return ratio_statistic(d1, d2, self.bias(name, sigma), self.floor, self.margin(name))

    def _chunks(self, n: int, load: Loader, indices=None):
        idx = np.arange(n) if indices is None else np.asarray(indices, np.int64)
        for s in range(0, len(idx), self.chunk):
            part = idx[s:s + self.chunk]
            yield part, load(part)

    # ------------------------------------------------------------------------ fitting

    def index(self, references) -> CopyRatioRule:
        """The references' features for every test (``references``: an array or ``(n, loader)``)."""
        import torch

        n, load = _source(references)
        feats: dict[str, list] = {name: [] for name in self.metrics}
        for _, x in self._chunks(n, load):
            for name, metric in self.metrics.items():
                feats[name].append(metric.features(x))
        self.searches_ = {name: ExactCopySearch(metric, torch.cat(feats[name]), shift_group=self.shift_group)
                          for name, metric in self.metrics.items()}
        self.labels_ = None
        self.pairs_: list[tuple[int, int]] = []
        self.radius_: ConformalThreshold | None = None
        return self

    def index_features(self, features: dict) -> CopyRatioRule:
        """:meth:`index` from features computed elsewhere (a cluster's workers): ``{test: (n, D)}``."""
        self.searches_ = {name: ExactCopySearch(self.metrics[name], f, shift_group=self.shift_group)
                          for name, f in features.items()}
        self.labels_ = None
        self.pairs_ = []
        self.radius_ = None
        return self

    @property
    def main(self) -> str:
        """The test whose distance defines near-duplicates (shift/zoom when there is one)."""
        return "shift_zoom" if "shift_zoom" in self.metrics else next(iter(self.metrics))

    def nearest_distances(self, images, name: str | None = None) -> np.ndarray:
        """Every image's exact distance to its nearest reference under test ``name`` (default :attr:`main`)."""
        n, load = _source(images)
        search = self.searches_[name or self.main]
        out = np.zeros(n)
        for part, x in self._chunks(n, load):
            out[part] = search.search(x, k=1).distances[:, 0]
        return out

    def duplicate_pairs(self, references, radius: float, name: str | None = None) -> list[tuple[int, int]]:
        """Every pair of references within ``radius`` of each other (either way round; exact radius search)."""
        n, load = _source(references)
        search = self.searches_[name or self.main]
        pairs = set()
        for part, x in self._chunks(n, load):
            for qi, kn in zip(part.tolist(), search.within(x, radius=radius, exclude=part.tolist())):
                pairs.update(tuple(sorted((qi, j))) for j, d in kn.as_dict().items() if d <= radius)
        return sorted(pairs)

    def group(self, references, holdout, patients=None, pairs=None) -> CopyRatioRule:
        """The training groups the second distance looks past (:meth:`index` first, then :meth:`calibrate`).

        Two training images are near-duplicates when one is within the
        *duplicate radius* of the other under :attr:`main`'s distance: the
        conformal ``alpha`` quantile of how near the holdout's (unseen) images
        come to any training image, so a pair is closer than all but that share
        of unseen images come to the training set.  Groups join near-duplicate
        pairs and, given ``patients`` (one ID per reference, empty for none),
        each patient's images.  A copy of a training image that has a
        near-duplicate (a follow-up scan, a second view) would otherwise be as
        near that sibling as its source, and its ratio would be about 1.
        ``pairs`` (``radius -> pairs``) replaces :meth:`duplicate_pairs` of
        ``references`` (a cluster's workers reading the training set themselves).
        """
        self.radius_ = ratio_threshold(self.nearest_distances(holdout), self.alpha)
        self.pairs_ = (self.duplicate_pairs(references, self.radius_.tau) if pairs is None
                       else list(pairs(self.radius_.tau)))
        self.labels_ = training_groups(self.searches_[self.main].n_refs, self.pairs_, patients)
        return self

    def calibrate(self, holdout, screen: float = 0.7, subsets=None) -> CopyRatioRule:
        """Each test's threshold from the holdout's ratios (:meth:`index` first).

        The conformal threshold is the ``k``-th smallest holdout ratio with
        ``k = floor(level (n + 1))``, so only the smallest ratios must be
        exact: a proven decision at ``screen`` finds every holdout image with
        a ratio below it, and only those get the exact two-nearest search.
        The screen widens until every index set in ``subsets`` (default: the
        whole holdout; cross-fitting passes its halves too) holds at least
        its own ``k`` exact ratios; past 0.99 every ratio is computed.  The
        second distance is the grouped one (:meth:`group`) when groups are set.
        """
        n, load = _source(holdout)
        groups = [np.arange(n)] if subsets is None else [np.asarray(g, np.int64) for g in subsets]
        self.holdout_ = {}
        for name, search in self.searches_.items():
            ratio = np.full(n, screen)
            exact = np.zeros(n, bool)
            d1_low = np.zeros(n)
            d1_high = np.full(n, np.inf)
            cut = screen
            while True:
                for part, x in self._chunks(n, load, np.nonzero(~exact)[0]):
                    sigma = noise_sigma(x)
                    if cut < 1.0:
                        dec = decide_ratio(search, x, cut, self.bias(name, sigma), self.floor, self.margin(name),
                                           labels=self.labels_)
                        d1_high[part] = np.minimum(d1_high[part], dec.d1)
                        d1_low[part] = np.maximum(d1_low[part], np.where(dec.d1_exact, dec.d1, dec.radius))
                        pick = np.nonzero(dec.flagged)[0]
                    else:
                        pick = np.arange(len(part))
                    if len(pick):
                        nb = self._two(search, x[pick])
                        ratio[part[pick]] = self.statistic(name, nb.distances[:, 0], nb.distances[:, 1], sigma[pick])
                        exact[part[pick]] = True
                        d1_low[part[pick]] = d1_high[part[pick]] = nb.distances[:, 0]
                ratio[~exact] = min(cut, 1.0)
                enough = all(exact[g].sum() >= min(len(g), conformal_k(len(g), self.level)) for g in groups)
                if enough or cut >= 1.0:
                    break
                cut = 1.0 if cut >= 0.99 else min(0.99, round(cut + 0.1, 6))
            self.holdout_[name] = HoldoutRatios(ratio, exact, d1_low, d1_high, min(cut, 1.0))
        self.thresholds_ = {name: ratio_threshold(h.ratio, self.level) for name, h in self.holdout_.items()}
        return self

    def fit(self, references, holdout, screen: float = 0.7, grouped: bool = True, patients=None,
            subsets=None) -> CopyRatioRule:
        """:meth:`index` the references, :meth:`group` them (unless ``grouped`` is false: every reference its
        own group, the plain second-nearest) and :meth:`calibrate` on the holdout."""
        self.index(references)
        if grouped:
            self.group(references, holdout, patients)
        return self.calibrate(holdout, screen, subsets)

    def _two(self, search: ExactCopySearch, queries):
        """The proven nearest and (grouped) second nearest."""
        if self.labels_ is None:
            return search.search(queries, k=2)
        return search.search_grouped(queries, self.labels_)

    # ------------------------------------------------------------------------ deciding

    def decide(self, queries) -> RuleDecision:
        """Each test's proven decision on ``queries`` and their union (:meth:`fit` first)."""
        sigma = noise_sigma(queries)
        comps = {}
        flagged = np.zeros(len(queries), bool)
        for name, search in self.searches_.items():
            d = decide_ratio(search, queries, self.thresholds_[name].tau, self.bias(name, sigma), self.floor,
                             self.margin(name), labels=self.labels_)
            comps[name] = d
            flagged |= d.flagged
        return RuleDecision(flagged, comps, dict(self.thresholds_), self.alpha)

    def nearest_two(self, queries, name: str):
        """The proven nearest reference and the nearest outside its group (the second nearest without groups)
        under test ``name``, and the exact ratio: ``(indices, distances, ratio)``."""
        nb = self._two(self.searches_[name], queries)
        return nb.indices, nb.distances, self.statistic(name, nb.distances[:, 0], nb.distances[:, 1],
                                                        noise_sigma(queries))

    def ratios(self, queries) -> dict[str, np.ndarray]:
        """Every test's exact ratio (two nearest proven) -- for benchmarks and the holdout."""
        return {name: self.nearest_two(queries, name)[2] for name in self.searches_}

    def matched(self, query, ref: int, name: str) -> tuple[tuple[float, int, int, bool], float]:
        """The transform ``(zoom, dy, dx, inverted)`` that brings ``query`` (``(C, H, W)``) nearest to ``ref``."""
        search = self.searches_[name]
        i, d = search.matched(search.orbits(query[None])[0], ref)
        return search.metric.orbit_items[i], d

    def content(self, images) -> np.ndarray:
        """How much there is to recognise: the RMS of the pooled, mean-removed whole image (identity features)."""
        metric = self.metrics["identity"] if "identity" in self.metrics else next(iter(self.metrics.values()))
        return metric.features(images).double().norm(dim=1).cpu().numpy()

    def reference_content(self) -> np.ndarray:
        """:meth:`content` of every indexed reference, from the features already held (:meth:`index` first)."""
        name = "identity" if "identity" in self.searches_ else next(iter(self.searches_))
        return self.searches_[name].rf.double().norm(dim=1).cpu().numpy()

    # ------------------------------------------------------------------------ state

    def state(self) -> dict:
        """The fitted state without live objects (features, holdout ratios, thresholds)."""
        return {"features": {n: s.rf.cpu().numpy() for n, s in self.searches_.items()},
                "holdout": dict(self.holdout_), "thresholds": dict(self.thresholds_), "labels": self.labels_,
                "pairs": list(self.pairs_), "radius": self.radius_}

    def restore(self, state: dict) -> CopyRatioRule:
        """Rebuild the searches from :meth:`state` (same settings and device as at fit time)."""
        self.searches_ = {n: ExactCopySearch(self.metrics[n], f, shift_group=self.shift_group)
                          for n, f in state["features"].items()}
        self.holdout_ = dict(state["holdout"])
        self.thresholds_ = dict(state["thresholds"])
        self.labels_, self.pairs_, self.radius_ = state["labels"], list(state["pairs"]), state["radius"]
        return self


def torch_index(idx):
    import torch

    return torch.as_tensor(np.asarray(idx, np.int64))
