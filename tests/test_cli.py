"""The umbrella CLI: exit codes, one-line errors, and instant --help."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import pydicom_test_file, write_png
from synthgate import cli


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from synthgate import cli; "
            "rc = [cli.main(a) for a in (['--help'], ['--version'], ['inspect', '--help'], ['train', '--help'], "
            "['sample', '--help'])]; "
            "assert rc == [0, 0, 0, 0, 0], rc; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    for script in ("audit", "release"):
        code = (f"import sys; from {script} import cli; assert cli.main(['--help']) == 0; "
                "assert 'torch' not in sys.modules")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_version(capsys):
    from synthgate import __version__

    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out


def test_phantoms_then_inspect_png_and_dicom(tmp_path, capsys):
    for fmt in ("png", "dicom"):
        code, out, _ = run(capsys, "phantoms", str(tmp_path / fmt), "--format", fmt, "--patients", "4",
                           "--images-per-patient", "3", "--size", "32")
        assert code == 0 and "12" in out
        code, out, err = run(capsys, "inspect", str(tmp_path / fmt / "train"), "--json")
        assert code == 0, err
        summary = json.loads(out)
        assert summary["images"] == 9 and summary["patients"]["count"] == 3
        assert set(summary["labels"]["counts"]) <= {"0", "1"} and summary["labels"]["unlabelled"] == 0
        assert summary["formats"] == {fmt: 9}
        assert "MRN" not in out  # patients counted, never named


def test_inspect_text_output(phantom_dicom, capsys):
    code, out, _ = run(capsys, "inspect", str(phantom_dicom))
    assert code == 0
    assert "MONOCHROME1" in out and "DICOM PatientID" in out and "IDs not shown" in out and "MRN" not in out


def _one_line_error(code, err, name):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err


def test_inspect_corrupt_png(tmp_path, capsys):
    write_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _one_line_error(*run(capsys, "inspect", str(tmp_path))[::2], "bad.png")


def test_inspect_truncated_pixels_found_by_decoding(tmp_path, capsys):
    data = write_png(tmp_path / "a.png", np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)).read_bytes()
    (tmp_path / "a.png").write_bytes(data[:-200])
    _one_line_error(*run(capsys, "inspect", str(tmp_path))[::2], "a.png")


def test_inspect_truncated_dicom(tmp_path, capsys):
    import shutil

    shutil.copy(pydicom_test_file("MR_truncated.dcm"), tmp_path / "MR_truncated.dcm")
    _one_line_error(*run(capsys, "inspect", str(tmp_path))[::2], "MR_truncated.dcm")


def test_inspect_empty_folder(tmp_path, capsys):
    _one_line_error(*run(capsys, "inspect", str(tmp_path))[::2], str(tmp_path))


def test_inspect_skip_unreadable_lists_every_file(tmp_path, capsys):
    write_png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"nope")
    code, out, _ = run(capsys, "inspect", str(tmp_path), "--skip-unreadable", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["images"] == 1
    assert [u["path"] for u in summary["unreadable"]] == ["bad.png"]


@pytest.mark.parametrize("argv,needle", [
    (["inspect"], "required"),
    (["inspect", ".", "--bogus"], "--bogus"),
    (["frobnicate"], "invalid choice"),
    (["phantoms", "x", "--format", "gif"], "invalid choice"),
    (["phantoms", "x", "--size", "big"], "invalid int"),
])
def test_usage_errors_are_one_line_exit_2(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    _one_line_error(code, err, needle)


def test_internal_error_exit_3_with_log(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SYNTHGATE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(cli, "cmd_inspect", lambda args: 1 / 0)
    code, _, err = run(capsys, "inspect", ".")
    assert code == 3 and "internal error" in err and "ZeroDivisionError" in err
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in err


def test_ctrl_c_exit_130(capsys, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_inspect", interrupt)
    code, _, err = run(capsys, "inspect", ".")
    assert code == 130 and "interrupted" in err


def test_console_scripts_installed():
    for script in ("synthgate", "audit", "release"):
        exe = Path(sys.executable).parent / script  # the venv's console script
        out = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
        assert out.returncode == 0 and "0." in out.stdout, script
