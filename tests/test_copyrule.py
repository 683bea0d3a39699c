"""The ratio copy rule (audit/copy_detection/ratio_rule.py, audit/core/shiftzoom*.py): transforms, orbit by hand, the lower bound, exactness against brute force, the ratio rule."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.copy_detection.ratio_rule import COMPONENTS, CopyRatioRule, decide_ratio
from audit.copy_detection.ratio_statistic import (
    noise_bias,
    noise_margin,
    noise_sigma,
    ratio_statistic,
    ratio_threshold,
    smallest_d1,
)
from audit.core.shiftzoom import (
    CopyLayout,
    CopyMetric,
    Transforms,
    brute_force,
    grouped_two,
    interpolation_matrix,
)
from audit.core.shiftzoom_search import ExactCopySearch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHIFT_ZOOM = COMPONENTS["shift_zoom"]


def real_crops(names=("camera", "brick", "astronaut", "grass", "coins", "moon"), size=32, stride=24, half=0):
    """Grayscale crops of one half (``half`` 0 = left, 1 = right) of bundled pictures."""
    import skimage.data
    from skimage.color import rgb2gray

    out = []
    for name in names:
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 3:
            img = rgb2gray(img[..., :3] / 255.0)
        elif img.max() > 1:
            img = img / 255.0
        h, w = img.shape
        lo, hi = (0, w // 2) if half == 0 else (w // 2, w)
        for y in range(8, h - size - 8, stride):
            for x in range(lo + 8, hi - size - 8, stride):
                out.append(img[y:y + size, x:x + size])
    return np.stack(out)[:, None].astype(np.float32)


def metric(size=32, transforms=SHIFT_ZOOM, channels=1, grid=1):
    return CopyMetric(CopyLayout(size, size, channels, pooled=8, grid=grid, transforms=transforms))


# ------------------------------------------------------------------ geometry


def test_transforms_and_groups_partition():
    t = Transforms(3, (0.95, 1.0, 1.05))
    items = t.items()
    assert items[0] == (1.0, 0, 0) and len(items) == 3 * 49 == len(set(items))
    for split in (False, True):
        groups = t.groups(3, split)
        assert sorted(i for g in groups for i in g) == list(range(len(items)))
    assert len(t.groups(3)) == 9 and len(t.groups(7)) == 1 and len(t.groups(3, True)) == 27
    assert Transforms(0, (1.0,)).items() == [(1.0, 0, 0)]


@pytest.mark.parametrize("n", [32, 33, 64, 100])
def test_central_region_keeps_every_transform_inside(n):
    lay = CopyLayout(n, n, 1, transforms=Transforms(3, (0.95, 1.0, 1.05)))
    top, h, _, _ = lay.central
    c = (n - 1) / 2
    for z, d, _ in lay.transforms.items():
        u = c + z * (np.arange(top, top + h) - c) + d
        assert u.min() >= -1e-9 and u.max() <= n - 1 + 1e-9
    assert CopyLayout(n, n, 1, transforms=Transforms(0, (1.0,))).central == (0, n, 0, n)


def test_too_small_image_is_refused():
    with pytest.raises(ValueError, match="too small"):
        CopyLayout(12, 12, 1, pooled=8, transforms=Transforms(3, (1.0,)))


def test_orbit_matches_resampling_by_hand():
    """phi(T x): bilinear resampling (scipy), block means, tile means removed -- for every transform."""
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    x = rng.random((2, 2, 30, 36)).astype(np.float32)
    lay = CopyLayout(30, 36, 2, pooled=4, grid=2, transforms=Transforms(2, (0.9, 1.0, 1.1)))
    m = CopyMetric(lay)
    orb = m.orbit(x).numpy()
    top, h, left, w = lay.central
    pr, pc = lay.pool_matrices()
    th, tw = lay.tile
    for ti, (z, dy, dx) in enumerate(m.items):
        cy, cx = 29 / 2, 35 / 2
        yy, xx = np.meshgrid(cy + z * (np.arange(top, top + h) - cy) + dy,
                             cx + z * (np.arange(left, left + w) - cx) + dx, indexing="ij")
        for n in range(2):
            img = np.stack([map_coordinates(x[n, c].astype(np.float64), [yy, xx], order=1) for c in range(2)])
            p = (pr @ img @ pc.T).reshape(2, 2, th, 2, tw)
            ref = (p - p.mean((2, 4), keepdims=True)).reshape(-1) / math.sqrt(lay.dim)
            np.testing.assert_allclose(orb[n, ti], ref, atol=1e-6)
    np.testing.assert_allclose(m.features(x).numpy(), orb[:, 0], atol=1e-7)


def test_interpolation_rows_sum_to_one_and_shifts_are_exact():
    m = interpolation_matrix(20, 3, 14, 1.0, -2)
    assert np.array_equal(m, np.eye(20)[1:15])
    z = interpolation_matrix(20, 3, 14, 1.05, 1)
    np.testing.assert_allclose(z.sum(1), 1.0)


def test_exact_distance_is_the_float64_minimum_over_transforms_float32_cannot_rank():
    """Near-copies whose transforms differ by less than float32 resolves (relative to the features' norms):
    the exact stage must return the float64 minimum over every transform, not the float32 winner's distance."""
    m = metric(32)
    t = len(m.items)
    rng = np.random.default_rng(5)
    f = torch.as_tensor(rng.normal(0, 10, (3, m.layout.dim)), dtype=torch.float32)  # |f|^2 ~ 100 D
    search = ExactCopySearch(m, f)
    # every transform of the query lies 1e-3 from reference 1, by distances that differ in the 6th digit
    steps = torch.as_tensor(rng.permutation(t), dtype=torch.float64)
    delta = torch.as_tensor(rng.normal(0, 1, (t, m.layout.dim)), dtype=torch.float64)
    delta = delta / delta.norm(dim=1, keepdim=True) * (1e-3 * (1 + 1e-6 * steps))[:, None]
    orbit = (f[1].double()[None] + delta).float()
    got = search._exact(orbit, np.array([0, 1, 2]))
    want = (orbit.double()[None] - f.double()[:, None]).square().sum(-1).amin(1).sqrt().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # float32 alone cannot rank them: its winner is not the float64 minimum's transform
    d32 = torch.addmm(search.rn[1:2, None], f[1:2], orbit.T, alpha=-2.0) + (orbit * orbit).sum(1)[None]
    true = int((orbit.double() - f[1].double()).square().sum(1).argmin())
    assert int(d32.argmin()) != true


def test_distance_by_hand():
    """A constant offset is removed; a shifted copy is at distance 0; the identity metric is plain RMS."""
    rng = np.random.default_rng(1)
    big = rng.random((48, 48))
    a = big[8:40, 8:40]
    b = big[10:42, 7:39]  # a shifted by (2, -1)
    m = metric()
    orb = m.orbit(a[None, None])[0]
    assert float(m.distance(orb, m.features((b + 0.1)[None, None]))[0]) < 1e-6
    ident = metric(transforms=Transforms(0, (1.0,)))
    c = np.zeros((32, 32))
    c[:16, :16] = 0.4  # one quarter differs by 0.4: pooled to 8x8, mean removed: RMS = 0.4 * sqrt(3) / 4
    d = ident.distance(ident.orbit(c[None, None])[0], ident.features(np.zeros((1, 1, 32, 32))))
    assert float(d[0]) == pytest.approx(0.4 * math.sqrt(3) / 4, rel=1e-6)


# -------------------------------------------------------------- lower bound


def _bound(search, orbits, refs_f):
    c, e = search.centres(orbits)
    d = torch.cdist(c.double(), refs_f.double()[None].expand(len(c), -1, -1))  # (Q, G, R)
    return (d - e.double()[:, :, None]).amin(1).numpy()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), shift=st.integers(0, 3), group=st.integers(1, 7),
       zooms=st.sampled_from([(1.0,), (0.95, 1.0, 1.05), (0.9, 1.1)]), grid=st.sampled_from([1, 2]),
       smooth=st.booleans())
def test_lower_bound_never_exceeds_distance(seed, shift, group, zooms, grid, smooth):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    x = rng.random((10, 1, 28, 28))
    if smooth:
        x = np.stack([gaussian_filter(i, 2.0) for i in x])
    x = x.astype(np.float32)
    m = CopyMetric(CopyLayout(28, 28, 1, pooled=4, grid=grid, transforms=Transforms(shift, zooms)))
    refs = m.features(x[5:])
    search = ExactCopySearch(m, refs, shift_group=group)
    lb = _bound(search, m.orbit(x[:5]), refs)
    exact = brute_force(m, x[:5], x[5:])
    assert (lb <= exact + 1e-6).all()


def test_one_group_bound_is_looser_than_nine():
    crops = real_crops(("brick", "grass"), stride=20)
    m = metric()
    refs = m.features(crops[20:])
    orb = m.orbit(crops[:20])
    one = _bound(ExactCopySearch(m, refs, shift_group=7), orb, refs)
    nine = _bound(ExactCopySearch(m, refs, shift_group=3), orb, refs)
    exact = brute_force(m, crops[:20], crops[20:])
    assert (one <= nine + 1e-7).mean() > 0.95 and (nine <= exact + 1e-6).all()
    assert nine.mean() > one.mean()


# ----------------------------------------------------------------- exactness


def _check_knn(nb, full, k, exclude=None):
    if exclude is not None:
        full = full.copy()
        full[np.arange(len(full)), exclude] = np.inf
    order = np.lexsort((np.broadcast_to(np.arange(full.shape[1]), full.shape), full), axis=1)[:, :k]
    np.testing.assert_allclose(nb.distances, np.take_along_axis(full, order, 1), atol=1e-9)
    same = nb.indices == order
    # ties may order differently only where the distances are equal
    assert np.all(same | np.isclose(nb.distances, np.take_along_axis(full, nb.indices, 1), atol=1e-12))


@pytest.mark.parametrize("transforms", [SHIFT_ZOOM, Transforms(0, (1.0,))], ids=["shift_zoom", "identity"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_search_is_exact_on_real_crops(transforms, k):
    crops = real_crops()
    rng = np.random.default_rng(k)
    q = crops[rng.choice(len(crops), 25, replace=False)]
    q = np.concatenate([q[:10], np.clip(q[10:] + rng.normal(0, 0.02, q[10:].shape), 0, 1).astype(np.float32)])
    m = metric(transforms=transforms)
    search = ExactCopySearch(m, m.features(crops), initial=3)
    nb = search.search(q, k=k)
    _check_knn(nb, brute_force(m, q, crops), k)
    assert search.stats.exact_pairs < len(q) * len(crops)


@pytest.mark.parametrize("transforms", [Transforms(0, (1.0,), invert=True), Transforms(2, (1.0, 1.05), invert=True)],
                         ids=["identity", "shift_zoom"])
def test_inverted_orbit_is_searched_exactly_and_finds_inverted_copies(transforms):
    """A copy exported without its MONOCHROME1 inversion (1 - x) is at distance 0 of its source under an inverting
    orbit; the search stays exact against brute force (the inverted half is bounded in groups of its own)."""
    crops = real_crops()
    rng = np.random.default_rng(4)
    src = rng.choice(len(crops), 12, replace=False)
    q = np.concatenate([1.0 - crops[src[:6]], np.clip(1.0 - crops[src[6:]] + rng.normal(0, 0.02, (6, 1, 32, 32)), 0, 1),
                        crops[src[:4]], real_crops(half=1)[::8]]).astype(np.float32)
    m = metric(transforms=transforms)
    assert len(m.orbit_items) == 2 * len(m.items) and m.orbit_items[len(m.items)][3] is True
    full = brute_force(m, q, crops)
    search = ExactCopySearch(m, m.features(crops), initial=2)
    nb = search.search(q, k=2)
    _check_knn(nb, full, 2)
    assert np.array_equal(nb.indices[:6, 0], src[:6]) and np.allclose(nb.distances[:6, 0], 0.0, atol=1e-6)
    assert (nb.indices[6:12, 0] == src[6:]).sum() >= 5  # noisy: a near-flat source may have a nearer twin
    plain = brute_force(metric(transforms=Transforms(transforms.max_shift, transforms.scales)), q, crops)
    assert np.all(full <= plain + 1e-9)  # the nearer of the image and its inverse
    assert search.stats.exact_pairs < len(q) * len(crops)
    (z, dy, dx, inverted), d = CopyRatioRule(32, 32, 1, components={"t": transforms}, pooled=8).index(
        crops).matched(q[0], int(src[0]), "t")
    assert inverted and d < 1e-6


def test_rule_with_inversion_catches_inverted_copies_at_no_cost_in_tests():
    from audit.copy_detection.ratio_rule import components

    crops, hold = real_crops(), real_crops(half=1)
    with_inv = components(3, (0.95, 1.0, 1.05), inverted=True)
    assert set(with_inv) == {"identity", "shift_zoom"} and with_inv["identity"].invert
    rule = CopyRatioRule(32, 32, 1, alpha=0.02, components=with_inv).fit(crops, hold[::2])
    plain = CopyRatioRule(32, 32, 1, alpha=0.02, components=components(3, (0.95, 1.0, 1.05))).fit(crops, hold[::2])
    assert COMPONENTS["identity"].invert  # the default rule inverts
    rng = np.random.default_rng(6)
    inv = (1.0 - crops[rng.choice(len(crops), 10, replace=False)]).astype(np.float32)
    assert rule.decide(inv).flagged.all() and not plain.decide(inv).flagged.any()
    novel = hold[1::2]
    assert rule.decide(novel).flagged.mean() <= 0.05


def test_search_is_exact_on_random_images_with_ties_and_tiles():
    rng = np.random.default_rng(3)
    refs = rng.random((40, 1, 24, 24)).astype(np.float32)
    refs = np.concatenate([refs, refs[:10], refs[:5] + 0.2])  # exact duplicates and offset duplicates: ties
    q = np.concatenate([refs[:6], rng.random((6, 1, 24, 24)).astype(np.float32)])
    for grid in (1, 2):
        m = CopyMetric(CopyLayout(24, 24, 1, pooled=4, grid=grid, transforms=Transforms(2, (1.0, 1.1))))
        nb = ExactCopySearch(m, m.features(refs), initial=2).search(q, k=4)
        _check_knn(nb, brute_force(m, q, refs), 4)
        assert np.allclose(nb.distances[:5, :3], 0.0, atol=1e-6)  # itself, its duplicate, its offset copy


def test_search_excluding_self_and_radius():
    crops = real_crops(("camera", "coins", "brick"))
    m = metric()
    search = ExactCopySearch(m, m.features(crops), initial=2)
    idx = list(range(0, len(crops), 3))
    full = brute_force(m, crops[idx], crops)
    nb = search.search(crops[idx], k=3, exclude=idx)
    _check_knn(nb, full, 3, exclude=idx)
    assert not np.any(nb.indices == np.asarray(idx)[:, None])
    radius = float(np.quantile(full, 0.02))
    found = search.within(crops[idx], radius=radius, exclude=idx)
    for row, (i, f) in enumerate(zip(idx, (e.as_dict() for e in found))):
        want = {j for j in np.nonzero(full[row] <= radius)[0] if j != i}
        assert want <= set(f) and all(abs(f[j] - full[row, j]) < 1e-9 for j in f)


def test_rgb_images_compare_channels_jointly():
    rng = np.random.default_rng(4)
    refs = rng.random((30, 3, 24, 24)).astype(np.float32)
    q = np.concatenate([refs[:4] + 0.05, rng.random((4, 3, 24, 24)).astype(np.float32)]).clip(0, 1)
    m = CopyMetric(CopyLayout(24, 24, 3, pooled=4, transforms=Transforms(1, (1.0,))))
    nb = ExactCopySearch(m, m.features(refs)).search(q, k=2)
    _check_knn(nb, brute_force(m, q, refs), 2)


# ------------------------------------------------------------------ statistic


@settings(max_examples=50, deadline=None)
@given(a=st.floats(0, 1), b=st.floats(0, 1), c=st.floats(0, 1), bias=st.floats(0, 0.1), margin=st.floats(0, 1))
def test_ratio_is_monotone(a, b, c, bias, margin):
    lo, hi = sorted((a, b))
    r = ratio_statistic(lo, hi, bias, margin=margin)
    assert 0 <= r <= 1 + 1e-12
    assert ratio_statistic(lo, max(hi, c), bias, margin=margin) <= r + 1e-12  # larger d2: not larger
    assert ratio_statistic(min(lo, c), hi, bias, margin=margin) <= r + 1e-12  # smaller d1: not larger


@settings(max_examples=50, deadline=None)
@given(d2=st.floats(1e-4, 1), tau=st.floats(0.05, 0.95), bias=st.floats(0, 0.05), margin=st.floats(0, 1))
def test_smallest_d1_is_where_the_ratio_reaches_tau(d2, tau, bias, margin):
    theta = float(smallest_d1(np.array([d2]), tau, bias, margin=margin)[0])
    assert 0 <= theta <= d2
    assert ratio_statistic(theta, d2, bias, margin=margin) >= tau
    if theta > 1e-9:
        assert ratio_statistic(theta * (1 - 1e-6), d2, bias, margin=margin) <= tau + 1e-6


def test_noise_removed_is_capped_at_the_nearest_distance():
    """A textured copy whose noise estimate is all texture keeps its evidence: d1 = 0 stays a copy."""
    assert ratio_statistic(0.0, 0.03, bias=1e-3, margin=0.25) < 0.01
    assert ratio_statistic(0.0, 0.03, bias=0.0) == pytest.approx(2e-4 / 0.03)


def test_ratio_of_two_flat_images_is_one_and_of_an_exact_copy_is_small():
    assert ratio_statistic(0.0, 0.0) == 1.0
    assert ratio_statistic(0.0, 0.05) < 0.01


def test_noise_sigma_in_chunks_equals_the_whole_array_at_once():
    """noise_sigma works a chunk of images at a time (memory); the numbers are those of one pass over all."""
    import torch.nn.functional as F

    x = np.random.default_rng(3).random((1100, 1, 64, 64)).astype(np.float32)  # 1,024 images per chunk
    m = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)
    whole = F.conv2d(torch.as_tensor(x, dtype=torch.float64), m[None, None]).abs().mean(dim=(1, 2, 3))
    want = (math.sqrt(math.pi / 2) * whole / 6.0).numpy()
    assert np.array_equal(noise_sigma(x), want)
    assert np.array_equal(noise_sigma(torch.as_tensor(x[:7])), want[:7])


def test_noise_sigma_recovers_white_noise():
    rng = np.random.default_rng(5)
    flat = np.full((4, 1, 64, 64), 0.5) + rng.normal(0, 0.03, (4, 1, 64, 64))
    np.testing.assert_allclose(noise_sigma(flat), 0.03, rtol=0.05)
    lay = CopyLayout(64, 64, 1)
    assert noise_bias(lay, np.array([0.03]))[0] == pytest.approx(0.03 ** 2 / lay.block_pixels * (63 / 64))
    assert noise_margin(lay) == pytest.approx(2 / math.sqrt(63))


def test_ratio_threshold():
    t = ratio_threshold(np.arange(1, 200) / 200, 0.01)  # n = 199: k = 2
    assert (t.k, t.tau, t.level) == (2, 0.01, 2 / 200)
    small = ratio_threshold([0.3, 0.5, 0.9], 0.01)
    assert small.k == 1 and small.tau == 0.3 and "cannot resolve" in small.note


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
def test_decision_agrees_with_exact_ratios(tau):
    crops = real_crops()
    rng = np.random.default_rng(6)
    src = rng.choice(len(crops), 20, replace=False)
    q = np.concatenate([np.clip(crops[src] + rng.normal(0, 0.03, crops[src].shape), 0, 1),
                        real_crops(half=1)[::4]]).astype(np.float32)
    m = metric()
    full = np.sort(brute_force(m, q, crops), 1)
    bias = noise_bias(m.layout, noise_sigma(q))
    want = ratio_statistic(full[:, 0], full[:, 1], bias, margin=0.25) < tau
    search = ExactCopySearch(m, m.features(crops), initial=2)
    dec = decide_ratio(search, q, tau, bias, margin=0.25)
    assert np.array_equal(dec.flagged, want) and 5 <= want.sum() < len(want)  # both outcomes occur
    assert np.all(dec.d1_exact[dec.flagged])
    np.testing.assert_allclose(dec.d1[dec.flagged], full[dec.flagged, 0], atol=1e-9)


def test_fit_screens_the_holdout_but_sets_the_exact_ratio_threshold():
    train = real_crops(("camera", "brick", "coins", "moon"))
    hold = real_crops(("camera", "brick", "coins", "moon"), half=1)
    rule = CopyRatioRule(32, 32, 1, alpha=0.02).fit(train, hold)
    full = rule.ratios(hold)
    for name, t in rule.thresholds_.items():
        assert t.tau == ratio_threshold(full[name], 0.01).tau and t.k >= 1
        h = rule.holdout_[name]
        assert np.all(h.ratio <= full[name] + 1e-12)  # screened ones carry a lower bound
        np.testing.assert_allclose(h.ratio[h.exact], full[name][h.exact], atol=1e-12)
        assert 1 <= h.exact.sum() < len(hold) and np.all(full[name][~h.exact] >= h.screen)


# --------------------------------------------------------------------- controls


def test_rule_catches_shifted_and_rescaled_copies_and_passes_novel_crops():
    """Positive control: copies shifted by 2-3 px or zoomed by 4 % are flagged; negative: unseen crops are not
    (beyond the level the holdout promises)."""
    import skimage.data
    from scipy.ndimage import map_coordinates
    from skimage.color import rgb2gray

    pics = [skimage.data.camera() / 255.0, rgb2gray(skimage.data.astronaut()), skimage.data.brick() / 255.0,
            skimage.data.coins() / 255.0, rgb2gray(skimage.data.coffee())]
    size, rng = 32, np.random.default_rng(7)
    train, origins, hold, novel = [], [], [], []
    for p, img in enumerate(pics):
        h, w = img.shape
        for y in range(8, h - size - 8, 28):
            for x in range(8, w // 2 - size - 8, 28):
                train.append(img[y:y + size, x:x + size])
                origins.append((p, y, x))
            for x in range(w // 2 + 8, w - size - 8, 28):
                (hold if (x // 28) % 2 else novel).append(img[y:y + size, x:x + size])
    train = np.stack(train)[:, None].astype(np.float32)
    rule = CopyRatioRule(size, size, 1, alpha=0.01).fit(train, np.stack(hold)[:, None].astype(np.float32))
    copies = []
    for j in rng.choice(len(train), 24, replace=False):
        p, y, x = origins[j]
        img = pics[p]
        if len(copies) % 2 == 0:  # shifted by 2 or 3 px
            dy, dx = rng.choice([-3, -2, 2, 3], 2)
            copies.append(img[y + dy:y + dy + size, x + dx:x + dx + size])
        else:  # the source region magnified by 4 %
            c = (size - 1) / 2
            g = c + (np.arange(size) - c) / 1.04
            yy, xx = np.meshgrid(y + g, x + g, indexing="ij")
            copies.append(map_coordinates(img, [yy, xx], order=1))
    copies = np.stack(copies)[:, None].astype(np.float32)
    assert rule.decide(copies).flagged.all()
    novel = np.stack(novel)[:, None].astype(np.float32)
    # the threshold is the smallest of ~300 holdout ratios per test: about 1 / 300 of unseen crops each
    assert len(novel) >= 200 and rule.decide(novel).flagged.mean() <= 0.01


# ------------------------------------------------------------ grouped second distance


def _with_siblings(seed=8, noise=0.01, shift=1):
    """Real crops plus, for a third of them, a near-identical sibling (noise ``noise``, shifted ``shift`` px): the
    grouped definition's case.  Labels: every crop and its sibling share a group; some unrelated crops are joined too."""
    crops = real_crops()
    rng = np.random.default_rng(seed)
    src = rng.choice(len(crops), len(crops) // 3, replace=False)
    sib = np.clip(np.roll(crops[src], shift, axis=-1) + rng.normal(0, noise, crops[src].shape), 0, 1)
    refs = np.concatenate([crops, sib]).astype(np.float32)
    labels = np.arange(len(crops))
    labels[rng.choice(len(crops), 20, replace=False)] = 0  # one big group: a patient with many images
    labels = np.concatenate([labels, labels[src]])
    return refs, labels, src


@pytest.mark.parametrize("transforms", [SHIFT_ZOOM, Transforms(0, (1.0,))], ids=["shift_zoom", "identity"])
def test_grouped_search_equals_brute_force(transforms):
    refs, labels, src = _with_siblings()
    rng = np.random.default_rng(9)
    q = np.concatenate([np.clip(refs[src[:15]] + rng.normal(0, 0.02, refs[src[:15]].shape), 0, 1),
                        refs[labels == labels[0]][:5], real_crops(half=1)[::6]]).astype(np.float32)
    m = metric(transforms=transforms)
    full = brute_force(m, q, refs)
    want_idx, want_dist = grouped_two(full, labels)
    search = ExactCopySearch(m, m.features(refs), initial=2)
    nb = search.search_grouped(q, labels)
    np.testing.assert_allclose(nb.distances, want_dist, atol=1e-7)  # exact copies: sqrt of rounding
    assert np.all((nb.indices == want_idx) | np.isclose(nb.distances, np.take_along_axis(full, nb.indices, 1)))
    assert np.all(labels[nb.indices[:, 0]] != labels[nb.indices[:, 1]])
    # the plain second-nearest of a copy of a crop with a sibling is that sibling: the grouped one is not
    plain = np.sort(full, 1)
    assert np.all(want_dist[:15, 1] >= plain[:15, 1]) and np.mean(want_dist[:15, 1] > plain[:15, 1]) >= 0.5
    assert search.stats.exact_pairs < len(q) * len(refs)
    # singleton groups are the plain two nearest
    nb1 = search.search_grouped(q, np.arange(len(refs)))
    np.testing.assert_allclose(nb1.distances, plain[:, :2], atol=1e-7)


def test_grouped_search_when_every_candidate_shares_a_group():
    """All of a query's first candidates in one group: a reference outside it is fetched; one group: ``inf``."""
    crops = real_crops(("camera", "coins"))
    m = metric()
    labels = np.zeros(len(crops), np.int64)
    labels[-3:] = [1, 2, 3]
    q = crops[:6]
    search = ExactCopySearch(m, m.features(crops), initial=2)
    nb = search.search_grouped(q, labels)
    _, want = grouped_two(brute_force(m, q, crops), labels)
    np.testing.assert_allclose(nb.distances, want, atol=1e-9)
    one = search.search_grouped(q, np.zeros(len(crops), np.int64))
    assert np.all(np.isinf(one.distances[:, 1])) and np.all(one.indices[:, 1] == -1)


@pytest.mark.parametrize("tau", [0.3, 0.5, 0.7])
def test_grouped_decision_agrees_with_brute_force(tau):
    refs, labels, src = _with_siblings(10)
    rng = np.random.default_rng(11)
    q = np.concatenate([np.clip(refs[src[:20]] + rng.normal(0, 0.03, refs[src[:20]].shape), 0, 1),
                        real_crops(half=1)[::4]]).astype(np.float32)
    m = metric()
    full = brute_force(m, q, refs)
    _, two = grouped_two(full, labels)
    bias = noise_bias(m.layout, noise_sigma(q))
    want = ratio_statistic(two[:, 0], two[:, 1], bias, margin=0.25) < tau
    plain = np.sort(full, 1)
    before = ratio_statistic(plain[:, 0], plain[:, 1], bias, margin=0.25) < tau
    search = ExactCopySearch(m, m.features(refs), initial=2)
    dec = decide_ratio(search, q, tau, bias, margin=0.25, labels=labels)
    assert np.array_equal(dec.flagged, want) and 5 <= want.sum() < len(want)
    assert want[:20].sum() > before[:20].sum()  # copies of crops with a sibling: caught now, missed before
    np.testing.assert_allclose(dec.d1[dec.flagged], two[dec.flagged, 0], atol=1e-9)
    exact = dec.ratio_low == dec.ratio_high
    np.testing.assert_allclose(dec.ratio_low[exact], ratio_statistic(two[:, 0], two[:, 1], bias, margin=0.25)[exact],
                               atol=1e-9)


def test_training_groups_join_patients_and_duplicate_pairs():
    from audit.copy_detection.ratio_rule import training_groups

    labels = training_groups(7, [(5, 6), (1, 5)], ["a", "b", "a", "", "", "c", ""])
    assert labels.tolist() == [0, 1, 0, 2, 3, 1, 1]
    assert training_groups(3).tolist() == [0, 1, 2]


def test_rule_groups_near_duplicates_within_the_holdout_radius_and_patients():
    """``group`` joins a crop and its exact duplicate (nearer than unseen crops come to the training set) and,
    given patient IDs, a crop and its noisy sibling (noise 0.006: farther than unseen flat crops come, so not a
    near-duplicate by distance alone, yet nearer than a noise-0.02 copy's own noise can tell); either way the
    grouped rule catches noisy copies of crops with a sibling that the plain rule misses."""
    hold = real_crops(half=1)
    rng = np.random.default_rng(13)
    for noise, patients, copy_noise in ((0.0, False, 0.01), (0.006, True, 0.02)):
        refs, _, src = _with_siblings(12, noise, shift=0)
        n = len(refs) - len(src)
        ids = [f"p{i}" for i in range(n)] + [f"p{s}" for s in src] if patients else None
        rule = CopyRatioRule(32, 32, 1, alpha=0.02).fit(refs, hold, patients=ids)
        assert all(rule.labels_[s] == rule.labels_[n + j] for j, s in enumerate(src))
        if patients:  # the IDs joined them, not the distance
            assert not {(s, n + j) for j, s in enumerate(src)} & set(rule.pairs_)
        assert rule.radius_.tau == np.sort(rule.nearest_distances(hold))[rule.radius_.k - 1]
        assert all(rule.labels_[a] == rule.labels_[b] for a, b in rule.pairs_)
        plain = CopyRatioRule(32, 32, 1, alpha=0.02).fit(refs, hold, grouped=False)
        assert plain.labels_ is None
        keep = src[rule.reference_content()[src] >= 0.02][:30]  # sources with content (see the control)
        copies = np.clip(refs[keep] + rng.normal(0, copy_noise, refs[keep].shape), 0, 1).astype(np.float32)
        now, before = rule.decide(copies).flagged, plain.decide(copies).flagged
        assert now.mean() >= 0.9 and before.mean() <= 0.2, (noise, now.mean(), before.mean())
