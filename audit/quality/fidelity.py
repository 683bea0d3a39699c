"""``fidelity``: do the synthetic images look like the real ones, and keep the real set's variety and balance?

What is measured (each against the real set):

* **label balance** -- per-class counts and shares of both sets, a test of
  homogeneity (chi-square, or Fisher's exact test on a 2 x 2 table with
  small counts); a class present in the real set and absent from the
  synthetic set fails, one under-represented below ``min_class_ratio`` of
  its real share warns (bias: rare classes must not silently vanish);
* **intensity** -- per image, the mean and standard deviation of its
  pixels; per class, real against synthetic with the seed studies' tests
  (Shapiro-Wilk, then Welch's t-test or Mann-Whitney U), Benjamini-Hochberg
  over all classes and statistics; a warning needs both ``q < alpha`` and at
  least a ``intensity_effect`` standardised difference (Cohen's d), since
  with thousands of images any difference is "significant";
* **nearest-SSIM** -- each image's highest SSIM to any other image of its
  own set (Hosseini & Serag 2025), real and synthetic at the same set size;
  synthetic images far more alike than real ones are a sign of lost variety
  (mode collapse, memorisation);
* **precision / recall / density / coverage** (Naeem et al. 2020, k = 5) in
  a randomly initialised CNN's feature space (no download), judged against
  what *real* data achieves: the real set is split by patient into a
  reference half and baseline images, and the synthetic set's scores are
  compared with the baseline's at equal sample size;
* **FID, KID, Inception Score** -- only when ``inception_weights`` names a
  local Inception-v3 state dict (:mod:`audit.inception`); otherwise absent,
  with the reason.

Controls, in every run: a planted mode-collapsed set (a few baseline images
repeated with faint noise) must fail the coverage rule (positive: else the
check cannot see lost variety, ``error``); independent real images (the
holdout, or a second real split) must pass the precision and coverage rules
(negative: else the rules are too tight for this sample size,
``inconclusive``).

Status: ``fail`` on a missing class, coverage or precision below its ratio
of the real baseline, or FID above ``max_fid``; ``warn`` on rare or invented
classes, large intensity differences, or synthetic nearest-SSIM clearly
above real; ``pass`` otherwise.
"""
from __future__ import annotations

import csv
import math

import numpy as np

from synthgate.progress import progress_bar

from audit.core.base import Check, CheckResult, Control, Estimate
from audit.quality.classifier import Normalizer, load_images
from audit.quality.prdc import PRDCReference, random_cnn_features
from audit.quality.ssim import nearest_ssim
from audit.core.stats import benjamini_hochberg, compare_samples, percentile_ci, summary

from .settings import FidelitySettings

INCEPTION_ABSENT = ("not computed: no local Inception-v3 weights were given (setting inception_weights); "
                    "FID, KID and IS are only ever computed with Inception-v3, never with a substitute network")


class Fidelity(Check):
    name = "fidelity"
    requires = ("real",)
    method = ("Label balance (chi-square / Fisher), per-class intensity tests (Shapiro-Wilk then t-test or "
              "Mann-Whitney, Benjamini-Hochberg), nearest-SSIM within each set, precision/recall/density/"
              "coverage in a random-CNN feature space against a real-vs-real baseline, and FID/KID/IS with "
              "local Inception-v3 weights only.")
    references = (
        "Hosseini & Serag 2025, DDPM + Swin transformer synthetic medical images (Front. Artif. Intell.): "
        "nearest-SSIM, IS, FID; t-test or Mann-Whitney by Shapiro-Wilk, FDR-corrected",
        "Wang, Bovik, Sheikh & Simoncelli 2004, Image quality assessment: from error visibility to structural "
        "similarity (IEEE TIP)",
        "Naeem, Oh, Uh, Choi & Yoo 2020, Reliable Fidelity and Diversity Metrics for Generative Models (ICML)",
        "Lee, Kim & Lee 2023, Demystifying Randomly Initialized Networks for Evaluating Generative Models (AAAI)",
        "Heusel et al. 2017 (FID); Binkowski et al. 2018 (KID); Salimans et al. 2016 (Inception Score)",
        "Khosravi et al. 2025, Lancet Digital Health viewpoint: bias propagation in synthetic data",
    )
    limitations = (
        "Random-CNN features see texture and layout, not diagnosis; precision and coverage in that space say "
        "whether synthetic images occupy the same regions as real ones, not whether they are clinically right "
        "(the utility check measures that).",
        "Nearest-SSIM and the intensity tests are computed at the analysis size (ssim_max_side, feature_size), "
        "not the original resolution, and nearest-SSIM on a sample of query images (ssim_queries).",
        "FID and KID are biased at small sample sizes; compare them only between audits with similar counts.",
    )

    Settings = FidelitySettings

    # ------------------------------------------------------------------ run

    def score(self, ctx, fitted) -> CheckResult:
        """Set-level: runs once on the final synthetic set (``fitted`` is ``None``)."""
        st = self.settings
        real, synth = ctx.real, ctx.synthetic
        fails, warns = [], []
        metrics: dict = {"n": {"real": len(real), "synthetic": len(synth)}}

        balance = label_balance(real, synth, st.min_class_ratio)
        metrics["label_balance"] = balance
        fails += balance.pop("fails")
        warns += balance.pop("warns")

        idx_r = self._sample(ctx, len(real), "real")
        idx_s = self._sample(ctx, len(synth), "synthetic")
        size = st.ssim_max_side
        x_real = load_images(ctx, real, size, idx_r)
        x_syn = load_images(ctx, synth, size, idx_s)
        labels_r = _labels(real, idx_r)
        labels_s = _labels(synth, idx_s)

        metrics["intensity"] = intensity_tests(x_real, x_syn, labels_r, labels_s, st.alpha,
                                               st.intensity_effect)
        big = [t for t in metrics["intensity"]["tests"] if t.get("flag")]
        if big:
            shown = [f"{t['statistic']} of class {t['class']} (d = {t['cohens_d']:+.2f}, q = {t['q']:.2g})"
                     for t in big[:4]]
            warns.append("intensity differs between real and synthetic images: " + "; ".join(shown))

        metrics["nearest_ssim"] = self._nearest_ssim(ctx, x_real, x_syn)
        gap = metrics["nearest_ssim"].get("median_difference")
        ssim_p = metrics["nearest_ssim"].get("test", {}).get("p")
        if gap is not None and gap > st.max_ssim_gap and ssim_p is not None and ssim_p < st.alpha:
            warns.append(f"synthetic images are more alike than real ones (median nearest-SSIM {gap:+.3f} above "
                         "real): lost variety, mode collapse or memorisation")

        prdc, controls = self._prdc(ctx, x_real, x_syn, real, idx_r)
        metrics["prdc"] = prdc
        prdc_fails = prdc.pop("fails")
        if controls and controls[1].passed:  # the rules are only trusted when independent real data pass them
            fails += prdc_fails

        metrics["inception"] = self._inception(ctx, idx_r, idx_s)
        fid = metrics["inception"].get("fid")
        if fid is not None and st.max_fid is not None and fid > st.max_fid:
            fails.append(f"FID {fid:.2f} above max_fid {st.max_fid}")

        thresholds = {k: getattr(st, k) for k in ("min_precision_ratio", "min_coverage_ratio", "min_class_ratio", "alpha",
                                        "intensity_effect", "max_ssim_gap", "nearest_k", "max_fid")}
        self._write_csv(ctx, metrics)
        data = {"nearest_ssim": metrics["nearest_ssim"].pop("histogram", None),
                "intensity": metrics["intensity"].pop("histograms", None)}
        metrics["warnings"] = warns
        status, reason = self._decide(controls, fails, warns, prdc)
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, controls=controls or (),
                           data=data)

    # -------------------------------------------------------------- pieces

    @staticmethod
    def _decide(controls, fails, warns, prdc) -> tuple[str, str]:
        """error (the planted collapse went unseen) > fail > inconclusive > warn > pass."""
        pos, neg = controls or (None, None)
        if pos is not None and not pos.passed:
            status, reason = "error", f"positive control failed: {pos.detail}; the check cannot see lost variety"
        elif fails:
            status, reason = "fail", "; ".join(fails)
        elif pos is None:
            status, reason = "inconclusive", prdc["note"]
        elif not neg.passed:
            status, reason = "inconclusive", (f"negative control failed: {neg.detail}; the precision/coverage rules "
                                              "flag independent real images at this sample size")
        elif warns:
            status, reason = "warn", "; ".join(warns)
        else:
            status, reason = "pass", ("synthetic images cover the real set as well as independent real images do, "
                                      "every real class is represented, no large intensity or variety difference")
        if status in ("fail", "error", "inconclusive") and warns:
            reason += "; also: " + "; ".join(warns)
        return status, reason

    def _sample(self, ctx, n: int, which: str):
        limit = self.settings.max_images
        if n <= limit:
            return None
        return np.sort(ctx.rng(f"fidelity.sample.{which}").choice(n, size=limit, replace=False)).tolist()

    def _nearest_ssim(self, ctx, x_real, x_syn) -> dict:
        """Nearest-SSIM within each set, both cut to the same size (a larger set has nearer neighbours)."""
        m = min(len(x_real), len(x_syn))
        if m < 2 or min(x_real.shape[-2:]) < 11:
            return {"note": "not computed: needs at least 2 images per set and images of at least 11 x 11 pixels"}
        out: dict = {"set_size": m}
        values = {}
        for name, x in (("real", x_real), ("synthetic", x_syn)):
            rng = ctx.rng(f"fidelity.ssim.{name}")
            pool = np.sort(rng.choice(len(x), m, replace=False)) if len(x) > m else np.arange(len(x))
            xs = x[pool]
            q = np.sort(rng.choice(m, min(m, self.settings.ssim_queries), replace=False))
            best, _ = nearest_ssim(xs, q)
            values[name] = best
            out[name] = summary(best)
        out["queries"] = len(values["real"])
        out["test"] = compare_samples(values["synthetic"], values["real"], self.settings.alpha)
        out["median_difference"] = float(np.median(values["synthetic"]) - np.median(values["real"]))
        lo = float(min(v.min() for v in values.values()))
        edges = np.linspace(min(lo, 0.0), 1.0, 41)
        out["histogram"] = {"edges": edges.round(4).tolist(),
                            **{k: np.histogram(v, edges)[0].tolist() for k, v in values.items()}}
        return out

    def _splits(self, ctx, real, idx_r):
        """Reference / baseline / independent index sets into the loaded real images, by patient when known."""
        records = real.records if idx_r is None else [real.records[i] for i in idx_r]
        groups = [r.patient_id or f"#{i}" for i, r in enumerate(records)]
        uniq = sorted(set(groups))
        rng = ctx.rng("fidelity.split")
        order = rng.permutation(len(uniq))
        has_holdout = ctx.holdout is not None
        cuts = (0.5, 1.0) if has_holdout else (0.5, 0.75)
        part = {uniq[j]: (0 if rank < cuts[0] * len(uniq) else 1 if rank < cuts[1] * len(uniq) else 2)
                for rank, j in enumerate(order)}
        which = np.array([part[g] for g in groups])
        return [np.flatnonzero(which == k) for k in range(3)], has_holdout

    def _prdc(self, ctx, x_real, x_syn, real, idx_r):
        import torch
        import torch.nn.functional as F

        st = self.settings
        k = st.nearest_k
        fs = st.feature_size

        def shrink(x):
            if max(x.shape[-2:]) <= fs:
                return x
            return F.interpolate(x.float(), size=(min(fs, x.shape[-2]), min(fs, x.shape[-1])), mode="bilinear",
                                 antialias=True, align_corners=False)

        normalizer = Normalizer.from_images(x_real)
        seed = int(ctx.rng("fidelity.features").integers(0, 2**31 - 1))
        feats = lambda x: random_cnn_features(shrink(x), seed, normalizer, device=ctx.torch_device)  # noqa: E731
        f_real = feats(x_real)
        (ref_i, base_i, indep_i), has_holdout = self._splits(ctx, real, idx_r)
        if has_holdout:
            x_h = load_images(ctx, ctx.holdout, st.ssim_max_side, self._sample(ctx, len(ctx.holdout), "holdout"))
            f_indep, indep_name = feats(x_h), "holdout"
        else:
            f_indep, indep_name = f_real[indep_i], "second real split"
        f_syn = feats(x_syn)
        m = min(len(base_i), len(f_indep), len(f_syn))
        fails: list[str] = []
        # with fewer than 4k images per compared set, every k-NN ball covers nearly everything and even the
        # planted collapse keeps full coverage: the control could not fail for a real reason
        if len(ref_i) < k + 2 or m < 4 * k:
            note = (f"precision/coverage not computed: too few images for k = {k} (reference {len(ref_i)}, "
                    f"comparison sets {m}; at least {4 * k} needed), so neither the check nor its controls could run")
            return {"note": note, "fails": fails}, None
        rng = ctx.rng("fidelity.prdc")
        reference = PRDCReference(f_real[ref_i], k)
        pick = lambda f: f[np.sort(rng.choice(len(f), m, replace=False))]  # noqa: E731
        base = reference.score(pick(f_real[base_i]))
        sets = {"synthetic": pick(f_syn), indep_name: pick(f_indep)}
        # positive control: m images made from a few baseline images (mode collapse), faint noise added
        n_src = max(1, min(st.collapse_sources, len(base_i)))
        src = rng.choice(base_i, n_src, replace=False)
        collapsed_x = x_real[src[rng.integers(0, n_src, m)]].float()
        noise = torch.from_numpy(rng.normal(0.0, 0.01, tuple(collapsed_x.shape)).astype(np.float32))
        sets["planted collapse"] = feats((collapsed_x + noise).clamp(0, 1))

        out: dict = {"feature_space": "random_cnn", "k": k, "n_reference": len(ref_i), "n_compared": m,
                     "baseline": {**base.as_dict(), "what": "real images (not in the reference) against the reference"}}
        ratio_rules = {"precision": st.min_precision_ratio, "coverage": st.min_coverage_ratio}
        verdicts = {}
        for name, f in sets.items():
            score = reference.score(f)
            boot = reference.bootstrap(f, st.n_boot, ctx.rng(f"fidelity.prdc.boot.{name}"))
            entry = {}
            for metric, value in score.as_dict().items():
                ci = percentile_ci(boot[metric]) if metric in boot else None
                entry[metric] = Estimate(value, ci, m)
            ratios = {mt: (score.as_dict()[mt] / base.as_dict()[mt]) if base.as_dict()[mt] > 0 else None
                      for mt in ("precision", "recall", "density", "coverage")}
            entry["ratio_to_baseline"] = ratios
            below = [f"{mt} {score.as_dict()[mt]:.3f} is {ratios[mt]:.2f} of real's {base.as_dict()[mt]:.3f} "
                     f"(minimum {lim})" for mt, lim in ratio_rules.items()
                     if ratios[mt] is not None and ratios[mt] < lim]
            verdicts[name] = below
            out[name] = entry
        fails += verdicts["synthetic"]
        collapse_caught = any(s.startswith("coverage") for s in verdicts["planted collapse"])
        pos = Control("planted mode collapse lowers coverage", "positive", collapse_caught,
                      f"{m} images made from {n_src} real image(s) with noise sigma 0.01: coverage "
                      f"{out['planted collapse']['coverage'].value:.3f} vs real {base.coverage:.3f} -> "
                      + ("caught by the coverage rule" if collapse_caught else "NOT caught by the coverage rule"),
                      {"coverage": out["planted collapse"]["coverage"], "baseline_coverage": base.coverage})
        neg = Control("independent real images pass", "negative", not verdicts[indep_name],
                      f"{indep_name} ({m} images): " + ("; ".join(verdicts[indep_name]) or
                                                        "precision and coverage within the rules"),
                      {k2: out[indep_name][k2] for k2 in ("precision", "coverage")})
        out["fails"] = fails
        return out, (pos, neg)

    def _inception(self, ctx, idx_r, idx_s) -> dict:
        st = self.settings
        if not st.inception_weights:
            return {"computed": False, "absent": {"fid": INCEPTION_ABSENT, "kid": INCEPTION_ABSENT,
                                                  "inception_score": INCEPTION_ABSENT}}
        from audit.quality.inception import frechet_distance, inception_score, kernel_inception_distance, load_inception

        net = load_inception(st.inception_weights, ctx.torch_device)
        # from the audit geometry straight to 299 x 299, as FID is computed, not via the smaller analysis size
        f_r, _ = _stream_outputs(ctx, net, ctx.real, idx_r)
        f_s, logits_s = _stream_outputs(ctx, net, ctx.synthetic, idx_s)
        kid, kid_sd, kid_m = kernel_inception_distance(f_r, f_s, st.kid_subsets, st.kid_subset_size,
                                                       ctx.rng("fidelity.kid"))
        is_mean, is_sd, splits = inception_score(logits_s, st.is_splits)
        half = ctx.rng("fidelity.fid.split").permutation(len(f_r))
        a, b = half[: len(half) // 2], half[len(half) // 2:]
        base = frechet_distance(f_r[a], f_r[b]) if min(len(a), len(b)) >= 2 else None
        return {"computed": True, "network": net.kind, "weights": net.path, "comparability": net.comparable,
                "fid": frechet_distance(f_r, f_s), "fid_real_halves": base,
                "kid": Estimate(kid, None, kid_m,
                                f"mean of {st.kid_subsets} subsets of {kid_m}; sd {kid_sd:.3g}"),
                "inception_score": Estimate(is_mean, None, len(f_s), f"{splits} splits; sd {is_sd:.3g}"),
                "n": {"real": len(f_r), "synthetic": len(f_s)},
                "note": "FID is biased upwards at small sample sizes; fid_real_halves is what two halves of the "
                        "real set score against each other"}

    def _write_csv(self, ctx, metrics) -> None:
        path = ctx.artifact("fidelity.csv")
        if path is None:
            return
        rows = []
        for c in metrics["label_balance"].get("classes", []):
            rows.append(["label_balance", c["class"], "share_synthetic_over_real", c["ratio"]])
        for t in metrics["intensity"]["tests"]:
            rows.append(["intensity", t["class"], f"{t['statistic']}_cohens_d", t.get("cohens_d")])
            rows.append(["intensity", t["class"], f"{t['statistic']}_q", t.get("q")])
        ns = metrics["nearest_ssim"]
        for s in ("real", "synthetic"):
            if s in ns:
                rows.append(["nearest_ssim", s, "median", ns[s]["median"]])
        for name, entry in metrics["prdc"].items():
            if isinstance(entry, dict) and "coverage" in entry:
                for mt in ("precision", "recall", "density", "coverage"):
                    v = entry[mt]
                    rows.append(["prdc", name, mt, v.value if isinstance(v, Estimate) else v])
        inc = metrics["inception"]
        if inc.get("computed"):
            rows += [["inception", inc["network"], "fid", inc["fid"]],
                     ["inception", inc["network"], "kid", inc["kid"].value],
                     ["inception", inc["network"], "inception_score", inc["inception_score"].value]]
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["section", "group", "metric", "value"])
            for r in rows:
                w.writerow([*r[:3], "" if r[3] is None else (f"{r[3]:.6f}" if isinstance(r[3], float) else r[3])])


# ------------------------------------------------------------------ helpers


def _stream_outputs(ctx, net, imageset, indices) -> tuple[np.ndarray, np.ndarray]:
    import torch

    n = len(imageset) if indices is None else len(indices)
    parts = [net.outputs(torch.from_numpy(batch))
             for _, batch in progress_bar(ctx.batches(imageset, 32, indices=indices), desc=f"fidelity: features of "
                                          f"{imageset.root.name}", unit="batch", total=-(-n // 32),
                                          enabled=ctx.progress)]
    return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])


def _labels(imageset, indices) -> list[str]:
    recs = imageset.records if indices is None else [imageset.records[i] for i in indices]
    return [r.label or "(all)" for r in recs] if imageset.has_labels else ["(all)"] * len(recs)


def label_balance(real, synth, min_ratio: float) -> dict:
    """Per-class counts and shares, a homogeneity test, and the classes that vanished or shrank."""
    from scipy import stats

    if not (real.has_labels and synth.has_labels):
        return {"note": "not applicable: labels are needed on both sets", "fails": [], "warns": []}
    classes = sorted(set(real.classes) | set(synth.classes))
    cr = np.array([sum(1 for r in real.records if r.label == c) for c in classes])
    cs = np.array([sum(1 for r in synth.records if r.label == c) for c in classes])
    share_r, share_s = cr / cr.sum(), cs / cs.sum()
    rows, fails, warns = [], [], []
    for c, nr, ns, a, b in zip(classes, cr, cs, share_r, share_s):
        ratio = b / a if a > 0 else None
        rows.append({"class": c, "real": int(nr), "synthetic": int(ns), "share_real": float(a),
                     "share_synthetic": float(b), "ratio": None if ratio is None else float(ratio)})
        if nr > 0 and ns == 0:
            fails.append(f"class {c} ({nr} real images) is missing from the synthetic set")
        elif ratio is not None and ratio < min_ratio:
            warns.append(f"class {c} is under-represented: {b:.1%} of synthetic vs {a:.1%} of real images")
        elif nr == 0:
            warns.append(f"class {c} appears only in the synthetic set ({ns} images)")
    table = np.stack([cr, cs])
    keep = table.sum(0) > 0
    table = table[:, keep]
    test: dict
    if table.shape[1] < 2:
        test = {"test": None, "note": "one class only"}
    elif table.shape[1] == 2 and (stats.contingency.expected_freq(table) < 5).any():
        res = stats.fisher_exact(table)
        test = {"test": "fisher_exact", "p": float(res.pvalue)}
    else:
        res = stats.chi2_contingency(table, correction=False)
        test = {"test": "chi_square_homogeneity", "statistic": float(res.statistic), "dof": int(res.dof),
                "p": float(res.pvalue), "min_expected": float(res.expected_freq.min())}
    return {"classes": rows, "test": test, "fails": fails, "warns": warns}


def intensity_tests(x_real, x_syn, labels_r, labels_s, alpha: float, min_effect: float) -> dict:
    """Per class, real vs synthetic per-image mean and standard deviation of intensity, BH-corrected."""
    fr = _intensity(x_real)
    fs = _intensity(x_syn)
    lr, ls = np.asarray(labels_r), np.asarray(labels_s)
    tests, hist = [], {}
    for c in sorted(set(lr) & set(ls)):
        for j, stat in enumerate(("mean_intensity", "std_intensity")):
            a, b = fs[ls == c, j], fr[lr == c, j]
            res = compare_samples(a, b, alpha)
            pooled = math.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if min(len(a), len(b)) > 1 else float("nan")
            d = (a.mean() - b.mean()) / pooled if pooled and math.isfinite(pooled) and pooled > 0 else float("nan")
            tests.append({"class": c, "statistic": stat, "synthetic": summary(a), "real": summary(b),
                          "cohens_d": float(d), **{k: res[k] for k in ("test", "p", "shapiro_p") if k in res}})
        edges = np.linspace(0, 1, 41)
        hist[c] = {"edges": edges.round(4).tolist(), "real": np.histogram(fr[lr == c, 0], edges)[0].tolist(),
                   "synthetic": np.histogram(fs[ls == c, 0], edges)[0].tolist()}
    q = benjamini_hochberg([t["p"] if t.get("p") is not None else np.nan for t in tests])
    for t, qv in zip(tests, q):
        t["q"] = None if not np.isfinite(qv) else float(qv)
        t["flag"] = bool(t["q"] is not None and t["q"] < alpha and abs(t["cohens_d"]) >= min_effect)
    return {"tests": tests, "histograms": hist,
            "note": "Cohen's d is (synthetic - real) over the pooled standard deviation"}


def _intensity(x) -> np.ndarray:
    xf = x.float().flatten(1)
    return np.stack([xf.mean(1).double().numpy(), xf.std(1).double().numpy()], 1)
