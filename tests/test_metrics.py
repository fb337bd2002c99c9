"""Metrics on hand-made inputs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from explainer.metrics import auroc, average_ranks, classify, pearson


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


def test_training_metrics_interval_helpers() -> None:
    """The ΔCE interval: Student's t quantile and a mean's 95% interval over independent contexts."""
    import torch

    from explainer.outliers import OutlierRule, mean_ci95, position_histogram, t_quantile_975

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
