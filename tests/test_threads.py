"""Torch's CPU thread count: the idle cores by default, --threads / SYNTHGATE_THREADS when given; passive OpenMP."""
from __future__ import annotations

import os

import pytest

from synthgate import clikit
from synthgate.device import default_threads, set_threads


@pytest.mark.parametrize("cores, load, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.4, 1), (2, 5.8, 1), (16, 3.2, 13), (1, 0.0, 1), (4, 9.0, 1),
])
def test_default_is_the_idle_cores(cores, load, expected):
    assert default_threads(cores, load) == expected


@pytest.fixture
def restore_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_precedence(monkeypatch, restore_threads):
    import torch

    monkeypatch.setenv("SYNTHGATE_THREADS", "1")
    assert set_threads(None) == 1
    assert set_threads(1) == 1
    monkeypatch.delenv("SYNTHGATE_THREADS")
    torch.set_num_threads(2)
    monkeypatch.setattr("synthgate.device.default_threads", lambda: 1)
    assert set_threads(None) == 1  # a busy machine: one thread, not torch's two
    monkeypatch.setattr("synthgate.device.default_threads", lambda: 64)
    assert set_threads(None) == 1  # never more than torch's own default (here the 1 in force)
    for bad in ("0", "two"):
        monkeypatch.setenv("SYNTHGATE_THREADS", bad)
        with pytest.raises(Exception, match="--threads"):
            set_threads(None)


def test_cli_entry_sets_passive_waiting(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert clikit.run(lambda argv: 0, [], "x") == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a choice the user made is kept
    clikit.run(lambda argv: 0, [], "x")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_audit_check_takes_threads(tmp_path, capsys, restore_threads):
    from audit import cli as audit_cli

    assert audit_cli.main(["check", str(tmp_path / "syn"), "--threads", "0"]) == 2
    assert "--threads 0 must be at least 1" in capsys.readouterr().err
    assert "--threads N" in audit_cli.build_parser("audit")._subparsers._group_actions[0].choices["check"].format_help()
