"""Benchmark: exact tiled nearest-neighbour search vs a brute-force baseline, same data, same run.

For each size, both find the nearest training image of every synthetic image
under the tiled distance; the baseline computes the exact distance of every
pair (batched torch, no bounds).  Reported: the speed ratio, whether the
nearest neighbours and distances agree, and whether both flag exactly the
same (synthetic, training) pairs at the threshold.

    .venv/bin/python bench/copy_detection.py                 # default sizes, 64x64
    .venv/bin/python bench/copy_detection.py --size 128 --sizes 100x2000
    .venv/bin/python bench/copy_detection.py --scale 1000x20000 --size 256   # streaming check from disk
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.core.tiled import ExactTiledSearch, TiledMetric, TileLayout, brute_force  # noqa: E402
from synthgate.phantoms import generate  # noqa: E402


def phantom_arrays(n_patients: int, per_patient: int, size: int, seed: int) -> np.ndarray:
    imgs, _ = generate(patients=n_patients, images_per_patient=per_patient, size=size, seed=seed, holdout_fraction=0)
    return np.stack([i.pixels for i in imgs])[:, None].astype(np.float32)


def one_size(q: int, r: int, size: int, threshold: float, k: int, seed: int) -> dict:
    refs = phantom_arrays(max(1, r // 4), 4, size, seed)[:r]
    novel = phantom_arrays(max(1, q // 2), 2, size, seed + 1)[: q - q // 10]
    rng = np.random.default_rng(seed)
    copies = refs[rng.choice(len(refs), q // 10, replace=False)]
    copies = np.clip(copies + rng.normal(0, 0.02, copies.shape), 0, 1).astype(np.float32)
    queries = np.concatenate([novel, copies])

    t0 = time.perf_counter()
    metric = TiledMetric(TileLayout(size, size, 1))
    search = ExactTiledSearch(metric, metric.features(refs), lambda idx: refs[idx])
    idx, dist = search.search(queries, k=k)
    ours = time.perf_counter() - t0

    t0 = time.perf_counter()
    fsearch = ExactTiledSearch(metric, metric.features(refs), lambda idx: refs[idx], engine="faiss")
    f_idx, f_dist = fsearch.search(queries, k=k)
    ours_faiss = time.perf_counter() - t0

    t0 = time.perf_counter()
    b_idx, b_dist, full = brute_force(queries, refs, k=k, batch=256)
    base = time.perf_counter() - t0


    ours_pairs = {(i, int(idx[i, 0])) for i in range(len(queries)) if dist[i, 0] <= threshold}
    base_pairs = {(i, int(j)) for i, j in zip(*np.nonzero(full <= threshold))}
    nearest_base = {(i, int(b_idx[i, 0])) for i in range(len(queries)) if b_dist[i, 0] <= threshold}
    return {
        "queries": len(queries), "references": len(refs), "size": size, "k": k,
        "ours_s": round(ours, 3), "brute_force_s": round(base, 3), "speedup": round(base / ours, 2),
        "same_neighbours": bool(np.array_equal(idx, b_idx)),
        "max_distance_difference": float(np.abs(dist - b_dist).max()),
        "flagged_nearest_pairs_equal": ours_pairs == nearest_base,
        "images_flagged": len(ours_pairs),
        "all_pairs_under_threshold_baseline": len(base_pairs),
        "images_with_a_pair_under_threshold_baseline": len({i for i, _ in base_pairs}),
        "exact_pairs_evaluated": search.stats.exact_pairs,
        "ours_faiss_engine_s": round(ours_faiss, 3), "faiss_engine_same_neighbours": bool(np.array_equal(f_idx, b_idx)),
        "faiss_engine_exact_pairs": fsearch.stats.exact_pairs,
        "pruned_fraction": round(search.stats.pruned_fraction, 4),
    }


def scale_run(q: int, r: int, size: int, seed: int) -> dict:
    """The whole check from PNG files on disk: streaming, bounded memory."""
    import resource

    from audit.core.context import AuditContext
    from audit.copy_detection.check import CopyDetection
    from synthgate.imageset import ImageSet
    from synthgate.phantoms import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_phantoms(tmp / "real", patients=max(1, r // 4), images_per_patient=4, size=size, seed=seed,
                       holdout_fraction=0)
        write_phantoms(tmp / "syn", patients=max(1, q // 2), images_per_patient=2, size=size, seed=seed + 1,
                       holdout_fraction=0)
        made = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx = AuditContext(ImageSet(tmp / "syn" / "train"), ImageSet(tmp / "real" / "train"), device="cpu",
                           progress=True)
        result = CopyDetection(n_neighbors=50, training_duplicates=False, synthetic_duplicates=False).run(ctx)
        took = time.perf_counter() - t0
    return {"queries": result.metrics["n_synthetic"], "references": result.metrics["n_real"], "size": size,
            "seconds": round(took, 1), "data_generation_s": round(made, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "search": result.metrics["search"], "status": result.status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50x500,100x2000,200x5000", help="QUERIESxREFERENCES,...")
    ap.add_argument("--size", type=int, default=64, help="image side")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", help="QUERIESxREFERENCES: run the full check from disk instead")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.scale:
        q, r = (int(v) for v in args.scale.split("x"))
        print(json.dumps(scale_run(q, r, args.size, args.seed), indent=1))
        return
    rows = []
    for spec in args.sizes.split(","):
        q, r = (int(v) for v in spec.split("x"))
        row = one_size(q, r, args.size, args.threshold, args.k, args.seed)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| queries x refs | size | ours, torch engine (s) | ours, faiss engine (s) | brute force (s) | speed-up "
          "(torch) | same NN (torch / faiss) | same flags | exact pairs (torch / faiss) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['queries']} x {r['references']} | {r['size']} | {r['ours_s']} | {r['ours_faiss_engine_s']} | "
              f"{r['brute_force_s']} | {r['speedup']}x | {r['same_neighbours']} / {r['faiss_engine_same_neighbours']} "
              f"| {r['flagged_nearest_pairs_equal']} | {r['exact_pairs_evaluated']} / {r['faiss_engine_exact_pairs']} |")


if __name__ == "__main__":
    main()
