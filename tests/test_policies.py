"""Policies: schema validation at load time, and the gate's actions (block, drop + re-audit, warn)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from audit import cli as audit_cli
from audit.core.base import Check, register_check, unregister_check
from audit.core.policy import load_policy, parse_policy
from policies.loader import BUILTIN
from synthgate.errors import ConfigError
from synthgate.phantoms import generate, write_phantoms
from conftest import save_unit_png


class Inconclusive(Check):
    """A check that can never vouch (for testing the gate's on_inconclusive rule)."""

    name = "always_inconclusive"

    def score(self, ctx, fitted):
        return self.result("inconclusive", "the attack could not beat its baseline")


@pytest.fixture
def inconclusive_check():
    register_check("always_inconclusive", "test_policies:Inconclusive")
    yield
    unregister_check("always_inconclusive")


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_policies_are_valid(name):
    loaded = load_policy(name)
    assert loaded.name == name and loaded.checks and len(loaded.sha256) == 64
    assert "#" in loaded.text  # thresholds come with comments explaining them


@pytest.mark.parametrize("text,message", [
    ("name: x\nchecks: {copy_detection: {}}\nmax_drop_fracton: 0.1\n", "did you mean 'max_drop_fraction'"),
    ("name: x\nchecks: {copy_detektion: {}}\n", "did you mean 'copy_detection'"),
    ("name: x\nchecks: {copy_detection: {acton: drop}}\n", "did you mean 'action'"),
    ("name: x\nchecks: {copy_detection: {action: delete}}\n", "checks.copy_detection.action"),
    ("name: x\nchecks: {copy_detection: {settings: {treshold: 0.2}}}\n", "did you mean 'threshold'"),
    ("name: x\nchecks: {copy_detection: {settings: {rule: magic}}}\n", "checks.copy_detection.settings.rule: Input should be"),
    ("name: x\nchecks: {}\n", "at least one check"),
    ("checks: {copy_detection: {}}\n", "name"),
    ("- a list\n", "YAML mapping"),
    ("name: [unclosed\n", "not valid policy YAML"),
])
def test_policy_errors_are_clear(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_policy(text, "my.yaml")
    assert str(err.value).startswith("my.yaml:") and "\n" not in str(err.value)


def test_validate_policy_cli(tmp_path, capsys):
    good = tmp_path / "p.yaml"
    good.write_text("name: mine\nchecks:\n  copy_detection: {action: drop, settings: {rule: calibrated}}\n")
    assert audit_cli.main(["validate-policy", str(good)]) == 0
    assert "valid policy 'mine'" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: mine\nchecks:\n  copy_detection: {settings: {alfa: 1}}\n")
    assert audit_cli.main(["validate-policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'alpha'" in err and len(err.strip().splitlines()) == 1
    assert audit_cli.main(["validate-policy", str(tmp_path / "strikt")]) == 2
    assert audit_cli.main(["validate-policy", "strict"]) == 0


@pytest.fixture(scope="module")
def gate_case(tmp_path_factory):
    """20 novel synthetic images, one of them a planted near-copy of a training image."""
    root = tmp_path_factory.mktemp("gate")
    write_phantoms(root / "p", patients=24, images_per_patient=4, size=32, seed=21)
    novel, _ = generate(patients=10, images_per_patient=2, size=32, seed=22)
    (root / "syn").mkdir()
    for i, im in enumerate(novel[:19]):
        save_unit_png(root / "syn" / f"s{i:02d}.png", im.pixels)
    src = sorted((root / "p" / "train").glob("*.png"))[3]
    x = np.asarray(Image.open(src), np.float64) / 255 + np.random.default_rng(0).normal(0, 0.01, (32, 32))
    save_unit_png(root / "syn" / "zz_copy.png", x)
    return root


def run(capsys, case, tmp_path, *extra):
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--out", str(tmp_path / "o"), "--json", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else err


def test_drop_action_removes_the_copy_and_reaudits(gate_case, capsys, tmp_path):
    # the default policy's copy rule (drop, at most 10% dropped), without the checks that train networks
    policy = tmp_path / "drop.yaml"
    policy.write_text("name: default-copy\nmax_drop_fraction: 0.1\nchecks:\n  copy_detection: {action: drop}\n"
                      "  dicom_phi: {action: block}\n")
    code, audit = run(capsys, gate_case, tmp_path, "--policy", str(policy))
    assert code == 0, audit["verdict_reasons"]
    assert audit["verdict"] == "pass" and audit["dropped"] == ["zz_copy.png"]
    assert audit["dropped_evidence"]["zz_copy.png"]["check"] == "copy_detection"
    assert "zz_copy.png" not in audit["released"] and len(audit["released"]) == 19
    assert [r["dropped"] for r in audit["drop_rounds"]] == [1, 0]  # the re-audit found nothing more
    copy = next(c for c in audit["checks"] if c["name"] == "copy_detection")
    assert copy["status"] == "pass" and copy["metrics"]["n_synthetic"] == 19  # the re-audit's result
    dropped = [json.loads(line) for line in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert [d["image"] for d in dropped] == ["zz_copy.png"] and dropped[0]["check"] == "copy_detection"
    assert audit["policy"]["name"] == "default-copy" and len(audit["policy"]["sha256"]) == 64
    assert [c["name"] for c in audit["checks"]] == ["copy_detection", "dicom_phi"]


def test_drop_beyond_max_fraction_blocks(gate_case, capsys, tmp_path):
    policy = tmp_path / "tight.yaml"
    policy.write_text("name: tight\nmax_drop_fraction: 0.01\nchecks:\n  copy_detection: {action: drop}\n")
    code, audit = run(capsys, gate_case, tmp_path, "--policy", str(policy))
    assert code == 1 and audit["released"] == []
    assert "max_drop_fraction" in " ".join(audit["verdict_reasons"])


def test_block_and_warn_actions(gate_case, capsys, tmp_path):
    code, audit = run(capsys, gate_case, tmp_path, "--policy", "strict", "--checks", "copy_detection")
    assert code == 1 and audit["dropped"] == [] and audit["released"] == []
    warn = tmp_path / "warn.yaml"
    warn.write_text("name: warn\nchecks:\n  copy_detection: {required: false, action: warn, on_inconclusive: warn}\n")
    code, audit = run(capsys, gate_case, tmp_path, "--policy", str(warn))
    assert code == 0 and audit["checks"][0]["status"] == "fail" and len(audit["released"]) == 20
    # a subset of a policy's checks is a partial audit: never a pass, nothing released
    code, audit = run(capsys, gate_case, tmp_path, "--policy", "research", "--checks", "copy_detection")
    assert code == 1 and audit["verdict"] == "partial" and audit["released"] == []


def test_inconclusive_fails_unless_policy_says_warn(gate_case, capsys, tmp_path, inconclusive_check):
    # a required check is never excused: an optional one may warn
    for on, required, expected in (("fail", "true", 1), ("fail", "false", 1), ("warn", "false", 0)):
        policy = tmp_path / f"{on}-{required}.yaml"
        policy.write_text(f"name: t\nchecks:\n  always_inconclusive: {{required: {required}, on_inconclusive: {on}}}\n")
        code, audit = run(capsys, gate_case, tmp_path, "--policy", str(policy))
        assert code == expected, audit


def test_required_check_without_inputs_is_a_usage_error(gate_case, capsys, tmp_path):
    code = audit_cli.main(["check", str(gate_case / "syn"), "--out", str(tmp_path / "o")])
    assert code == 2 and "copy_detection is required" in capsys.readouterr().err


@pytest.mark.parametrize("text,message", [
    ("name: x\nchecks:\n  copy_detection: {settings: {grid: four}}\n",
     "checks.copy_detection.settings.grid: Input should be a valid integer (got 'four')"),
    ("name: x\nchecks:\n  copy_detection: {settings: {grid: 4.0}}\n", "checks.copy_detection.settings.grid"),
    ("name: x\nchecks:\n  copy_detection: {settings: {holdout_quantile: 0.7}}\n",
     "checks.copy_detection.settings.holdout_quantile: Input should be less than 0.5"),
    ("name: x\nchecks:\n  membership_inference: {settings: {timesteps: 50}}\n",
     "checks.membership_inference.settings.timesteps: Input should be a valid list"),
    ("name: x\nchecks:\n  membership_inference: {settings: {model_attacks: [loss, magic]}}\n",
     "'magic' is not a registered scenario-2 attack"),
    ("name: x\nchecks:\n  reidentification: {settings: {batch_size: 4, views: 4}}\n", "batch_size must be at least 2 x views"),
    ("name: x\nchecks:\n  copy_detection: {settings: {tresh: 1}}\n", "unknown setting 'tresh'"),
    ("name: x\nchecks:\n  copy_detection: {}\n  copy_detection: {}\n", "duplicate key 'copy_detection'"),
    ("name: x\nchecks:\n  copy_detection: {settings: {grid: 4, grid: 8}}\n", "duplicate key 'grid'"),
    ("name: x\nbase: &b {grid: 4}\nchecks:\n  copy_detection: {settings: *b}\n", "anchor &b is not allowed"),
    ("name: x\nchecks:\n  copy_detection: {settings: {<<: {grid: 4}}}\n", "merge keys"),
    ("name: x\nmax_drop_fraction: '0.1'\nchecks: {copy_detection: {}}\n", "max_drop_fraction: Input should be a valid number"),
    ("name: x\nchecks:\n  copy_detection: {required: 'yes'}\n", "checks.copy_detection.required"),
])
def test_policy_settings_are_typed_and_yaml_is_strict(tmp_path, capsys, text, message):
    """validate-policy refuses each with exit 2 and one line naming the check, the key and the problem."""
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert audit_cli.main(["validate-policy", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_alias_bomb_is_refused_quickly(tmp_path, capsys):
    """The billion-laughs pattern: refused at the first anchor, never expanded."""
    import time

    lines = ["name: x", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    lines += ["checks:", "  copy_detection: {settings: {embedding_weights: *a8}}"]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    assert audit_cli.main(["validate-policy", str(path)]) == 2
    assert time.perf_counter() - start < 5
    assert "is not allowed in a policy" in capsys.readouterr().err


def test_oversized_policy_is_refused(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\ndescription: '" + "y" * 70_000 + "'\nchecks: {copy_detection: {}}\n")
    assert audit_cli.main(["validate-policy", str(path)]) == 2
    assert "KiB" in capsys.readouterr().err


def test_param_overrides_are_validated_before_any_work(gate_case, capsys, tmp_path, monkeypatch):
    import audit.api

    def no_work(*a, **k):
        raise AssertionError("the audit read its inputs although its settings are invalid")

    monkeypatch.setattr(audit.api, "resolve_inputs", no_work)
    for param, message in (("copy_detection.grid=four", "checks.copy_detection.settings.grid"),
                           ("copy_detection.treshold=0.2", "did you mean 'threshold'"),
                           ("reidentification.epochs=3", "not being run"),
                           ("copy_detection.grid", "must look like CHECK.KEY=VALUE")):
        code = audit_cli.main(["check", str(gate_case / "syn"), "--real", str(gate_case / "p" / "train"),
                               "--checks", "copy_detection", "--param", param, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_every_check_documents_its_settings():
    """Each registered check's settings model: defaults validate, every field has a description, JSON round-trips."""
    from audit.core.base import available_checks, settings_class

    for name in available_checks():
        model = settings_class(name)
        s = model()
        assert model.model_validate_json(s.model_dump_json()) == s
        undocumented = [n for n, _, doc in model.documented() if not doc]
        assert not undocumented, (name, undocumented)
