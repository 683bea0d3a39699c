"""The model card and the datasheet that travel with a release bundle.

Model card: the sections of Mitchell et al. 2019 ("Model Cards for Model
Reporting") under Hugging Face front matter.  Datasheet: the sections of
Gebru et al. 2021 ("Datasheets for Datasets") for the synthetic data set,
with the STANDING Together items (dataset documentation for health data)
that apply to synthetic data.  Everything is filled from what synthgate
recorded (synthgate.json, manifest.json, audit.json); what synthgate cannot
know is said plainly, never invented.
"""
from __future__ import annotations

from collections import Counter

UNKNOWN = "_Not recorded by synthgate: the data steward should complete this._"


def _dp_line(model: dict | None) -> str:
    dp = (model or {}).get("dp")
    if not dp:
        return "Trained **without** differential privacy: no formal privacy guarantee; the audit is the evidence."
    return (f"Trained with differential privacy (DP-SGD, opacus): ε = {dp.get('epsilon_spent')} spent "
            f"(target {dp.get('epsilon_target')}), δ = {dp.get('delta')}, accountant {dp.get('accountant')}, "
            f"max grad norm {dp.get('max_grad_norm')}, noise multiplier {dp.get('noise_multiplier')}, "
            f"noise multiplicity {dp.get('noise_multiplicity')}.")


def _checks_table(audit: dict) -> str:
    lines = ["| check | status | finding |", "|---|---|---|"]
    for c in audit["checks"]:
        lines.append(f"| {c['name']} | {c['status']} | {c['reason'].replace('|', '/')} |")
    return "\n".join(lines)


def model_card(audit: dict, model: dict | None, manifest: dict | None) -> str:
    m = model or {}
    training = m.get("training_set") or (manifest or {}).get("training_set") or {}
    labels = (m.get("conditioning") or {}).get("labels")
    front = ["---", "library_name: diffusers", "tags:", "- synthetic-data", "- medical-imaging", "- synthgate",
             "pipeline_tag: unconditional-image-generation" if not labels else "pipeline_tag: image-generation",
             f"synthgate_audit_verdict: {audit['verdict']}", "---", ""]
    body = f"""# Model card: {(manifest or {}).get('model', {}).get('path', 'synthetic image generator')}

## Model details
- Type: {m.get('kind', 'unknown')} diffusion model ({m.get('architecture', 'UNet2DModel')}), {m.get('resolution', '?')}×{m.get('resolution', '?')} pixels, {m.get('image_channels', '?')} channel(s).
- Conditioning: {('class labels ' + ', '.join(map(str, labels))) if labels else 'none (unconditional)'}.
- Training: {m.get('steps', '?')} steps, seed {m.get('seed', '?')}, prediction type {m.get('prediction_type', '?')}.
- Privacy: {_dp_line(model)}
- Model digest: `{(audit['inputs'].get('model') or {}).get('sha256', 'not audited')}`.
- Software: synthgate {audit['tool']['version']}; {', '.join(f'{k} {v}' for k, v in (m.get('versions') or {}).items())}.

## Intended use
- Primary use: sharing synthetic images for method development, education and research in place of the
  patient images they were learned from, within the policy **{(audit.get('policy') or {}).get('name')}**.
- Out of scope: clinical diagnosis or treatment decisions; re-training on the synthetic images as if they
  were patient data without saying so; any attempt to link images to people.

## Factors
- Modality, acquisition device and protocol, patient population: {UNKNOWN}
- The generator reproduces the distribution of its training set, including its biases.

## Metrics
The release gate applied these checks (see the report for methods, thresholds and intervals):

{_checks_table(audit)}

## Evaluation data
- Holdout set (unseen real images): {('digest `' + audit['inputs']['holdout']['sha256'] + '`, ' + str(audit['inputs']['holdout']['n_images']) + ' images') if audit['inputs'].get('holdout') else 'none given'}.

## Training data
- Digest `{training.get('sha256', '?')}`, {training.get('n_images', '?')} images, {training.get('n_patients', '?')} patients.
- The training images never leave the hospital; only this model's audited outputs do.

## Quantitative analyses
Verdict **{audit['verdict'].upper()}**; {len(audit['released'])} of {audit['inputs']['synthetic']['n_images']} synthetic images released, {len(audit.get('dropped', []))} dropped by the policy. Details in `report.html` and `audit.json`.

## Ethical considerations
- Diffusion models can memorise and reproduce training images (Carlini et al. 2023); this release was
  gated by copy detection{', re-identification' if any(c['name'] == 'reidentification' for c in audit['checks']) else ''}{', membership inference' if any(c['name'] == 'membership_inference' for c in audit['checks']) else ''} and header checks. {_dp_line(model)}
- Passing the audit is evidence, not proof, of privacy: each method's limitations are listed in the report.

## Caveats and recommendations
- Re-audit after any change to the model, sampler settings or post-processing.
- Keep the internal report and the salt file inside the hospital.
"""
    return "\n".join(front) + body


def datasheet(audit: dict, model: dict | None, manifest: dict | None, files: list[str], labels: dict) -> str:
    counts = Counter(labels.get(f) for f in files)
    label_lines = "\n".join(f"  - {k if k is not None else 'unlabelled'}: {v}" for k, v in sorted(counts.items(), key=str))
    sampler = (manifest or {}).get("sampler") or {}
    return f"""# Datasheet: synthetic image set

## Motivation
- Purpose: to share images that keep the diagnostic signal of a hospital data set without sharing
  patient images. Created with synthgate {audit['tool']['version']}; gated by policy
  **{(audit.get('policy') or {}).get('name')}** (sha256 `{(audit.get('policy') or {}).get('sha256')}`).
- Funding and creators: {UNKNOWN}

## Composition
- {len(files)} synthetic images (files in `images/`), none of them a patient's image; labels:
{label_lines}
- Excluded: {len(audit.get('dropped', []))} generated images dropped by the release gate (near-copies or
  re-identifiable images) and never included.
- Geometry as audited: {audit['inputs']['geometry']['height']}×{audit['inputs']['geometry']['width']}, {audit['inputs']['geometry']['channels']} channel(s).
- Does it relate to people? Each image is generated, not acquired; it is derived from a model trained on
  patient images ({(model or {}).get('training_set', {}).get('n_patients', '?')} patients). The audit tests
  whether any image can be linked back to them.

## Collection process
- Generated by the model with digest `{(audit['inputs'].get('model') or {}).get('sha256', (manifest or {}).get('model', {}).get('sha256', '?'))}`,
  sampler {sampler.get('name', '?')} with {sampler.get('steps', '?')} steps; each image's seed is in the generator manifest.
- {_dp_line(model)}

## Preprocessing / cleaning / labelling
- Labels are the classes the generator was conditioned on (not read by a clinician).
- No post-processing beyond what the sampler wrote.

## Uses
- Suitable: method development, education, benchmarking of algorithms meant to be validated later on
  real data.
- Not suitable: clinical decisions; estimating prevalence; any re-identification attempt.

## Distribution
- Distributed as this bundle; integrity: `release verify` re-checks every SHA-256 in `manifest.json`.
- Licence and terms of use: {UNKNOWN}

## Maintenance
- Contact and update policy: {UNKNOWN}
- A change to the generator or sampler makes a new data set that needs a new audit.

## STANDING Together items (health data documentation)
- Source data: a hospital image set (digest `{audit['inputs']['real']['sha256'] if audit['inputs'].get('real') else '?'}`); demographics of the source population: {UNKNOWN}
- Known limitations and biases: the synthetic set reproduces the source set's label balance and
  acquisition characteristics; see the report's fidelity and utility sections where those checks ran.
- Intended-use population and setting: {UNKNOWN}
"""
