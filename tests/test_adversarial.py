"""The gate as a careless or dishonest user would try it: every case here once ended in data loss, a pass
without evidence, a leak or a traceback (see the trust issue); each must now be refused, caught or escaped.

Release-side forgeries (edited audits, swapped images, re-signed manifests, real names in bundles) are in
tests/test_release_trust.py; DICOM header coverage in tests/test_dicom_phi.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from audit import cli as audit_cli
from conftest import save_unit_png
from synthgate.errors import SynthgateError
from synthgate.phantoms import generate, write_phantoms


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A small real set, its holdout, and a synthetic set holding one near-copy of a training image."""
    root = tmp_path_factory.mktemp("adv")
    write_phantoms(root / "p", patients=12, images_per_patient=3, size=32, seed=31)
    novel, _ = generate(patients=6, images_per_patient=2, size=32, seed=32)
    for i, im in enumerate(novel[:9]):
        save_unit_png(root / "syn" / f"s{i:02d}.png", im.pixels)
    src = sorted((root / "p" / "train").glob("*.png"))[2]
    save_unit_png(root / "syn" / "zz_copy.png", np.asarray(Image.open(src), np.float64) / 255)
    (root / "only_copy.yaml").write_text("name: only-copy\nmax_drop_fraction: 0.5\nchecks:\n"
                                         "  copy_detection: {action: drop, settings: {control_copies: 5}}\n")
    return root


def _audit(capsys, case, out, *extra, synthetic=None, real=None):
    code = audit_cli.main(["check", str(synthetic or case / "syn"), "--real", str(real or case / "p" / "train"),
                           "--holdout", str(case / "p" / "holdout"), "--policy", str(case / "only_copy.yaml"),
                           "--out", str(out), *map(str, extra)])
    return code, *capsys.readouterr()


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. data loss


def test_out_onto_the_real_set_holding_an_audit_json_is_refused(case, capsys, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(case / "p" / "train", real)
    code, _, _ = _audit(capsys, case, tmp_path / "a")
    assert code == 0
    shutil.copy(tmp_path / "a" / "audit.json", real / "audit.json")  # a sidecar name sets may hold
    before = _tree(real)
    code, out, err = _audit(capsys, case, real, real=real)
    assert code == 2 and "is the real input itself" in err and len(err.strip().splitlines()) == 1
    assert _tree(real) == before  # not one byte of the training set changed


@pytest.mark.parametrize("where", ["synthetic", "real", "holdout"])
def test_out_inside_or_around_an_input_is_refused_before_any_work(case, capsys, tmp_path, monkeypatch, where):
    import audit.api

    def no_work(*a, **k):
        raise AssertionError("read the image sets although --out is refused")

    monkeypatch.setattr(audit.api, "ImageSet", no_work)
    target = {"synthetic": case / "syn", "real": case / "p" / "train", "holdout": case / "p" / "holdout"}[where]
    code, _, err = _audit(capsys, case, target / "audit")
    assert code == 2 and f"inside the {where} input" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = _audit(capsys, case, target.parent)  # a folder holding the input: replacing it would delete it
    assert code == 2 and "contains the" in err and len(err.strip().splitlines()) == 1, err
    assert not (target / "audit").exists()


def test_rerun_keeps_what_the_audit_did_not_write(case, capsys, tmp_path):
    out = tmp_path / "a"
    assert _audit(capsys, case, out)[0] == 0
    (out / "report-internal.html").write_text("<p>internal</p>")
    (out / "steward-notes.txt").write_text("spoke to the ethics board")
    code, stdout, _ = _audit(capsys, case, out)
    assert code == 0 and "left alone" in stdout and "steward-notes.txt" in stdout
    assert (out / "steward-notes.txt").read_text() == "spoke to the ethics board"
    assert (out / "report-internal.html").exists() and (out / "audit.json").exists()


def test_a_refused_rerun_changes_nothing_in_the_folder(case, capsys, tmp_path):
    """Red team: report.html replaced by a symlink was refused, but only after audit.json had been replaced."""
    out = tmp_path / "a"
    assert _audit(capsys, case, out)[0] == 0
    elsewhere = tmp_path / "elsewhere.html"
    elsewhere.write_text("not ours")
    (out / "report.html").unlink()
    (out / "report.html").symlink_to(elsewhere)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()}
    code, _, err = _audit(capsys, case, out)
    assert code == 2 and "not a regular file" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()} == before
    assert elsewhere.read_text() == "not ours"


def test_unmarked_existing_folder_is_never_replaced(case, capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    code, _, err = _audit(capsys, case, out)
    assert code == 2 and "was not written by `audit check`" in err
    assert (out / "thesis.tex").read_text() == "years of work"


def test_sample_overwrite_never_replaces_a_real_set(case, capsys, tmp_path):
    from synthgate import cli

    real = tmp_path / "real"
    shutil.copytree(case / "p" / "train", real)
    before = _tree(real)
    code = cli.main(["sample", str(tmp_path / "no-model"), "--n", "2", "--out", str(real), "--overwrite"])
    err = capsys.readouterr().err
    assert code == 2 and _tree(real) == before, err


# ------------------------------------------------------------------ 2. a pass needs evidence


def test_a_checks_subset_is_partial_never_a_pass(case, capsys, tmp_path):
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--checks", "dicom_phi",
                           "--out", str(tmp_path / "a"), "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert code == 1 and audit["verdict"] == "partial" and audit["released"] == []
    assert any("partial audit" in r for r in audit["verdict_reasons"])


def test_an_empty_checks_list_is_refused_and_repeats_are_one(case, capsys, tmp_path):
    code = audit_cli.main(["check", str(case / "syn"), "--checks", " , ", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and "--checks names no check" in err and not (tmp_path / "a").exists()
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--checks",
                           "dicom_phi,dicom_phi", "--out", str(tmp_path / "b"), "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert code == 1 and [c["name"] for c in audit["checks"]].count("dicom_phi") == 1
    assert not any("dicom_phi, dicom_phi" in r or "dicom_phi,dicom_phi" in r for r in audit["verdict_reasons"])


def test_required_check_must_be_conclusive(case, capsys, tmp_path):
    from audit.core.base import Check, register_check, unregister_check

    class Blind(Check):
        name = "blind"

        def score(self, ctx, fitted):
            return self.result("inconclusive", "could not vouch")

    sys.modules["adv_blind"] = type(sys)("adv_blind")
    sys.modules["adv_blind"].Blind = Blind
    register_check("blind", "adv_blind:Blind")
    try:
        policy = tmp_path / "p.yaml"
        policy.write_text("name: t\nchecks:\n  blind: {required: true, on_inconclusive: fail}\n")
        code = audit_cli.main(["check", str(case / "syn"), "--policy", str(policy), "--out", str(tmp_path / "a")])
        assert code == 1
        policy.write_text("name: t\nchecks:\n  blind: {required: true, on_inconclusive: warn}\n")
        code = audit_cli.main(["check", str(case / "syn"), "--policy", str(policy), "--out", str(tmp_path / "b")])
        err = capsys.readouterr().err
        assert code == 2 and "required check cannot warn" in err
    finally:
        unregister_check("blind")


def _audit_holdout(capsys, case, out, holdout, synthetic=None):
    code = audit_cli.main(["check", str(synthetic or case / "syn"), "--real", str(case / "p" / "train"),
                           "--holdout", str(holdout), "--policy", str(case / "only_copy.yaml"), "--out", str(out)])
    return code, *capsys.readouterr()


def test_holdout_that_is_or_holds_the_synthetic_set_is_refused(case, capsys, tmp_path):
    """The holdout calibrates the copy rule: the synthetic images themselves in it made their copies look unseen."""
    code, _, err = _audit_holdout(capsys, case, tmp_path / "a", case / "syn")
    assert code == 2 and "holdout is the synthetic set's folder" in err and len(err.strip().splitlines()) == 1
    mixed = tmp_path / "mixed"
    shutil.copytree(case / "p" / "holdout", mixed)
    (mixed / "metadata.csv").unlink()  # images without a patient ID: the copy check needs none
    shutil.copy(case / "syn" / "zz_copy.png", mixed / "h_zz.png")
    code, _, err = _audit_holdout(capsys, case, tmp_path / "b", mixed)
    assert code == 2 and "shares 1 file(s) with the synthetic set" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_holdout_of_near_copies_makes_copy_detection_inconclusive_not_a_pass(case, capsys, tmp_path):
    """Re-noised copies of training images in the holdout drive the ratio thresholds towards 0: a set of shifted
    copies then passed with a warning (red team); a calibration that cannot vouch blocks the pass."""
    rng = np.random.default_rng(5)
    train = sorted((case / "p" / "train").glob("*.png"))
    hold = tmp_path / "hold"
    shutil.copytree(case / "p" / "holdout", hold)
    (hold / "metadata.csv").unlink()
    syn = tmp_path / "syn"
    shutil.copytree(case / "syn", syn)
    (syn / "zz_copy.png").unlink()
    for i, src in enumerate(train[:3]):
        x = np.asarray(Image.open(src), np.float64) / 255
        save_unit_png(hold / f"h_near_{i}.png", np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1))
        save_unit_png(syn / f"zz_{i}.png", np.clip(np.roll(x, (1, 0), (0, 1)) + rng.normal(0, 0.03, x.shape), 0, 1))
    code, _, _ = _audit_holdout(capsys, case, tmp_path / "a", hold, synthetic=syn)
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    copy = next(c for c in audit["checks"] if c["name"] == "copy_detection")
    assert code == 1 and audit["verdict"] != "pass" and copy["status"] != "warn"
    assert "a pass would not be evidence" in copy["reason"]


def test_a_tiled_rule_control_plants_every_kind_however_few_copies_asked(case, capsys, tmp_path):
    """Red team: `rule: absolute, threshold: 0.000001, control_copies: 1` planted one exact copy (caught by any
    threshold above 0), passed noisy copies of training images and was bundled; every kind is planted now."""
    policy = tmp_path / "weak.yaml"
    policy.write_text("name: hospital-share\nchecks:\n  copy_detection:\n    required: true\n    action: block\n"
                      "    settings: {rule: absolute, threshold: 0.000001, control_copies: 1}\n")
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--policy", str(policy), "--out", str(tmp_path / "a")])
    capsys.readouterr()
    audit = json.loads((tmp_path / "a" / "audit.json").read_text())
    copy = audit["checks"][0]
    control = copy["controls"][0]
    assert code == 1 and audit["verdict"] == "fail" and copy["status"] == "error"
    assert control["metrics"]["planted"] >= 5 and set(control["metrics"]["by_transform"]) >= {"exact", "noise"}


def test_copy_verdict_doubt_blocks_a_pass_but_never_excuses_a_copy():
    from types import SimpleNamespace

    from audit.copy_detection.check import CopyDetection

    check = CopyDetection()
    fit = SimpleNamespace(control=SimpleNamespace(passed=True, detail=""), ratio=None, rule="ratio")
    none, some = np.zeros(4, bool), np.array([False, True, False, False])
    assert check._verdict(fit, none, [], 4, ["threshold 0.03 < 0.1"])[0] == "inconclusive"
    assert check._verdict(fit, some, [], 4, ["threshold 0.03 < 0.1"])[0] == "fail"
    assert check._verdict(fit, none, ["a clique"], 4)[0] == "warn"
    assert check._verdict(fit, none, [], 4)[0] == "pass"


def test_default_policy_requires_membership_inference():
    from audit.core.policy import load_policy

    p = load_policy("default")
    assert p.checks["membership_inference"].required and p.checks["reidentification"].on_inconclusive == "fail"


# ------------------------------------------------------------------ 6. cache poisoning


def test_poisoned_decode_cache_entry_is_not_trusted(case, capsys, tmp_path, monkeypatch):
    """Noise stored under the hash of the planted copy must not hide the copy."""
    from synthgate.cache import DecodeCache
    from synthgate.fsutil import sha256_file

    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("SYNTHGATE_CACHE_DIR", str(cache_dir))
    code, _, _ = _audit(capsys, case, tmp_path / "a", "--json")
    cache = DecodeCache(cache_dir)
    sha = sha256_file(case / "syn" / "zz_copy.png")
    entry = cache._path(sha)
    assert entry.exists()
    noise = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 1), dtype=np.uint8)
    forged = DecodeCache(cache_dir, secret=b"an attacker's guess")
    forged.put(sha, noise)  # the right file name, the wrong key
    audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--policy", str(case / "only_copy.yaml"), "--out",
                           str(tmp_path / "b"), "--json"])
    audit = json.loads(capsys.readouterr().out)
    assert "zz_copy.png" in audit["dropped"], audit["dropped"]
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700"


def test_tampered_reid_network_cache_is_retrained(tmp_path):
    from synthgate.cache import folder_is_sealed, seal_folder

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "network.safetensors").write_bytes(b"weights")
    seal_folder(tmp_path / "net", "re-identification network cache")
    assert folder_is_sealed(tmp_path / "net", "re-identification network cache")
    (tmp_path / "net" / "network.safetensors").write_bytes(b"a network that never matches anyone")
    assert not folder_is_sealed(tmp_path / "net", "re-identification network cache")


# ------------------------------------------------------------------ 7. manifest confinement


def _manifest(case, tmp_path, **entries) -> Path:
    syn = tmp_path / "proj" / "syn"
    shutil.copytree(case / "syn", syn)
    (syn / "manifest.json").write_text(json.dumps(entries))
    return syn


def test_manifest_cannot_send_the_audit_outside_its_tree(case, capsys, tmp_path):
    syn = _manifest(case, tmp_path, training_set={"path": str(case / "p" / "train")})
    code = audit_cli.main(["check", str(syn), "--policy", str(case / "only_copy.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pass --real" in err and len(err.strip().splitlines()) == 1
    syn2 = _manifest(case, tmp_path / "x", training_set={"path": "../../../../.."})
    code = audit_cli.main(["check", str(syn2), "--policy", str(case / "only_copy.yaml"), "--out", str(tmp_path / "o2")])
    assert code == 2 and "outside" in capsys.readouterr().err


def test_manifest_paths_inside_the_tree_are_used(case, tmp_path):
    from audit.core.inputs import resolve_inputs

    syn = _manifest(case, tmp_path, training_set={"path": "../real"})
    shutil.copytree(case / "p" / "train", tmp_path / "proj" / "real")
    assert resolve_inputs(syn).real == (tmp_path / "proj" / "real").resolve()


def test_manifest_model_must_be_a_model_folder(case, capsys, tmp_path):
    syn = _manifest(case, tmp_path, model={"path": "../"})  # the project folder: not a model
    start = time.perf_counter()
    code = audit_cli.main(["check", str(syn), "--real", str(case / "p" / "train"), "--policy",
                           str(case / "only_copy.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "synthgate.json" in err and time.perf_counter() - start < 10, err


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "{not json", '{"model": "x"}', '{"model": {"path": 3}}'])
def test_malformed_manifest_is_exit_2(case, capsys, tmp_path, text):
    syn = tmp_path / "syn"
    shutil.copytree(case / "syn", syn)
    (syn / "manifest.json").write_text(text)
    code = audit_cli.main(["check", str(syn), "--real", str(case / "p" / "train"), "--policy",
                           str(case / "only_copy.yaml"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "manifest.json" in err and "Traceback" not in err


# ------------------------------------------------------------------ 8. contract


def test_audit_json_without_inputs_is_exit_2(tmp_path, capsys):
    from reports import cli as report_cli

    for doc in ([1, 2], {"schema_version": 1, "checks": [], "verdict": "pass", "control": {"passed": True},
                          "inputs": {}}):
        (tmp_path / "a.json").write_text(json.dumps(doc))
        assert report_cli.main([str(tmp_path / "a.json")]) == 2
        err = capsys.readouterr().err
        assert "not an audit.json" in err and len(err.strip().splitlines()) == 1


def test_image_smaller_than_the_copy_grid_is_exit_2(case, capsys, tmp_path):
    tiny = tmp_path / "tiny"
    for i in range(3):
        save_unit_png(tiny / f"t{i}.png", np.full((3, 3), 0.5))
    policy = tmp_path / "p.yaml"
    policy.write_text("name: t\nchecks:\n  copy_detection: {settings: {grid: 4, control_copies: 2}}\n")
    code = audit_cli.main(["check", str(tiny), "--real", str(tiny), "--policy", str(policy), "--out",
                           str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "grid 4" in err and len(err.strip().splitlines()) == 1


def test_control_characters_in_file_names_are_escaped(case, capsys, tmp_path):
    syn = tmp_path / "syn"
    shutil.copytree(case / "syn", syn)
    evil = "evil\n\x1b[2Jname.png"
    shutil.copy(syn / "zz_copy.png", syn / evil)
    code, stdout, err = _audit(capsys, case, tmp_path / "o", synthetic=syn)
    assert code == 0 and "\x1b" not in stdout + err
    dropped = [json.loads(line) for line in (tmp_path / "o" / "dropped.jsonl").read_text().splitlines()]
    assert {evil, "zz_copy.png"} <= {d["image"] for d in dropped}  # one JSON object per line: a newline cannot
    released = [json.loads(line) for line in (tmp_path / "o" / "released.jsonl").read_text().splitlines()]
    assert released and all(len(r["sha256"]) == 64 for r in released)  # split the list or forge an entry
    (syn / evil).write_bytes(b"not an image")  # an error naming the file: escaped, one line
    code, stdout, err = _audit(capsys, case, tmp_path / "o2", synthetic=syn)
    assert code == 2 and "\x1b" not in err and "evil\\n\\x1b[2Jname.png" in err and len(err.strip().splitlines()) == 1


def test_a_reader_library_warning_does_not_precede_the_one_line_error(capsys, tmp_path):
    """Red team: a DICOM whose pixel data holds an extra frame printed pydicom's 4-line UserWarning first."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    from audit.dicom_phi.check import _control_meta
    from generators.write import dicom_bytes

    data = dicom_bytes(np.full((1, 32, 32), 0.5, np.float32), 8, _control_meta(),
                       {k: generate_uid() for k in ("sop", "study", "series")}, 1)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.PixelData * 2
    (tmp_path / "syn").mkdir()
    ds.save_as(tmp_path / "syn" / "a.dcm", enforce_file_format=True)
    # a process of its own: pytest would collect the warning itself, and the test could not fail
    run = subprocess.run([sys.executable, "-c", "import sys; from audit.cli import main; sys.exit(main())", "check",
                          str(tmp_path / "syn"), "--checks", "dicom_phi", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "default"})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "a.dcm" in run.stderr, run.stderr


def test_symlinked_folders_are_listed_as_skipped(tmp_path):
    from synthgate.imageset import ImageSet

    save_unit_png(tmp_path / "set" / "a" / "x.png", np.zeros((8, 8)))
    save_unit_png(tmp_path / "elsewhere" / "y.png", np.zeros((8, 8)))
    os.symlink(tmp_path / "elsewhere", tmp_path / "set" / "outside")
    os.symlink(tmp_path / "set" / "a", tmp_path / "set" / "again")
    s = ImageSet(tmp_path / "set", cache=None)
    reasons = {k.path: k.reason for k in s.skipped}
    assert len(s) == 1 and "outside the set" in reasons["outside/"] and "inside the set" in reasons["again/"]


def test_sigterm_exits_143_and_leaves_no_temporary_files(case, tmp_path):
    """SIGTERM mid-audit: exit 143, no .partial output folder, no synthgate-audit-* temp folder with names."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = ("import sys, time\n"
              "import audit.core.runner as r\n"
              "real = r.run_policy\n"
              "def slow(*a, **k):\n"
              "    print('running', flush=True); time.sleep(60); return real(*a, **k)\n"
              "r.run_policy = slow\n"
              "import audit.api; audit.api.run_policy = slow\n"
              "from audit.cli import main\n"
              f"sys.exit(main(['check', {str(case / 'syn')!r}, '--real', {str(case / 'p' / 'train')!r}, '--policy', "
              f"{str(case / 'only_copy.yaml')!r}, '--out', {str(tmp_path / 'out')!r}]))\n")
    env = {**os.environ, "TMPDIR": str(tmp), "SYNTHGATE_CACHE_DIR": "off"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=Path(__file__).parent.parent, text=True)
    assert proc.stdout.readline().strip() == "running"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated" in err
    assert not [p for p in tmp.iterdir() if p.name.startswith("synthgate")] and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ------------------------------------------------------------------ parsers of untrusted input (property tests)


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=60)
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(_text, c, max_size=4), max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_json | st.dictionaries(st.sampled_from(["schema_version", "inputs", "checks", "verdict", "control",
                                                    "released", "policy"]), _json))
def test_audit_json_reader_never_crashes(doc):
    from audit.record import parse_audit

    try:
        parse_audit(doc, "audit.json")
    except SynthgateError:
        pass


@settings(max_examples=80, deadline=None)
@given(text=_text | st.sampled_from(["name: x\nchecks: {copy_detection: {settings: {grid: [1]}}}",
                                     "name: x\nchecks: {copy_detection: {settings: !!python/object:os.system x}}",
                                     "&a [*a]", "name: x\nchecks:\n  utility: {settings: {epochs: .nan}}"]))
def test_policy_parser_never_crashes(text):
    from audit.core.policy import parse_policy

    try:
        parse_policy(text, "p.yaml")
    except SynthgateError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_json)
def test_manifest_reader_never_crashes(tmp_path_factory, doc):
    from audit.core.inputs import resolve_inputs

    syn = tmp_path_factory.mktemp("m") / "syn"
    syn.mkdir()
    (syn / "manifest.json").write_text(json.dumps(doc))
    try:
        resolve_inputs(syn)
    except SynthgateError:
        pass


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(_text, min_size=1, max_size=5), max_size=5), header=st.lists(_text, max_size=5))
def test_metadata_csv_parser_never_crashes(tmp_path_factory, rows, header):
    import csv

    from synthgate.imageset import ImageSet

    root = tmp_path_factory.mktemp("csv")
    save_unit_png(root / "a.png", np.zeros((4, 4)))
    with open(root / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    try:
        ImageSet(root, cache=None)
    except SynthgateError:
        pass


# ------------------------------------------------------------------ 4. real names never leave in shareable outputs


def test_shareable_report_names_no_real_file_patient_or_path(case, capsys, tmp_path):
    import csv
    import re

    real = tmp_path / "hospital-MRN-tree" / "train"
    real.mkdir(parents=True)
    rows = []
    for i, src in enumerate(sorted((case / "p" / "train").glob("*.png"))):
        name = f"MRN{900100 + i}_chest.png"
        shutil.copy(src, real / name)
        rows.append({"path": name, "patient_id": f"PAT-{7000 + i // 3}", "label": "0"})
    with open(real / "metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "patient_id", "label"])
        w.writeheader()
        w.writerows(rows)
    code, _, _ = _audit(capsys, case, tmp_path / "o", real=real)
    html = (tmp_path / "o" / "report.html").read_text()
    text = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", html)
    doc = json.loads((tmp_path / "o" / "audit.json").read_text())
    assert any("MRN9001" in json.dumps(c) for c in doc["checks"])  # the internal audit.json names them
    for needle in ("MRN9001", "PAT-70", str(real), "hospital-MRN-tree"):
        assert needle not in text, needle
