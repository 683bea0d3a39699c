"""Benchmark: what the identity test's inversion (``copy_detection.inverted``, on by default) costs the search.

The same streamed sets as ``bench/copy_scale.py`` (phantom-like 256 x 256 images area-downsampled to 64 x 64; 10 %
of the queries shifted noisy copies), the identity test's proven decision
(:func:`~audit.copy_detection.ratio_rule.decide_ratio`, ``tau`` 0.7) with and without the inverted half of the
orbit, alternated and repeated, in one process on one thread; the ratio of the best times, and the flags (which
must be the same: none of these queries is inverted).

    OMP_NUM_THREADS=1 .venv/bin/python bench/copy_invert_cost.py --queries 2000 --references 20000
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--references", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import torch

    import copy_scale
    from audit.copy_detection.ratio_rule import decide_ratio
    from audit.copy_detection.ratio_statistic import noise_bias, noise_margin, noise_sigma
    from audit.core.shiftzoom import CopyLayout, CopyMetric, Transforms
    from audit.core.shiftzoom_search import ExactCopySearch

    torch.set_num_threads(1)
    q, r = args.queries, args.references
    refs, qry, is_copy, _, _ = copy_scale.streamed_sets(q, r, 0)
    sigma = noise_sigma(qry)
    best, flags = {}, {}
    print(f"load average at start {os.getloadavg()[0]:.2f}; {q} queries x {r} references")
    for _ in range(args.repeats):
        for invert in (False, True):
            m = CopyMetric(CopyLayout(copy_scale.ANALYSIS, copy_scale.ANALYSIS, 1,
                                      transforms=Transforms(0, (1.0,), invert=invert)))
            feats = torch.cat([m.features(refs[s:s + 2048]) for s in range(0, r, 2048)])
            search = ExactCopySearch(m, feats)
            t0 = time.perf_counter()
            dec = decide_ratio(search, qry, 0.7, noise_bias(m.layout, sigma), margin=noise_margin(m.layout))
            sec = time.perf_counter() - t0
            best[invert] = min(best.get(invert, np.inf), sec)
            flags[invert] = dec.flagged
            print(f"identity test, inverted half {'on ' if invert else 'off'}: {sec:.2f} s "
                  f"({int(dec.flagged[is_copy].sum())}/{int(is_copy.sum())} copies flagged, "
                  f"{int(dec.flagged[~is_copy].sum())} others)", flush=True)
    print(f"inverted / plain (best of {args.repeats}): {best[True] / best[False]:.2f}; same flags: "
          f"{bool(np.array_equal(flags[True], flags[False]))}; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
