"""``utility``: does a classifier trained on the synthetic set still work on real patients?

Method (the "classification accuracy score" of the seed studies): the same
classifier, trained the same way, on three training sets --

``real``            the real training images (the reference),
``synthetic``       the synthetic images alone,
``real+synthetic``  both (augmentation, as MediSyn: 1,000 real + 1,000
                    synthetic against 2,000 real),

each tested on the real holdout set (unseen patients).  Reported per arm:
AUC (macro one-vs-rest for more than two classes), F1, precision, recall
and accuracy (macro over classes), with percentile bootstrap intervals over
the holdout (2,000 resamples, as MediSyn; whole patients are resampled when
the holdout has patient IDs, images otherwise); and the differences to the
real arm, bootstrapped *paired* (every arm is scored on the same resampled
images in each draw).  With ``repeats`` >= 3 independent trainings per arm,
each metric is also compared across trainings by the seed studies' tests
(Shapiro-Wilk, then Welch's t-test or Mann-Whitney U, Benjamini-Hochberg
FDR over every metric and comparison).

Every arm gets the same number of optimizer steps (``epochs`` passes over
the *real* training set), so a larger synthetic set cannot win by more
training, and the same input normalisation (from the real training set).

Controls, in every run:

* positive -- the real-trained classifier must beat chance on the holdout
  (AUC interval above 0.5); else the task is not learnable from these data
  and utility cannot be judged: ``inconclusive``;
* negative -- classifiers trained on the real images with labels made
  independent of the truth (same class frequencies, assigned so the
  contingency table with the true labels is as close to independence as
  integers allow) must *not* beat chance; if they do, something other than
  the given labels teaches the classifier (the evaluation leaks) and
  nothing it says can be trusted: ``inconclusive``.  A label-free
  classifier is still a fixed function of the images, and such a function
  can correlate with the truth by chance, in either direction (a score that
  follows brightness follows a bright lesion): on 300 phantom holdout
  images one scored AUC 0.41, its interval excluding 0.5, and its twin
  0.51.  So the control is trained once per cyclic shift of its labels
  (``K`` models for ``K`` classes, each shift as independent of the truth,
  each with its own seed) and, like the other arms over repeats, its
  metrics are the mean over those models, which shrinks such chance
  deviations without removing them: the control can still fail by chance,
  and then the check says ``inconclusive``, never ``pass``;
* positive -- that useless training set must *fail* the decision rule
  below; if it would pass, the tolerance is too loose for this task (the
  real classifier is too weak to tell useful from useless data):
  ``inconclusive``.

Decision on ``metric`` (AUC by default), with ``d`` the synthetic-minus-real
difference and ``[lo, hi]`` its interval:

``fail``          ``d < -max_drop`` (the point estimate loses more than allowed);
``pass``          ``lo >= -max_drop`` (the loss is within tolerance with 95% confidence);
``inconclusive``  otherwise (the holdout is too small to vouch either way);
``warn``          a pass that also found something to read: the augmented arm is
                  worse than real alone (interval below 0), or holdout classes the
                  synthetic set lacks.
"""
from __future__ import annotations

import csv
import math

import numpy as np

from synthgate.progress import Progress

from audit.core.base import Check, CheckResult, Control, Estimate
from audit.quality.classifier import TrainConfig, load_images, normalizer_for, resolve_preset, train_classifier
from audit.core.stats import (CLASSIFICATION_METRICS, benjamini_hochberg, bootstrap_draws, classification_metrics,
                    compare_samples, percentile_ci, roc_points)

from .settings import UtilitySettings

ARMS = ("real", "synthetic", "real+synthetic")
CONTROL_ARM = "shuffled"
COMPARISONS = ("synthetic", "real+synthetic")
_TRAIN_KEYS = ("architecture", "image_size", "epochs", "batch_size", "lr", "weight_decay", "repeats")


def independent_labels(y: np.ndarray, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels with ``y``'s class frequencies, assigned (as nearly as integers allow) independently of ``y``.

    Images are ordered by true class (randomly within a class) and given new
    labels from a sequence in which every label is spread evenly, so each
    true class receives every new label in proportion to its frequency, to
    within one image.  A plain permutation only achieves that on average;
    on a few hundred images its chance agreement with the truth can be
    learned.
    """
    y = np.asarray(y, np.int64)
    counts = np.bincount(y, minlength=n_classes)
    keys = np.concatenate([(np.arange(c) + rng.random()) / c for c in counts if c])
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts) if c])
    sequence = labels[np.argsort(keys, kind="stable")]
    order = np.lexsort((rng.random(len(y)), y))
    out = np.empty_like(y)
    out[order] = sequence
    return out


class Utility(Check):
    name = "utility"
    requires = ("real", "holdout", "labels")
    method = ("Classification accuracy score: the same classifier trained on real, synthetic and real+synthetic "
              "images, tested on the real holdout; metrics with paired bootstrap intervals over holdout images; "
              "Shapiro-Wilk then t-test or Mann-Whitney across repeated trainings, Benjamini-Hochberg FDR; "
              "a label-independent control classifier.")
    references = (
        "Hosseini & Serag 2025, DDPM + Swin transformer synthetic medical images (Front. Artif. Intell.): "
        "train on synthetic, test on real; t-test or Mann-Whitney by Shapiro-Wilk, FDR-corrected",
        "MediSyn: 1,000 real + 1,000 synthetic vs 2,000 real; bootstrap CIs on macro-AUROC, 2,000 resamples",
        "Ravuri & Vinyals 2019, Classification Accuracy Score for Conditional Generative Models (NeurIPS)",
        "Benjamini & Hochberg 1995, Controlling the false discovery rate (J. R. Stat. Soc. B)",
    )
    limitations = (
        "Utility is measured for one task (the labels given) and one classifier recipe; a set useful for this "
        "task may be useless for another.",
        "The bootstrap intervals cover the choice of holdout images, not the randomness of training; the "
        "repeated trainings cover that, and with the CPU preset's 3 repeats the tests have little power "
        "(a Mann-Whitney test on 3 against 3 values cannot give p below 0.1).",
        "No early stopping or tuning: there is no validation set that is not the test set, so every arm "
        "gets the same fixed recipe; a tuned classifier may do better on every arm.",
    )

    Settings = UtilitySettings

    # ----------------------------------------------------------------- data

    def _config(self, ctx) -> tuple[str, TrainConfig, int]:
        st = self.settings
        preset, s = resolve_preset(st.preset, ctx.torch_device, {k: getattr(st, k) for k in _TRAIN_KEYS})
        repeats = int(s.pop("repeats"))
        config = TrainConfig(architecture=str(s["architecture"]), image_size=int(s["image_size"]),
                             epochs=int(s["epochs"]), batch_size=int(s["batch_size"]), lr=float(s["lr"]),
                             weight_decay=float(s["weight_decay"]), weights=st.weights)
        return preset, config, repeats

    def _load(self, ctx, imageset, which: str, size: int, class_index: dict[str, int]):
        n = len(imageset)
        limit = self.settings.max_images
        indices = None
        if n > limit:
            indices = np.sort(ctx.rng(f"utility.subsample.{which}").choice(n, size=limit, replace=False)).tolist()
        x = load_images(ctx, imageset, size, indices)
        records = imageset.records if indices is None else [imageset.records[i] for i in indices]
        y = np.array([class_index[r.label] for r in records], np.int64)
        self._indices[which] = np.arange(n) if indices is None else np.asarray(indices)
        return x, y, (n if indices is None else len(indices)) < n

    # ------------------------------------------------------------------ run

    def score(self, ctx, fitted) -> CheckResult:
        """Set-level: runs once on the final synthetic set (``fitted`` is ``None``)."""
        import torch

        st = self.settings
        self._indices: dict[str, np.ndarray] = {}
        real, synth, hold = ctx.real, ctx.synthetic, ctx.holdout
        if not hold.has_labels:
            return self.result("skipped", "the holdout set has no labels (metadata.csv label column or class folders)")
        classes = sorted(set(real.classes) | set(synth.classes) | set(hold.classes))
        k = len(classes)
        counts = {name: {c: sum(1 for r in s.records if r.label == c) for c in classes}
                  for name, s in (("real", real), ("synthetic", synth), ("holdout", hold))}
        if len(hold.classes) < 2:
            return self.result("inconclusive", f"the holdout set has one class ({hold.classes[0]}); "
                               "no classifier can be scored on it", metrics={"class_counts": counts})
        preset, config, repeats = self._config(ctx)
        index = {c: i for i, c in enumerate(classes)}
        size = config.image_size
        x_real, y_real, cut_r = self._load(ctx, real, "real", size, index)
        x_syn, y_syn, cut_s = self._load(ctx, synth, "synthetic", size, index)
        x_hold, y_hold, cut_h = self._load(ctx, hold, "holdout", size, index)
        normalizer = normalizer_for(config, x_real)
        steps = config.steps_for(len(x_real))
        y_ctrl = independent_labels(y_real, k, ctx.rng("utility.control.labels"))
        data = {"real": (x_real, y_real), "synthetic": (x_syn, y_syn), CONTROL_ARM: (x_real, y_ctrl)}
        arms = list(ARMS if st.augmented else ARMS[:2])
        if st.augmented:
            data["real+synthetic"] = (torch.cat([x_real, x_syn]), np.concatenate([y_real, y_syn]))

        # the control is trained once per cyclic shift of its labels (see the module docstring)
        plan = [(arm, r) for r in range(repeats) for arm in arms] + [(CONTROL_ARM, s) for s in range(k)]
        probs, losses = self._train(ctx, plan, data, k, config, normalizer, steps, x_hold)
        names = [*arms, CONTROL_ARM]
        groups = [r.patient_id for r in hold.records] if hold.has_patients and not cut_h else None
        full, draws = self._bootstrap(ctx, probs, names, y_hold, groups)
        alpha = st.alpha
        arm_est = {a: {m: self._estimate(full[i, j], draws[:, i, j], alpha, len(y_hold), len(probs[a]))
                       for j, m in enumerate(CLASSIFICATION_METRICS)} for i, a in enumerate(names)}
        diffs = {}
        for a in arms[1:]:
            i = names.index(a)
            diffs[f"{a} - real"] = {m: self._estimate(full[i, j] - full[0, j], draws[:, i, j] - draws[:, 0, j],
                                                      alpha, len(y_hold), None)
                                    for j, m in enumerate(CLASSIFICATION_METRICS)}
        ctrl_i = names.index(CONTROL_ARM)
        ctrl_diff = {m: self._estimate(full[ctrl_i, j] - full[0, j], draws[:, ctrl_i, j] - draws[:, 0, j], alpha,
                                       len(y_hold), None) for j, m in enumerate(CLASSIFICATION_METRICS)}

        runs = {a: [dict(zip(CLASSIFICATION_METRICS, classification_metrics(q, y_hold).round(6).tolist()))
                    for q in probs[a]] for a in names}
        tests = self._tests(runs, arms, alpha)
        controls = self._controls(arm_est, ctrl_diff, y_real, y_ctrl, k, runs[CONTROL_ARM])
        metric = st.metric
        d = diffs["synthetic - real"][metric]
        status, reason, warnings = self._decide(d, controls, diffs, classes, counts, arm_est)

        metrics = {
            "classes": classes, "class_counts": counts,
            "n": {"real": len(y_real), "synthetic": len(y_syn), "holdout": len(y_hold)},
            "subsampled": {"real": cut_r, "synthetic": cut_s, "holdout": cut_h},
            "bootstrap_unit": (f"patient ({hold.n_patients} holdout patients)" if groups is not None
                               else "image (no patient IDs on the holdout: intervals may be too narrow)"),
            "arms": arm_est, "differences": diffs, "control_difference": ctrl_diff,
            "tests": tests, "runs": runs,
            "final_training_loss": {a: [round(v, 5) for v in vs] for a, vs in losses.items()},
            "training": {"preset": preset, "architecture": config.architecture, "input_size": list(x_hold.shape[-2:]),
                         "epochs_over_real": config.epochs, "steps_per_model": steps,
                         "batch_size": config.batch_size, "lr": config.lr, "weight_decay": config.weight_decay,
                         "repeats": repeats, "weights": config.weights, "device": str(ctx.torch_device),
                         "normalisation": {"mean": normalizer.mean, "std": normalizer.std}},
            "warnings": warnings,
        }
        thresholds = {"metric": metric, "max_drop": st.max_drop, "chance_auc": 0.5, "alpha": alpha,
                      "n_boot": st.n_boot}
        table = self._table(names, arm_est, diffs)
        self._write_csv(ctx, table)
        plot = {"table": table}
        if k == 2:
            plot["roc"] = {a: roc_points(probs[a][0][:, 1], y_hold == 1) for a in names}
            plot["roc_note"] = "first training run of each arm"
        # per holdout image, each arm's mean probabilities over its runs: the per-subgroup analysis reads them
        per_image = {"holdout": self._indices["holdout"], "y": y_hold,
                     "probs": {a: np.mean(probs[a], axis=0) for a in names if a in ("real", "synthetic")}}
        return self.result(status, reason, metrics=metrics, thresholds=thresholds, controls=tuple(controls),
                           data=plot, per_image=per_image)

    # -------------------------------------------------------------- pieces

    def _train(self, ctx, plan, data, k, config, normalizer, steps, x_hold):
        """Train every (arm, run) of the plan; holdout class probabilities and final losses per arm."""
        probs: dict[str, list[np.ndarray]] = {}
        losses: dict[str, list[float]] = {}
        with Progress(len(plan), desc="utility: train", unit="model", enabled=ctx.progress) as bar:
            for arm, r in plan:
                x, y = data[arm]
                if arm == CONTROL_ARM:
                    y = (y + r) % k
                seed = int(ctx.rng(f"utility.train.{arm}.{r}").integers(0, 2**31 - 1))
                clf = train_classifier(x, y, k, config, normalizer, seed, ctx.torch_device, steps=steps)
                probs.setdefault(arm, []).append(clf.predict_proba(x_hold, self.settings.batch_size_eval))
                losses.setdefault(arm, []).append(clf.final_loss_)
                bar.update(1, arm=arm)
        return probs, losses

    def _bootstrap(self, ctx, probs, names, y_hold, groups):
        """Metrics (mean over each arm's runs) on the holdout and on paired resamples of it: ``(arms, metrics)``."""
        m_count = len(CLASSIFICATION_METRICS)

        def statistics(idx):
            yi = y_hold[idx]
            return np.concatenate([np.mean([classification_metrics(q[idx], yi) for q in probs[a]], axis=0)
                                   for a in names])

        full = statistics(np.arange(len(y_hold))).reshape(len(names), m_count)
        draws = bootstrap_draws(statistics, len(y_hold), self.settings.n_boot, ctx.rng("utility.bootstrap"),
                                groups=groups)
        return full, draws.reshape(len(draws), len(names), m_count)

    @staticmethod
    def _estimate(value: float, draws: np.ndarray, alpha: float, n: int, runs: int | None) -> Estimate:
        lo, hi = percentile_ci(draws, alpha)
        note = f"mean of {runs} training runs" if runs and runs > 1 else None
        return Estimate(float(value), (lo, hi), n, note)

    @staticmethod
    def _tests(runs: dict, arms: list[str], alpha: float) -> list[dict]:
        """The seed studies' tests across repeated trainings, FDR-corrected over every metric and comparison."""
        rows = []
        for arm in arms[1:]:
            for m in CLASSIFICATION_METRICS:
                res = compare_samples([r[m] for r in runs[arm]], [r[m] for r in runs["real"]], alpha)
                rows.append({"comparison": f"{arm} vs real", "metric": m, **res})
        q = benjamini_hochberg([r["p"] if r["p"] is not None else np.nan for r in rows])
        for row, qv in zip(rows, q):
            row["q"] = None if not np.isfinite(qv) else float(qv)
            row["significant"] = None if row["q"] is None else bool(row["q"] < alpha)
        return rows

    def _controls(self, arm_est, ctrl_diff, y_real, y_ctrl, k, control_models) -> list[Control]:
        real_auc, ctrl_auc = arm_est["real"]["auc"], arm_est[CONTROL_ARM]["auc"]
        learns = real_auc.ci is not None and real_auc.ci[0] > 0.5
        table = np.bincount(y_real * k + y_ctrl, minlength=k * k).reshape(k, k)
        not_learned = ctrl_auc.ci is not None and not ctrl_auc.ci[0] > 0.5
        metric = self.settings.metric
        tol = self.settings.max_drop
        useless = ctrl_diff[metric].value
        rejected = useless is not None and useless < -tol
        return [
            Control("real-trained classifier beats chance", "positive", bool(learns),
                    f"holdout AUC {_fmt(real_auc)} for the classifier trained on real images "
                    f"({'above' if learns else 'not above'} chance 0.5)",
                    {"auc": real_auc}),
            Control("label-independent control does not learn", "negative", bool(not_learned),
                    f"mean holdout AUC {_fmt(ctrl_auc)} of {k} classifiers trained on the real images "
                    f"with labels independent of the truth, one per cyclic label shift ("
                    + ("no evidence of learning)" if not_learned else "they beat chance: the evaluation leaks)")
                    + "; single models: " + ", ".join(f"{m['auc']:.3f}" for m in control_models),
                    {"auc": ctrl_auc, "label_table": table.tolist(),
                     "single_model_auc": [m["auc"] for m in control_models]}),
            Control("decision rule rejects a useless training set", "positive", bool(rejected),
                    f"the label-independent training set scores {metric} {useless:+.4f} against real "
                    f"({'beyond' if rejected else 'within'} the tolerance -{tol}); "
                    + ("the rule would fail it" if rejected else "the rule would pass a useless set"),
                    {"difference": ctrl_diff[metric]}),
        ]

    def _decide(self, d: Estimate, controls, diffs, classes, counts, arm_est):
        tol = self.settings.max_drop
        metric = self.settings.metric
        warnings = []
        missing = [c for c in classes if counts["holdout"][c] and not counts["synthetic"][c]]
        if missing:
            warnings.append(f"the synthetic set has no image of holdout class(es) {', '.join(missing)}")
        aug = diffs.get("real+synthetic - real", {}).get(metric)
        if aug is not None and aug.ci is not None and aug.ci[1] < 0:
            warnings.append(f"adding the synthetic images to the real ones lowers {metric} by {-aug.value:.4f} "
                            f"(interval {aug.ci[0]:+.4f} to {aug.ci[1]:+.4f})")
        failed = [c for c in controls if not c.passed]
        if failed:
            why = {"real-trained classifier beats chance": "the real-trained classifier does not beat chance on "
                   "the holdout, so the task is not learnable from these data with this recipe",
                   "label-independent control does not learn": "a classifier trained on label-independent data "
                   "beats chance, so the evaluation leaks and cannot be trusted",
                   "decision rule rejects a useless training set": f"a useless training set would pass the "
                   f"tolerance of {tol} (real-trained {metric} {arm_est['real'][metric].value:.4f}); "
                   "tighten max_drop or use a stronger classifier"}
            return "inconclusive", "; ".join(why[c.name] for c in failed), warnings
        text = (f"synthetic-trained {metric} {arm_est['synthetic'][metric].value:.4f} vs real-trained "
                f"{arm_est['real'][metric].value:.4f}: difference {d.value:+.4f} (95% CI {d.ci[0]:+.4f} to "
                f"{d.ci[1]:+.4f}), tolerance -{tol}")
        if d.value < -tol:
            return "fail", text + "; the synthetic set loses more than allowed", warnings
        if d.ci[0] >= -tol:
            if warnings:
                return "warn", text + "; within tolerance; also: " + "; ".join(warnings), warnings
            return "pass", text + "; within tolerance", warnings
        return ("inconclusive", text + "; the interval reaches beyond the tolerance, so the holdout set is too "
                "small to vouch for the synthetic set", warnings)

    @staticmethod
    def _table(names, arm_est, diffs) -> dict:
        label = {"real": "real", "synthetic": "synthetic", "real+synthetic": "real + synthetic",
                 CONTROL_ARM: "control: label-independent real"}
        rows = [{"arm": label[a], "kind": "arm", **{m: arm_est[a][m].to_dict() for m in CLASSIFICATION_METRICS}}
                for a in names]
        rows += [{"arm": name, "kind": "difference", **{m: est[m].to_dict() for m in CLASSIFICATION_METRICS}}
                 for name, est in diffs.items()]
        return {"columns": list(CLASSIFICATION_METRICS), "rows": rows}

    @staticmethod
    def _write_csv(ctx, table) -> None:
        path = ctx.artifact("utility.csv")
        if path is None:
            return
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["arm", "kind", "metric", "value", "ci_low", "ci_high", "n_holdout"])
            for row in table["rows"]:
                for m in table["columns"]:
                    e = row[m]
                    ci = e.get("ci") or [None, None]
                    w.writerow([row["arm"], row["kind"], m, _num(e["value"]), _num(ci[0]), _num(ci[1]), e.get("n")])


def _fmt(e: Estimate) -> str:
    if e.value is None or e.ci is None or not math.isfinite(e.value):
        return "undefined"
    return f"{e.value:.4f} (95% CI {e.ci[0]:.4f} to {e.ci[1]:.4f})"


def _num(v) -> str:
    return "" if v is None else f"{v:.6f}"
