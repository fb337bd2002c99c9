"""Metrics on hand-made inputs whose answers are known."""

from __future__ import annotations  # noqa: I001  (keeps the wrapped import below compact; ruff's isort writes one name per line)

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from explainer.metrics import (auroc, average_ranks, balanced_accuracy_ci, bootstrap_ci, classify, judge_stats, pearson,
    pearson_ci, simulation_stats)


def test_pearson_perfect_scaled_and_inverted() -> None:
    true = [0, 0, 3, 0, 7, 1]
    assert pearson(true, true) == pytest.approx(1.0)
    # Correlation ignores scale and offset: a simulator on a 0-9 scale can still score 1.
    assert pearson([2 * x + 5 for x in true], true) == pytest.approx(1.0)
    assert pearson([-x for x in true], true) == pytest.approx(-1.0)


def test_pearson_constant_is_zero_not_nan() -> None:
    assert pearson([4, 4, 4, 4], [0, 1, 2, 3]) == 0.0
    assert pearson([0, 1, 2, 3], [0, 0, 0, 0]) == 0.0
    # 0.1 repeated: the floating mean differs from 0.1, which must not create a correlation.
    assert pearson([0.1] * 7, [1, 2, 3, 4, 5, 6, 8]) == 0.0
    assert pearson([], []) == 0.0
    assert pearson([1.0], [2.0]) == 0.0


def test_pearson_shuffled_is_near_zero_and_hand_value() -> None:
    rng = np.random.default_rng(0)
    true = rng.exponential(size=20_000) * (rng.random(20_000) < 0.1)
    assert abs(pearson(rng.permutation(true), true)) < 0.03
    # Hand-computed: x = [1,2,3], y = [1,3,2] -> cov = 0.5, var = 1 each -> 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_pearson_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="3 predictions for 2"):
        pearson([1, 2, 3], [1, 2])


def test_average_ranks_ties() -> None:
    assert average_ranks([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert average_ranks([1, 1, 1]).tolist() == [2.0, 2.0, 2.0]


def test_auroc_known_cases() -> None:
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # All tied: every positive/negative pair counts half.
    assert auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5
    # Positives 3 and 1 against negatives 2 and 0: pairs won = (3>2, 3>0, 1>0) = 3 of 4.
    assert auroc([3, 1, 2, 0], [1, 1, 0, 0]) == pytest.approx(0.75)
    # A tie between one positive and one negative: (1 + 0.5) / 2.
    assert auroc([2, 1, 1], [1, 1, 0]) == pytest.approx(0.75)
    assert auroc([1, 2], [1, 1]) is None
    assert auroc([1, 2], [0, 0]) is None


def test_auroc_random_scores_near_half() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(5000) < 0.3
    assert abs(auroc(rng.random(5000), labels) - 0.5) < 0.03


def test_classification_metrics() -> None:
    pred = [1, 1, 1, 0, 0, 0, 0, 0]
    true = [1, 1, 0, 1, 0, 0, 0, 0]
    c = classify(pred, true)
    assert (c.tp, c.fp, c.tn, c.fn) == (2, 1, 4, 1)
    assert c.accuracy == pytest.approx(6 / 8)
    assert c.precision == pytest.approx(2 / 3)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(2 / 3)
    assert c.balanced_accuracy == pytest.approx((2 / 3 + 4 / 5) / 2)
    d = c.as_dict()
    assert d["tp"] == 2 and d["f1"] == pytest.approx(2 / 3)


def test_classification_degenerate_cases() -> None:
    # Predicting nothing: precision has an empty denominator and is 0, not NaN.
    c = classify([0, 0, 0], [1, 0, 0])
    assert c.precision == 0.0 and c.recall == 0.0 and c.f1 == 0.0
    assert c.balanced_accuracy == pytest.approx(0.5)
    # Only negatives present and all predicted negative: balanced accuracy is their recall.
    assert classify([0, 0], [0, 0]).balanced_accuracy == 1.0
    assert classify([], []).accuracy == 0.0


# --- bootstrap intervals (property tests) -----------------------------------------------------


def _items(seed: int, k: int, noise: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """k snippets of 16 tokens: sparse true activations and a noisy 0-9 simulation of them."""
    rng = np.random.default_rng(seed)
    trues = [rng.uniform(0.5, 3.0, size=16) * (rng.random(16) < 0.3) for _ in range(k)]
    for t in trues:
        t[rng.integers(16)] = 1.0 + rng.random()  # every snippet fires somewhere: well-behaved
    preds = [np.round(np.clip(3 * t + rng.normal(0, noise, 16), 0, 9)) for t in trues]
    return preds, trues


def _cat_pearson(preds, trues):
    def fn(ix: np.ndarray):
        p = np.concatenate([preds[i] for i in ix])
        t = np.concatenate([trues[i] for i in ix])
        return pearson(p, t) if np.ptp(t) > 0 else None
    return fn


@hsettings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(8, 40), noise=st.floats(0.2, 2.0))
def test_bootstrap_interval_holds_the_estimate_and_matches_the_generic_one(seed, k, noise):
    preds, trues = _items(seed, k, noise)
    point = pearson(np.concatenate(preds), np.concatenate(trues))
    lo, hi = pearson_ci(preds, trues, seed=seed)
    assert lo is not None and hi is not None and lo <= point <= hi
    # The vectorized interval is the generic bootstrap of the same function on the same draws.
    glo, ghi = bootstrap_ci(_cat_pearson(preds, trues), k, seed=seed)
    assert (lo, hi) == pytest.approx((glo, ghi), abs=1e-9)


@hsettings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(2, 30))
def test_bootstrap_is_deterministic_for_a_seed(seed, k):
    preds, trues = _items(seed, k, 1.0)
    fn = _cat_pearson(preds, trues)
    assert bootstrap_ci(fn, k, seed=seed) == bootstrap_ci(fn, k, seed=seed)
    assert pearson_ci(preds, trues, seed=seed) == pearson_ci(preds, trues, seed=seed)
    if k >= 8:  # with fewer snippets there are few distinct resamples and seeds can tie
        assert bootstrap_ci(fn, k, seed=seed, n=200) != bootstrap_ci(fn, k, seed=seed + 1, n=200)


@hsettings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(6, 20))
def test_bootstrap_narrows_with_more_items(seed, k):
    preds, trues = _items(seed, 16 * k, 1.0)
    # 16x the snippets from the same distribution: the width shrinks ~ 1/sqrt(items), to ~1/4 of
    # the typical width on k of them (the median over the 16 disjoint subsets; one subset alone
    # can be narrow by chance).
    widths = [np.subtract(*pearson_ci(preds[i * k:(i + 1) * k], trues[i * k:(i + 1) * k], seed=seed)[::-1])
              for i in range(16)]
    lo16, hi16 = pearson_ci(preds, trues, seed=seed)
    assert hi16 - lo16 < 0.5 * np.median(widths)
    lo, hi = pearson_ci(preds[:k], trues[:k], seed=seed)
    # The same snippets four times over: the same estimate, about half the width.
    lo4, hi4 = pearson_ci(preds[:k] * 4, trues[:k] * 4, seed=seed)
    assert hi4 - lo4 < 0.75 * (hi - lo)


def test_bootstrap_undefined_cases() -> None:
    assert bootstrap_ci(lambda ix: 1.0, 0) == (None, None)
    assert bootstrap_ci(lambda ix: None, 5) == (None, None)  # no resample defined
    assert bootstrap_ci(lambda ix: 0.3, 5) == (0.3, 0.3)
    # One snippet fires, nine do not: most resamples still hold it, the rest are left out.
    trues = [np.array([0.0, 2.0, 0.0])] + [np.zeros(3)] * 9
    preds = [np.array([0.0, 5.0, 0.0])] + [np.zeros(3)] * 9
    assert pearson_ci(preds, trues) == pytest.approx((1.0, 1.0))
    # Truth constant everywhere: the interval is undefined, not a made-up 0.
    assert pearson_ci([np.arange(3.0)] * 4, [np.ones(3)] * 4) == (None, None)
    # Constant predictions score 0 in every resample, as `pearson` scores them.
    assert pearson_ci([np.ones(3)] * 4, [np.arange(3.0)] * 4) == (0.0, 0.0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(lambda ix: 0.0, 3, level=1.5)
    # Any int is a seed (settings do not forbid negative ones), and distinct seeds draw differently.
    preds, trues = _items(0, 12, 1.0)
    assert pearson_ci(preds, trues, seed=-1, n=200) != pearson_ci(preds, trues, seed=1, n=200)


def test_simulation_stats_names_and_baseline() -> None:
    kinds = ["top", "top", "quantile", "random", "random"]
    trues = [np.array([0, 3.0, 0]), np.array([2.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3), np.array([0, 0, 1.0])]
    preds = [np.array([0, 9.0, 0]), np.array([6.0, 0, 0]), np.array([0, 0, 3.0]), np.array([0, 2.0, 0]), np.array([0, 0, 3.0])]
    s = simulation_stats(preds, trues, kinds)
    assert s["all"] == pytest.approx(pearson(np.concatenate(preds), np.concatenate(trues)))
    tr = [0, 1, 3, 4]
    assert s["top_random"] == pytest.approx(pearson(np.concatenate([preds[i] for i in tr]),
                                                    np.concatenate([trues[i] for i in tr])))
    assert s["top"] == pytest.approx(1.0) and s["quantile"] == pytest.approx(-0.5)
    assert s["random"] == pytest.approx(pearson([0, 2, 0, 0, 0, 3], [0, 0, 0, 0, 0, 1]))
    assert s["baseline"] == 0.0 and s["ci_low"] <= s["all"] <= s["ci_high"]
    only_top = simulation_stats(preds[:2], trues[:2], kinds[:2])
    assert only_top["quantile"] is None and only_top["random"] is None and only_top["top_random"] == only_top["top"]


def test_judge_stats_baseline_is_always_yes_balanced_accuracy() -> None:
    labels = [True, True, True, False, False]  # fuzzing with 5 snippets: 2 highlights moved
    yes = judge_stats([True] * 5, labels)
    assert yes["baseline"] == 0.5 and (yes["ci_low"], yes["ci_high"]) == (0.5, 0.5)
    assert judge_stats([True] * 3, [True] * 3)["baseline"] == 1.0
    perfect = judge_stats(labels, labels)
    assert (perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0)
    lo, hi = balanced_accuracy_ci([1, 0, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0], seed=3)
    assert lo is not None and hi is not None and lo <= classify([1, 0, 1, 0, 0, 1], [1, 1, 1, 0, 0, 0]).balanced_accuracy <= hi
    assert balanced_accuracy_ci([], []) == (None, None)


def test_training_metrics_interval_helpers() -> None:
    """The ΔCE interval: Student's t quantile and a mean's 95% interval over independent contexts."""
    import torch

    from explainer.sae.outliers import OutlierRule, mean_ci95, position_histogram, t_quantile_975

    for df, t in [(10, 2.228139), (30, 2.042272), (1000, 1.962339)]:
        assert t_quantile_975(df) == pytest.approx(t, abs=2e-4)
    mean, lo, hi = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]))
    # sd of 1..11 = sqrt(11), t(10) = 2.228139
    assert mean == 6 and hi - mean == pytest.approx(2.228139 * 11**0.5 / 11**0.5, abs=1e-3) and lo == 12 - hi
    assert mean_ci95(torch.tensor([3.0]))[1:] == (None, None)
    rule = OutlierRule(factor=10, median_norm=2.0)
    x = torch.ones(2, 3, 4)  # norm 2
    x[1, 0] *= 100
    assert rule.mask(x).tolist() == [[False] * 3, [True, False, False]]
    assert position_histogram(rule.mask(x)) == {"0": 1}
    assert OutlierRule.from_cfg(rule.cfg()) == rule and OutlierRule.from_cfg({}) is None
    assert not OutlierRule(0, 2.0).mask(x).any()
