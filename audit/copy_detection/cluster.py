"""The ratio rule's real side on a Ray cluster: training images decoded and featurised by tasks, searched in shards.

Used when the audit runs with ``--cluster`` (``ctx.cluster`` is a connected
``ray`` module).  Two things move to the workers:

* decoding the training set and computing its features: one task per
  chunk of the rule's own chunk size (the chunks a single process reads, so
  each image's features are computed from the same batch and are the same);
  plain tasks rather than Ray Data, because the work is a fixed list of
  index ranges whose results must come back in order, and
  :func:`synthgate.cluster.imap_ordered` already retries them;
* the exact copy search over the training set, split into one shard per
  worker slot (:class:`~audit.core.shiftzoom_shards.ShardedCopySearch`).

The holdout and the synthetic images are read on the driver (they are the
small sets); their orbits are computed there and sent to the shards.
"""
from __future__ import annotations

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


def _featurise(imageset, geometry, shape, batch_size: int, layouts: dict, device: str, idx) -> dict:
    """One chunk of training images, decoded at the audit geometry, at the analysis size -> features per test."""
    from audit.core.shiftzoom import CopyMetric
    from synthgate.device import resolve_device

    dev = resolve_device(device)
    x = np.concatenate([b for _, b in imageset.iter_batches(batch_size=batch_size, geometry=geometry,
                                                            indices=[int(i) for i in idx])])
    x = to_analysis(x, shape)
    return {name: CopyMetric(lay, dev).features(x).cpu().numpy() for name, lay in layouts.items()}
