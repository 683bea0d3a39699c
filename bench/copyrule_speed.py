"""Benchmark: the ratio rule's exact shift/zoom search vs the exact tiled search of the Carlini rules vs brute force.

References are 64 x 64 grayscale crops of the bundled pictures (training
halves, every dihedral variant, so there are enough distinct images);
queries are crops of the other halves plus 10 % noisy copies of references.
For each size the script times, in one process and on one thread:

* ``ours decide``: :func:`audit.copy_detection.ratio_rule.decide_ratio` for both tests of the
  rule (identity and shift/zoom) at a typical threshold -- what the check
  would run on synthetic images;
* ``ours k=2``: the exact two nearest under the shift/zoom distance (what
  the holdout needs);
* ``current``: :class:`audit.core.tiled.ExactTiledSearch` (Carlini's tiled
  distance, k = 1) -- today's check;
* ``brute``: every pair's exact shift/zoom distance by plain float32 matrix
  products (147 transforms x 64 features per pair);
* ``bound only`` vs ``matmul``: the grouped bound pass alone and a bare
  ``torch.mm`` of the same shapes (so the bound's overhead is a ratio).

It reports the bound's pruned fraction, exact pairs, fallbacks, whether the
decisions and neighbours equal brute force (on the smaller size), and an
extrapolation to 10,000 x 100,000 from measured throughputs.

    OMP_NUM_THREADS=1 .venv/bin/python bench/copyrule_speed.py --sizes 500x5000,1000x20000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.copy_detection.ratio_rule import COMPONENTS, decide_ratio
from audit.copy_detection.ratio_statistic import (
    noise_bias,
    noise_margin,
    noise_sigma,
    ratio_statistic,
)
from audit.core.shiftzoom import CopyLayout, CopyMetric
from audit.core.shiftzoom_search import ExactCopySearch
from bench.copy_power import PICTURES, SIZE, load_picture


def crops(n: int, half: int, stride: int, rng: np.random.Generator, dihedral: bool) -> np.ndarray:
    """``n`` crops from one half of every picture (drawn among all 8 dihedral variants when ``dihedral``)."""
    pics = [load_picture(name) for name in PICTURES]
    spots = []
    for i, p in enumerate(pics):
        h, w = p.shape
        axis = 1 if w >= h else 0
        n_ax = (h, w)[axis]
        lo, hi = (0, n_ax // 2) if half == 0 else (n_ax // 2, n_ax)
        for a in range(lo + 4, hi - SIZE - 4, stride):
            for b in range(4, (w, h)[axis] - SIZE - 4, stride):
                y, x = (a, b) if axis == 0 else (b, a)
                spots += [(i, y, x, k) for k in (range(8) if dihedral else [0])]
    if len(spots) < n:
        raise SystemExit(f"only {len(spots)} crops available; lower the stride")
    out = np.empty((n, 1, SIZE, SIZE), np.float32)
    for j, s in enumerate(rng.choice(len(spots), n, replace=False)):
        i, y, x, k = spots[s]
        c = np.rot90(pics[i][y:y + SIZE, x:x + SIZE], k % 4)
        out[j, 0] = c[:, ::-1] if k >= 4 else c
    return out


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def brute_min(metric: CopyMetric, queries, ref_f, chunk: int = 4):
    """All pairs' exact distance by float32 matrix products: (chunk * |T|, D) x (D, R), min over T."""
    import torch

    rn = (ref_f * ref_f).sum(1)
    out = []
    for s in range(0, len(queries), chunk):
        orb = metric.orbit(queries[s:s + chunk])  # (c, T, D)
        c, t, d = orb.shape
        o = orb.reshape(c * t, d)
        dd = torch.addmm(rn[None, :], o, ref_f.T, alpha=-2.0) + (o * o).sum(1)[:, None]
        out.append(dd.reshape(c, t, -1).amin(1).clamp_min(0).sqrt())
    return torch.cat(out).numpy()


def one_size(q: int, r: int, seed: int, tau: float, brute: bool) -> dict:
    import torch

    from audit.core.tiled import ExactTiledSearch, TiledMetric, TileLayout

    rng = np.random.default_rng(seed)
    refs = crops(r, 0, 16, rng, dihedral=True)
    novel = crops(q - q // 10, 1, 16, rng, dihedral=True)
    src = rng.choice(r, q // 10, replace=False)
    copies = np.clip(refs[src] + rng.normal(0, 0.01, refs[src].shape), 0, 1).astype(np.float32)
    queries = np.concatenate([novel, copies])
    row: dict = {"queries": q, "references": r}

    # ours: both tests of the rule, decision mode
    total = 0.0
    decisions = {}
    for name, tr in COMPONENTS.items():
        m = CopyMetric(CopyLayout(SIZE, SIZE, 1, transforms=tr))
        (feats, t_feat) = timed(lambda m=m: m.features(refs))
        search = ExactCopySearch(m, feats)
        bias = noise_bias(m.layout, noise_sigma(queries))
        dec, t_dec = timed(lambda m=m, search=search, bias=bias: decide_ratio(
            search, queries, tau, bias, margin=noise_margin(m.layout)))
        decisions[name] = (m, feats, dec, bias)
        total += t_feat + t_dec
        row[f"ours_decide_{name}_s"] = round(t_feat + t_dec, 3)
        row[f"ours_decide_{name}_stats"] = search.stats.to_dict()
    row["ours_decide_both_s"] = round(total, 3)

    m, feats, dec, bias = decisions["shift_zoom"]
    # the one-pass bound (one group: one product per pair) against nine groups, same decision
    for groups, label in ((2 * m.layout.transforms.max_shift + 1, "one_group"), (3, "nine_groups")):
        s1 = ExactCopySearch(m, feats, shift_group=groups, refine=False)
        d1, t1 = timed(lambda s1=s1: decide_ratio(s1, queries, tau, bias, margin=noise_margin(m.layout)))
        assert np.array_equal(d1.flagged, dec.flagged)
        row[f"bound_{label}_no_refine"] = {"s": round(t1, 3), "survivors_per_query": round(
            s1.stats.exact_pairs / s1.stats.queries, 1), "pruned_fraction": s1.stats.pruned_fraction}
    search = ExactCopySearch(m, feats)
    nb, t_knn = timed(lambda: search.search(queries, k=2))
    row["ours_k2_shift_zoom_s"] = round(t_knn, 3)
    row["ours_k2_stats"] = search.stats.to_dict()

    # the grouped bound alone vs a bare matmul of the same shapes
    orb = search.orbits(queries[:256])
    c, e = search.centres(orb)
    _, t_bound = timed(lambda: search._survivors(c, e, np.full(len(c), 0.01), None))
    lhs = torch.randn(c.shape[0] * c.shape[1], c.shape[2] + 1)
    rhs = torch.randn(r, c.shape[2] + 1)
    _, t_mm = timed(lambda: torch.mm(lhs, rhs.T))
    row["bound_pass_256_queries_s"] = round(t_bound, 4)
    row["plain_matmul_same_shape_s"] = round(t_mm, 4)
    row["bound_over_matmul"] = round(t_bound / t_mm, 2)
    row["matmul_gflops"] = round(2 * lhs.shape[0] * lhs.shape[1] * r / t_mm / 1e9, 1)

    # today's exact tiled search (Carlini distance, k = 1)
    tm = TiledMetric(TileLayout(SIZE, SIZE, 1))
    cur = ExactTiledSearch(tm, tm.features(refs), lambda idx: refs[idx])
    _, t_cur = timed(lambda: cur.search(queries, k=1))
    row["current_tiled_k1_s"] = round(t_cur, 3)
    row["current_tiled_stats"] = cur.stats.to_dict()

    if brute:
        d, t_b = timed(lambda: brute_min(m, queries, feats))
        row["brute_shift_zoom_s"] = round(t_b, 3)
        s = np.sort(d, 1)
        row["k2_equals_brute"] = bool(np.allclose(nb.distances, s[:, :2], atol=1e-5))
        want = ratio_statistic(s[:, 0], s[:, 1], bias, margin=noise_margin(m.layout)) < tau
        row["decisions_equal_brute"] = int((want == dec.flagged).sum())
        row["decisions_total"] = len(want)
        row["speedup_decide_both_vs_brute_one_test"] = round(t_b / total, 2)
    return row


def extrapolate(row: dict, q: int = 10_000, r: int = 100_000) -> dict:
    """Scale the measured single-thread cost of both tests' decisions to ``q x r``.

    Orbits scale with the queries; every other stage (bound and proxy passes,
    refinement and exact distances on the survivors, bookkeeping) is scaled
    with the pairs -- the survivors' share of the references was the same at
    5,000 and 20,000 references here, so no shrinkage is assumed.
    """
    pairs_ratio = q * r / (row["queries"] * row["references"])
    out = {}
    total = 0.0
    for name in COMPONENTS:
        st = row[f"ours_decide_{name}_stats"]
        sec = st["seconds"]
        orbits = sec.get("orbits", 0.0)
        rest = row[f"ours_decide_{name}_s"] - orbits
        est = orbits * q / row["queries"] + rest * pairs_ratio
        out[f"{name}_s"] = round(est, 1)
        out[f"{name}_stage_s"] = {k: round(v * (q / row["queries"] if k == "orbits" else pairs_ratio), 1)
                                  for k, v in sec.items()}
        out[f"{name}_exact_pairs_per_query_at_{r}"] = round(st["exact_pairs"] / st["queries"] * r / row["references"])
        total += est
    out["both_tests_single_thread_s"] = round(total, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500x5000,1000x20000")
    ap.add_argument("--tau", type=float, default=0.4, help="ratio threshold (the holdout sets it in the rule)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--brute-max-pairs", type=float, default=2.5e7, help="run brute force up to this many pairs")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    rows = []
    for spec in args.sizes.split(","):
        q, r = (int(v) for v in spec.split("x"))
        row = one_size(q, r, args.seed, args.tau, brute=q * r <= args.brute_max_pairs)
        row["extrapolated_10000x100000"] = extrapolate(row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| Q x R | ours decide, both tests (s) | ours k=2 shift/zoom (s) | current tiled k=1 (s) | "
          "brute shift/zoom (s) | pruned (decide, shift/zoom) | exact pairs / query | bound / matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["ours_decide_shift_zoom_stats"]
        print(f"| {r['queries']} x {r['references']} | {r['ours_decide_both_s']} | {r['ours_k2_shift_zoom_s']} | "
              f"{r['current_tiled_k1_s']} | {r.get('brute_shift_zoom_s', '-')} | {st['pruned_fraction']} | "
              f"{st['exact_pairs'] / st['queries']:.1f} | {r['bound_over_matmul']} |")
    import resource

    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
