"""The exact shift/zoom search with the references split into shards, each searched by a Ray task.

:class:`ShardedCopySearch` is an :class:`~audit.core.shiftzoom_search.ExactCopySearch`
whose three reference-wide steps run shard by shard on a Ray cluster:

``_initial`` (the first candidates)
    each shard returns, per query, its ``initial`` references nearest to the
    orbit's centre with that proxy distance and their exact distances; the
    driver keeps the globally nearest ``initial`` by proxy distance (ties by
    index), which are the candidates one process would have chosen, and
    their exact distances.
``within`` (everything within a per-query radius)
    each shard returns every one of its references whose bound is within the
    radius, with its exact distance (the references the driver already knows
    are passed along and not evaluated twice).  The union over shards is the
    set one process evaluates: the bound and the exact distance of a
    (query, reference) pair depend on that pair alone, never on the other
    references.
``_add_outside`` (the grouped second distance's first bound)
    where a query's evaluated references all lie in one training group, one
    reference outside it is added: each shard gets the group labels (its
    slice of them) and the group to leave out, which only the driver knows
    (the group of the best reference evaluated so far, over all shards), and
    returns its reference nearest to the orbit's centre outside that group;
    the driver keeps the nearest of those (ties to the lower index), the one
    one process picks from the whole set.

So every exact distance the driver sees, and so every decision, ratio and
threshold built on them, is the one-process result.  The driver holds each
query's evaluated references with their global indices and the training
groups, so everything the search derives from them -- the k-th distance, the
grouped bound ``U2g`` (nearest evaluated outside the best one's group), the
radius of the next round, the fallback radius -- is computed on the driver
from the same numbers one process has; the only step that needed the whole
reference set besides ``_initial`` and ``within`` is ``_add_outside``, whose
shards get the labels.  Orbits (cheap, per query) are computed on the driver and shipped
once per call; the driver also keeps every reference's features (64 floats
per test and image), for :meth:`matched`, the fitted state and the reports.

Each task builds its shard's search once per worker process (cached by the
shard's token) on the device the worker resolves (``--device auto``: its GPU
when it has one).  A task whose worker dies is re-run by Ray
(:func:`synthgate.cluster.imap_ordered`); the shard's answer does not depend
on which worker computes it.
"""
from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .shiftzoom import CopyMetric
from .shiftzoom_search import CopySearchStats, Evaluated, ExactCopySearch

@dataclass
class ShardedSearchStats(CopySearchStats):
    """:class:`CopySearchStats` plus the shards and the Ray tasks that did the work (pairs summed over shards)."""

    shards: int = 0
    tasks: int = 0

    def to_dict(self) -> dict:
        return super().to_dict() | {"shards": self.shards, "tasks": self.tasks}


#: Searches built by this worker process, by shard token (a worker serves a few audits' shards at most).
_BUILT: OrderedDict = OrderedDict()
_BUILT_MAX = 8


class ShardedCopySearch(ExactCopySearch):
    """:class:`ExactCopySearch` with the references in ``shards`` contiguous parts, searched as Ray tasks.

    Parameters
    ----------
    ray
        A connected ``ray`` module (:func:`synthgate.cluster.connect`).
    metric, ref_features, shift_group, split_zoom, refine, initial, query_block, ref_block
        As :class:`ExactCopySearch` (every shard uses the same settings).
    shards
        Number of parts (at most one per reference).
    device
        The device setting each worker resolves for itself (``auto``, ``cpu``, ``cuda``).
    num_gpus
        GPUs each task asks Ray for (0: Ray hides the GPUs from the task, which then runs on its CPU).
    """

    def __init__(self, ray, metric: CopyMetric, ref_features, shards: int, device: str = "auto", num_gpus: float = 0,
                 shift_group: int = 3, split_zoom: bool = False, refine: bool = True, initial: int = 8,
                 query_block: int = 64, ref_block: int = 4096):
        super().__init__(metric, ref_features, shift_group=shift_group, split_zoom=split_zoom, refine=refine,
                         initial=initial, query_block=query_block, ref_block=ref_block)
        self.ray = ray
        n = self.n_refs
        cuts = np.linspace(0, n, max(1, min(int(shards), n)) + 1).round().astype(np.int64)
        self.spans = [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        feats = self.rf.cpu().numpy()
        self._shards = [ray.put({"token": uuid.uuid4().hex, "start": a, "features": feats[a:b]})
                        for a, b in self.spans]
        self.num_gpus = num_gpus
        self.stats = ShardedSearchStats(references=n, groups=len(self.groups))
        self._settings = {"layout": metric.layout, "device": device, "shift_group": shift_group,
                          "split_zoom": split_zoom, "refine": refine, "initial": initial,
                          "query_block": query_block, "ref_block": ref_block}

    def _map(self, fn, *shared):
        from synthgate.cluster import imap_ordered

        return list(imap_ordered(self.ray, fn, self._shards, num_gpus=self.num_gpus,
                                 shared=(self._settings, *shared)))

    def _count(self, stats: dict) -> None:
        """Add a shard's work to this search's counters (seconds are worker seconds, summed)."""
        self.stats.shards = len(self.spans)
        self.stats.tasks += 1
        for key in ("bound_pairs", "exact_pairs", "proxy_pairs", "refine_pairs"):
            setattr(self.stats, key, getattr(self.stats, key) + stats[key])
        for stage, sec in stats["seconds"].items():
            self.stats.seconds[stage] = self.stats.seconds.get(stage, 0.0) + sec

    def _initial(self, orbits, exclude, k: int) -> list[Evaluated]:
        q = orbits.shape[0]
        m = min(max(self.initial, k), self.n_refs - (1 if exclude is not None else 0))
        pieces = self._map(_shard_initial, orbits.cpu().numpy(), exclude, k)
        idx = np.concatenate([p[0] for p in pieces], 1)  # (Q, shards * initial), padded with -1 / inf
        proxy = np.concatenate([p[1] for p in pieces], 1)
        dist = np.concatenate([p[2] for p in pieces], 1)
        keep = np.lexsort((idx, proxy), axis=-1)[:, :m]  # globally nearest to the centre, ties by index
        idx, dist = np.take_along_axis(idx, keep, 1), np.take_along_axis(dist, keep, 1)
        known = [Evaluated() for _ in range(q)]
        for i in range(q):
            known[i].add(idx[i], dist[i])
        for p in pieces:
            self._count(p[3])
        return known

    def _add_outside(self, orbits, known: list[Evaluated], labels: np.ndarray, exclude, rows: list[int]) -> None:
        """:meth:`ExactCopySearch._add_outside` over the shards: each shard gets the group labels of its
        references, and per row the group to leave out (the best evaluated reference's, which only the driver
        knows) and returns its reference nearest to the orbit's centre outside that group, with that ranking
        distance and its exact distance; the driver keeps the smallest ranking distance (ties to the lower
        index), which is the reference one process picks from the whole set."""
        lab = np.asarray(labels)
        groups, excluded = [], []
        for i in rows:
            best = known[i].ranked(1)[0]
            groups.append(int(lab[best[0]]) if len(best) else None)
            excluded.append(None if exclude is None else exclude[i])
        sub = orbits[self._torch.as_tensor(np.asarray(rows, np.int64), device=orbits.device)].cpu().numpy()
        best_j = np.full(len(rows), -1, np.int64)
        best_v = np.full(len(rows), np.inf)
        best_d = np.full(len(rows), np.nan)
        for j, v, d, stats in self._map(_shard_outside, sub, groups, excluded, lab):  # shards in index order
            better = v < best_v  # strictly: on a tie the earlier shard's (lower) index stays
            best_j[better], best_v[better], best_d[better] = j[better], v[better], d[better]
            self._count(stats)
        for r, i in enumerate(rows):
            if best_j[r] >= 0:
                known[i].add([int(best_j[r])], np.array([best_d[r]]))

    def within(self, queries=None, radius=None, exclude=None, orbits=None,
               known: list[Evaluated] | None = None) -> list[Evaluated]:
        orbits = self.orbits(queries) if orbits is None else orbits
        q = orbits.shape[0]
        radius = np.array(np.broadcast_to(np.asarray(radius, np.float64), (q,)))
        known = [Evaluated() for _ in range(q)] if known is None else known
        self.stats.rounds += 1
        seen = [kn.ranked()[0] for kn in known]
        seen_dist = [kn.ranked()[1] for kn in known]
        # shards hold disjoint references and return only ones not yet known: adding is a union
        for rows, idx, dist, stats in self._map(_shard_within, orbits.cpu().numpy(), radius, exclude, seen,
                                                seen_dist):
            cuts = np.searchsorted(rows, np.arange(q + 1))
            for i in np.nonzero(np.diff(cuts))[0]:
                known[i].add(idx[cuts[i]:cuts[i + 1]], dist[cuts[i]:cuts[i + 1]])
            self._count(stats)
        return known


# ------------------------------------------------------------------------------------------ worker side


def _search(settings: dict, shard: dict) -> ExactCopySearch:
    """The shard's search on this worker's device (built once per worker process)."""
    token = shard["token"]
    if token in _BUILT:
        _BUILT.move_to_end(token)
        search = _BUILT[token]
    else:
        from synthgate.device import resolve_device

        metric = CopyMetric(settings["layout"], resolve_device(settings["device"]))
        search = ExactCopySearch(metric, np.array(shard["features"]), shift_group=settings["shift_group"],
                                 split_zoom=settings["split_zoom"], refine=settings["refine"],
                                 initial=settings["initial"], query_block=settings["query_block"],
                                 ref_block=settings["ref_block"])
        _BUILT[token] = search
        while len(_BUILT) > _BUILT_MAX:
            _BUILT.popitem(last=False)
    search.stats = CopySearchStats(references=search.n_refs, groups=len(search.groups))
    return search


def _local(exclude, start: int, stop: int):
    """Global reference indices to leave out -> this shard's (``None`` where it holds none)."""
    if exclude is None:
        return None
    return [None if r is None or not start <= int(r) < stop else int(r) - start for r in exclude]


def _stats(search: ExactCopySearch) -> dict:
    st = search.stats
    return {"bound_pairs": st.bound_pairs, "exact_pairs": st.exact_pairs, "proxy_pairs": st.proxy_pairs,
            "refine_pairs": st.refine_pairs, "seconds": dict(st.seconds)}


def _shard_initial(settings: dict, orbits, exclude, k: int, shard: dict):
    """Per query: this shard's ``initial`` proxy-nearest references (global indices), proxy and exact distances.

    ``(Q, initial)`` arrays, padded with index -1, proxy ``inf`` where the
    shard has fewer.  The proxy ranking runs without exclusions and asks for
    one more than needed, so that leaving out a query's own reference
    afterwards still leaves the shard's best ``initial`` of the others.
    """
    search = _search(settings, shard)
    torch = search._torch
    start = shard["start"]
    m = max(search.initial, k)
    ex = _local(exclude, start, start + search.n_refs)
    orbits = torch.as_tensor(orbits, device=search.rf.device)
    q = orbits.shape[0]
    idx, proxy, dist = np.full((q, m), -1, np.int64), np.full((q, m), np.inf, np.float32), np.full((q, m), np.nan)
    for s in range(0, q, search.query_block):
        block = slice(s, min(s + search.query_block, q))
        cand, near = search._proxy_ranked(orbits[block], None, m + 1)
        cand, near = cand.cpu().numpy(), near.cpu().numpy()
        for i in range(len(cand)):
            own = None if ex is None else ex[s + i]
            ok = np.ones(len(cand[i]), bool) if own is None else cand[i] != own
            row = cand[i][ok][:m]
            idx[s + i, :len(row)] = row + start
            proxy[s + i, :len(row)] = near[i][ok][:m]
            dist[s + i, :len(row)] = search._exact(orbits[s + i], row)
    return idx, proxy, dist, _stats(search)


def _shard_within(settings: dict, orbits, radius, exclude, seen, seen_dist, shard: dict):
    """Every reference of this shard within ``radius`` of each query that the driver did not know yet, with its
    exact distance: ``(query rows, global indices, distances)``, by query."""
    search = _search(settings, shard)
    torch = search._torch
    start = shard["start"]
    stop = start + search.n_refs
    known = []
    for idx, dist in zip(seen, seen_dist):
        mine = (idx >= start) & (idx < stop)
        kn = Evaluated()
        kn.add(idx[mine] - start, dist[mine])
        known.append(kn)
    before = [len(kn) for kn in known]
    orbits = torch.as_tensor(orbits, device=search.rf.device)
    done = search.within(radius=radius, exclude=_local(exclude, start, stop), orbits=orbits, known=known)
    rows, out_idx, out_dist = [], [], []
    for i, (kn, n0) in enumerate(zip(done, before)):
        if len(kn) > n0:
            idx, dist = kn.ranked()
            new = ~np.isin(idx, seen[i] - start)
            rows.append(np.full(int(new.sum()), i))
            out_idx.append(idx[new] + start)
            out_dist.append(dist[new])
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), _stats(search)
    return np.concatenate(rows), np.concatenate(out_idx), np.concatenate(out_dist), _stats(search)


def _shard_outside(settings: dict, orbits, groups, excluded, labels, shard: dict):
    """Per row: this shard's reference nearest to the orbit's centre outside group ``groups[r]`` (global labels,
    ``labels``) and other than ``excluded[r]`` -- ``(global indices, ranking distances, exact distances)``, index
    -1 and ``inf`` where the shard has none."""
    search = _search(settings, shard)
    torch = search._torch
    start = shard["start"]
    stop = start + search.n_refs
    lab = torch.as_tensor(np.asarray(labels)[start:stop], device=search.rf.device)
    orbits = torch.as_tensor(orbits, device=search.rf.device)
    ex = _local(excluded, start, stop)
    q = orbits.shape[0]
    idx, rank, dist = np.full(q, -1, np.int64), np.full(q, np.inf), np.full(q, np.nan)
    for r in range(q):
        j, v = search._outside_candidate(orbits[r], lab, groups[r], ex[r])
        if j >= 0:
            idx[r], rank[r] = j + start, v
            dist[r] = search._exact(orbits[r], np.array([j]))[0]
    search.stats.proxy_pairs += q * search.n_refs
    return idx, rank, dist, _stats(search)
