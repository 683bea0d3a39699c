"""synthgate.signing: installation keys, canonical JSON, signatures that catch every edit."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from synthgate import signing
from synthgate.errors import ConfigError, MissingInputError


def test_installation_key_is_created_once_private_and_stable(tmp_path):
    path = signing.default_key_path()
    assert not path.exists() and signing.installation_public_key() is None
    key = signing.load_signing_key()
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.load_signing_key().fingerprint == key.fingerprint == signing.installation_public_key().fingerprint
    assert "PRIVATE" not in repr(key) and key.public.b64 not in repr(key._private)
    with pytest.raises(FileExistsError):  # O_EXCL: never two keys at one path
        signing.write_new_key(path)


def test_key_file_others_can_read_is_refused(tmp_path, monkeypatch):
    key = signing.write_new_key(tmp_path / "hospital.pem")
    monkeypatch.setenv("SYNTHGATE_KEY", str(tmp_path / "hospital.pem"))
    assert signing.load_signing_key().fingerprint == key.fingerprint
    os.chmod(tmp_path / "hospital.pem", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        signing.load_signing_key()
    monkeypatch.setenv("SYNTHGATE_KEY", str(tmp_path / "typo.pem"))
    with pytest.raises(MissingInputError):  # a named key is never created silently
        signing.load_signing_key()


def test_signature_covers_every_field_and_survives_the_json_round_trip():
    key = signing.SigningKey.generate()
    doc = {"verdict": "pass", "n": np.int64(3), "x": np.float32(0.1), "t": (1, 2), "nested": {"b": 1, "a": [None]},
           "name": "é\u2028"}
    signed = signing.sign_document(doc, key)
    back = json.loads(json.dumps(signed, indent=2))
    assert signing.verify_document(back).fingerprint == key.fingerprint
    assert signed["signature"]["fingerprint"] == key.fingerprint and "value" in signed["signature"]
    for edit in ({"verdict": "fail"}, {"n": 4}, {"nested": {"b": 1, "a": [0]}}, {"extra": 1}):
        with pytest.raises(signing.SignatureError, match="does not verify"):
            signing.verify_document({**back, **edit})
    with pytest.raises(signing.SignatureError, match="not signed"):
        signing.verify_document({k: v for k, v in back.items() if k != "signature"})
    other = signing.SigningKey.generate()  # swapping in another key's public half breaks the fingerprint check
    forged = {**back, "signature": {**back["signature"], "public_key": other.public.b64}}
    with pytest.raises(signing.SignatureError):
        signing.verify_document(forged)
    resigned = signing.sign_document({**back, "verdict": "fail"}, other)  # valid, but by another key
    assert signing.verify_document(resigned).fingerprint == other.fingerprint != key.fingerprint


def test_public_key_files_and_fingerprints(tmp_path):
    key = signing.SigningKey.generate()
    (tmp_path / "pub.pem").write_text(key.public.pem())
    (tmp_path / "pub.b64").write_text(key.public.b64 + "\n")
    assert signing.trusted_key(str(tmp_path / "pub.pem")) == key.fingerprint
    assert signing.PublicKey.read(tmp_path / "pub.b64") == key.public
    colons = ":".join(key.fingerprint[i:i + 2] for i in range(0, 64, 2)).upper()
    assert signing.trusted_key(colons) == key.fingerprint
    with pytest.raises(MissingInputError):
        signing.trusted_key(key.fingerprint[:16])  # a prefix is not a fingerprint
    signing.write_new_key(tmp_path / "priv.pem")
    with pytest.raises(Exception, match="private key"):
        signing.PublicKey.read(tmp_path / "priv.pem")
