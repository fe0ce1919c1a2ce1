"""Metrics against values worked out by hand (the arithmetic is in the comments)."""

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from emofuse.fuse.metrics import (
    PRIMARY,
    classification_metrics,
    is_better,
    multilabel_binary_metrics,
    regression_metrics,
    task_metrics,
)

CLASSES = ["neu", "hap", "sad", "ang"]


def test_classification_by_hand():
    y_true = [0, 0, 0, 1, 1, 2, 2, 2]  # "ang" is in neither truth nor prediction
    y_pred = [0, 0, 1, 1, 0, 2, 2, 1]
    r = classification_metrics(y_true, y_pred, CLASSES)
    assert r["n"] == 8
    # right at 0, 1, 3, 5, 6 -> 5 / 8
    assert r["wa"] == pytest.approx(5 / 8)
    # recall neu 2/3, hap 1/2, sad 2/3 -> (2/3 + 1/2 + 2/3) / 3 = 11/18
    assert r["ua"] == pytest.approx(11 / 18)
    # F1 neu: P 2/3 R 2/3 -> 2/3; hap: P 1/3 R 1/2 -> 2*(1/6)/(5/6) = 2/5; sad: P 1 R 2/3 -> 4/5
    f1 = r["per_class_f1"]
    assert f1["neu"] == pytest.approx(2 / 3)
    assert f1["hap"] == pytest.approx(2 / 5)
    assert f1["sad"] == pytest.approx(4 / 5)
    assert math.isnan(f1["ang"])  # never seen, never predicted: undefined
    # weighted by support 3, 2, 3: (3*2/3 + 2*2/5 + 3*4/5) / 8 = 5.2 / 8
    assert r["weighted_f1"] == pytest.approx(5.2 / 8)
    # macro over the classes seen: (2/3 + 2/5 + 4/5) / 3
    assert r["macro_f1"] == pytest.approx((2 / 3 + 2 / 5 + 4 / 5) / 3)
    assert r["confusion"] == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
    # neu one-vs-rest: truth 11100000, pred 11001000 -> wrong at 2 and 4: acc 6/8;
    # F1 pos: tp 2 fp 1 fn 1 -> 2/3 (support 3); neg: tp 4 fp 1 fn 1 -> 8/10 (support 5)
    # weighted (3*2/3 + 5*0.8) / 8 = 6/8
    assert r["per_emotion"]["neu"] == pytest.approx({"acc": 0.75, "f1": 0.75})
    # ang one-vs-rest: all negative on both sides -> perfect
    assert r["per_emotion"]["ang"] == pytest.approx({"acc": 1.0, "f1": 1.0})


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_class_absent_from_split():
    # class 2 is predicted once but never true
    y_true, y_pred = [0, 0, 1, 1], [0, 2, 1, 1]
    r = classification_metrics(y_true, y_pred, ["a", "b", "c"])
    # UA over present classes only: recall a 1/2, b 2/2 -> 0.75 (not (0.5 + 1 + 0) / 3)
    assert r["ua"] == pytest.approx(0.75)
    assert r["ua"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert r["confusion"] == [[1, 0, 1], [0, 2, 0], [0, 0, 0]]  # absent class keeps its row
    assert r["per_class_f1"]["c"] == 0.0  # predicted but never true: a real 0, not undefined
    assert r["wa"] == pytest.approx(3 / 4)


def test_classification_perfect():
    y = [0, 1, 2, 3, 3, 1]
    r = classification_metrics(y, y, CLASSES)
    for key in ("wa", "ua", "weighted_f1", "macro_f1"):
        assert r[key] == 1.0
    assert all(v == {"acc": 1.0, "f1": 1.0} for v in r["per_emotion"].values())


def test_multilabel_binary_by_hand():
    names = ["neu", "hap", "sad", "ang"]
    y_true = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    y_pred = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    r = multilabel_binary_metrics(y_true, y_pred, names)
    per = r["per_emotion"]
    # neu: truth 1000, pred 1100 -> acc 3/4; pos F1 tp1 fp1 fn0 = 2/3 (support 1),
    # neg F1 tp2 fp0 fn1 = 4/5 (support 3) -> (2/3 + 3*4/5) / 4 = 23/30
    assert per["neu"] == pytest.approx({"acc": 0.75, "f1": 23 / 30})
    # hap: truth 0100, pred 0000 -> acc 3/4; pos F1 0 (support 1); neg tp3 fp1 fn0 = 6/7 (support 3)
    # -> 3*(6/7) / 4 = 9/14
    assert per["hap"] == pytest.approx({"acc": 0.75, "f1": 9 / 14})
    assert per["sad"] == pytest.approx({"acc": 1.0, "f1": 1.0})
    assert per["ang"] == pytest.approx({"acc": 0.75, "f1": 9 / 14})
    assert r["mean_acc"] == pytest.approx((0.75 * 3 + 1) / 4)
    assert r["mean_f1"] == pytest.approx((23 / 30 + 9 / 14 + 1 + 9 / 14) / 4)
    with pytest.raises(ValueError):
        multilabel_binary_metrics(y_true, y_pred[:, :3], names)


def test_regression_by_hand():
    t = [-3.0, -1.5, 0.0, 0.5, 2.5, 1.0]
    p = [-2.5, 0.4, 0.2, -0.5, 3.7, 1.0]
    r = regression_metrics(t, p)
    assert r["n"] == 6 and r["n_non0"] == 5
    # |err| = 0.5, 1.9, 0.2, 1.0, 1.2, 0 -> 4.8 / 6
    assert r["mae"] == pytest.approx(0.8)
    assert r["corr"] == pytest.approx(np.corrcoef(t, p)[0, 1])
    # acc7, np.round (half to even): truth -> -3, -2, 0, 0, 2, 1;
    # pred (3.7 clipped to 3) -> -2, 0, 0, -0, 3, 1
    # equal at 2, 3, 5 -> 3/6
    assert r["acc7"] == pytest.approx(0.5)
    # acc5, clip to [-2, 2]: truth -> -2, -2, 0, 0, 2, 1; pred -> -2, 0, 0, -0, 2, 1 -> wrong only at 1
    assert r["acc5"] == pytest.approx(5 / 6)
    # has0 (>= 0): truth FFTTTT, pred FTTFTT -> wrong at 1, 3: acc 4/6
    # F1 True: tp3 fp1 fn1 = 3/4 (support 4); False: tp1 fp1 fn1 = 1/2 (support 2) -> (3 + 1) / 6
    assert r["acc2_has0"] == pytest.approx(4 / 6)
    assert r["f1_has0"] == pytest.approx(4 / 6)
    # non0 (drop truth 0): truth FFTTT, pred (-2.5, .4, -.5, 3.7, 1) FTFTT -> acc 3/5
    # F1 True: tp2 fp1 fn1 = 2/3 (support 3); False: tp1 fp1 fn1 = 1/2 (support 2) -> (2 + 1) / 5
    assert r["acc2_non0"] == pytest.approx(3 / 5)
    assert r["f1_non0"] == pytest.approx(3 / 5)
    assert r["notes"] == []


def test_pearson_by_hand_and_constant_inputs():
    # deviations t (-1, 0, 1), p (-1, 1, 0): cov 1, variances 2 and 2 -> r = 1/2
    assert regression_metrics([1, 2, 3], [1, 3, 2])["corr"] == pytest.approx(0.5)
    # constant prediction: r undefined -> 0.0, never NaN
    r = regression_metrics([-1.0, 0.5, 2.0], [0.3, 0.3, 0.3])
    assert r["corr"] == 0.0
    assert r["mae"] == pytest.approx((1.3 + 0.2 + 1.7) / 3)


def test_regression_all_zero_truth():
    r = regression_metrics([0.0, 0.0, 0.0], [0.5, -0.2, 0.0])
    assert r["n_non0"] == 0
    assert math.isnan(r["acc2_non0"]) and math.isnan(r["f1_non0"])
    assert r["notes"] and "non0" in r["notes"][0]
    # has0: truth all >= 0, pred TFT -> acc 2/3; F1 True tp2 fn1 = 4/5 with all the support
    assert r["acc2_has0"] == pytest.approx(2 / 3)
    assert r["f1_has0"] == pytest.approx(0.8)
    assert r["corr"] == 0.0  # constant truth
    # rounds: 0.5 -> 0 (half to even), -0.2 -> -0, 0 -> 0: all equal to the truth's 0
    assert r["acc7"] == 1.0


def test_regression_perfect():
    y = [-2.0, -0.3, 0.0, 1.2, 3.0]
    r = regression_metrics(y, y)
    assert r["mae"] == 0.0
    assert r["corr"] == pytest.approx(1.0)
    for key in ("acc7", "acc5", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0"):
        assert r[key] == 1.0


def test_primary_and_is_better():
    assert PRIMARY["regression"] == "mae" and PRIMARY["classification"] == "weighted_f1"
    assert is_better("mae", 0.7, 0.8) and not is_better("mae", 0.9, 0.8)
    assert is_better("weighted_f1", 0.6, 0.5) and not is_better("weighted_f1", 0.5, 0.5)
    assert is_better("mae", 1.0, None) and is_better("wa", 0.1, math.nan)
    assert not is_better("wa", math.nan, 0.1)


def test_task_metrics_dispatches_by_task():
    assert task_metrics("regression", [1.0, -1.0], [1.0, -1.0])["acc2_non0"] == 1.0
    assert task_metrics("classification", [0, 1], [0, 0], ["a", "b"])["wa"] == 0.5
    assert task_metrics("multilabel", [[1, 0]], [[1, 0]], ["a", "b"])["mean_acc"] == 1.0
    with pytest.raises(ValueError, match="unknown task"):
        task_metrics("ranking", [0], [0])
    assert set(PRIMARY) == {"classification", "multilabel", "regression"}
