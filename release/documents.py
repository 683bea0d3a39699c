"""The model card and the datasheet that travel with a release bundle.

Model card: the sections of Mitchell et al. 2019 ("Model Cards for Model
Reporting") under Hugging Face front matter.  Datasheet: the sections of
Gebru et al. 2021 ("Datasheets for Datasets") for the synthetic data set,
with the STANDING Together items (dataset documentation for health data)
that apply to synthetic data.  Everything is filled from what synthgate
recorded (synthgate.json, manifest.json, the shareable audit); what synthgate
cannot know or was not given is said plainly, never invented and never a
``?``.  Only checks that ran are listed as evidence: a skipped check is named
as not run, and the card never claims the release was gated by it.

The texts take their values from the shareable audit and from a generator
manifest and model description already passed through the same redaction,
so they hold no local path and no real file name; the bundle still passes
each text through it once more before writing.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from audit.record import AuditRecord

UNKNOWN = "_Not recorded by synthgate: the data steward should complete this._"
NO_MODEL = "not recorded (the audit was not given the model, so its synthgate.json was not read)"
CONCLUSIVE = ("pass", "warn", "fail")  # ran and decided (a failed per-image check passes once its images dropped)
TITLES = {"copy_detection": "copy detection", "reidentification": "re-identification",
          "membership_inference": "membership inference", "dicom_phi": "DICOM header / image metadata PHI",
          "utility": "utility", "fidelity": "fidelity"}
PRIVACY = ("copy_detection", "reidentification", "membership_inference", "dicom_phi")


def _given(value, missing: str = "not recorded") -> str:
    return missing if value is None or value == "" else str(value)


def _title(name: str) -> str:
    return TITLES.get(name, name.replace("_", " "))


def _dp_line(model: dict | None) -> str:
    if model is None:
        return "Differential privacy: not recorded (the model's synthgate.json was not given to the audit)."
    dp = model.get("dp")
    if not dp:
        return "Trained **without** differential privacy: no formal privacy guarantee; the audit is the evidence."
    parts = [f"ε = {_given(dp.get('epsilon_spent'))} spent (target {_given(dp.get('epsilon_target'))})",
             f"δ = {_given(dp.get('delta'))}", f"accountant {_given(dp.get('accountant'))}",
             f"max grad norm {_given(dp.get('max_grad_norm'))}", f"noise multiplier {_given(dp.get('noise_multiplier'))}",
             f"noise multiplicity {_given(dp.get('noise_multiplicity'))}"]
    return f"Trained with differential privacy (DP-SGD, opacus): {', '.join(parts)}."


def ran(audit: "AuditRecord") -> list:
    """The checks that ran and decided (evidence), in audit order."""
    return [c for c in audit.checks if c.status in CONCLUSIVE]


def not_run(audit: "AuditRecord") -> list:
    return [c for c in audit.checks if c.status not in CONCLUSIVE]


def _checks_table(audit: "AuditRecord") -> str:
    lines = ["| check | status | finding |", "|---|---|---|"]
    for c in ran(audit):
        lines.append(f"| {_title(c.name)} | {c.status} | {' '.join(c.reason.split()).replace('|', '/')} |")
    skipped = not_run(audit)
    if skipped:
        lines += ["", "Not run (no evidence from these; the release was not gated by them): "
                  + "; ".join(f"{_title(c.name)} ({c.status}: {' '.join(c.reason.split())})" for c in skipped) + "."]
    return "\n".join(lines)


def _gated_by(audit: "AuditRecord") -> str:
    names = [_title(c.name) for c in ran(audit) if c.name in PRIVACY]
    missing = [_title(n) for n in PRIVACY if n not in {c.name for c in ran(audit)}]
    out = f"this release was gated by {', '.join(names)}" if names else "no privacy check ran"
    if missing:
        out += f"; {', '.join(missing)} did not run and {'is' if len(missing) == 1 else 'are'} no part of this evidence"
    return out


def _set_line(entry, what: str) -> str:
    if entry is None:
        return f"none given ({what})"
    return f"digest `{entry.sha256}`, {entry.n_images} images"


def model_card(audit: "AuditRecord", model: dict | None, generator: dict | None) -> str:
    m = model or {}
    training = m.get("training_set") or (generator or {}).get("training_set") or {}
    labels = (m.get("conditioning") or {}).get("labels")
    policy = audit.policy
    model_rec = audit.inputs.model
    front = ["---", "library_name: diffusers", "tags:", "- synthetic-data", "- medical-imaging", "- synthgate",
             "pipeline_tag: unconditional-image-generation" if not labels else "pipeline_tag: image-generation",
             f"synthgate_audit_verdict: {audit.verdict}", "---", ""]
    if model is None:
        details = f"- {NO_MODEL.capitalize()}."
    else:
        res = m.get("resolution")
        geometry = f"{res}×{res} pixels" if res else "resolution not recorded"
        details = "\n".join([
            f"- Type: {_given(m.get('kind'), 'kind not recorded')} diffusion model "
            f"({_given(m.get('architecture'), 'architecture not recorded')}), {geometry}, "
            f"{_given(m.get('image_channels'), 'not recorded')} channel(s).",
            f"- Conditioning: {('class labels ' + ', '.join(map(str, labels))) if labels else 'none (unconditional)'}.",
            f"- Training: {str(m['steps']) + ' steps' if m.get('steps') is not None else 'number of steps not recorded'}"
            f", seed {_given(m.get('seed'))}, prediction type {_given(m.get('prediction_type'))}.",
        ])
    versions = ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())
    body = f"""# Model card: synthetic image generator

## Model details
{details}
- Privacy: {_dp_line(model)}
- Model digest: {f'`{model_rec.sha256}`' if model_rec is not None and model_rec.sha256 else 'not audited (no --model)'}.
- Software: synthgate {audit.tool.version}{'; ' + versions if versions else ''}.

## Intended use
- Primary use: sharing synthetic images for method development, education and research in place of the
  patient images they were learned from, within the policy **{policy.name if policy else 'not recorded'}**.
- Out of scope: clinical diagnosis or treatment decisions; re-training on the synthetic images as if they
  were patient data without saying so; any attempt to link images to people.

## Factors
- Modality, acquisition device and protocol, patient population: {UNKNOWN}
- The generator reproduces the distribution of its training set, including its biases.

## Metrics
The release gate ran these checks (see the report for methods, thresholds and intervals):

{_checks_table(audit)}

## Evaluation data
- Holdout set (unseen real images): {_set_line(audit.inputs.holdout, 'no membership inference against unseen images')}.

## Training data
- {_training_line(training)}
- The training images never leave the hospital; only this model's audited outputs do.

## Quantitative analyses
Verdict **{audit.verdict.upper()}**; {len(audit.released)} of {audit.inputs.synthetic.n_images} synthetic images released, {len(audit.dropped)} dropped by the policy. Details in `report.html` and `audit.json` (the shareable edition).

## Ethical considerations
- Diffusion models can memorise and reproduce training images (Carlini et al. 2023); {_gated_by(audit)}.
  {_dp_line(model)}
- Passing the audit is evidence, not proof, of privacy: each method's limitations are listed in the report.

## Caveats and recommendations
- Re-audit after any change to the model, sampler settings or post-processing.
- Keep the internal audit, the internal report, the salt file and the signing key inside the hospital.
"""
    return "\n".join(front) + body


def _training_line(training: dict) -> str:
    if not training:
        return "Training set: not recorded (no model description or generator manifest was given)."
    parts = [f"digest `{training['sha256']}`" if training.get("sha256") else "digest not recorded",
             f"{training['n_images']} images" if training.get("n_images") is not None else "image count not recorded",
             f"{training['n_patients']} patients" if training.get("n_patients") is not None
             else "patient count not recorded"]
    return "Training set: " + ", ".join(parts) + "."


def datasheet(audit: "AuditRecord", model: dict | None, generator: dict | None, files: list[str], labels: dict,
              fingerprint: str) -> str:
    counts = Counter(labels.get(f) for f in files)
    label_lines = "\n".join(f"  - {k if k is not None else 'unlabelled'}: {v}" for k, v in sorted(counts.items(), key=str))
    sampler = (generator or {}).get("sampler") or {}
    policy = audit.policy
    geo = audit.inputs.geometry
    geometry = f"{geo.height}×{geo.width}, {geo.channels} channel(s)" if geo is not None else "not recorded"
    model_rec = audit.inputs.model
    model_digest = (model_rec.sha256 if model_rec is not None else None) or ((generator or {}).get("model") or {}).get("sha256")
    n_patients = ((model or {}).get("training_set") or {}).get("n_patients")
    if sampler:
        collection = (f"sampler {_given(sampler.get('name'), 'name not recorded')} with "
                      f"{_given(sampler.get('steps'), 'an unrecorded number of')} steps; each image's seed is in the "
                      "generator manifest (kept by the steward)")
    else:
        collection = "sampler settings not recorded (the synthetic set has no generator manifest)"
    real = audit.inputs.real
    return f"""# Datasheet: synthetic image set

## Motivation
- Purpose: to share images that keep the diagnostic signal of a hospital data set without sharing
  patient images. Created with synthgate {audit.tool.version}; gated by policy
  **{policy.name if policy else 'not recorded'}** (sha256 `{policy.sha256 if policy else 'not recorded'}`).
- Funding and creators: {UNKNOWN}

## Composition
- {len(files)} synthetic image files (in `images/`), none of them a patient's image; labels:
{label_lines}
- Excluded: {len(audit.dropped)} generated images dropped by the release gate (near-copies or
  re-identifiable images) and never included.
- Geometry as audited: {geometry}.
- Does it relate to people? Each image is generated, not acquired; it is derived from a model trained on
  patient images ({f'{n_patients} patients' if n_patients is not None else 'number of patients not recorded'}).
  The audit tests whether any image can be linked back to them: {_gated_by(audit)}.

## Collection process
- Generated by the model with digest {f'`{model_digest}`' if model_digest else 'not recorded'}, {collection}.
- {_dp_line(model)}

## Preprocessing / cleaning / labelling
- Labels are the classes the generator was conditioned on (not read by a clinician).
- Each file's ancillary metadata (text chunks, EXIF, comments) was removed when bundled; its pixels are
  unchanged and synthgate's provenance chunk is kept. DICOM files ship as audited.

## Uses
- Suitable: method development, education, benchmarking of algorithms meant to be validated later on
  real data.
- Not suitable: clinical decisions; estimating prevalence; any re-identification attempt.

## Distribution
- Distributed as this bundle. `manifest.json` and `audit.json` are signed (Ed25519) by the key with
  fingerprint `{fingerprint}`; `release verify BUNDLE --fingerprint {fingerprint}` checks every file,
  image and signature against it. Compare the fingerprint with the one the hospital publishes.
- Licence and terms of use: {UNKNOWN}

## Maintenance
- Contact and update policy: {UNKNOWN}
- A change to the generator or sampler makes a new data set that needs a new audit.

## STANDING Together items (health data documentation)
- Source data: a hospital image set ({_set_line(real, 'the audit was not given the real set')}); demographics of the source population: {UNKNOWN}
- Known limitations and biases: the synthetic set reproduces the source set's label balance and
  acquisition characteristics; see the report's fidelity and utility sections where those checks ran.
- Intended-use population and setting: {UNKNOWN}
"""
