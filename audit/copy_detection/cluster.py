"""The ratio rule's real side on a Ray cluster: training images decoded and featurised by tasks, searched in shards.

Used when the audit runs with ``--cluster`` (``ctx.cluster`` is a connected
``ray`` module).  Three things move to the workers:

* decoding the training set and computing its features: one task per
  chunk of the rule's own chunk size (the chunks a single process reads, so
  each image's features are computed from the same batch and are the same);
  plain tasks rather than Ray Data, because the work is a fixed list of
  index ranges whose results must come back in order, and
  :func:`synthgate.cluster.imap_ordered` already retries them;
* the exact copy search over the training set, split into one shard per
  worker slot (:class:`~audit.core.shiftzoom_shards.ShardedCopySearch`);
* the training set's near-duplicate pairs (the groups of the grouped second
  distance), where the training images are the queries too: one task per
  chunk of the rule's chunk size decodes its images, as for the features,
  and runs :meth:`~audit.core.shiftzoom_search.ExactCopySearch.within` at
  the duplicate radius against the whole training set's features (put in
  the object store once, a search built once per worker), each image
  leaving itself out -- the very call one process makes on the same chunk,
  so the pairs are the same; the driver takes their union.

The holdout and the synthetic images are read on the driver (they are the
small sets); their orbits are computed there and sent to the shards.
"""
from __future__ import annotations

import uuid

import numpy as np

from audit.core.shiftzoom_shards import ShardedCopySearch

from .ratio_rule import CopyRatioRule
from .reading import to_analysis


def worker_slots(ray, device: str) -> tuple[int, float]:
    """``(shards, gpus per task)``: one shard per GPU when the workers should use theirs, else per CPU."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if device != "cpu" and gpus > 0:
        return gpus, 1.0
    return max(1, int(res.get("CPU", 1))), 0.0


def index_on_cluster(ctx, rule: CopyRatioRule, imageset, shape: tuple[int, int], batch_size: int) -> CopyRatioRule:
    """:meth:`CopyRatioRule.index` with the training images decoded and featurised by Ray tasks."""
    import torch

    from synthgate.cluster import imap_ordered

    n = len(imageset)
    chunks = [np.arange(s, min(s + rule.chunk, n)) for s in range(0, n, rule.chunk)]
    layouts = {name: m.layout for name, m in rule.metrics.items()}
    _, num_gpus = worker_slots(ctx.cluster, ctx.device)
    feats: dict[str, list] = {name: [] for name in layouts}
    for part in imap_ordered(ctx.cluster, _featurise, chunks, num_gpus=num_gpus,
                             shared=(imageset, ctx.geometry, shape, batch_size, layouts, ctx.device)):
        for name, f in part.items():
            feats[name].append(torch.from_numpy(np.array(f)))
    return rule.index_features({name: torch.cat(f) for name, f in feats.items()})


def shard_searches(ctx, rule: CopyRatioRule) -> CopyRatioRule:
    """Replace the rule's searches by sharded ones over the same features (same results, work on the cluster)."""
    shards, num_gpus = worker_slots(ctx.cluster, ctx.device)
    rule.searches_ = {name: ShardedCopySearch(ctx.cluster, s.metric, s.rf, shards, device=ctx.device,
                                              num_gpus=num_gpus, shift_group=rule.shift_group)
                      for name, s in rule.searches_.items()}
    return rule


def duplicate_pairs_on_cluster(ctx, rule: CopyRatioRule, imageset, shape: tuple[int, int], batch_size: int):
    """``radius -> pairs``: :meth:`CopyRatioRule.duplicate_pairs` of the training set with its images decoded and
    searched by Ray tasks (``rule``'s searches indexed first)."""
    from synthgate.cluster import imap_ordered

    def pairs(radius: float) -> list[tuple[int, int]]:
        search = rule.searches_[rule.main]
        n = len(imageset)
        chunks = [np.arange(s, min(s + rule.chunk, n)) for s in range(0, n, rule.chunk)]
        _, num_gpus = worker_slots(ctx.cluster, ctx.device)
        settings = {"layout": search.metric.layout, "device": ctx.device, "shift_group": rule.shift_group,
                    "split_zoom": False, "refine": True, "initial": search.initial,
                    "query_block": search.query_block, "ref_block": search.ref_block}
        refs = {"token": uuid.uuid4().hex, "start": 0, "features": search.rf.cpu().numpy()}
        found: set = set()
        for part in imap_ordered(ctx.cluster, _pairs, chunks, num_gpus=num_gpus,
                                 shared=(imageset, ctx.geometry, shape, batch_size, settings, refs, float(radius))):
            found.update((int(a), int(b)) for a, b in part[0])
            if isinstance(search, ShardedCopySearch):  # the work, in the search's counters
                search._count(part[1])
        return sorted(found)

    return pairs


def _pairs(imageset, geometry, shape, batch_size: int, settings: dict, refs: dict, radius: float, idx):
    """One chunk of training images against the whole training set: every pair within ``radius`` (and the
    search's work)."""
    from audit.core.shiftzoom_shards import _search, _stats

    x = np.concatenate([b for _, b in imageset.iter_batches(batch_size=batch_size, geometry=geometry,
                                                            indices=[int(i) for i in idx])])
    x = to_analysis(x, shape)
    part = [int(i) for i in idx]
    search = _search(settings, refs)
    out = set()
    for qi, kn in zip(part, search.within(x, radius=radius, exclude=part)):
        out.update(tuple(sorted((qi, j))) for j, d in kn.as_dict().items() if d <= radius)
    return sorted(out), _stats(search)


def _featurise(imageset, geometry, shape, batch_size: int, layouts: dict, device: str, idx) -> dict:
    """One chunk of training images, decoded at the audit geometry, at the analysis size -> features per test."""
    from audit.core.shiftzoom import CopyMetric
    from synthgate.device import resolve_device

    dev = resolve_device(device)
    x = np.concatenate([b for _, b in imageset.iter_batches(batch_size=batch_size, geometry=geometry,
                                                            indices=[int(i) for i in idx])])
    x = to_analysis(x, shape)
    return {name: CopyMetric(lay, dev).features(x).cpu().numpy() for name, lay in layouts.items()}
