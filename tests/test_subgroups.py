"""Results per subgroup: copies planted only in one small subgroup are found there, where the overall rate hides
them, and a per-subgroup limit fails the audit on the worst subgroup."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from audit import cli as audit_cli
from conftest import save_unit_png
from synthgate.phantoms import generate, write_phantoms

POLICY = """name: subgroups
max_drop_fraction: 0.5
checks:
  copy_detection: {action: drop, settings: {control_copies: 6}}
subgroups:
  columns: [sex, age, label]
  bins: {age: [0, 50, 70, 120]}
  min_size: 4
  limits: {copy_rate: %s}
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("subgroups")
    write_phantoms(root / "p", patients=48, images_per_patient=3, size=32, seed=61, holdout_fraction=0.3)
    rows = list(csv.DictReader(open(root / "p" / "train" / "metadata.csv")))
    old = [r for r in rows if int(r["age"]) >= 70]
    assert 6 <= len(old) < len(rows) / 2, len(old)  # a small subgroup
    novel, _ = generate(patients=20, images_per_patient=2, size=32, seed=62)
    for i, im in enumerate(novel[:34]):
        save_unit_png(root / "syn" / f"n{i:02d}.png", im.pixels)
    rng = np.random.default_rng(0)
    for j, r in enumerate(old[:6]):  # copies of the oldest patients' images only
        x = np.asarray(Image.open(root / "p" / "train" / r["path"]), np.float64) / 255
        save_unit_png(root / "syn" / f"c{j}.png", x + rng.normal(0, 0.01, x.shape))
    return root


def _audit(case, tmp_path, capsys, limit="null"):
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY % limit)
    code = audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                           str(case / "p" / "holdout"), "--policy", str(policy), "--out", str(tmp_path / "o"),
                           "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_subgroup_table_finds_copies_the_overall_rate_hides(case, capsys, tmp_path):
    code, audit = _audit(case, tmp_path, capsys)
    overall = len(audit["dropped"]) / audit["inputs"]["synthetic"]["n_images"]
    table = audit["subgroups"]["table"]
    old = table["age"]["70-120"]["copy"]
    assert old["resolved"] and old["rate"]["value"] >= 0.4, old
    assert overall < 0.25 and old["rate"]["value"] > 2 * overall
    young = table["age"]["0-50"]["copy"]
    assert young["flagged"] <= 1
    comp = table["sex"]
    assert sum(v["composition"]["training"] for v in comp.values()) == audit["inputs"]["real"]["n_images"]
    assert code == 0 and audit["verdict"] == "pass"  # no per-subgroup limit: reported, not judged
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Results per subgroup" in html and "age=70-120" in html and html.count("subgroup plot") >= 1


def test_per_subgroup_limit_fails_on_the_worst_subgroup(case, capsys, tmp_path):
    code, audit = _audit(case, tmp_path, capsys, limit="0.1")
    assert code == 1 and audit["verdict"] == "fail"
    worst = audit["subgroups"]["exceeded"][0]
    assert worst["column"] == "age" and worst["value"] == "70-120" and worst["limit"] == "copy_rate"
    assert any("subgroup age=70-120" in r for r in audit["verdict_reasons"])


def test_small_subgroups_are_named_too_small(case, capsys, tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text((POLICY % "null").replace("min_size: 4", "min_size: 1000"))
    audit_cli.main(["check", str(case / "syn"), "--real", str(case / "p" / "train"), "--holdout",
                    str(case / "p" / "holdout"), "--policy", str(policy), "--out", str(tmp_path / "o"), "--json"])
    audit = json.loads(capsys.readouterr().out)
    row = audit["subgroups"]["table"]["sex"]["F"]["copy"]
    assert row["resolved"] is False and "too small to resolve" in row["note"] and row["rate"] is None


def test_subgroups_block_is_validated(tmp_path, capsys):
    for text, needle in (("subgroups: {columns: []}", "subgroups.columns"),
                         ("subgroups: {columns: [age], bins: {age: [50, 10]}}", "increasing"),
                         ("subgroups: {columns: [age], limits: {copy_rte: 0.1}}", "subgroups.limits")):
        path = tmp_path / "p.yaml"
        path.write_text(f"name: x\nchecks: {{copy_detection: {{}}}}\n{text}\n")
        assert audit_cli.main(["validate-policy", str(path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
