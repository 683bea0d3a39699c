"""The release ledger: every bundle from a training set, the privacy cost they add up to, and the policy's limit.

One synthetic set is audited three times, each time with a different (tiny, untrained) model directory whose
``synthgate.json`` says how it was trained: DP with ε = 2, DP with ε = 3, and without DP.  The ledger logic needs
nothing more; one test trains a real DP model (``synthgate train --dp-epsilon``) to tie the ledger to opacus' ε.
Policies with a cumulative-ε limit are the audited policy with the limit added and the audit re-signed with the
same hospital key (the audit's checks are the same; only the policy text, which the bundle must match, differs).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from audit import cli as audit_cli
from conftest import one_line_error, save_unit_png
from release import cli as release_cli
from release import ledger as L
from synthgate import signing
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms

POLICY = "name: ledger-test\nmax_drop_fraction: 0.5\nchecks:\n  copy_detection: {action: drop}\n  dicom_phi: {action: block}\n"
DP = {"A": {"epsilon_spent": 2.0, "delta": 1e-6, "accountant": "rdp", "epsilon_target": 2.0},
      "B": {"epsilon_spent": 3.0, "delta": 2e-6, "accountant": "prv", "epsilon_target": 3.0},
      "C": None}


@pytest.fixture(autouse=True)
def _hospital_key(hospital_key, monkeypatch):
    monkeypatch.setenv("SYNTHGATE_KEY", str(hospital_key))


def _model_dir(path: Path, train: Path, dp) -> Path:
    """A model directory as far as the ledger reads it: synthgate.json (digested with the folder)."""
    images = ImageSet(train, cache=None)
    path.mkdir(parents=True)
    labels: dict[str, int] = {}
    for r in images.records:
        labels[str(r.label)] = labels.get(str(r.label), 0) + 1
    info = {"schema_version": 1, "kind": "pixel",
            "architecture": {"name": "unet", "folder": "unet", "class": "diffusers:UNet2DModel"},
            "resolution": 32, "image_channels": 1, "conditioning": {"type": "class", "labels": sorted(labels)},
            "prediction_type": "epsilon", "seed": 7, "steps": 40,
            "training_set": {"path": str(train.resolve()), "sha256": images.digest, "n_images": len(images),
                             "n_patients": images.n_patients, "labels": labels},
            "dp": dp, "training": {"device": "cpu", "processes": 1, "mixed_precision": "no", "resumed_from": None,
                                   "seconds_this_run": 12.5},
            "config": {"batch_size": 8, "learning_rate": 0.001, "lr_schedule": "constant", "ema_decay": 0.995,
                       "num_train_timesteps": 1000, "beta_schedule": "linear"},
            "versions": {"synthgate": "0.1.0", "torch": "2.x"}}
    (path / "synthgate.json").write_text(json.dumps(info))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory, hospital_key):
    root = tmp_path_factory.mktemp("ledger")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        write_phantoms(root / "p", patients=12, images_per_patient=3, size=32, seed=61)
        novel, _ = generate(patients=4, images_per_patient=2, size=32, seed=62)
        with open(_mkdir(root / "syn") / "metadata.csv", "w") as fh:
            fh.write("path,label\n")
            for i, im in enumerate(novel):
                save_unit_png(root / "syn" / f"s{i:02d}.png", im.pixels)
                fh.write(f"s{i:02d}.png,{im.label}\n")
        (root / "policy.yaml").write_text(POLICY)
        from generators.loading import model_digest

        for name, dp in DP.items():
            model = _model_dir(root / f"model{name}", root / "p" / "train", dp)
            syn = root / f"syn{name}"  # each model's own images: the manifest ties them to it (no DP credit without)
            shutil.copytree(root / "syn", syn)
            (syn / "manifest.json").write_text(json.dumps({"model": {"path": None, "sha256": model_digest(model)}}))
            code = audit_cli.main(["check", str(syn), "--real", str(root / "p" / "train"), "--model",
                                   str(model), "--policy", str(root / "policy.yaml"), "--out",
                                   str(root / f"audit{name}")])
            assert code == 0
    return root


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _limited(case: Path, tmp: Path, limit: float | None, on: str | None, model: str) -> tuple[Path, Path]:
    """(policy file, audit) for the audited policy with a cumulative-ε limit added, the audit re-signed."""
    text = POLICY + (f"max_cumulative_epsilon: {limit}\n" if limit is not None else "") + \
        (f"on_cumulative_epsilon: {on}\n" if on else "")
    policy = tmp / f"policy-{limit}-{on}.yaml"
    policy.write_text(text)
    from audit.core.policy import load_policy

    doc = json.loads((case / f"audit{model}" / "audit.json").read_text())
    doc["policy"].update({"text": text, "sha256": load_policy(policy).sha256,
                          "max_cumulative_epsilon": limit, "on_cumulative_epsilon": on or "refuse"})
    audit = tmp / f"audit-{model}-{limit}-{on}.json"
    audit.write_text(json.dumps(signing.sign_document(doc)))
    return policy, audit


def _bundle(capsys, case, out, model="A", *extra, ledger=None, policy=None, audit=None):
    audit = audit or case / f"audit{model}" / "audit.json"
    synthetic = json.loads(Path(audit).read_text())["inputs"]["synthetic"]["path"]  # the set that audit saw
    argv = ["bundle", synthetic, "--audit", str(audit), "--out",
            str(out), "--policy", str(policy or case / "policy.yaml"), "--ledger", str(ledger), *map(str, extra)]
    code = release_cli.main(argv)
    out_, err = capsys.readouterr()
    return code, out_, err


def _ledger(capsys, ledger, *extra):
    code = release_cli.main(["ledger", "--ledger", str(ledger), *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def _report(capsys, ledger) -> dict:
    code, out, err = _ledger(capsys, ledger, "--json")
    report = json.loads(out)
    assert code == (0 if report["verified"] else 1), err
    return report


# ------------------------------------------------------------------ composition


def test_two_dp_models_on_the_same_training_set_add_up(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    assert _bundle(capsys, case, tmp_path / "b1", "A", ledger=ledger)[0] == 0
    code, out, err = _bundle(capsys, case, tmp_path / "b2", "B", ledger=ledger)
    assert code == 0, err
    assert "cumulative ε = 5 , δ" not in out and "cumulative ε = 5, δ = 3e-06 over 2 model(s), 2 release(s)" in out
    report = _report(capsys, ledger)
    assert report["verified"] and len(report["training_sets"]) == 1
    group = report["training_sets"][0]
    assert group["sha256"] == ImageSet(case / "p" / "train", cache=None).digest  # from the models' synthgate.json
    cum = group["cumulative"]
    assert cum["bounded"] and cum["epsilon"] == pytest.approx(5.0) and cum["delta"] == pytest.approx(3e-6)
    assert [e["model"]["dp"]["epsilon_spent"] for e in group["entries"]] == [2.0, 3.0]
    assert all(e["images_released"] == len(json.loads((case / "auditA" / "audit.json").read_text())["released"])
               for e in group["entries"])
    entry = group["entries"][1]
    assert entry["bundle"]["path"] == str((tmp_path / "b2").resolve())
    assert entry["bundle"]["manifest_sha256"] == L._sha((tmp_path / "b2" / "manifest.json").read_bytes())
    assert entry["policy"]["name"] == "ledger-test" and entry["audit"]["verdict"] == "pass"
    # the bundle says so too: its manifest and model card carry the cost at bundling
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert manifest["privacy"]["cumulative_at_bundling"]["epsilon"] == pytest.approx(5.0)
    card = (tmp_path / "b2" / "MODEL_CARD.md").read_text()
    assert "cumulative ε = 5, δ = 3e-06 over 2 models" in card and "Dwork & Roth 2014, Theorem 3.16" in card
    assert "Trained with differential privacy (DP-SGD" in card and "ε spent = 3, target ε = 3, δ = 2e-06, prv accountant" in card
    code, text, _ = _ledger(capsys, ledger)
    assert code == 0 and "every entry verifies" in text and "cumulative: cumulative ε = 5" in text
    assert str(case / "p" / "train") not in "".join(p.read_text(errors="replace")
                                                  for p in (tmp_path / "b2").rglob("*") if p.is_file())


def test_more_images_from_the_same_model_cost_nothing_more(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    for out in ("b1", "b2", "b3"):
        assert _bundle(capsys, case, tmp_path / out, "A", ledger=ledger)[0] == 0
    (group,) = _report(capsys, ledger)["training_sets"]
    cum = group["cumulative"]
    assert cum["releases"] == 3 and len(cum["models"]) == 1 and cum["models"][0]["releases"] == 3
    assert cum["epsilon"] == pytest.approx(2.0) and cum["delta"] == pytest.approx(1e-6)


def test_a_model_without_dp_means_no_guarantee(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    assert _bundle(capsys, case, tmp_path / "b1", "A", ledger=ledger)[0] == 0
    code, out, err = _bundle(capsys, case, tmp_path / "b2", "C", ledger=ledger)
    assert code == 0, err
    assert "NO differential-privacy guarantee" in out and "cumulative ε not bounded" in out
    (group,) = _report(capsys, ledger)["training_sets"]
    assert not group["cumulative"]["bounded"] and group["cumulative"]["epsilon"] is None
    assert "trained without differential privacy" in " ".join(group["cumulative"]["reasons"])
    code, text, _ = _ledger(capsys, ledger)
    assert code == 0 and "NO differential-privacy guarantee" in text and "not bounded" in text
    assert "Trained **without** differential privacy" in (tmp_path / "b2" / "MODEL_CARD.md").read_text()


def test_compose_rule_on_hand_built_releases():
    def rel(model, eps, delta=1e-6, images=10):
        dp = None if eps is None else L.ModelDP(eps, delta)
        return L.Release("t" * 64, "test", model, "test", dp, None if dp else "trained without differential privacy",
                         images)

    c = L.compose([rel("m1", 1.5), rel("m2", 0.25, 1e-7), rel("m1", 1.5)], "t" * 64)
    assert (c.epsilon, c.delta, c.releases, c.images, len(c.models)) == (1.75, pytest.approx(1.1e-6), 3, 30, 2)
    assert L.compose([], "t" * 64).epsilon == 0.0
    none = L.compose([rel("m1", 1.0), rel("m3", None)], "t" * 64)
    assert not none.bounded and "model m3… has no DP guarantee: trained without differential privacy" in none.describe()
    unknown = L.compose([rel(None, None), rel(None, None)], "t" * 64)
    assert len(unknown.models) == 2  # two releases of unknown origin are not assumed to share a model
    assert L.parse_dp({"epsilon_spent": float("inf"), "delta": 1e-5})[0] is None
    assert L.parse_dp({"epsilon_spent": 1.0, "delta": 1.0})[0] is None
    assert L.parse_dp({"epsilon_spent": 1, "delta": 0})[0] == L.ModelDP(1.0, 0.0)


# ------------------------------------------------------------------ the policy's limit


def test_a_release_past_the_limit_is_refused_before_anything_is_written(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    policy_a, audit_a = _limited(case, tmp_path, 4.0, "refuse", "A")
    policy_b, audit_b = _limited(case, tmp_path, 4.0, "refuse", "B")
    assert policy_a.read_text() == policy_b.read_text()
    assert _bundle(capsys, case, tmp_path / "b1", ledger=ledger, policy=policy_a, audit=audit_a)[0] == 0
    before = ledger.read_bytes()
    result = _bundle(capsys, case, tmp_path / "b2", ledger=ledger, policy=policy_b, audit=audit_b)
    one_line_error(result, "cumulative ε", "to 5", "max_cumulative_epsilon 4", "nothing was written")
    assert not (tmp_path / "b2").exists() and ledger.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b2")]  # no temporary sibling either
    # the same model again costs nothing: still within the limit
    assert _bundle(capsys, case, tmp_path / "b3", ledger=ledger, policy=policy_a, audit=audit_a)[0] == 0


def test_the_limit_is_checked_again_under_the_ledger_lock(case, capsys, tmp_path, monkeypatch):
    """A concurrent bundle recorded between this bundle's first check and its ledger entry: still refused."""
    ledger = tmp_path / "ledger.jsonl"
    policy_a, audit_a = _limited(case, tmp_path, 4.0, "refuse", "A")
    policy_b, audit_b = _limited(case, tmp_path, 4.0, "refuse", "B")
    assert _bundle(capsys, case, tmp_path / "b1", ledger=ledger, policy=policy_a, audit=audit_a)[0] == 0
    empty = L.LedgerState(ledger)  # what the first check saw, before the other bundle's entry landed
    monkeypatch.setattr(L, "read_ledger", lambda *a, **k: empty)
    result = _bundle(capsys, case, tmp_path / "b2", ledger=ledger, policy=policy_b, audit=audit_b)
    one_line_error(result, "another release was recorded while this one was being written", "nothing was written")
    assert not (tmp_path / "b2").exists() and len(ledger.read_text().splitlines()) == 1


def test_a_release_past_the_limit_warns_when_the_policy_says_warn(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    policy_a, audit_a = _limited(case, tmp_path, 4.0, "warn", "A")
    policy_b, audit_b = _limited(case, tmp_path, 4.0, "warn", "B")
    assert _bundle(capsys, case, tmp_path / "b1", ledger=ledger, policy=policy_a, audit=audit_a)[0] == 0
    code, out, err = _bundle(capsys, case, tmp_path / "b2", ledger=ledger, policy=policy_b, audit=audit_b)
    assert code == 0 and (tmp_path / "b2" / "manifest.json").exists()
    assert "warning:" in err and "past policy 'ledger-test'" in err and "bundling anyway" in err
    assert _report(capsys, ledger)["training_sets"][0]["cumulative"]["epsilon"] == pytest.approx(5.0)


def test_a_model_without_dp_under_a_limit_is_refused(case, capsys, tmp_path):
    policy, audit = _limited(case, tmp_path, 10.0, None, "C")  # refuse is the default
    result = _bundle(capsys, case, tmp_path / "b", ledger=tmp_path / "l.jsonl", policy=policy, audit=audit)
    one_line_error(result, "no differential-privacy guarantee", "trained without differential privacy")
    assert not (tmp_path / "b").exists() and not (tmp_path / "l.jsonl").exists()


def test_policy_limit_keys_are_validated():
    from audit.core.policy import parse_policy
    from synthgate.errors import ConfigError

    base = "name: x\nchecks: {copy_detection: {}}\n"
    assert parse_policy(base, "p").to_dict()["max_cumulative_epsilon"] is None
    p = parse_policy(base + "max_cumulative_epsilon: 8\n", "p")
    assert (p.max_cumulative_epsilon, p.on_cumulative_epsilon) == (8.0, "refuse")
    assert p.to_dict()["on_cumulative_epsilon"] == "refuse"
    for bad, says in (("max_cumulative_epsilon: 0", "greater than 0"), ("max_cumulative_epsilon: .inf", "finite"),
                      ("max_cumulative_epsilon: 2\non_cumulative_epsilon: stop", "'warn' or 'refuse'"),
                      ("on_cumulative_epsilon: warn", "set both, or neither"),
                      ("max_cumulative_epsilom: 2", "did you mean 'max_cumulative_epsilon'")):
        with pytest.raises(ConfigError, match=says):
            parse_policy(base + bad + "\n", "p")


# ------------------------------------------------------------------ integrity


def test_a_hand_edited_entry_is_detected_and_named(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    for out, model in (("b1", "A"), ("b2", "B"), ("b3", "A")):
        assert _bundle(capsys, case, tmp_path / out, model, ledger=ledger)[0] == 0
    lines = ledger.read_text().splitlines()
    doc = json.loads(lines[1])
    doc["model"]["dp"]["epsilon_spent"] = 0.5  # someone makes model B look cheaper
    edited = lines[:1] + [json.dumps(doc, sort_keys=True, separators=(",", ":"))] + lines[2:]
    ledger.write_text("\n".join(edited) + "\n")
    code, out, err = _ledger(capsys, ledger)
    assert code == 1 and "#2" in out and "DOES NOT VERIFY" in out
    assert "line 2's signature does not verify" in out and "line 3 does not follow line 2" in out
    assert "#1" in out.split("#2")[0] and "ok" in out.split("#2")[0]
    assert "not bounded" in out and "cannot be vouched for" in err
    report = _report(capsys, ledger)
    assert [e["verified"] for e in report["training_sets"][0]["entries"]] == [True, False, False]
    # under a limit, a ledger that does not verify cannot vouch for the total: refused
    policy, audit = _limited(case, tmp_path, 100.0, "refuse", "A")
    one_line_error(_bundle(capsys, case, tmp_path / "b4", ledger=ledger, policy=policy, audit=audit),
                   "the ledger does not verify: line 2")
    # without a limit the release is recorded after a warning
    code, _, err = _bundle(capsys, case, tmp_path / "b5", ledger=ledger)
    assert code == 0 and "warning: the release ledger does not verify (line 2" in err


def test_a_deleted_entry_breaks_the_chain(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    for out, model in (("b1", "B"), ("b2", "A")):
        assert _bundle(capsys, case, tmp_path / out, model, ledger=ledger)[0] == 0
    ledger.write_text(ledger.read_text().splitlines(keepends=True)[1])  # model B's (costlier) release removed
    code, out, _ = _ledger(capsys, ledger)
    assert code == 1 and "line 1 says it is entry 2" in out


def test_an_entry_signed_by_another_key_is_not_trusted_unless_named(case, capsys, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    assert _bundle(capsys, case, tmp_path / "b1", ledger=ledger)[0] == 0
    pub = tmp_path / "hospital.pub"
    pub.write_text(signing.load_signing_key().public.pem())  # the key that signed the entry (SYNTHGATE_KEY)
    signing.write_new_key(tmp_path / "other.pem")
    with pytest.MonkeyPatch.context() as mp:  # another installation reads the ledger
        mp.setenv("SYNTHGATE_KEY", str(tmp_path / "other.pem"))
        code, out, _ = _ledger(capsys, ledger)
        assert code == 1 and "which this installation does not trust" in out
        assert _ledger(capsys, ledger, "--trust-key", pub)[0] == 0


def test_concurrent_appends_from_two_processes_leave_a_valid_ledger(tmp_path, hospital_key):
    ledger = tmp_path / "ledger.jsonl"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path.cwd())!r})
        from release import ledger as L
        from synthgate.signing import load_signing_key
        key = load_signing_key()
        who = sys.argv[1]
        for i in range(25):
            r = L.Release("t" * 64, "test", who * 64, "test", L.ModelDP(0.1, 1e-9), None, i)
            L.append(r, path={str(ledger)!r}, key=key, bundle_sha256=f"{{who}}{{i}}", bundle_path=f"/b/{{who}}{{i}}",
                     bundle_signer=key.fingerprint, policy={{"name": "p", "sha256": "s"}},
                     audit={{"sha256": "a", "verdict": "pass"}})
    """)
    env = {**__import__("os").environ, "SYNTHGATE_KEY": str(hospital_key), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, who], env=env) for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        state = L.read_ledger(ledger)
    assert state.intact, state.problems[:3]
    assert [e.seq for e in state.entries] == list(range(1, 51))
    assert sorted(e.bundle_sha256 for e in state.entries) == sorted(f"{w}{i}" for w in "ab" for i in range(25))
    cum = state.cumulative("t" * 64)
    assert len(cum.models) == 2 and cum.epsilon == pytest.approx(0.2)
    # a cut-short write is reported, and the next entry still starts on a line of its own
    with open(ledger, "ab") as fh:
        fh.write(b'{"kind": "synthgate release')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SYNTHGATE_KEY", str(hospital_key))
        key = signing.load_signing_key()
        L.append(L.Release("t" * 64, "test", "c" * 64, "test", None, "x", 1), path=ledger, key=key,
                 bundle_sha256="c", bundle_path="/b/c", bundle_signer=key.fingerprint, policy={}, audit={})
        state = L.read_ledger(ledger)
    assert [p for p in state.problems] == ["line 51: not a ledger entry (edited or cut short)"]
    assert state.entries[-1].seq == 52 and state.entries[-1].verified


# ------------------------------------------------------------------ the command


def test_ledger_command_paths_filters_and_refusals(case, capsys, tmp_path, monkeypatch):
    code, out, _ = _ledger(capsys, tmp_path / "missing.jsonl")
    assert code == 2
    code = release_cli.main(["ledger"])  # the default ledger, not there yet: nothing recorded
    assert code == 0 and "no release recorded yet" in capsys.readouterr().out
    monkeypatch.setenv("SYNTHGATE_LEDGER", str(tmp_path / "env.jsonl"))
    code = release_cli.main(["bundle", str(case / "synA"), "--audit", str(case / "auditA" / "audit.json"), "--out",
                             str(tmp_path / "b"), "--policy", str(case / "policy.yaml")])
    assert code == 0 and (tmp_path / "env.jsonl").exists()
    digest = ImageSet(case / "p" / "train", cache=None).digest
    assert release_cli.main(["ledger", "--training-set", digest[:10]]) == 0
    assert digest in capsys.readouterr().out
    assert release_cli.main(["ledger", "--training-set", "0" * 12]) == 0
    assert "no release recorded from a training set" in capsys.readouterr().out
    one_line_error((release_cli.main(["ledger", "--training-set", "xyz"]), *capsys.readouterr()), "not a digest")


def test_the_default_ledger_lives_under_xdg_data_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert L.ledger_path() == tmp_path / "data" / "synthgate" / "ledger.jsonl"
    monkeypatch.setenv("SYNTHGATE_LEDGER", str(tmp_path / "x.jsonl"))
    assert L.ledger_path() == tmp_path / "x.jsonl" and L.ledger_path(tmp_path / "y") == tmp_path / "y"


# ------------------------------------------------------------------ a real DP model


def test_a_real_dp_model_s_epsilon_reaches_the_ledger(tmp_path, capsys, one_torch_thread):
    from synthgate import cli

    write_phantoms(tmp_path / "p", patients=6, images_per_patient=4, size=16, seed=3)
    code = cli.main(["train", str(tmp_path / "p" / "train"), "--out", str(tmp_path / "dp"), "--resolution", "16",
                     "--block-out-channels", "16,32", "--batch-size", "8", "--steps", "3", "--seed", "1",
                     "--dp-epsilon", "8", "--accountant", "rdp", "--conditioning", "none", "--quiet"])
    assert code == 0
    spent = json.loads((tmp_path / "dp" / "synthgate.json").read_text())["dp"]
    # the model's own samples: their manifest (bound to the audit) is what ties the DP model to the images
    assert cli.main(["sample", str(tmp_path / "dp"), "--n", "6", "--steps", "2", "--seed", "9", "--out",
                     str(tmp_path / "syn"), "--quiet"]) == 0
    (tmp_path / "policy.yaml").write_text(POLICY)
    assert audit_cli.main(["check", str(tmp_path / "syn"), "--real", str(tmp_path / "p" / "train"), "--model",
                           str(tmp_path / "dp"), "--policy", str(tmp_path / "policy.yaml"), "--out",
                           str(tmp_path / "audit")]) == 0
    capsys.readouterr()
    assert release_cli.main(["bundle", str(tmp_path / "syn"), "--audit", str(tmp_path / "audit" / "audit.json"),
                             "--out", str(tmp_path / "b"), "--policy", str(tmp_path / "policy.yaml"), "--ledger",
                             str(tmp_path / "l.jsonl")]) == 0
    capsys.readouterr()
    (group,) = _report(capsys, tmp_path / "l.jsonl")["training_sets"]
    assert group["sha256"] == ImageSet(tmp_path / "p" / "train", cache=None).digest
    (entry,) = group["entries"]
    assert entry["model"]["dp"] == {"epsilon_spent": spent["epsilon_spent"], "delta": spent["delta"],
                                    "accountant": "rdp"}
    assert 0 < group["cumulative"]["epsilon"] == spent["epsilon_spent"] <= 8.0
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "### Training procedure\n- 3 steps; seed 1; batch size 8" in card and "opacus" in card


def test_a_ledger_that_is_an_input_or_not_a_ledger_is_refused_untouched(case, capsys, tmp_path):
    """Red team: `--ledger` naming the real set's metadata.csv appended a signed JSON line to it (the set no longer
    read); a file that is not a ledger is now refused, and a ledger inside an input too."""
    real_csv = case / "p" / "train" / "metadata.csv"
    before = real_csv.read_bytes()
    code, _, err = _bundle(capsys, case, tmp_path / "b1", ledger=real_csv)
    assert code == 2 and "the release ledger" in err and "inside the real input" in err, err
    assert real_csv.read_bytes() == before and not (tmp_path / "b1").exists()
    other = tmp_path / "notes.csv"
    other.write_text("path,label\na.png,0\n")
    code, _, err = _bundle(capsys, case, tmp_path / "b2", ledger=other)
    assert code == 2 and "is not a release ledger" in err, err
    assert other.read_text() == "path,label\na.png,0\n" and not (tmp_path / "b2").exists()


def test_no_dp_credit_for_images_no_manifest_ties_to_the_audited_model(case, capsys, tmp_path):
    """Red team: a non-DP model's images (manifest removed), audited with a DP model's folder as --model, were
    bundled with that model's epsilon in the ledger and the model card."""
    syn = tmp_path / "syn"
    shutil.copytree(case / "synA", syn)
    (syn / "manifest.json").unlink()
    assert audit_cli.main(["check", str(syn), "--real", str(case / "p" / "train"), "--model", str(case / "modelA"),
                           "--policy", str(case / "policy.yaml"), "--out", str(tmp_path / "audit")]) == 0
    capsys.readouterr()
    ledger = tmp_path / "l.jsonl"
    code, _, err = _bundle(capsys, case, tmp_path / "b", ledger=ledger, audit=tmp_path / "audit" / "audit.json")
    assert code == 0, err
    (entry,) = _report(capsys, ledger)["training_sets"][0]["entries"]
    assert entry["model"]["dp"] is None and "no generator manifest naming the audited model" in entry["model"]["no_dp"]
    card = (tmp_path / "b" / "MODEL_CARD.md").read_text()
    assert "nothing shows it made these images: this release carries **no** differential-privacy guarantee" in card
    assert "Trained with differential privacy" not in card
