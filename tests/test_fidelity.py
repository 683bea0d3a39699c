"""fidelity: SSIM, PRDC, FID/KID/IS and the tests by hand; Inception loading; the check's controls and decisions."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from audit import cli as audit_cli
from audit.core.base import create_check
from audit.core.context import AuditContext
from audit.quality.fidelity import intensity_tests, label_balance
from audit.quality.inception import (fid_inception_v3, frechet_distance, inception_score, kernel_inception_distance,
                                    load_inception)
from audit.quality.prdc import PRDCReference
from audit.quality.ssim import SSIM, gaussian_window, nearest_ssim
from audit.core.stats import benjamini_hochberg
from conftest import assert_golden, write_labelled_set
from synthgate.errors import InputError
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _t(a):
    a = np.asarray(a, np.float64)
    return torch.tensor(a if a.ndim == 3 else a[None])[None]


# ---------------------------------------------------------------------- SSIM


def test_ssim_window_is_wangs():
    g = gaussian_window()
    assert len(g) == 11 and g.sum() == pytest.approx(1.0)
    assert g[5] / g[4] == pytest.approx(np.exp(1 / (2 * 1.5**2)))


def test_ssim_by_hand():
    # constant images: both sigmas and the covariance are 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = np.full((11, 11), 0.3), np.full((11, 11), 0.6)
    c1 = 0.01**2
    assert float(SSIM().paired(_t(a), _t(b))[0]) == pytest.approx((2 * 0.18 + c1) / (0.09 + 0.36 + c1), rel=1e-9)
    # one 11 x 11 window: Gaussian-weighted means, population variances and covariance, written out
    rng = np.random.default_rng(0)
    x, y = rng.random((11, 11)), rng.random((11, 11))
    w = np.outer(gaussian_window(), gaussian_window())
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    c2 = 0.03**2
    hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert float(SSIM().paired(_t(x), _t(y))[0]) == pytest.approx(hand, rel=1e-9)


def _skimage_ssim(a, b):
    """scikit-image's SSIM with Wang et al.'s settings; ``(C, H, W)`` images average over channels."""
    from skimage.metrics import structural_similarity

    return structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 channel_axis=0 if a.ndim == 3 else None)


@pytest.mark.parametrize("shape", [(20, 24), (3, 16, 13), (11, 11)])
def test_ssim_equals_scikit_image_on_random_images(shape):
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(a + rng.normal(0, 0.1, shape), 0, 1)
    got = float(SSIM().paired(_t(a), _t(b))[0])
    assert got == pytest.approx(_skimage_ssim(a, b), abs=1e-12)
    assert float(SSIM().paired(_t(a), _t(a))[0]) == pytest.approx(1.0)
    assert float(SSIM().paired(_t(b), _t(a))[0]) == pytest.approx(got, rel=1e-12)


def _real_images():
    """Real photographs and scans that ship with scikit-image (no download), as float64 in [0, 1]."""
    from skimage import data

    retina = data.retina()[::8, ::8].astype(np.float64).transpose(2, 0, 1) / 255  # (3, 177, 177) fundus
    return {"camera": data.camera()[100:196, 200:328] / 255.0, "moon": data.moon()[:80, :100] / 255.0,
            "retina": retina, "face": data.lfw_subset()[0].astype(np.float64)}


def test_ssim_equals_scikit_image_on_real_images():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(2)
    worst = 0.0
    for name, a in _real_images().items():
        axes = (0, 1.2, 1.2) if a.ndim == 3 else 1.2
        noisy, darker = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1), np.clip(a * 0.8 + 0.1, 0, 1)
        for b in (noisy, gaussian_filter(a, axes), darker):
            worst = max(worst, abs(float(SSIM().paired(_t(a), _t(b))[0]) - _skimage_ssim(a, b)))
    assert worst < 1e-12


def test_nearest_ssim_equals_scikit_image_over_every_pair():
    """The batched float32 search finds scikit-image's best match, at its SSIM (to float32 rounding)."""
    from skimage import data

    faces = data.lfw_subset()[:24].astype(np.float64)  # 24 real faces, 25 x 25
    queries = [0, 5, 17]
    best, arg = nearest_ssim(torch.tensor(faces[:, None]), queries)
    for q, b, j in zip(queries, best, arg):
        ref = [(_skimage_ssim(faces[q], faces[r]), r) for r in range(len(faces)) if r != q]
        assert (b, j) == (pytest.approx(max(ref)[0], abs=1e-5), max(ref)[1])


def test_ssim_matrix_equals_pairs_and_nearest_excludes_self():
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.random((9, 1, 16, 16)))
    x[7] = x[2]  # a duplicate pair
    m = SSIM()
    full = m.matrix(x, x, block_pairs=5)
    pairs = torch.stack([m.paired(x[i:i + 1], x[j:j + 1])[0] for i in range(9) for j in range(9)]).view(9, 9)
    assert torch.allclose(full, pairs, atol=1e-12)
    best, arg = nearest_ssim(x, [0, 2, 7])
    assert arg[1] == 7 and arg[2] == 2 and best[1] == pytest.approx(1.0)
    off = full.clone().fill_diagonal_(-np.inf)
    assert best[0] == pytest.approx(float(off[0].max())) and arg[0] != 0
    with pytest.raises(ValueError, match="11 x 11"):
        m.paired(x[:1, :, :8, :8], x[:1, :, :8, :8])


# ---------------------------------------------------------------------- PRDC


def test_prdc_by_hand(capsys):
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0], [10.5]])
    ref = PRDCReference(real, k=1)
    assert ref.radii.tolist() == [1.0, 1.0, 1.0, 1.0]
    s = ref.score(fake)
    assert s.precision == pytest.approx(1 / 3)  # 0.5 lies in the balls of reals 0 and 1; 10 and 10.5 in none
    assert s.density == pytest.approx(2 / 3)  # (2 + 0 + 0) / (k * M)
    assert s.coverage == 0.5  # reals 0 and 1 hold a fake in their ball
    assert s.recall == 1.0  # the fake 0.5 has radius 9.5: every real lies within it
    assert capsys.readouterr().out == ""  # compute_prdc prints the set sizes; audit --json owns stdout
    assert PRDCReference(np.array([[0.0], [1.0], [3.0], [7.0]]), k=2).radii.tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k \\+ 2"):
        ref.score(fake[:2])  # the authors' package takes the k-th neighbour at index k + 1: k + 2 points needed


def test_prdc_is_the_definition_and_the_bootstrap_counts_what_it_scores():
    """The authors' package against the definitions written out; ``inside`` (the bootstrap's input) agrees."""
    from scipy.spatial.distance import cdist

    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(120, 6)), rng.normal(0.3, 1.2, size=(70, 6))
    fake[:5] = real[:5]  # exact copies: distance 0 to their real point
    k = 3
    ref = PRDCReference(real, k)
    d_rr, d_ff, d_rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real, r_fake = np.sort(d_rr, 1)[:, k], np.sort(d_ff, 1)[:, k]  # column 0 is the point itself
    inside = d_rf < r_real[:, None]
    want = {"precision": inside.any(0).mean(), "recall": (d_rf < r_fake[None, :]).any(1).mean(),
            "density": inside.sum(0).mean() / k, "coverage": inside.any(1).mean()}
    got = ref.score(fake).as_dict()
    assert max(abs(got[m] - want[m]) for m in want) < 1e-12
    assert np.abs(ref.radii - r_real).max() < 1e-9
    assert np.array_equal(ref.inside(fake), inside)
    boot = ref.bootstrap(fake, 50, rng)
    assert boot["precision"].mean() == pytest.approx(want["precision"], abs=0.1)


def test_prdc_identical_distributions_and_collapse():
    rng = np.random.default_rng(0)
    ref = PRDCReference(rng.normal(size=(400, 8)), k=5)
    same = ref.score(rng.normal(size=(400, 8)))
    collapsed = ref.score(rng.normal(size=(1, 8)).repeat(400, 0) + rng.normal(0, 0.01, (400, 8)))
    assert 0.8 < same.density < 1.2 and same.coverage > 0.9
    assert collapsed.coverage < 0.1
    boot = ref.bootstrap(rng.normal(size=(400, 8)), 200, rng)
    assert set(boot) == {"precision", "density"} and boot["density"].shape == (200,)


# -------------------------------------------------------------- FID/KID/IS


def test_frechet_distance_by_hand():
    a = np.array([[1.0, 0], [-1, 0], [0, 2], [0, -2]])  # mean 0, covariance diag(2/3, 8/3)
    b = 2 * a + 1  # mean (1, 1), covariance 4x
    # |mu|^2 + tr(S + 4S - 2 * 2S) = 2 + tr(S) = 2 + 10/3
    assert frechet_distance(a, b) == pytest.approx(2 + 10 / 3, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    x = np.random.default_rng(0).normal(size=(50, 1))
    y = 3 * x + 2  # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(x, y) == pytest.approx((x.mean() - y.mean()) ** 2 + (x.std(ddof=1) - y.std(ddof=1)) ** 2)


@pytest.mark.parametrize("n,d", [(60, 8), (12, 40)])
def test_frechet_distance_equals_the_sqrtm_formula(n, d):
    """The exact trace form agrees with the textbook ``sqrtm`` both with more and with fewer images than dims."""
    from scipy import linalg

    rng = np.random.default_rng(n)
    a, b = rng.normal(size=(n, d)), rng.normal(0.5, 2.0, size=(n + 3, d))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 3)), rng.normal(1, 1, size=(6, 3))
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    yy = sum(k(y[i], y[j]) for i in range(6) for j in range(6) if i != j) / 30
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(6)) / 36
    # one subset of all 6: torchmetrics' poly_mmd on a permutation of both sets, which MMD^2 does not see
    assert kernel_inception_distance(x, y, subsets=1, subset_size=6)[0] == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    same = kernel_inception_distance(rng.normal(size=(300, 4)), rng.normal(size=(300, 4)), subsets=20,
                                     subset_size=100, rng=rng)
    apart = kernel_inception_distance(rng.normal(size=(300, 4)), rng.normal(1, 1, size=(300, 4)), subsets=20,
                                      subset_size=100, rng=rng)
    assert abs(same[0]) < 0.05 < apart[0] and same[2] == 100


class _Features(torch.nn.Module):
    """A "feature extractor" that returns its input: torchmetrics' metrics then see our features as they are."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


@pytest.mark.parametrize("n", [30, 300])
def test_fid_equals_torchmetrics(n):
    """torchmetrics' FID (eigenvalues of the d x d covariance product) agrees with ours (nuclear norm / eigh).

    Kept ours: at d = 2048 and fewer images than dimensions (an audit's usual
    case) torchmetrics' general eigensolver takes seconds per FID (bench/field_libraries.py).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(n)
    mix = rng.normal(size=(16, 64))
    a = np.abs(rng.normal(size=(n, 16)) @ mix)
    b = np.abs(rng.normal(0.3, 1.0, size=(n + 7, 16)) @ mix)
    fid = FrechetInceptionDistance(feature=_Features(64))
    fid.update(torch.from_numpy(a), real=True)
    fid.update(torch.from_numpy(b), real=False)
    assert frechet_distance(a, b) == pytest.approx(float(fid.compute()), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save")
def test_inception_score_is_torchmetrics_without_its_shuffle_and_sample_sd():
    """Same splits (torchmetrics shuffles first) give the same mean; its sd is the sample sd (ddof 1), ours ddof 0."""
    from torchmetrics.image.inception import InceptionScore

    logits = torch.from_numpy(np.random.default_rng(3).normal(0, 3, size=(60, 10)))
    metric = InceptionScore(feature=_Features(10), splits=6)
    metric.update(logits)
    torch.manual_seed(11)
    perm = torch.randperm(60)
    torch.manual_seed(11)
    tm_mean, tm_sd = (float(v) for v in metric.compute())
    mean, sd, splits = inception_score(logits[perm].numpy(), splits=6)
    assert splits == 6 and mean == pytest.approx(tm_mean, rel=1e-9)
    assert sd * np.sqrt(6 / 5) == pytest.approx(tm_sd, rel=1e-9)


def test_inception_score_by_hand():
    assert inception_score(np.zeros((8, 5)), splits=2)[0] == pytest.approx(1.0)  # uniform predictions
    sharp = np.eye(4) * 50.0  # four confident, distinct predictions; 2 splits of 2 -> exp(log 2) = 2
    mean, sd, splits = inception_score(sharp, splits=10)
    assert (splits, mean, sd) == (2, pytest.approx(2.0), pytest.approx(0.0, abs=1e-9))


def test_fid_blocks_pool_like_tensorflow():
    """The FID network's blocks differ from torchvision's only where padding enters the pooling: the border."""
    from torchvision.models import inception as tv

    from audit.quality.inception import _fid_blocks

    block_a, _, _, _ = _fid_blocks()
    torch.manual_seed(0)
    theirs = tv.InceptionA(192, 32).eval()
    ours = block_a(192, 32).eval()
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(1, 192, 6, 6)
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-6)
    assert not torch.allclose(a[..., 0, :], b[..., 0, :], atol=1e-4)


@pytest.fixture(scope="module")
def inception_files(tmp_path_factory):
    """Randomly initialised Inception-v3 weights in both accepted layouts (real architectures, tiny use)."""
    import torchvision

    root = tmp_path_factory.mktemp("inception")
    torch.manual_seed(0)
    tf = root / "pt_inception_random.pth"
    torch.save(fid_inception_v3().state_dict(), tf)
    tv = root / "inception_v3_random.pth"
    torch.save(torchvision.models.inception_v3(weights=None, init_weights=False, aux_logits=True).state_dict(), tv)
    return {"tf": tf, "tv": tv}


def test_load_inception_both_layouts(inception_files, tmp_path):
    x = torch.rand(2, 1, 32, 32)
    for key, kind in (("tf", "tf_fid"), ("tv", "torchvision")):
        net = load_inception(inception_files[key])
        assert net.kind == kind
        feats, logits = net.outputs(x)
        assert feats.shape == (2, 2048) and logits.shape == (2, 1008 if key == "tf" else 1000)
    assert "NOT comparable" in load_inception(inception_files["tv"]).comparable
    wrong = tmp_path / "resnet.pth"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(InputError, match="Inception-v3") as exc:
        load_inception(wrong)
    assert str(wrong) in str(exc.value)


# --------------------------------------------------------- tests and balance


def test_intensity_tests_flag_only_large_differences():
    from scipy import stats

    rng = np.random.default_rng(0)
    real = torch.tensor(rng.normal(0.5, 0.05, (120, 1, 1, 1)).clip(0, 1)).expand(-1, 1, 4, 4).clone()
    syn = real.clone()
    labels_r = ["a"] * 60 + ["b"] * 60
    syn[60:] += 0.1  # class b is brighter in the synthetic set
    res = intensity_tests(real, syn, labels_r, labels_r, alpha=0.05, min_effect=0.5)
    mean_tests = {t["class"]: t for t in res["tests"] if t["statistic"] == "mean_intensity"}
    assert not mean_tests["a"]["flag"] and mean_tests["b"]["flag"]
    assert mean_tests["b"]["cohens_d"] > 1.5
    a, b = syn[60:].flatten(1).mean(1).numpy(), real[60:].flatten(1).mean(1).numpy()
    expected = stats.ttest_ind(a, b, equal_var=False).pvalue if mean_tests["b"]["test"] == "welch_t" else \
        stats.mannwhitneyu(a, b, alternative="two-sided").pvalue
    assert mean_tests["b"]["p"] == pytest.approx(expected)
    ps = [t["p"] if t["p"] is not None else np.nan for t in res["tests"]]
    assert [t["q"] for t in res["tests"]] == pytest.approx(benjamini_hochberg(ps).tolist(), nan_ok=True)


def _set(counts: dict):
    records = [SimpleNamespace(label=c) for c, n in counts.items() for _ in range(n)]
    return SimpleNamespace(records=records, has_labels=True, classes=sorted(c for c, n in counts.items() if n))


def test_label_balance_missing_rare_and_test():
    from scipy import stats

    res = label_balance(_set({"a": 50, "b": 40, "c": 10}), _set({"a": 70, "b": 30}), min_ratio=0.5)
    assert res["fails"] == ["class c (10 real images) is missing from the synthetic set"]
    table = np.array([[50, 40, 10], [70, 30, 0]])
    assert res["test"]["p"] == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue)
    rare = label_balance(_set({"a": 50, "b": 50}), _set({"a": 90, "b": 10}), min_ratio=0.5)
    assert not rare["fails"] and "under-represented" in rare["warns"][0]
    small = label_balance(_set({"a": 6, "b": 4}), _set({"a": 3, "b": 7}), min_ratio=0.5)
    assert small["test"]["test"] == "fisher_exact"
    assert small["test"]["p"] == pytest.approx(stats.fisher_exact([[6, 4], [3, 7]]).pvalue)


# ------------------------------------------------------------------ the check


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    write_phantoms(root / "real", patients=40, images_per_patient=6, size=32, seed=0)
    imgs, _ = generate(patients=40, images_per_patient=6, size=32, seed=1, holdout_fraction=0)
    write_labelled_set(root / "good", [i.pixels for i in imgs], [i.label for i in imgs])
    rng = np.random.default_rng(0)
    few = [imgs[j].pixels for j in (0, 1, 2)]
    collapsed = [np.clip(few[j % 3] + rng.normal(0, 0.01, few[0].shape), 0, 1) for j in range(180)]
    write_labelled_set(root / "collapsed", collapsed, [imgs[j % 3].label for j in range(180)])
    zeros = [i for i in imgs if i.label == 0]
    write_labelled_set(root / "one_class", [i.pixels for i in zeros], [0] * len(zeros))
    return root


def _fidelity(sets, synthetic, holdout=False, **params):
    ctx = AuditContext(synthetic=ImageSet(sets / synthetic), real=ImageSet(sets / "real" / "train"),
                       holdout=ImageSet(sets / "real" / "holdout") if holdout else None, device="cpu", seed=0)
    return create_check("fidelity", **{"ssim_queries": 40, **params}).run(ctx)


def test_independent_phantoms_pass(sets):
    r = _fidelity(sets, "good", holdout=True)
    assert r.status in ("pass", "warn"), r.reason
    assert all(c.passed for c in r.controls), [c.detail for c in r.controls]
    prdc = r.metrics["prdc"]
    assert prdc["synthetic"]["ratio_to_baseline"]["coverage"] > 0.5
    assert r.metrics["inception"]["computed"] is False
    assert set(r.metrics["inception"]["absent"]) == {"fid", "kid", "inception_score"}
    assert "never with a substitute network" in r.metrics["inception"]["absent"]["fid"]
    assert "fid" not in r.metrics["inception"]
    json.dumps(r.to_dict())


def test_deterministic_given_seed(sets):
    a, b = _fidelity(sets, "good", ssim_queries=10), _fidelity(sets, "good", ssim_queries=10)
    assert a.to_dict()["metrics"] == b.to_dict()["metrics"]
    # golden numbers (seed 0; identical with 1 and 2 torch threads); rel 1e-5: float32 random-CNN features
    m = a.metrics
    assert_golden({"coverage": m["prdc"]["synthetic"]["coverage"].value,
                   "precision": m["prdc"]["synthetic"]["precision"].value,
                   "density": m["prdc"]["synthetic"]["density"].value,
                   "baseline coverage": m["prdc"]["baseline"]["coverage"],
                   "ssim synthetic median": m["nearest_ssim"]["synthetic"]["median"],
                   "ssim real median": m["nearest_ssim"]["real"]["median"]},
                  {"coverage": 0.7888888888888889, "precision": 1.0, "density": 1.0714285714285714,
                   "baseline coverage": 0.8222222222222222, "ssim synthetic median": 0.7484709620475769,
                   "ssim real median": 0.7376680970191956}, rel=1e-5)


def test_mode_collapse_fails(sets):
    r = _fidelity(sets, "collapsed")
    assert r.status == "fail" and "coverage" in r.reason, r.reason
    ns = r.metrics["nearest_ssim"]
    assert ns["synthetic"]["median"] > ns["real"]["median"] + 0.1
    assert "more alike" in r.reason


def test_missing_class_fails(sets):
    r = _fidelity(sets, "one_class")
    assert r.status == "fail" and "class 1" in r.reason and "missing" in r.reason


def test_positive_control_failure_is_an_error(sets):
    # with a coverage rule that nothing can fail, the planted collapse is not caught: the audit is invalid
    r = _fidelity(sets, "good", min_coverage_ratio=0.0)
    assert r.status == "error" and not r.controls[0].passed


def test_fid_kid_is_with_local_weights(sets, inception_files):
    r = _fidelity(sets, "good", inception_weights=str(inception_files["tf"]), max_images=12, kid_subset_size=10,
                  kid_subsets=5, nearest_k=2)
    inc = r.metrics["inception"]
    assert inc["computed"] and inc["network"] == "tf_fid" and "comparable with published" in inc["comparability"]
    assert inc["fid"] >= 0 and inc["fid_real_halves"] >= 0
    assert inc["kid"].n == 10 and inc["inception_score"].value >= 1.0


def test_cli_writes_csv_and_reason(sets, tmp_path):
    out = tmp_path / "audit"
    code = audit_cli.main(["check", str(sets / "good"), "--real", str(sets / "real" / "train"), "--checks", "fidelity",
                           "--param", "fidelity.ssim_queries=20", "--out", str(out), "--device", "cpu"])
    audit = json.loads((out / "audit.json").read_text())
    assert code == (0 if audit["verdict"] == "pass" else 1)
    check = audit["checks"][0]
    assert check["metrics"]["inception"]["absent"]["fid"].startswith("not computed")
    with open(out / "fidelity.csv") as fh:
        sections = {r["section"] for r in csv.DictReader(fh)}
    assert {"label_balance", "intensity", "nearest_ssim", "prdc"} <= sections


def test_too_few_images_is_inconclusive_not_a_pass(tmp_path):
    imgs, _ = generate(patients=2, images_per_patient=4, size=32, seed=3, holdout_fraction=0)
    real = write_labelled_set(tmp_path / "real", [i.pixels for i in imgs], [i.label for i in imgs],
                              [i.patient_id for i in imgs])
    ctx = AuditContext(synthetic=ImageSet(real), real=ImageSet(real), device="cpu")
    r = create_check("fidelity").run(ctx)
    assert r.status == "inconclusive" and "too few images" in r.reason and r.controls == ()
