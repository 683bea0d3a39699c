"""Benchmark: our SSIM, PRDC, FID/KID/IS and statistics against the field's libraries, same data, same run.

For each of the four, the number both compute (largest absolute difference)
and the cost at the sizes the checks use (seconds of each, and the ratio
library / ours).  Where a module now calls the library, "ours" is the
hand-written form it replaced, kept here as the baseline.

    .venv/bin/python bench/field_libraries.py                  # all four, default sizes
    .venv/bin/python bench/field_libraries.py --only ssim --queries 10 --refs 100
    .venv/bin/python bench/field_libraries.py --only prdc inception stats

Run with one thread (the script sets it); the machines here are shared, so
only the ratios mean anything.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, repeats: int = 1):
    """(result, best wall time of ``repeats`` calls)."""
    best, out = np.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def line(what: str, diff: float | None, ours: float, lib: float, note: str = "") -> None:
    d = "" if diff is None else f"max |diff| {diff:.3g}; "
    print(f"  {what}: {d}ours {ours:.3f} s, library {lib:.3f} s, ratio library/ours {lib / ours:.2f}"
          + (f"  ({note})" if note else ""), flush=True)


# ---------------------------------------------------------------------- SSIM


def bench_ssim(args) -> None:
    import torch
    from skimage import data
    from skimage.metrics import structural_similarity

    from audit.quality.ssim import SSIM, nearest_ssim

    def sk(a, b):
        return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, channel_axis=0 if a.ndim == 3 else None)

    print("SSIM: audit.quality.ssim vs skimage.metrics.structural_similarity", flush=True)
    rng = np.random.default_rng(0)
    imgs = [data.camera() / 255.0, data.moon() / 255.0, data.retina()[::4, ::4].transpose(2, 0, 1) / 255.0]
    worst = 0.0
    for a in imgs:
        b = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
        t = lambda z: torch.tensor(z if z.ndim == 3 else z[None])[None]  # noqa: E731
        worst = max(worst, abs(float(SSIM().paired(t(a), t(b))[0]) - sk(a, b)))
    print(f"  paired, float64, camera 512^2 / moon 512^2 / retina RGB 353^2 + noise: max |diff| {worst:.3g}")

    # nearest-SSIM as the fidelity check runs it: every query against every image of the set, float32
    s = args.ssim_size
    cam = np.concatenate([data.camera(), data.moon(), data.brick(), data.grass(), data.gravel()]) / 255.0
    pos = rng.integers(0, [cam.shape[0] - s, cam.shape[1] - s], size=(args.refs, 2))
    x = np.stack([cam[i:i + s, j:j + s] for i, j in pos])  # real crops
    q = np.arange(args.queries)
    xt = torch.tensor(x[:, None], dtype=torch.float16)  # the check loads images as float16
    (best, arg), t_ours = timed(lambda: nearest_ssim(xt, q))

    def skimage_nearest():
        xs = xt.double().numpy()[:, 0]
        out = np.full(len(q), -np.inf)
        for n, i in enumerate(q):
            for j in range(len(xs)):
                if j != i:
                    out[n] = max(out[n], sk(xs[i], xs[j]))
        return out

    sk_best, t_sk = timed(skimage_nearest)
    line(f"nearest-SSIM {len(q)} queries x {args.refs} images, {s}x{s} gray", float(np.abs(best - sk_best).max()),
         t_ours, t_sk, f"per pair: ours {t_ours / len(q) / args.refs * 1e3:.2f} ms, skimage "
                       f"{t_sk / len(q) / (args.refs - 1) * 1e3:.2f} ms")


# ---------------------------------------------------------------------- PRDC


def _prdc_by_hand(real, fakes, k):
    """The hand-written PRDC this project used before the authors' package: radii cached, float64."""
    def dist(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.sqrt(np.maximum(sq, 0.0))

    radii = np.partition(dist(real, real), k, axis=1)[:, k]
    out = []
    for f in fakes:
        d = dist(real, f)
        inside = d < radii[:, None]
        fr = np.partition(dist(f, f), k, axis=1)[:, k]
        out.append({"precision": inside.any(0).mean(), "recall": (d < fr[None, :]).any(1).mean(),
                    "density": inside.sum(0).mean() / k, "coverage": inside.any(1).mean()})
    return out


def bench_prdc(args) -> None:
    from audit.quality.prdc import PRDCReference

    print("PRDC: audit.quality.prdc (prdc.compute_prdc) vs the hand-written form it replaced", flush=True)
    rng = np.random.default_rng(1)
    for n_ref, m in ((36, 18), (200, 100), (1000, 500), (2500, 1250)):  # fidelity: reference half, compared quarter
        real = np.abs(rng.normal(size=(n_ref, 256)))
        fakes = [np.abs(rng.normal(size=(m, 256))), np.abs(rng.normal(0.1, 1.0, size=(m, 256))),
                 np.abs(rng.normal(size=(m, 256))), np.abs(rng.normal(size=(1, 256))) + rng.normal(0, 0.01, (m, 256))]
        # a check scores four sets (baseline, synthetic, independent, planted collapse) against one reference
        lib, t_lib = timed(lambda: (lambda ref: [ref.score(f).as_dict() for f in fakes])(PRDCReference(real, 5)),
                           args.repeats)
        ours, t_ours = timed(lambda: _prdc_by_hand(real, fakes, 5), args.repeats)
        diff = max(abs(a[k] - b[k]) for a, b in zip(lib, ours) for k in a)
        line(f"reference {n_ref}, 4 sets of {m}, 256-d, k=5", diff, t_ours, t_lib)


# --------------------------------------------------------------- FID/KID/IS


def bench_inception(args) -> None:
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import poly_mmd

    from audit.quality.inception import frechet_distance, inception_score

    class Features(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.num_features = d

        def forward(self, x):
            return x

    print("FID/KID/IS: audit.quality.inception vs torchmetrics (features given, no network)", flush=True)
    rng = np.random.default_rng(2)
    for n, d in ((200, 2048), (1000, 2048), (3000, 256)):
        mix = rng.normal(size=(64, d))
        a = np.abs(rng.normal(size=(n, 64)) @ mix) / 8  # non-negative, correlated, rank-deficient like pool-3
        b = np.abs(rng.normal(0.1, 1.0, size=(n + 37, 64)) @ mix) / 8
        ours, t_ours = timed(lambda: frechet_distance(a, b), args.repeats)

        def tm():
            fid = FrechetInceptionDistance(feature=Features(d))
            fid.update(torch.from_numpy(a), real=True)
            fid.update(torch.from_numpy(b), real=False)
            return float(fid.compute())

        lib, t_lib = timed(tm, args.repeats)
        line(f"FID {n} vs {n + 37} images, d={d}", abs(ours - lib), t_ours, t_lib,
             f"relative {abs(ours - lib) / ours:.2g}")

    x, y = rng.normal(size=(1000, 2048)), rng.normal(0.1, 1.0, size=(1000, 2048))

    def mmd_by_hand():  # the unbiased MMD^2 this project computed before torchmetrics' poly_mmd
        d, m = x.shape[1], len(x)
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        off = m * (m - 1)
        return float((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())

    ours, t_ours = timed(mmd_by_hand, args.repeats)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lib, t_lib = timed(lambda: float(poly_mmd(xt, yt)), args.repeats)
    line("KID, one subset of 1000 vs 1000, d=2048 (a check runs 100)", abs(ours - lib), t_ours, t_lib)

    logits = rng.normal(0, 3, size=(2000, 1008))
    (o_mean, o_sd, _), t_ours = timed(lambda: inception_score(logits, 10), args.repeats)

    def tm_is(splits):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "will save all extracted features in buffer"
            torch.manual_seed(0)
            metric = InceptionScore(feature=Features(1008), splits=splits)
            metric.update(torch.from_numpy(logits))
            return [float(v) for v in metric.compute()]

    (l_mean, l_sd), t_lib = timed(lambda: tm_is(10), args.repeats)
    line("IS, 2000 images, 10 splits", abs(o_mean - l_mean), t_ours, t_lib,
         f"sd ours {o_sd:.4f} (ddof 0, contiguous splits) vs torchmetrics {l_sd:.4f} (ddof 1, shuffled splits)")
    one = abs(inception_score(logits, 1)[0] - tm_is(1)[0])
    print(f"  IS with one split (no shuffle, no sd): max |diff| {one:.3g}", flush=True)


# ---------------------------------------------------------------- statistics


def bench_stats(args) -> None:
    from scipy import stats

    from audit.core.stats import bootstrap_ci, bootstrap_draws, bootstrap_roc, clopper_pearson, percentile_ci, roc_auc
    from audit.core.stats import tpr_at_fpr

    print("statistics: audit.core.stats vs scipy.stats", flush=True)
    cases = [(k, n) for n in (10, 100, 1000, 20000) for k in (0, 1, n // 10, n // 2, n)]

    def beta_form():
        out = []
        for k, n in cases:
            lo = 0.0 if k == 0 else stats.beta.ppf(0.025, k, n - k + 1)
            hi = 1.0 if k == n else stats.beta.ppf(0.975, k + 1, n - k)
            out.append((lo, hi))
        return out

    ours, t_ours = timed(beta_form, args.repeats)
    lib, t_lib = timed(lambda: [clopper_pearson(k, n) for k, n in cases], args.repeats)
    line(f"Clopper-Pearson, {len(cases)} intervals (binomtest vs beta quantiles)",
         float(np.abs(np.subtract(ours, lib)).max()), t_ours, t_lib,
         f"{t_lib / len(cases) * 1e3:.2f} ms per interval; a check computes a handful")

    rng = np.random.default_rng(3)
    n_groups, per = 300, 4
    values = rng.random((n_groups * per, 5))
    groups = np.repeat(np.arange(n_groups), per)
    members = [np.arange(g * per, g * per + per) for g in range(n_groups)]
    stat = lambda idx: values[idx].mean(0)  # noqa: E731

    def loop():
        r = np.random.default_rng(9)
        return np.stack([stat(np.concatenate([members[g] for g in r.integers(0, n_groups, n_groups)]))
                         for _ in range(2000)])

    ours, t_ours = timed(loop, args.repeats)
    lib, t_lib = timed(lambda: bootstrap_draws(stat, len(groups), 2000, np.random.default_rng(9), groups=groups),
                       args.repeats)
    line(f"cluster bootstrap draws, {n_groups} patients x {per}, 2000 resamples (scipy.stats.bootstrap vs loop)",
         float(np.abs(ours - lib).max()), t_ours, t_lib)
    x = rng.random(500)
    ours, t_ours = timed(lambda: percentile_ci(np.array([x[r].mean() for r in np.random.default_rng(4).integers(
        0, 500, (1000, 500))])), args.repeats)
    lib, t_lib = timed(lambda: bootstrap_ci(lambda s: float(s.mean()), x, n_boot=1000, rng=np.random.default_rng(4)),
                       args.repeats)
    line("bootstrap_ci, 500 values, 1000 resamples", float(np.abs(np.subtract(ours, lib)).max()), t_ours, t_lib)

    # membership inference: members and non-members resampled separately, by patient, AUC and TPR at low FPR
    n_pos, n_neg, fprs = args.mia, args.mia, (0.01, 0.001)
    pos, neg = rng.normal(0.3, 1, n_pos), rng.normal(0, 1, n_neg)
    gp, gn = np.arange(n_pos) // 4, np.arange(n_neg) // 4
    reps, t_ours = timed(lambda: bootstrap_roc(pos, neg, fprs, n_boot=1000, rng=np.random.default_rng(5),
                                               pos_groups=gp, neg_groups=gn), args.repeats)
    mp = [np.flatnonzero(gp == g) for g in range(gp.max() + 1)]
    mn = [np.flatnonzero(gn == g) for g in range(gn.max() + 1)]

    def roc_stat(ip, ineg):
        s = np.concatenate([pos[np.concatenate([mp[g] for g in ip])], neg[np.concatenate([mn[g] for g in ineg])]])
        y = np.r_[np.ones(sum(len(mp[g]) for g in ip), bool), np.zeros(sum(len(mn[g]) for g in ineg), bool)]
        return np.array([roc_auc(s, y), *(tpr_at_fpr(s, y, f) for f in fprs)])

    res, t_lib = timed(lambda: stats.bootstrap((np.arange(len(mp)), np.arange(len(mn))), roc_stat, n_resamples=1000,
                                               paired=False, vectorized=False, method="percentile",
                                               rng=np.random.default_rng(5)), args.repeats)
    ci_ours = percentile_ci(reps["auc"])
    ci_lib = percentile_ci(res.bootstrap_distribution[0])
    line(f"stratified cluster ROC bootstrap, {n_pos} members / {n_neg} non-members, 1000 resamples, AUC + 2 TPRs",
         max(abs(ci_ours[0] - ci_lib[0]), abs(ci_ours[1] - ci_lib[1])), t_ours, t_lib,
         f"AUC CI ours {ci_ours[0]:.4f}-{ci_ours[1]:.4f} vs scipy {ci_lib[0]:.4f}-{ci_lib[1]:.4f}: different draws "
         f"(multinomial weights vs indices), same estimator; replicate sd {reps['auc'].std():.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=("ssim", "prdc", "inception", "stats"),
                   default=("ssim", "prdc", "inception", "stats"))
    p.add_argument("--queries", type=int, default=10, help="nearest-SSIM queries (the check: ssim_queries=100)")
    p.add_argument("--refs", type=int, default=200, help="images each query is compared with (the check: up to 5000)")
    p.add_argument("--ssim-size", type=int, default=128, help="SSIM side (the check: ssim_max_side=128)")
    p.add_argument("--mia", type=int, default=2000, help="members and non-members in the ROC bootstrap")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings (SSIM: one)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for name in args.only:
        globals()[f"bench_{name}"](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
