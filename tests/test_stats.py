"""audit.core.stats against the libraries it delegates to, and against the hand-written forms they replaced."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from audit.core.stats import bootstrap_ci, bootstrap_draws, clopper_pearson, percentile_ci


def _beta_form(k, n, alpha):
    """Clopper & Pearson's interval as beta quantiles (the form this module used before scipy's binomtest)."""
    lo = 0.0 if k == 0 else stats.beta.ppf(alpha / 2, k, n - k + 1)
    hi = 1.0 if k == n else stats.beta.ppf(1 - alpha / 2, k + 1, n - k)
    return lo, hi


@pytest.mark.parametrize("n", [1, 2, 7, 40, 1000, 12345])
@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.1])
def test_clopper_pearson_equals_the_beta_quantile_form(n, alpha):
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        lo, hi = clopper_pearson(k, n, alpha)
        ref = _beta_form(k, n, alpha)
        assert abs(lo - ref[0]) < 1e-11 and abs(hi - ref[1]) < 1e-11, (k, n, alpha)
        assert lo <= k / n <= hi
    # by hand: no successes in n trials -> upper bound 1 - (alpha/2)^(1/n)
    assert clopper_pearson(0, n, alpha) == (0.0, pytest.approx(1 - (alpha / 2) ** (1 / n), rel=1e-10))
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def _draws_by_loop(statistic, members, n_boot, rng):
    """Resample groups one draw at a time with ``rng.integers`` (the loop this module used before scipy)."""
    out = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), len(members))
        out.append(np.asarray(statistic(np.concatenate([members[g] for g in pick])), np.float64))
    return np.stack(out)


def test_bootstrap_draws_are_the_same_draws_as_the_loop():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(90, 3))
    stat = lambda idx: values[idx].mean(0)  # noqa: E731
    rows = [np.array([i]) for i in range(90)]
    ours = bootstrap_draws(stat, 90, 300, np.random.default_rng(4))
    assert ours.shape == (300, 3)
    assert np.array_equal(ours, _draws_by_loop(stat, rows, 300, np.random.default_rng(4)))
    groups = np.repeat(["p%02d" % g for g in range(30)], 3)  # sorted keys: group g holds rows 3g..3g+2
    members = [np.arange(3 * g, 3 * g + 3) for g in range(30)]
    ours = bootstrap_draws(stat, 90, 300, np.random.default_rng(5), groups=groups)
    assert np.array_equal(ours, _draws_by_loop(stat, members, 300, np.random.default_rng(5)))


def test_bootstrap_ci_is_scipys_percentile_interval_and_drops_undefined_draws():
    rng = np.random.default_rng(1)
    x = rng.exponential(size=60)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=500, rng=np.random.default_rng(2))
    ref = stats.bootstrap((x,), np.mean, n_resamples=500, method="percentile", vectorized=False,
                          rng=np.random.default_rng(2)).confidence_interval
    assert (lo, hi) == (pytest.approx(ref.low, abs=1e-15), pytest.approx(ref.high, abs=1e-15))
    loop = _draws_by_loop(lambda idx: x[idx].mean(), [np.array([i]) for i in range(60)], 500,
                          np.random.default_rng(2))
    assert (lo, hi) == percentile_ci(loop)
    # a statistic undefined on some resamples (None / NaN): those draws are dropped, the interval stays finite
    y = np.r_[np.zeros(57), np.ones(3)]
    undefined = lambda s: None if s.sum() == 0 else float(s.mean())  # noqa: E731
    lo, hi = bootstrap_ci(undefined, y, n_boot=400, rng=np.random.default_rng(3))
    assert 0 < lo < hi < 1
    # one observation: every resample is the sample itself
    assert bootstrap_ci(np.mean, np.array([2.5]), n_boot=10) == (2.5, 2.5)
