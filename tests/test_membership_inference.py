"""membership_inference: statistics, each attack's score on hand-made inputs, controls, both scenarios, CLI, bad inputs."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import norm

from audit import cli as audit_cli
from audit.core.base import create_check
from audit.core.context import AuditContext
from audit.membership_inference.design import group_split
from audit.membership_inference.statistics import RocMetrics, exceeded, roc_metrics, strength
from audit.membership_inference.model_attacks import (centre_crop_resize, ddim_step, fluctuation_scores, loss_scores,
                                                      mirror_neighbours, pfami_scores, pia_scores, secmi_scores,
                                                      sima_scores)
from audit.membership_inference.synthetic_attacks import (RandomConvFeatures, density_ratio_scores, loo_bandwidth,
                                                          nearest_distance, nearest_rms, pca_basis)
from audit.core.stats import bootstrap_roc, percentile_ci, roc_auc, tpr_at_fpr
from synthgate.imageset import ImageSet
from synthgate.phantoms import generate, write_phantoms
from conftest import assert_golden, save_unit_png


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mia-cache")


@pytest.fixture(autouse=True)
def _cache(shared_cache, monkeypatch):
    # the overfit control model is trained once per module, then read from this cache
    monkeypatch.setenv("SYNTHGATE_CACHE_DIR", str(shared_cache))


# ------------------------------------------------------------------ statistics


def test_bootstrap_replicates_equal_direct_resampling():
    rng = np.random.default_rng(0)
    for trial in range(12):
        n1, n0 = int(rng.integers(1, 40)), int(rng.integers(1, 250))
        pos, neg = np.round(rng.normal(0.5, 1, n1), 1), np.round(rng.normal(0, 1, n0), 1)  # with ties
        reps = bootstrap_roc(pos, neg, (0.01, 0.1, 0.5), n_boot=15, rng=np.random.default_rng(trial))
        r = np.random.default_rng(trial)  # the same multinomial weights, applied by hand
        wp = r.multinomial(n1, np.full(n1, 1 / n1), size=15)
        wn = r.multinomial(n0, np.full(n0, 1 / n0), size=15)
        for b in range(15):
            p, n = np.repeat(np.sort(pos), wp[b]), np.repeat(np.sort(neg), wn[b])
            s, y = np.r_[p, n], np.r_[np.ones(len(p)), np.zeros(len(n))]
            assert reps["auc"][b] == pytest.approx(roc_auc(s, y), abs=1e-12)
            for f in (0.01, 0.1, 0.5):
                assert reps[f][b] == pytest.approx(tpr_at_fpr(s, y, f), abs=1e-12)


def test_cluster_bootstrap_resamples_whole_groups():
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0.3, 1, 60), rng.normal(0, 1, 60)
    # unique groups: the same replicates as the per-image bootstrap
    a = bootstrap_roc(pos, neg, (0.1,), n_boot=50, rng=np.random.default_rng(1))
    b = bootstrap_roc(pos, neg, (0.1,), n_boot=50, rng=np.random.default_rng(1), pos_groups=range(60),
                      neg_groups=range(60))
    assert np.allclose(a["auc"], b["auc"]) and np.allclose(a[0.1], b[0.1])
    # 6 patients with 10 identical-score images each: the interval must reflect 6 units, not 60
    pos_c, neg_c = np.repeat(rng.normal(0.3, 1, 6), 10), np.repeat(rng.normal(0, 1, 6), 10)
    groups = np.repeat(np.arange(6), 10)
    wide = percentile_ci(bootstrap_roc(pos_c, neg_c, n_boot=400, rng=rng, pos_groups=groups,
                                             neg_groups=groups)["auc"])
    narrow = percentile_ci(bootstrap_roc(pos_c, neg_c, n_boot=400, rng=rng)["auc"])
    assert wide[1] - wide[0] > 2 * (narrow[1] - narrow[0])


def test_intervals_cover_the_truth_in_simulation():
    """Two Gaussians 1 SD apart: AUC = Phi(1 / sqrt 2), TPR at 10% FPR = 1 - Phi(z_0.9 - 1)."""
    rng = np.random.default_rng(0)
    auc_true, tpr_true = norm.cdf(1 / np.sqrt(2)), 1 - norm.cdf(norm.ppf(0.9) - 1)
    hits_auc = hits_tpr = 0
    for _ in range(100):
        reps = bootstrap_roc(rng.normal(1, 1, 100), rng.normal(0, 1, 100), (0.1,), n_boot=400, rng=rng)
        lo, hi = percentile_ci(reps["auc"])
        hits_auc += lo <= auc_true <= hi
        lo, hi = percentile_ci(reps[0.1])
        hits_tpr += lo <= tpr_true <= hi
    assert hits_auc >= 88 and hits_tpr >= 88, (hits_auc, hits_tpr)


def test_unresolvable_tpr_is_said_so_with_the_count_needed():
    rng = np.random.default_rng(1)
    y = np.r_[np.ones(50), np.zeros(50)]
    m = roc_metrics(np.r_[rng.normal(2, 1, 50), rng.normal(0, 1, 50)], y, n_boot=200, rng=rng)
    est = m.estimates()
    assert est["tpr_at_1pct_fpr"].value is None and "needs at least 100" in est["tpr_at_1pct_fpr"].note
    assert "needs at least 1,000" in est["tpr_at_0.1pct_fpr"].note
    assert est["auc"].value > 0.8 and est["auc"].ci[0] > 0.5
    y2 = np.r_[np.ones(200), np.zeros(200)]
    m2 = roc_metrics(rng.normal(0, 1, 400), y2, n_boot=200, rng=rng)  # chance
    assert m2.resolvable(0.01) and not m2.resolvable(0.001)
    assert "coarse" in m2.estimates()["tpr_at_1pct_fpr"].note
    assert m2.auc_ci[0] < 0.5 < m2.auc_ci[1]  # an attack that does not beat chance, with its interval


def test_exceeded_and_strength_by_hand():
    m = RocMetrics(auc=0.7, auc_ci=(0.6, 0.8), auc_simultaneous=(0.55, 0.85), tpr={0.01: 0.2, 0.001: None},
                   tpr_ci={0.01: (0.1, 0.3), 0.001: (0, 0.4)}, tpr_simultaneous={0.01: (0.04, 0.35), 0.001: (0, 0.5)},
                   tpr_zero_fp=0.1, n_members=200, n_nonmembers=200)
    limits = {"auc": 0.6, 0.01: 0.05, 0.001: 0.01}
    assert exceeded(m, limits) == ["AUC 0.700 > 0.6", "TPR at 1% FPR 0.200 > 0.05"]  # 0.1% not resolvable: skipped
    assert exceeded(m, limits, "lower") == []  # 0.55 and 0.04 are within
    assert exceeded(m, limits, "upper") == ["AUC 0.850 > 0.6", "TPR at 1% FPR 0.350 > 0.05"]
    assert exceeded(m, {"auc": None, 0.01: None}) == []
    y = np.r_[np.ones(600), np.zeros(600)]
    s = np.r_[np.arange(600, 1200), np.arange(600)].astype(float)  # perfect: AUC 1, TPR 1
    assert strength(s, y, {"auc": 0.6, 0.01: 0.05}) == pytest.approx(1.0 / 0.05)  # 600 x 1% = 6 false positives
    assert strength(s, y, {"auc": 0.6, 0.01: None}) == pytest.approx(0.5 / 0.1)
    # 100 non-members allow 1 false positive at 1% FPR: too few to rank by, so the AUC ranks
    y2 = np.r_[np.ones(100), np.zeros(100)]
    assert strength(np.r_[np.arange(100, 200), np.arange(100)].astype(float), y2, {"auc": 0.6, 0.01: 0.05}) == \
        pytest.approx(0.5 / 0.1)


def test_group_split_keeps_patients_together_and_halves():
    groups = ["a"] * 5 + ["b"] * 5 + [f"i{k}" for k in range(10)]
    half = group_split(groups, np.random.default_rng(0))
    assert len(set(half[:5])) == 1 and len(set(half[5:10])) == 1
    assert abs(int(half.sum()) - 10) <= 1


# ------------------------------------------------------ score functions by hand


def test_nearest_distance_and_random_features():
    q = np.array([[0.0, 0.0], [3.0, 4.0]])
    r = np.array([[0.0, 1.0], [3.0, 0.0], [6.0, 8.0]])
    assert nearest_distance(q, r) == pytest.approx([1.0, 4.0])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    x = np.random.default_rng(0).random((3, 1, 20, 24)).astype(np.float32)
    f1, f2 = RandomConvFeatures(1, g1)(x), RandomConvFeatures(1, g2)(x)
    assert f1.shape == (3, 64 * 16) and np.allclose(f1, f2)
    assert np.allclose(np.linalg.norm(f1, axis=1), 1.0, atol=1e-5)
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.01, x.shape), 0, 1).astype(np.float32)
    other = np.random.default_rng(2).random((3, 1, 20, 24)).astype(np.float32)
    f_noisy, f_other = RandomConvFeatures(1, torch.Generator().manual_seed(5))(noisy), RandomConvFeatures(
        1, torch.Generator().manual_seed(5))(other)
    assert np.all(np.linalg.norm(f1 - f_noisy, axis=1) < np.linalg.norm(f1 - f_other, axis=1))


def test_nearest_rms_equals_brute_force_over_streamed_chunks():
    rng = np.random.default_rng(4)
    refs = rng.random((70, 1, 12, 10)).astype(np.float32)
    queries = np.concatenate([np.clip(refs[:5] + rng.normal(0, 0.01, (5, 1, 12, 10)), 0, 1),
                              rng.random((20, 1, 12, 10))]).astype(np.float32)
    chunks = [refs[i:i + 16] for i in range(0, 70, 16)]
    got = nearest_rms(queries, iter(chunks), block=7)
    diff = queries[:, None].astype(np.float64) - refs[None].astype(np.float64)
    want = np.sqrt((diff ** 2).mean(axis=(2, 3, 4)).min(1))
    assert np.allclose(got, want, rtol=0, atol=1e-12)


def test_nearest_rms_recomputation_in_row_blocks_is_bit_identical_to_the_whole_block():
    """The cache-sized float64 recomputation gives exactly the sums of the whole-block form it replaced."""
    import torch

    from audit.membership_inference.synthetic_attacks import squared_distances

    rng = np.random.default_rng(7)
    for n, dim in ((1, 5), (13, 4096), (64, 65536 + 3)):
        q = torch.as_tensor(rng.integers(0, 256, (n, dim)).astype(np.float32) / 255)
        r = torch.as_tensor(rng.random((29, dim)).astype(np.float32))
        j = torch.as_tensor(rng.integers(0, 29, n))
        assert torch.equal(squared_distances(q, r, j), (q.double() - r[j].double()).square().sum(1))


def test_pca_basis_equals_svd_both_ways():
    rng = np.random.default_rng(0)
    for shape in ((60, 12), (12, 60)):
        x = rng.normal(size=shape) * np.linspace(3, 0.1, shape[1])
        mean, basis = pca_basis(x, 3)
        _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
        assert np.allclose(mean, x.mean(0)) and np.allclose(np.abs(basis.T @ vt[:3].T), np.eye(3), atol=1e-8)


def test_density_ratio_scores_members_where_synthetic_is_denser_than_reference():
    """A generator that overfits puts extra density around its training images (DOMIAS' premise)."""
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(0, 1, (40, 6)), rng.normal(0, 1, (40, 6))
    overfit = np.repeat(members, 5, axis=0) + rng.normal(0, 0.1, (200, 6))
    synthetic = np.concatenate([overfit, rng.normal(0, 1, (100, 6))])
    reference = rng.normal(0, 1, (300, 6))
    y = np.r_[np.ones(40), np.zeros(40)]
    assert roc_auc(density_ratio_scores(np.r_[members, nonmembers], synthetic, reference, dims=6), y) > 0.95
    # a generator that learned the population, not its members: chance
    s0 = density_ratio_scores(np.r_[members, nonmembers], rng.normal(0, 1, (300, 6)), reference, dims=6)
    assert abs(roc_auc(s0, y) - 0.5) < 0.15
    with pytest.raises(ValueError, match="needs at least"):
        density_ratio_scores(members, synthetic, reference[:3], dims=3)


def test_loo_bandwidth_shrinks_for_clustered_data():
    rng = np.random.default_rng(1)
    spread = rng.normal(0, 1, (2, 300))
    clustered = np.repeat(rng.normal(0, 1, (2, 30)), 10, axis=1) + rng.normal(0, 0.02, (2, 300))
    scott = 300 ** (-1 / 6)
    assert loo_bandwidth(spread) == pytest.approx(scott)
    assert loo_bandwidth(clustered) < scott / 4 + 1e-12


class Memorizer:
    """A hand-made denoiser that has memorised ``members``: for x_t it returns the exact noise that
    turns the nearest memorised image into x_t.  For a member the loss is exactly zero and PIA's
    deterministic trajectory is exactly self-consistent; for anything else neither holds."""

    def __init__(self, members):
        from diffusers import DDPMScheduler

        self.members = torch.as_tensor(members, dtype=torch.float32)
        self.alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
        self.device = torch.device("cpu")
        self.calls = 0

    def predict_eps(self, x, t, class_labels=None):
        self.calls += 1
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        d = (x[:, None] - a.sqrt()[:, None] * self.members[None]).flatten(2).square().sum(-1)
        m = self.members[d.argmin(1)]
        return (x - a.sqrt() * m) / (1 - a).sqrt()


class ModeModel:
    """A denoiser that knows one image ``mu`` and misjudges the noise level by a factor that depends on
    t: its DDIM round trip is exact at ``mu`` and drifts with the distance from it (SecMI's premise)."""

    def __init__(self, mu):
        from diffusers import DDPMScheduler

        self.mu = torch.as_tensor(mu, dtype=torch.float32)
        self.alphas_cumprod = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
        self.device = torch.device("cpu")

    def predict_eps(self, x, t, class_labels=None):
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * self.mu) / (1 - a).sqrt() * (1 + t.view(-1, 1, 1, 1).float() / 500)


def _images(seed, n, shape=(1, 8, 8)):
    return torch.as_tensor(np.random.default_rng(seed).uniform(-1, 1, (n, *shape)), dtype=torch.float32)


def test_loss_score_is_zero_for_memorised_images_and_batching_is_one_pass():
    members, others = _images(0, 6), _images(1, 6)
    model = Memorizer(members)
    x = torch.cat([members, others])
    s = loss_scores(model, x, None, [50, 100, 200], draws=3, generator=torch.Generator().manual_seed(0), batch_rows=1000)
    assert s.shape == (12, 3)
    assert np.allclose(s[:6], 0.0, atol=1e-8) and np.all(s[6:] < -1e-3)  # higher = member
    assert model.calls == 1  # 12 images x 3 timesteps x 3 draws in one forward pass


def test_pia_score_is_zero_for_memorised_images_and_deterministic():
    members, others = _images(2, 5), _images(3, 5)
    model = Memorizer(members)
    x = torch.cat([members, others])
    s = pia_scores(model, x, None, [100, 200], p=4, batch_rows=64)
    assert s.shape == (10, 2) and np.allclose(s[:5], 0.0, atol=1e-6) and np.all(s[5:] < -1.0)
    assert model.calls == 2  # two queries per image: eps at t=0, then every timestep together
    assert np.array_equal(s, pia_scores(Memorizer(members), x, None, [100, 200], p=4, batch_rows=3))


def test_secmi_score_highest_at_the_known_image():
    mu = _images(4, 1)[0]
    model = ModeModel(mu)
    near = mu[None] + 0.01 * _images(5, 4)
    far = _images(6, 4)
    s = secmi_scores(model, torch.cat([mu[None], near, far]), None, t_sec=100, k=10)
    assert s[0] == pytest.approx(0.0, abs=1e-6)
    assert s[1:5].min() > s[5:].max()  # higher = member
    # an exact denoiser inverts and denoises back to where it started
    x = _images(7, 3)
    exact = Memorizer(x)
    assert torch.allclose(ddim_step(exact, ddim_step(exact, x, 0, 50), 50, 0), x, atol=1e-4)


def test_sima_score_is_zero_at_memorised_images_one_query_per_timestep():
    members, others = _images(8, 5), _images(9, 5)
    model = Memorizer(members)
    # at t = 0 the memoriser's eps on a clean member is exactly 0 (at t = 10 nearly: the clean image is
    # sqrt(abar_10) x0 away from x0's noisy mean); on anything else it points away
    s = sima_scores(model, torch.cat([members, others]), None, [0, 10], p=4, batch_rows=64)
    assert s.shape == (10, 2) and np.allclose(s[:5, 0], 0.0, atol=1e-6) and np.allclose(s[:5, 1], 0.0, atol=1e-4)
    assert np.all(s[5:] < -1.0)
    assert model.calls == 1  # 10 images x 2 timesteps in one pass
    assert np.array_equal(s, sima_scores(Memorizer(members), torch.cat([members, others]), None, [0, 10], 4, 3))


def test_centre_crop_resize_is_the_identity_at_full_strength_and_crops_the_centre():
    x = _images(10, 2, (1, 16, 16))
    assert torch.allclose(centre_crop_resize(x, 1.0), x)
    # a ramp (value = column index): bilinear resampling of the centre 8 columns (4..11) is exact inside,
    # output column k samples input column 4 + k / 2 - 1/4 (half-pixel centres)
    ramp = torch.arange(16.0).expand(1, 1, 16, 16)
    y = centre_crop_resize(ramp, 0.5)
    k = torch.arange(1, 15.0)
    assert y.shape == ramp.shape and torch.allclose(y[0, 0, 5, 1:15], 4 + k / 2 - 0.25, atol=1e-5)


def test_pfami_fluctuation_is_large_at_members_and_noise_free_for_a_shift_invariant_model():
    members, others = _images(11, 6, (1, 16, 16)), _images(12, 6, (1, 16, 16))
    x = torch.cat([members, others])
    gen = torch.Generator().manual_seed(0)
    s = pfami_scores(Memorizer(members), x, None, [50, 200], [0.9, 0.8], 2, gen, batch_rows=7)
    assert s.shape == (12, 2)
    # a member's loss is 0 and its crops' is not: the fluctuation is positive; a non-member's neighbours are
    # no closer to the memorised set than it is, so it fluctuates less
    assert np.all(s[:6] > 0) and s[:6].min() > np.median(s[6:])

    class Blind:  # predicts zero noise everywhere: the loss is the noise's own energy, the same for any image
        alphas_cumprod = Memorizer(members).alphas_cumprod
        device = torch.device("cpu")

        def predict_eps(self, x, t, class_labels=None):
            return torch.zeros_like(x)

    # the image and its neighbours share every noise draw, so a model that ignores the image fluctuates by 0
    blind = pfami_scores(Blind(), x, None, [50], [0.9, 0.8], 3, torch.Generator().manual_seed(1), batch_rows=5)
    assert np.allclose(blind, 0.0, atol=1e-12)


def test_mirror_fluctuation_is_exactly_zero_for_a_model_that_treats_an_image_and_its_mirror_alike():
    members, others = _images(13, 5, (1, 12, 12)), _images(14, 5, (1, 12, 12))
    x = torch.cat([members, others])

    class Local:  # a pixel-wise denoiser: mirror-equivariant, knows no image, finds some easier than others
        alphas_cumprod = Memorizer(members).alphas_cumprod
        device = torch.device("cpu")

        def predict_eps(self, x, t, class_labels=None):
            return 0.3 * x + 0.1 * x.square()

    # the mirrored image noised with the mirrored noise is the mirror of the same x_t: the same loss exactly,
    # whatever the image's difficulty -- a non-member scores 0
    s = fluctuation_scores(Local(), x, None, [50, 300], mirror_neighbours(), 2, torch.Generator().manual_seed(2), 7)
    assert s.shape == (10, 2) and np.allclose(s, 0.0, atol=1e-6)  # float32 rounding of O(1) losses
    # a memoriser knows the members, not their mirrors: every member fluctuates, by more than any non-member
    m = fluctuation_scores(Memorizer(members), x, None, [50, 300], mirror_neighbours(), 2,
                           torch.Generator().manual_seed(2), 7)
    assert np.all(m[:5] > 0) and m[:5].min() > m[5:].max()


# ------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """200 training and 200 holdout phantoms (patient-disjoint), a novel synthetic set and a leaky one."""
    root = tmp_path_factory.mktemp("mia")
    write_phantoms(root / "p", patients=100, images_per_patient=4, size=16, seed=3, holdout_fraction=0.5)
    novel, _ = generate(patients=50, images_per_patient=4, size=16, seed=4)
    for i, im in enumerate(novel):
        save_unit_png(root / "syn" / f"s{i:03d}.png", im.pixels)
    shutil.copytree(root / "syn", root / "leaky")
    rng = np.random.default_rng(0)
    train = sorted((root / "p" / "train").glob("*.png"))
    for j, f in enumerate(rng.choice(train, 30, replace=False)):
        x = np.asarray(Image.open(f), np.float64) / 255
        save_unit_png(root / "leaky" / f"leak_{j:02d}.png", x + rng.normal(0, 0.02, x.shape))
    return root


def _ctx(case, synthetic="syn", holdout=None, model=None, tmp=None, **kw):
    return AuditContext(synthetic=ImageSet(case / synthetic), real=ImageSet(kw.pop("real", case / "p" / "train")),
                        holdout=ImageSet(holdout or case / "p" / "holdout"), model=model, device="cpu",
                        workdir=tmp, **kw)


# ---------------------------------------------------- scenario 1 (synthetic set)


def test_clean_synthetic_set_passes_with_every_control(case, tmp_path):
    r = create_check("membership_inference").run(_ctx(case, tmp=tmp_path))
    assert r.status == "pass", r.reason
    assert "scenario 2 (model released) was not run: no model was given" in r.reason
    kinds = {c.name: c for c in r.controls}
    assert kinds["planted near-copies (synthetic-set attacks)"].passed
    assert kinds["null: patients relabelled at random"].passed and kinds["holdout exchangeability"].passed
    null = kinds["null: patients relabelled at random"].metrics
    assert null["resolved"] and null["chance_auc_quantile"] < 0.6 and null["patients"] == 100  # 50 + 50, 4 images each
    attacks = r.metrics["attacks"]
    assert set(attacks) == {"dcr_pixel", "dcr_embedding", "domias"}
    for a in attacks.values():  # near chance, each with its interval
        assert a["auc"].ci[0] < 0.5 + 0.08 and a["auc"].ci[1] > 0.5 - 0.08
        assert a["tpr_at_0.1pct_fpr"].value is None  # 200 non-members cannot resolve 0.1%
    assert set(r.data["roc"]) == set(attacks) and r.data["roc"]["dcr_pixel"]["fpr"][0] == 0.0
    rows = list(csv.DictReader(open(tmp_path / "membership_inference.csv")))
    assert len(rows) == 400 and {r_["role"] for r_ in rows} == {"member", "non-member"}
    assert all(r_["patient"].startswith("pt-") for r_ in rows)
    text = json.dumps(r.to_dict()) + (tmp_path / "membership_inference.csv").read_text()
    assert "MRN" not in text  # patients only as salted hashes


def test_leaky_synthetic_set_fails_on_low_fpr_evidence(case, tmp_path):
    r = create_check("membership_inference").run(_ctx(case, "leaky", tmp=tmp_path))
    assert r.status == "fail", r.reason
    d = r.metrics["decision"]
    assert d["chosen_attack"] in ("dcr_pixel", "dcr_embedding")
    dcr = r.metrics["attacks"]["dcr_pixel"]
    assert dcr["tpr_at_1pct_fpr"].value > 0.05 and dcr["beats_chance"]


def test_tiled_pixel_distance_is_available_too(case):
    """dcr_grid > 1: Carlini's tiled metric via copy_detection's exact search; the leak is still caught."""
    r = create_check("membership_inference", dcr_grid=4, synthetic_attacks=["dcr_pixel"], n_boot=300).run(
        _ctx(case, "leaky"))
    assert r.status == "fail" and r.metrics["scenario_1"]["dcr_grid"] == 4
    assert list(r.metrics["attacks"]) == ["dcr_pixel"]


def test_deterministic_given_the_seed(case):
    a = create_check("membership_inference", n_boot=200).run(_ctx(case, "leaky", seed=3)).to_dict()
    b = create_check("membership_inference", n_boot=200).run(_ctx(case, "leaky", seed=3)).to_dict()
    assert a["metrics"] == b["metrics"] and a["controls"] == b["controls"]
    # golden numbers (seed 3; identical with 1 and 2 torch threads); rel 1e-5: float32 distances and features
    attacks = a["metrics"]["attacks"]
    assert_golden({**{f"{n} auc": attacks[n]["auc"]["value"] for n in ("dcr_pixel", "dcr_embedding", "domias")},
                   "dcr_pixel tpr at 1%": attacks["dcr_pixel"]["tpr_at_1pct_fpr"]["value"],
                   "chosen": a["metrics"]["decision"]["chosen_attack"], "status": a["status"]},
                  {"dcr_pixel auc": 0.595225, "dcr_embedding auc": 0.53335, "domias auc": 0.586075,
                   "dcr_pixel tpr at 1%": 0.16, "chosen": "dcr_pixel", "status": "fail"}, rel=1e-5)


def test_limits_too_lax_to_catch_the_planted_leak_make_the_audit_invalid(case):
    r = create_check("membership_inference", max_auc=0.95, max_tpr_at_1pct_fpr=0.9, n_boot=200).run(_ctx(case))
    assert r.status == "error" and "positive control failed" in r.reason


def test_too_few_non_members_for_the_low_fpr_limit_decide_on_the_auc(case):
    """60 non-members cannot resolve TPR at 1% FPR: with an AUC limit the AUC decides, and the result says what
    the low-FPR figure would need; without one the check is inconclusive."""
    r = create_check("membership_inference", n_samples=60, n_boot=200, max_auc=0.7).run(_ctx(case))
    assert r.status == "pass", r.reason  # 60 + 60 images resolve an AUC limit of 0.7 (not 0.6: see below)
    assert "decided on the AUC" in r.reason and "at least 100" in r.reason
    r = create_check("membership_inference", n_samples=60, n_boot=200, max_auc=None).run(_ctx(case))
    assert r.status == "inconclusive" and "at least 100" in r.reason


def test_null_control_by_patient_relabelling_says_cannot_resolve_on_a_small_sample(case):
    """8 members and 8 non-members from few patients: chance alone reaches the AUC limit, so no pass -- and
    the result names the patients needed; the same statistic computed by hand over every relabelling."""
    from itertools import combinations

    from audit.core.stats import roc_auc
    from audit.membership_inference.statistics import relabelled_max_auc

    r = create_check("membership_inference", n_samples=8, n_boot=200, max_tpr_at_1pct_fpr=None).run(_ctx(case))
    null = next(c for c in r.controls if c.kind == "null")
    assert not null.passed and "cannot resolve" in null.detail and null.metrics["patients_needed"] > 16
    assert r.status == "inconclusive" and "cannot resolve" in r.reason
    # the relabelling null by brute force: 3 patients of 6 are members in every relabelling
    rng = np.random.default_rng(0)
    scores = {"a": rng.normal(size=12), "b": rng.normal(size=12)}
    groups = np.repeat(np.arange(6), 2)
    draws, distinct, exact = relabelled_max_auc(scores, np.r_[np.ones(6), np.zeros(6)], groups, 100, rng)
    brute = [max(roc_auc(v, np.isin(groups, c)) for v in scores.values()) for c in combinations(range(6), 3)]
    assert exact and distinct == 20 and np.allclose(np.sort(draws), np.sort(brute))


def test_null_control_counts_relabellings_beyond_float_range():
    """1,000 members and 1,000 non-members, each of its own patient (members drawn from a 100,000-image
    training set): C(2000, 1000) ~ 2e600 relabellings, which overflowed when formatted through a float."""
    import math
    from types import SimpleNamespace

    from audit.membership_inference.controls import count_text, null_control
    from audit.membership_inference.design import Sample
    from audit.membership_inference.settings import MembershipInferenceSettings

    assert count_text(20) == "20" and count_text(78 * 10**23) == "7.8e+24"
    assert count_text(math.comb(2000, 1000)) == "2.0e+600"
    n = 1000
    sample = Sample(np.arange(n), np.arange(n), np.zeros(2 * n, np.int8), np.ones(2 * n, bool), np.zeros(n, np.int8),
                    np.array([f"g{i}" for i in range(2 * n)], object))
    ctx = SimpleNamespace(rng=lambda purpose: np.random.default_rng(1))
    scores = {"a": np.random.default_rng(0).normal(size=2 * n)}
    c = null_control(ctx, MembershipInferenceSettings(n_permutations=100), {"auc": 0.6}, sample, scores)
    assert "100 random relabellings (of 2.0e+600)" in c.detail and c.passed


def test_holdout_from_another_population_fails_and_names_the_failed_control(case, tmp_path):
    """A holdout from another scanner makes every attack separate "members" from "non-members": the check
    cannot tell that from a leak, and controls are asymmetric -- they may block a pass, never excuse a leak --
    so it fails, naming the exchangeability control that explains why the steward must look at the holdout."""
    shifted = tmp_path / "shifted"
    for f in sorted((case / "p" / "holdout").glob("*.png")):
        x = np.asarray(Image.open(f), np.float64) / 255
        save_unit_png(shifted / f.name, np.clip(x, 0, 1) ** 0.6)  # another scanner's tone curve
    r = create_check("membership_inference", n_boot=200).run(_ctx(case, holdout=shifted))
    ctl = next(c for c in r.controls if c.name == "holdout exchangeability")
    assert not ctl.passed and r.status == "fail", r.reason
    assert "cannot excuse the leak" in r.reason and "holdout exchangeability" in r.reason


# ------------------------------------------------------- scenario 2 (the model)


@pytest.fixture(scope="module")
def model_case(case, tmp_path_factory):
    """A class-conditional tiny model overfit on 16 labelled training images (4 patients), and 16 training
    images it never saw, one from each of 16 other patients (so they are a fair sample of the population)."""
    from diffusers import DDPMScheduler

    from audit.membership_inference.control_model import overfit_model, save_model_dir

    root = tmp_path_factory.mktemp("mia-model")
    train = sorted((case / "p" / "train").glob("*.png"))
    rows = {r["path"]: r for r in csv.DictReader(open(case / "p" / "train" / "metadata.csv"))}
    seen_patients = {rows[f.name]["patient_id"] for f in train[:16]}
    one_each: dict = {}
    for f in train:
        one_each.setdefault(rows[f.name]["patient_id"], f)
    unseen = [f for pid, f in one_each.items() if pid not in seen_patients][:16]
    for name, files in (("seen", train[:16]), ("unseen", unseen)):
        (root / name).mkdir()
        with open(root / name / "metadata.csv", "w") as fh:
            fh.write("path,patient_id,label\n")
            for f in files:
                shutil.copy(f, root / name / f.name)
                fh.write(f"{f.name},{rows[f.name]['patient_id']},{rows[f.name]['label']}\n")
    seen = ImageSet(root / "seen")
    x = np.concatenate([b for _, b in seen.iter_batches(64)])
    labels = sorted(set(seen.labels))
    sch = DDPMScheduler(num_train_timesteps=1000)
    unet = overfit_model(x, sch, np.array([labels.index(v) for v in seen.labels]), len(labels), steps=200,
                         batch=16, lr=3e-3, widths=(8, 16), max_timestep=450)
    save_model_dir(root / "model", unet, sch, labels)
    return root


FAST = {"timesteps": [50, 200], "noise_draws": 2, "pia_timesteps": [200], "n_boot": 300}


def test_overfit_model_is_caught_by_the_model_attacks(case, model_case, tmp_path):
    from generators.loading import load_model

    r = create_check("membership_inference", **FAST).run(
        _ctx(case, real=model_case / "seen", model=model_case / "model", tmp=tmp_path))
    assert r.status == "fail", r.reason
    loss = r.metrics["attacks"]["loss_t50"]
    assert loss["auc"].value > 0.9 and loss["scenario"] == 2
    ctl = next(c for c in r.controls if c.name == "overfit model (model attacks)")
    assert ctl.passed, ctl.detail
    assert r.metrics["scenario_2"]["conditional"] and r.metrics["scenario_2"]["forward_passes_per_image"] == {
        "loss": 4, "pia": 2, "secmi": 11, "sima": 3, "pfami": 20, "mirror": 16}
    assert set(r.metrics["scenario_2"]["seconds"]["per_image"]) == {"loss", "pia", "secmi", "sima", "pfami", "mirror"}
    # TPR at 1% FPR needs >= 100 non-members: measure the same scores against all 200 holdout images
    model = load_model(model_case / "model")
    seen, hold = ImageSet(model_case / "seen"), ImageSet(case / "p" / "holdout")
    xs = [np.concatenate([b for _, b in s.iter_batches(64)]) for s in (seen, hold)]
    labels = [model.class_labels(s.labels) for s in (seen, hold)]
    s = [loss_scores(model, model.to_model_space(x), cl, [50], 2, torch.Generator().manual_seed(0))[:, 0]
         for x, cl in zip(xs, labels)]
    y = np.r_[np.ones(len(s[0])), np.zeros(len(s[1]))]
    assert tpr_at_fpr(np.r_[s[0], s[1]], y, 0.01) > 0.5


def test_a_memorising_model_fails_the_default_policy(case, model_case):
    """The default policy's settings (not the fast ones) on the overfit model: its members are recognised, so the
    check fails -- not inconclusive on a control, not a pass -- and so does the audit's verdict."""
    from audit.api import check

    result = check(case / "syn", real=model_case / "seen", holdout=case / "p" / "holdout",
                   model=model_case / "model", policy="default", checks=["membership_inference"], progress=False,
                   device="cpu")
    r = result.result("membership_inference")
    assert r.status == "fail", r.reason
    assert result.verdict == "fail" and not result.passed
    assert max(a["auc"].value for a in r.metrics["attacks"].values() if a["scenario"] == 2) > 0.9


def test_the_model_records_resize_is_applied_and_reported(case, model_case, tmp_path):
    """32 x 32 copies of the 16 x 16 sets: refused for a model whose record does not say its trainer resized, run
    (and said so) when synthgate.json records it, as synthgate's trainer does."""
    from synthgate.errors import InputError

    def upscaled(src, dst):
        dst.mkdir()
        for f in sorted(src.glob("*.png")):
            Image.open(f).resize((32, 32), Image.Resampling.BILINEAR).save(dst / f.name)
        shutil.copy(src / "metadata.csv", dst / "metadata.csv")
        return dst

    seen, hold = upscaled(model_case / "seen", tmp_path / "seen"), upscaled(case / "p" / "holdout", tmp_path / "h")
    model = tmp_path / "model"
    shutil.copytree(model_case / "model", model)
    ctx = _ctx(case, real=seen, holdout=hold, model=model)
    check = create_check("membership_inference", control_model=False, **FAST)
    with pytest.raises(InputError, match="does not say its trainer resized"):
        check.preflight(ctx)
    info = json.loads((model / "synthgate.json").read_text())
    info["training_set"] = {**(info.get("training_set") or {}), "resized": ["sizes 32x32 resized to 16x16"]}
    (model / "synthgate.json").write_text(json.dumps(info))
    r = check.run(ctx)
    assert r.metrics["scenario_2"]["preprocessing"].startswith("images resized to 16x16 (antialiased bilinear) as "
                                                               "the model's trainer recorded")
    assert r.metrics["attacks"]["loss_t50"]["auc"].value > 0.9  # the members are still recognised


def test_model_that_never_saw_the_members_is_not_flagged(case, model_case):
    # 16 non-members cannot resolve TPR at 1% FPR: judge the AUC only here
    r = create_check("membership_inference", control_model=False, max_tpr_at_1pct_fpr=None, **FAST).run(
        _ctx(case, real=model_case / "unseen", model=model_case / "model"))
    # not fail (no held-out or simultaneous evidence), and never a pass with the model control off
    assert r.status == "inconclusive", r.reason
    assert r.metrics["decision"]["significant_after_bonferroni"] == []
    assert all(a["auc"].ci[0] < 0.75 for n, a in r.metrics["attacks"].items() if a["scenario"] == 2)
    null = next(c for c in r.controls if c.kind == "null")  # 16 + 16 images of 30 patients: chance reaches 0.6
    assert not null.passed and "cannot resolve" in null.detail


# ------------------------------------------------------------------ CLI


def run_audit(capsys, *argv):
    code = audit_cli.main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_results_roc_and_scores(case, model_case, capsys, tmp_path):
    out = tmp_path / "out"
    params = [x for k, v in FAST.items() for x in ("--param", f"membership_inference.{k}={json.dumps(v)}")]
    code, stdout, err = run_audit(capsys, case / "syn", "--real", model_case / "seen", "--holdout",
                                  case / "p" / "holdout", "--model", model_case / "model", "--checks",
                                  "membership_inference", "--out", out, *params)
    assert code == 1, err
    audit = json.loads((out / "audit.json").read_text())
    check = audit["checks"][0]
    assert check["name"] == "membership_inference" and check["status"] == "fail"
    assert {"dcr_pixel", "loss_t50", "pia_t200", "pia_t200_rev", "secmi_t100"} <= set(check["data"]["roc"])
    assert check["metrics"]["attacks"]["loss_t50"]["auc"]["ci"]
    assert audit["control"]["passed"]
    assert (out / "membership_inference.csv").exists() and (out / "report.html").exists()


@pytest.mark.parametrize("case_name", ["no_holdout", "overlap", "trained_on_holdout", "resolution", "unlabelled",
                                       "timestep", "typo"])
def test_bad_inputs_exit_2_one_line(case, model_case, capsys, tmp_path, case_name):
    argv = [case / "syn", "--real", model_case / "seen", "--holdout", case / "p" / "holdout", "--checks",
            "membership_inference", "--model", model_case / "model", "--out", tmp_path / "o"]
    expect = ""
    if case_name == "no_holdout":
        del argv[3:5]
        expect = "holdout"
    elif case_name == "overlap":
        argv[4] = model_case / "seen"
        expect = "the holdout is the training set's folder"
    elif case_name == "trained_on_holdout":  # red team: a model trained on the holdout passed and was bundled
        shutil.copytree(model_case / "seen", tmp_path / "held")
        shutil.copytree(model_case / "model", tmp_path / "model")
        info = json.loads((tmp_path / "model" / "synthgate.json").read_text())
        info["training_set"] = {"path": "held", "sha256": ImageSet(tmp_path / "held", cache=None).digest}
        (tmp_path / "model" / "synthgate.json").write_text(json.dumps(info))
        argv[2], argv[4], argv[8] = case / "p" / "holdout", tmp_path / "held", tmp_path / "model"
        expect = "records the holdout as its training set"
    elif case_name == "resolution":
        big = tmp_path / "big"
        for f in sorted((model_case / "seen").glob("*.png")):
            save_unit_png(big / f.name, np.kron(np.asarray(Image.open(f), np.float64) / 255, np.ones((2, 2))))
        shutil.copy(model_case / "seen" / "metadata.csv", big / "metadata.csv")
        argv[2] = big
        expect = "trained on 1x16x16 images"
    elif case_name == "unlabelled":
        plain = tmp_path / "plain"
        plain.mkdir()
        for f in sorted((model_case / "seen").glob("*.png")):
            shutil.copy(f, plain / f.name)
        argv[2] = plain
        expect = "class-conditional"
    elif case_name == "timestep":
        argv += ["--param", "membership_inference.timesteps=[50, 1200]"]
        expect = "outside the model's 1000-step schedule"
    elif case_name == "typo":
        argv += ["--param", "membership_inference.max_acu=0.6"]
        expect = "did you mean 'max_auc'"
    code, out, err = run_audit(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and expect in err, err
    assert not (tmp_path / "o").exists()
