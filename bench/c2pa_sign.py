"""Benchmark: C2PA signing and validation vs encoding the same image with Pillow, same data, same run.

For a real image (skimage's 1411 x 1411 RGB retina) as PNG and JPEG, and for
pydicom's CT_small.dcm: the time to sign (:func:`sign_image`, which also
decodes before and after to prove the pixels unchanged, or
:func:`sign_detached`) and to validate (:func:`read_credentials`), as ratios
to a baseline measured in the same run (Pillow encoding the image; SHA-256
of the DICOM file), the bytes the manifest adds, and whether validation
holds.  Best of ``--repeat`` runs.

    .venv/bin/python bench/c2pa_sign.py
    .venv/bin/python bench/c2pa_sign.py --repeat 5 --alg ps256
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthgate import c2pa_credentials as cc

RELEASE = {"model_sha256": "a" * 64, "audit_sha256": "b" * 64, "verdict": "pass"}


def best(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--alg", default="es256", choices=["es256", "es384", "ps256", "ed25519"])
    args = parser.parse_args(argv)

    import pydicom.data
    from PIL import Image
    from skimage import data

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        chain = cc.make_test_chain(tmp, alg=args.alg)
        image = data.retina()
        for fmt in ("png", "jpeg"):
            def encode(fmt=fmt):
                buf = io.BytesIO()
                Image.fromarray(image).save(buf, fmt.upper(), quality=90)
                return buf.getvalue()

            t_base, src = best(encode, args.repeat)
            t_sign, signed = best(lambda src=src, fmt=fmt: cc.sign_image(src, fmt, chain=chain.chain, key=chain.key,
                                                                          assertion=RELEASE), args.repeat)
            t_read, cred = best(lambda signed=signed, fmt=fmt: cc.read_credentials(signed, fmt,
                                                                                   trust_anchors=chain.anchors),
                                args.repeat)
            rows.append({"file": f"retina.{fmt}", "bytes": len(src), "added_bytes": len(signed) - len(src),
                         "baseline": "Pillow encode", "baseline_s": round(t_base, 4),
                         "sign_s": round(t_sign, 4), "sign_ratio": round(t_sign / t_base, 3),
                         "verify_s": round(t_read, 4), "verify_ratio": round(t_read / t_base, 3), "valid": cred.valid})
        dcm = Path(pydicom.data.get_testdata_file("CT_small.dcm", download=False)).read_bytes()
        t_base, _ = best(lambda: hashlib.sha256(dcm).hexdigest(), args.repeat)
        t_sign, store = best(lambda: cc.sign_detached(dcm, chain=chain.chain, key=chain.key, assertion=RELEASE),
                             args.repeat)
        t_read, cred = best(lambda: cc.read_credentials(dcm, "dicom", detached=store, trust_anchors=chain.anchors),
                            args.repeat)
        rows.append({"file": "CT_small.dcm", "bytes": len(dcm), "sidecar_bytes": len(store), "baseline": "SHA-256",
                     "baseline_s": round(t_base, 6), "sign_s": round(t_sign, 4), "sign_ratio": round(t_sign / t_base, 1),
                     "verify_s": round(t_read, 4), "verify_ratio": round(t_read / t_base, 1), "valid": cred.valid})
    print(json.dumps({"alg": args.alg, "repeat": args.repeat, "rows": rows}, indent=1))
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
