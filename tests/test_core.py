"""Core helpers: atomic outputs, hashing, salted IDs, device choice."""
from __future__ import annotations


import pytest

from synthgate import privacy
from synthgate.device import resolve_device
from synthgate.errors import ConfigError, UsageError
from synthgate.fsutil import atomic_directory, atomic_write_json, digest_pairs, sha256_file


def test_atomic_directory_appears_whole_or_not_at_all(tmp_path):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "a.txt").read_text() == "x"
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out2") as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("interrupted")
    assert not (tmp_path / "out2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial leftovers
    with pytest.raises(UsageError, match="already exists"):
        with atomic_directory(tmp_path / "out"):
            pass
    with atomic_directory(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("y")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt"]


def test_atomic_write_json_and_hashes(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    assert (tmp_path / "x.json").read_text() == '{\n  "a": 1\n}\n'
    assert sha256_file(tmp_path / "x.json") == sha256_file(tmp_path / "x.json")
    assert digest_pairs([("b", "2"), ("a", "1")]) == digest_pairs([("a", "1"), ("b", "2")])
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_salted_ids(monkeypatch, tmp_path):
    a = privacy.hash_id("MRN1234567")
    assert a.startswith("pt-") and "1234567" not in a and a == privacy.hash_id("MRN1234567")
    monkeypatch.setenv("SYNTHGATE_SALT", "other")
    assert privacy.hash_id("MRN1234567") != a  # a different key, a different hash


def test_salt_file_created_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv("SYNTHGATE_SALT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    first = privacy.get_salt()
    path = tmp_path / "synthgate" / "salt"
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600" and len(first) == 32
    assert privacy.get_salt() == first
    path.write_text("not hex")
    with pytest.raises(ConfigError, match="damaged"):
        privacy.get_salt()


def test_device_choice(monkeypatch):
    import torch

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")
    monkeypatch.setenv("SYNTHGATE_DEVICE", "cpu")
    assert resolve_device(None).type == "cpu"


@pytest.fixture(scope="module")
def module_env():
    import os

    return {k: os.environ.get(k) for k in ("SYNTHGATE_CACHE_DIR", "SYNTHGATE_SALT", "SYNTHGATE_LOG_DIR",
                                             "XDG_CONFIG_HOME")}


def test_module_scoped_fixtures_run_isolated(module_env, tmp_path_factory):
    """Module fixtures (trained networks, audits) must not see the developer's cache, salt or logs."""
    base = str(tmp_path_factory.getbasetemp())
    assert module_env["SYNTHGATE_SALT"] == "test-salt"
    for key in ("SYNTHGATE_CACHE_DIR", "SYNTHGATE_LOG_DIR", "XDG_CONFIG_HOME"):
        assert module_env[key] and module_env[key].startswith(base), (key, module_env[key])
