"""The model card and the datasheet that travel with a release bundle, written for a reviewer.

``MODEL_CARD.md`` follows the Hugging Face model card layout (YAML front
matter; Model details, Uses, Bias/risks/limitations, Training details,
Evaluation, Environmental impact, Technical specifications, Citation, Card
authors), itself derived from Mitchell et al. 2019, "Model Cards for Model
Reporting".  ``DATASHEET.md`` follows the sections of Gebru et al. 2021,
"Datasheets for Datasets" (Motivation, Composition, Collection process,
Preprocessing, Uses, Distribution, Maintenance), and carries the STANDING
Together dataset-documentation items (Alderman et al., the STANDING Together
consensus recommendations, 2024/2025): a summary; identity and access
(version, licence, custodian); purpose and uses to avoid; composition by
subgroup; and what is unknown, stated as unknown.

Everything is filled from what synthgate recorded (the model's
``synthgate.json``, the generator manifest, the signed shareable audit, the
release ledger) and from what the custodian said when bundling
(``--custodian``, ``--licence``, ``--purpose``, ``--uses-to-avoid``).  What
was not given is named, with what its absence means for the evidence; no
field is ever a placeholder.  Only checks that ran are evidence: a check
that did not run is listed as not run, with what that leaves unknown.

The texts take their values from the shareable audit and from a model
description and generator manifest already passed through the same
redaction, so they hold no local path and no real file name; the bundle
still passes each text through it once more before writing.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:  # pragma: no cover
    from audit.record import AuditRecord, CheckRecord

    from .ledger import Cumulative

CONCLUSIVE = ("pass", "warn", "fail")  # ran and decided (a failed per-image check passes once its images dropped)
TITLES = {"copy_detection": "copy detection", "reidentification": "re-identification",
          "membership_inference": "membership inference", "dicom_phi": "DICOM header / image metadata PHI",
          "utility": "utility", "fidelity": "fidelity"}
PRIVACY = ("copy_detection", "reidentification", "membership_inference", "dicom_phi")
#: what is left unknown when a check did not run
WITHOUT = {
    "copy_detection": "nothing shows that the released images are not copies of training images",
    "reidentification": "nothing shows that a released image cannot be matched to a training patient",
    "membership_inference": "nothing shows whether the model gives away who was in its training set",
    "dicom_phi": "the files' headers and metadata were not searched for identifying data",
    "utility": "nothing shows that models trained on these images work on real ones",
    "fidelity": "nothing shows how closely the images follow the real images' distribution",
}
NO_MODEL = ("The audit was not given the model (`audit check --model`, or a synthetic set whose `manifest.json` "
            "names it), so nothing about the model was read. What that means for the evidence: its architecture, "
            "its training data and procedure, and whether it was trained with differential privacy are **not** "
            "part of this release's evidence, and the model's digest was not re-checked when bundling. What was "
            "audited are the released images themselves, compared with the real data.")
DEFAULT_PURPOSE = ("sharing synthetic images for method development, education and research in place of the patient "
                   "images they were learned from")
DEFAULT_AVOID = ("clinical diagnosis or treatment decisions; estimating prevalence or other population statistics; "
                 "training a model and reporting it as trained on patient data; any attempt to link an image to a "
                 "person")
MAX_STEWARD_CHARS = 2000


# ------------------------------------------------------------------ what the custodian says


@dataclass(frozen=True)
class Stewardship:
    """What the data custodian states when bundling (``release bundle --custodian/--licence/--purpose/--uses-to-avoid``)."""

    custodian: str | None = None
    licence: str | None = None
    purpose: str | None = None
    uses_to_avoid: str | None = None

    def option(self, name: str) -> str:
        return "--" + name.replace("_", "-")

    def given(self, name: str) -> str:
        """The value, or a plain statement that it was not given and where it would come from."""
        value = getattr(self, name)
        return value if value else f"not given (`release bundle {self.option(name)}`)"

    def missing(self) -> list[str]:
        return [f.name for f in fields(self) if not getattr(self, f.name)]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _policy_text(policy) -> str:
    """The policy as every shareable document names it: built-in or custom (:func:`audit.core.policy.policy_label`)."""
    from audit.core.policy import policy_label

    return policy_label(policy.name, policy.sha256) if policy is not None else "policy: not recorded"


def stewardship(custodian: str | None = None, licence: str | None = None, purpose: str | None = None,
                uses_to_avoid: str | None = None) -> Stewardship:
    """Validate the custodian's statements: one line each (whitespace collapsed), printable, at most 2000 characters."""
    from synthgate.errors import UsageError

    out = {}
    for name, value in (("custodian", custodian), ("licence", licence), ("purpose", purpose),
                        ("uses_to_avoid", uses_to_avoid)):
        if value is None:
            out[name] = None
            continue
        text = " ".join(str(value).split())
        if any(not ch.isprintable() for ch in text):
            raise UsageError(f"--{name.replace('_', '-')}: holds a control character; give plain text")
        if len(text) > MAX_STEWARD_CHARS:
            raise UsageError(f"--{name.replace('_', '-')}: longer than {MAX_STEWARD_CHARS} characters; say it in "
                             "fewer words (the cards are for a reader)")
        out[name] = text or None
    return Stewardship(**out)


# ------------------------------------------------------------------ small helpers


def _title(name: str) -> str:
    return TITLES.get(name, name.replace("_", " "))


def _md(text: str) -> str:
    """One table cell: whitespace collapsed, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _num(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ran(audit: "AuditRecord") -> list:
    """The checks that ran and decided (evidence), in audit order."""
    return [c for c in audit.checks if c.status in CONCLUSIVE]


def not_run(audit: "AuditRecord") -> list:
    """The checks the audit lists that did not decide (skipped, inconclusive, error)."""
    return [c for c in audit.checks if c.status not in CONCLUSIVE]


def absent(audit: "AuditRecord") -> list[str]:
    """Known checks that are not in the audit at all (the policy did not ask for them)."""
    present = {c.name for c in audit.checks}
    return [n for n in TITLES if n not in present]


def key_numbers(check: "CheckRecord", limit: int = 4) -> str:
    """A check's headline numbers: its scalar metrics and rates with their intervals, then its scalar thresholds."""
    rates, counts = [], []  # rates with their intervals first: they are what a threshold judges
    for k, v in check.metrics.items():
        if _is_num(v):
            counts.append(f"{k.replace('_', ' ')} {_num(v)}")
        elif isinstance(v, Mapping) and _is_num(v.get("value")):
            ci = v.get("ci")
            interval = (f" [{_num(ci[0])}, {_num(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2
                        and all(_is_num(x) for x in ci) else "")
            rates.append(f"{k.replace('_', ' ')} {_num(v['value'])}{interval}")
    parts = (rates + counts)[:limit]
    thresholds = [f"{k.replace('_', ' ')} {_num(v)}" for k, v in check.thresholds.items() if _is_num(v)][:2]
    out = "; ".join(parts) if parts else "no numeric metric recorded"
    return out + (f" (thresholds: {', '.join(thresholds)})" if thresholds else "")


def _gated_by(audit: "AuditRecord") -> str:
    names = [_title(c.name) for c in ran(audit) if c.name in PRIVACY]
    missing = [_title(n) for n in PRIVACY if n not in {c.name for c in ran(audit)}]
    out = f"this release was gated by {', '.join(names)}" if names else "no privacy check ran"
    if missing:
        out += f"; {', '.join(missing)} did not run and {'is' if len(missing) == 1 else 'are'} no part of this evidence"
    return out


def _set_line(entry, missing: str) -> str:
    if entry is None:
        return f"none given ({missing})"
    return f"digest `{entry.sha256}`, {entry.n_images} images"


def _attacker_lines(audit) -> str:
    """Public data the re-identification attacker also trained on (``--attacker-data``), or nothing."""
    return "".join(f"- Attacker data (public images the re-identification attacker also trained on): "
                   f"{_set_line(e, '')}, {(e.model_extra or {}).get('n_patients', '?')} patients.\n"
                   for e in audit.inputs.attacker_data)


def _value(d: Mapping | None, key: str, missing: str = "not recorded") -> str:
    v = (d or {}).get(key)
    if v is None or v == "" or v == []:
        return missing
    if isinstance(v, (list, tuple)):
        return ", ".join(_num(x) for x in v)
    return _num(v)


def _architecture(m: Mapping) -> str:
    arch = m.get("architecture")
    if isinstance(arch, Mapping):
        name, cls = arch.get("name"), arch.get("class")
        if name and cls:
            return f"{name} ({str(cls).split(':')[-1]})"
        return str(name or cls or "architecture not recorded")
    return str(arch) if arch else "architecture not recorded"


def _conditioning(m: Mapping) -> str:
    cond = m.get("conditioning") if isinstance(m.get("conditioning"), Mapping) else {}
    kind, labels = cond.get("type"), cond.get("labels")
    if labels:
        return "class labels " + ", ".join(map(str, labels))
    if kind in (None, "none"):
        return "none (unconditional)" if kind == "none" else "not recorded"
    columns = cond.get("columns")
    if isinstance(columns, list) and columns:
        names = [c.get("name") if isinstance(c, Mapping) else c for c in columns]
        return f"{kind}: " + ", ".join(str(n) for n in names if n)
    return str(kind)


def _model_type(m: Mapping) -> str:
    res = m.get("resolution")
    geometry = f"{res}×{res} pixels" if _is_num(res) else "resolution not recorded"
    channels = m.get("image_channels")
    kind = {"pixel": "pixel-space", "latent": "latent"}.get(m.get("kind"), m.get("kind") or "")
    return (f"{kind + ' ' if kind else ''}denoising diffusion model, {_architecture(m)}, {geometry}, "
            f"{_num(channels) if _is_num(channels) else 'an unrecorded number of'} channel(s); conditioning: "
            f"{_conditioning(m)}")


def _ties(audit: "AuditRecord", generator: Mapping | None) -> bool:
    """Whether the synthetic set's generator manifest (bound to the audit) names the audited model's digest."""
    gen = generator if isinstance(generator, Mapping) else {}
    claimed = (gen.get("model") or {}).get("sha256") if isinstance(gen.get("model"), Mapping) else None
    audited = audit.inputs.model.sha256 if audit.inputs.model is not None else None
    return bool(claimed) and claimed == audited


def _dp_text(model: Mapping | None, tied: bool = True) -> str:
    if model is None:
        return ("Differential privacy: not known (the model was not given to the audit), so this release carries "
                "no differential-privacy guarantee that anyone checked.")
    dp = model.get("dp")
    if not dp:
        return "Trained **without** differential privacy: no formal privacy guarantee; the audit is the evidence."
    fields_ = (("epsilon_spent", "ε spent = {}"), ("epsilon_target", "target ε = {}"), ("delta", "δ = {}"),
               ("accountant", "{} accountant"), ("max_grad_norm", "per-example clipping norm {}"),
               ("noise_multiplier", "noise multiplier {}"), ("noise_multiplicity", "noise multiplicity {}"),
               ("sampling", "{} sampling"), ("sample_rate", "sampling rate {}"))
    given = [text.format(_num(dp[k])) for k, text in fields_ if dp.get(k) not in (None, "")]
    missing = [k.replace("_", " ") for k, _ in fields_ if dp.get(k) in (None, "")]
    library = f", {dp['library']}" if dp.get("library") else ""
    text = (f"Trained with differential privacy (DP-SGD{library}): {', '.join(given)}."
            + (f" Not recorded: {', '.join(missing)}." if missing else ""))
    if not tied:
        return ("The audited model's record says: " + text[0].lower() + text[1:] + " But no generator manifest of "
                "the synthetic set names this model, so nothing shows it made these images: this release carries "
                "**no** differential-privacy guarantee.")
    return text


def _cumulative_text(privacy: "Cumulative | None") -> str:
    if privacy is None:
        return "Cumulative privacy cost of releases from this training set: not computed for this bundle."
    digest = f"`{privacy.training_set[:16]}…`" if privacy.training_set else "(digest not recorded)"
    return (f"Cumulative privacy cost of every release recorded from training set {digest}, this one included "
            f"(the custodian's release ledger when this bundle was made): {privacy.describe()}.")


def _training_labels(model: Mapping | None) -> dict[str, int] | None:
    labels = ((model or {}).get("training_set") or {}).get("labels")
    if isinstance(labels, Mapping) and labels:
        return {str(k): int(v) for k, v in labels.items() if _is_num(v)}
    return None


# ------------------------------------------------------------------ composition by subgroup


def subgroup_counts(files: list[str], columns: Mapping[str, Mapping[str, str | None]]) -> dict[str, Counter]:
    """Files per value of each subgroup column of the released set.

    ``columns`` maps a column name to each file's value.  Today the bundle
    passes the label only (``{"label": labels}``); subgroup columns beyond
    the label (sex, age band, site, scanner...) will come from a later change
    that passes them here, and the datasheet's table shows every column given.
    """
    return {name: Counter(values.get(f) if values.get(f) not in (None, "") else "unlabelled" for f in files)
            for name, values in columns.items()}


def _policy_subgroups(audit: "AuditRecord") -> str:
    """The training set's composition by the policy's subgroup columns (from the audit's per-subgroup analysis),
    against the released images where they carry the column; with the subgroups beyond a limit."""
    sg = (audit.model_extra or {}).get("subgroups") or {}
    table = sg.get("table") or {}
    if not table:
        return ""
    lines = ["- Composition by the policy's subgroup columns (training set as audited; released images where they "
             "carry the column -- a generator not conditioned on it does not record it):", "",
             "| column | value | training images | released images |", "|---|---|---|---|"]
    for column, values in table.items():
        for value, row in values.items():
            comp = row.get("composition") or {}
            rel = comp.get("synthetic")
            lines.append(f"| {column} | {value} | {comp.get('training', 0)} | "
                         f"{rel if rel is not None else 'not recorded'} |")
    for e in sg.get("exceeded") or []:
        lines.append(f"\n- Subgroup {e['column']}={e['value']} went beyond the policy's per-subgroup "
                     f"{e['limit'].replace('_', ' ')} limit {e['limit_value']:g}.")
    return "\n".join(lines) + "\n"


def _composition_table(released: Mapping[str, Counter], reference: Mapping[str, Mapping[str, int]] | None,
                       reference_name: str) -> str:
    lines = [f"| subgroup column | value | released images | {reference_name} |", "|---|---|---|---|"]
    for column, counts in released.items():
        total = sum(counts.values()) or 1
        ref = (reference or {}).get(column)
        ref_total = sum(ref.values()) if ref else 0
        for value in sorted(set(counts) | set(ref or {}), key=str):
            n = counts.get(value, 0)
            if ref:
                r = ref.get(value, 0)
                ref_cell = f"{r} ({100 * r / ref_total:.0f}%)" if ref_total else str(r)
            else:
                ref_cell = "not given"
            lines.append(f"| {_md(column)} | {_md(value)} | {n} ({100 * n / total:.0f}%) | {ref_cell} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ the model card


def _front_matter(audit: "AuditRecord", model: Mapping | None, steward: Stewardship, model_digest: str | None) -> str:
    labels = ((model or {}).get("conditioning") or {}).get("labels") if isinstance(model, Mapping) else None
    lines = ["---", "library_name: diffusers",
             f"pipeline_tag: {'image-generation' if labels else 'unconditional-image-generation'}",
             "tags:", "- synthetic-data", "- medical-imaging", "- diffusion", "- synthgate"]
    if model is not None and model.get("dp"):
        lines.append("- differential-privacy")
    if steward.licence:
        if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", steward.licence.lower()):
            lines.append(f"license: {steward.licence.lower()}")
        else:
            lines += ["license: other", f"license_name: {json.dumps(steward.licence, ensure_ascii=False)}"]
    lines += ["synthgate:", f"  audit_verdict: {audit.verdict}", f"  model_given_to_audit: {'true' if model is not None else 'false'}"]
    if model_digest:
        lines.append(f"  model_sha256: {model_digest}")
    return "\n".join([*lines, "---", ""])


def _results(audit: "AuditRecord") -> str:
    lines = ["| check | status | finding | key numbers |", "|---|---|---|---|"]
    for c in ran(audit):
        lines.append(f"| {_title(c.name)} | {c.status} | {_md(c.reason)} | {_md(key_numbers(c))} |")
    if len(lines) == 2:
        lines = ["No check ran and decided: this release has no audit evidence."]
    gaps = [f"- {_title(c.name)}: **not run** ({c.status}: {' '.join(c.reason.split())}); so "
            f"{WITHOUT.get(c.name, 'it is no part of this evidence')}." for c in not_run(audit)]
    gaps += [f"- {_title(n)}: **not run** (not in the policy); so {WITHOUT[n]}." for n in absent(audit)]
    if gaps:
        lines += ["", "Checks that did not run (no evidence from them; the release was not gated by them):", *gaps]
    return "\n".join(lines)


def model_card(audit: "AuditRecord", model: Mapping | None, generator: Mapping | None, *,
               steward: Stewardship | None = None, privacy: "Cumulative | None" = None,
               credentials: Mapping | None = None) -> str:
    """``MODEL_CARD.md``: the Hugging Face layout, filled from what synthgate recorded and what the custodian said."""
    steward = steward or Stewardship()
    m = model if isinstance(model, Mapping) else None
    gen = generator if isinstance(generator, Mapping) else {}
    model_rec = audit.inputs.model
    digest = model_rec.sha256 if model_rec is not None and model_rec.sha256 else None
    cfg = (m or {}).get("config") if isinstance((m or {}).get("config"), Mapping) else {}
    training = (m or {}).get("training_set") if isinstance((m or {}).get("training_set"), Mapping) else None
    policy = audit.policy
    version = audit.tool.version

    if m is None:
        summary = ("This card describes the generator of a synthetic medical image release that passed synthgate's "
                   "release gate. **The model itself was not given to the audit**: see Model details for what that "
                   "means.")
        details = f"{NO_MODEL}\n\n- **Model digest:** not given (no model was audited, so none was re-hashed)."
        gen_model = (gen.get("model") or {}).get("sha256") if isinstance(gen.get("model"), Mapping) else None
        if gen_model:
            details += (f"\n- **Claimed by the generator manifest:** model `{gen_model}` (a claim of the synthetic "
                        "set's manifest.json, not verified by the audit).")
    else:
        summary = (f"This card describes the {_model_type(m).split(',')[0]} whose images make up this release; "
                   f"its released images passed synthgate's release gate under the "
                   f"**{_policy_text(policy)}**.")
        details = "\n".join([
            f"- **Model type:** {_model_type(m)}.",
            f"- **Model digest:** `{digest}` (SHA-256 over its declared files, re-checked when bundled)."
            if digest else "- **Model digest:** not recorded by the audit.",
        ])
    details += "\n" + "\n".join([
        f"- **Developed by / data custodian:** {steward.given('custodian')}.",
        f"- **Licence of the released images:** {steward.given('licence')}.",
        "- **Shared as:** this release bundle (images, signed manifest and audit, report, this card, DATASHEET.md).",
    ])

    # Uses
    purpose = steward.purpose or DEFAULT_PURPOSE
    direct = (f"- {purpose[0].upper()}{purpose[1:]}" + ("" if steward.purpose else " (synthgate's default statement: the custodian did not "
                                "state a purpose with `--purpose`)")
              + f"; within the **{_policy_text(policy)}**.")
    avoid = [f"- {steward.uses_to_avoid} (stated by the custodian)."] if steward.uses_to_avoid else [
        "- The custodian did not state uses to avoid (`--uses-to-avoid`); synthgate's defaults follow."]
    avoid.append(f"- {DEFAULT_AVOID[0].upper()}{DEFAULT_AVOID[1:]}.")

    # Training details
    if m is None:
        train_data = "- Not given: the model was not given to the audit, so its training set is not described here."
        procedure = "- Not given (the model was not given to the audit)."
    else:
        if training:
            parts = [f"digest `{training['sha256']}`" if training.get("sha256") else "digest not recorded",
                     f"{training['n_images']} images" if _is_num(training.get("n_images")) else "image count not recorded",
                     f"{training['n_patients']} patients" if _is_num(training.get("n_patients"))
                     else "patient count not recorded"]
            labels = _training_labels(m)
            label_text = ("; labels " + ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))) if labels else \
                "; label counts not recorded"
            train_data = f"- Training set: {', '.join(parts)}{label_text}."
        else:
            train_data = "- Training set: not recorded in the model's synthgate.json."
        train_data += "\n- The training images never leave the hospital; only this model's audited outputs do."
        procedure = "\n".join([
            (f"- {m['steps']} steps" if _is_num(m.get("steps")) else "- Number of steps: not recorded")
            + f"; seed {_value(m, 'seed')}; batch size {_value(cfg, 'batch_size')}; learning rate "
            f"{_value(cfg, 'learning_rate')} ({_value(cfg, 'lr_schedule', 'schedule not recorded')}); EMA decay "
            f"{_value(cfg, 'ema_decay')}.",
            f"- Objective: predict the {_value(m, 'prediction_type', 'unrecorded target')} of a denoising diffusion "
            f"model (Ho et al. 2020) over {_value(cfg, 'num_train_timesteps', 'an unrecorded number of')} noise "
            f"levels ({_value(cfg, 'beta_schedule', 'unrecorded')} schedule).",
        ])

    # Environmental impact and compute
    run = (m or {}).get("training") if isinstance((m or {}).get("training"), Mapping) else None
    if m is None:
        compute = "- Not given (the model was not given to the audit)."
    elif run:
        resumed = run.get("resumed_from")
        compute = (f"- Hardware: {_value(run, 'device')} × {_value(run, 'processes')} process(es), mixed precision "
                   f"{_value(run, 'mixed_precision')}.\n- Training time: {_value(run, 'seconds_this_run')} s in the "
                   f"final run" + (f" (resumed from step {resumed}: earlier runs not counted)" if resumed else "")
                   + ".\n- Carbon emissions: not measured by synthgate.")
    else:
        compute = "- Not recorded in the model's synthgate.json. Carbon emissions: not measured by synthgate."

    sampler = gen.get("sampler") if isinstance(gen.get("sampler"), Mapping) else None
    versions = ", ".join(f"{k} {v}" for k, v in ((m or {}).get("versions") or {}).items() if k != "synthgate")
    tech = "\n".join([
        f"- Architecture: {_architecture(m)}." if m is not None else "- Architecture: not given (no model audited).",
        (f"- Sampling for this release: {_value(sampler, 'name', 'sampler not recorded')} sampler, "
         f"{_value(sampler, 'steps', 'an unrecorded number of')} steps; each image's seed is in the generator "
         "manifest kept by the custodian.") if sampler else
        "- Sampling for this release: not recorded (the synthetic set has no generator manifest).",
        f"- Software: synthgate {version}" + (f"; {versions}" if versions else
                                             " (the training run's library versions were not given)") + ".",
    ])
    if credentials:
        tech += (f"\n- Content credentials: every released file carries a C2PA manifest (embedded in PNG/JPEG, a "
                 f"`.c2pa` sidecar otherwise) saying it is `trainedAlgorithmicMedia`, signed by "
                 f"{credentials.get('signer_subject', 'the custodian')} (certificate valid until "
                 f"{credentials.get('signer_not_after', 'a date not recorded')}).")

    released = len(audit.released)
    body = f"""# Model card: the generator of this synthetic image release

{summary}

## Model details

### Model description
{details}

## Uses

### Direct use
{direct}

### Out-of-scope use
{chr(10).join(avoid)}

## Bias, risks, and limitations
- Diffusion models can memorise and reproduce training images (Carlini et al. 2023); {_gated_by(audit)}.
- The generator reproduces the distribution of its training set, biases included; the composition of the
  released set by subgroup is in DATASHEET.md. The patient population, acquisition devices and protocols of the
  training data are unknown to synthgate.
- {_dp_text(m, _ties(audit, generator))}
- Passing the audit is evidence, not proof, of privacy: each method's limitations are listed in `report.html`.

### Recommendations
- Re-audit after any change to the model, sampler settings or post-processing.
- Validate any model trained on these images on real data before drawing a clinical conclusion.
- Keep the internal audit, the internal report, the salt file, the release ledger and the signing keys inside the
  hospital.

## Training details

### Training data
{train_data}

### Training procedure
{procedure}

### Differential privacy
- {_dp_text(m, _ties(audit, generator))}
- {_cumulative_text(privacy)}

## Evaluation

### Testing data
- Synthetic set audited: digest `{audit.inputs.synthetic.sha256}`, {audit.inputs.synthetic.n_images} images.
- Real set (the data the images were compared with): {_set_line(audit.inputs.real, 'no comparison with real images')}.
- Holdout set (unseen real images): {_set_line(audit.inputs.holdout, 'no comparison with unseen real images')}.
{_attacker_lines(audit)}
### Results: the release audit
{_results(audit)}

### Summary
Verdict **{audit.verdict.upper()}**: {released} of {audit.inputs.synthetic.n_images} synthetic images released,
{len(audit.dropped)} dropped by the policy. Methods, thresholds and intervals are in `report.html` and
`audit.json` (the shareable, signed edition).

## Environmental impact and compute
{compute}

## Technical specifications
{tech}

## Citation
- No publication describes this model: refer to {f'it by its digest `{digest[:16]}…`' if digest else 'this release'}
  and to this bundle by the fingerprint of the key that signed `manifest.json` (see DATASHEET.md, Distribution).
- Methods: Ho et al. 2020 (denoising diffusion); Carlini et al. 2023 (training-data extraction); Dwork & Roth
  2014 (differential privacy, composition); Mitchell et al. 2019 (model cards); Gebru et al. 2021 (datasheets).

## Model card authors
- Written by synthgate {version} from the signed audit in this bundle when it was bundled; data custodian:
  {steward.given('custodian')}.
"""
    return _front_matter(audit, m, steward, digest) + body


# ------------------------------------------------------------------ the datasheet


def datasheet(audit: "AuditRecord", model: Mapping | None, generator: Mapping | None, files: list[str], labels: dict,
              fingerprint: str, *, steward: Stewardship | None = None, privacy: "Cumulative | None" = None,
              credentials: Mapping | None = None, created: str | None = None,
              reference_labels: Mapping[str, int] | None = None, reference_name: str | None = None) -> str:
    """``DATASHEET.md``: Gebru et al.'s sections with the STANDING Together items.

    ``reference_labels`` are the training set's label counts when the model
    was not given (the audit's real set, named by ``reference_name``); with
    the model, its ``synthgate.json`` is used.
    """
    steward = steward or Stewardship()
    m = model if isinstance(model, Mapping) else None
    gen = generator if isinstance(generator, Mapping) else {}
    policy = audit.policy
    version = audit.tool.version
    geo = audit.inputs.geometry
    geometry = f"{geo.height}×{geo.width} pixels, {geo.channels} channel(s)" if geo is not None else "not recorded"
    model_rec = audit.inputs.model
    digest = model_rec.sha256 if model_rec is not None and model_rec.sha256 else None
    sampler = gen.get("sampler") if isinstance(gen.get("sampler"), Mapping) else None
    released_counts = subgroup_counts(files, {"label": labels})
    training = _training_labels(m)
    if training is not None:
        reference, ref_name = {"label": training}, "training set (model's synthgate.json)"
    elif reference_labels:
        reference, ref_name = {"label": dict(reference_labels)}, reference_name or "real set as audited"
    else:
        reference, ref_name = None, "training set"
    n_patients = ((m or {}).get("training_set") or {}).get("n_patients") if m is not None else None
    formats = Counter(f.rsplit(".", 1)[-1].lower() if "." in f.rsplit("/", 1)[-1] else "dicom (no extension)"
                      for f in files)
    purpose = steward.purpose or DEFAULT_PURPOSE

    unknown = ["the demographics (age, sex, ethnicity) of the patients behind the training data, and how they "
               "relate to the population the images will be used for",
               "the acquisition devices, protocols and sites of the training data",
               "who funded the creation of this data set"]
    if m is None:
        unknown.append("the model that generated the images (not given to the audit): its training data, procedure "
                       "and any differential-privacy guarantee")
    if reference is None:
        unknown.append("the training set's composition by subgroup (label counts)")
    if m is not None and not _is_num(n_patients):
        unknown.append("the number of patients in the training set")
    unknown += [f"the {f.replace('_', ' ')} (not given: `release bundle --{f.replace('_', '-')}`)"
                for f in steward.missing()]
    unknown += [f"{_title(c.name)} evidence (the check did not run: {c.status})" for c in not_run(audit)]
    unknown += [f"{_title(n)} evidence (not in the policy)" for n in absent(audit)]
    unknown.append("subgroup columns beyond the label (synthgate does not yet record them for a release)")

    collection = (f"{_value(sampler, 'name', 'an unrecorded')} sampler with {_value(sampler, 'steps', 'an unrecorded number of')} "
                  "steps; each image's seed is in the generator manifest (kept by the custodian)") if sampler else \
        "sampler settings not recorded (the synthetic set has no generator manifest)"
    by_model = (f"the model with digest `{digest}` (re-checked when bundled)" if digest else
                "a model that was not given to the audit (its digest was not checked)")
    c2pa = ""
    if credentials:
        c2pa = (f"\n- Content credentials (C2PA): each image file carries a signed manifest saying it is "
                f"`trainedAlgorithmicMedia` (embedded in PNG/JPEG, a `.c2pa` sidecar otherwise), signed by "
                f"{credentials.get('signer_subject', 'the custodian')}; check them with `release verify BUNDLE "
                f"--c2pa-trust ROOT.pem` using the root certificate the hospital publishes. Offline signing has no "
                f"time-stamp: they validate only while the signing certificate is valid (until "
                f"{credentials.get('signer_not_after', 'a date not recorded')}).")
    avoid = steward.uses_to_avoid
    return f"""# Datasheet: synthetic image set

## Summary
{len(files)} synthetic medical image file(s) generated by a diffusion model trained on hospital images, released
after synthgate's release gate passed them under the **{_policy_text(policy)}**. No file is a
patient's image. Purpose: {purpose}. Custodian: {steward.given('custodian')}. What is not known about this data set
is listed at the end, as unknown.

## Motivation
- Purpose: {purpose}{'' if steward.purpose else ' (synthgate default: the custodian did not state one with `--purpose`)'}.
- Created with synthgate {version}; gated by the **{_policy_text(policy)}** (sha256
  `{policy.sha256 if policy else 'not recorded'}`).
- Created by / custodian: {steward.given('custodian')}. Funding: unknown (synthgate does not record it).
- Uses to avoid: {avoid + ' (stated by the custodian); and ' if avoid else ''}{DEFAULT_AVOID}.

## Composition
- {len(files)} image file(s) in `images/` ({', '.join(f'{n} {k}' for k, n in sorted(formats.items()))}); labels in
  `images/metadata.csv` where the set has them. Each image is generated, none is a patient's.
- Composition by subgroup (released files vs the {ref_name}):

{_composition_table(released_counts, reference, ref_name)}
{_policy_subgroups(audit)}
- Excluded: {len(audit.dropped)} generated image(s) dropped by the release gate (near-copies or re-identifiable
  images), never included.
- Geometry as audited: {geometry}.
- Relation to people: derived from a model trained on patient images
  ({f'{n_patients} patients' if _is_num(n_patients) else 'number of patients unknown'}). The audit tests whether an
  image can be linked back to them: {_gated_by(audit)}.

## Collection process
- Generated by {by_model}, {collection}.
- {_dp_text(m, _ties(audit, generator))}
- {_cumulative_text(privacy)}

## Preprocessing / cleaning / labelling
- Labels come from the synthetic set's `metadata.csv`: the classes the generator was asked for, not read by a
  clinician.
- Each file's ancillary metadata (text chunks, EXIF, comments) was removed when bundled; its pixels are unchanged
  and synthgate's provenance chunk is kept. DICOM files ship as audited.{c2pa}

## Uses
- Suitable: {purpose}; benchmarking algorithms that will be validated on real data.
- To avoid: {avoid + '; ' if avoid else ''}{DEFAULT_AVOID}.

## Distribution
- Distributed as this bundle. `manifest.json` and `audit.json` are signed (Ed25519) by the key with
  fingerprint `{fingerprint}`; `release verify BUNDLE --fingerprint {fingerprint}` checks every file,
  image and signature against it. Compare the fingerprint with the one the hospital publishes.
- Licence and terms of use: {steward.given('licence')}.

## Maintenance
- Custodian and contact: {steward.given('custodian')}.
- A change to the generator or sampler makes a new data set that needs a new audit; every release is recorded in
  the custodian's release ledger (`release ledger`).

## STANDING Together items (health data documentation)
- Summary: see Summary above.
- Identity and access: synthetic image set, version = synthetic set digest `{audit.inputs.synthetic.sha256}`;
  released {created or 'when this bundle was made'}; licence: {steward.given('licence')}; custodian:
  {steward.given('custodian')}; access: this bundle.
- Purpose and uses to avoid: see Motivation and Uses.
- Composition by subgroup: see Composition (the label only; demographic subgroups are unknown).
- Source data: a hospital image set ({_set_line(audit.inputs.real, 'the audit was not given the real set')}).
- What is unknown, stated as unknown:
{chr(10).join(f'  - {u}.' for u in unknown)}
"""
