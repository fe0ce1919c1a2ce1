"""Every metric of every protocol, defined once. scikit-learn / scipy do the arithmetic.

All values are fractions in [0, 1] (or raw MAE / Pearson r); reports format them as percentages.

- classification_metrics: IEMOCAP 4-class (WA, UA, weighted F1, per-emotion binary), MELD (accuracy,
  weighted F1, per-class F1).
- multilabel_binary_metrics: IEMOCAP as the paper trained it, four binary heads.
- regression_metrics: CMU-MOSI / CMU-MOSEI sentiment in [-3, 3], the MulT / MMSA conventions.
- task_metrics: the one entry point, by task name.
- PRIMARY and is_better: which number early stopping watches, and in which direction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score


def _binary_acc_f1(y_true, y_pred) -> dict:
    """Accuracy and support-weighted F1 of one binary problem (the MulT / SSE-FT table's "Acc" and "F1")."""
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    return {
        "acc": float(accuracy_score(y_true, y_pred)),
        # labels fixed so a one-sided split (no positives) is still well defined
        "f1": float(f1_score(y_true, y_pred, labels=[False, True], average="weighted", zero_division=0)),
    }


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict:
    """Single-label classification; y_true / y_pred are class indices into `classes`.

    wa   - weighted accuracy: overall accuracy (the IEMOCAP literature's name for it)
    ua   - unweighted accuracy: mean per-class recall over the classes present in y_true
           (= sklearn balanced_accuracy; a class absent from the split has no recall to average)
    weighted_f1, macro_f1 - macro over the classes seen in y_true or y_pred (sklearn's default)
    per_class_f1 - {class: F1}; NaN for a class neither in y_true nor in y_pred (undefined)
    per_emotion  - {class: {"acc", "f1"}}: one-vs-rest binary accuracy and weighted F1
    confusion    - rows = truth, columns = prediction, every class has a row and a column
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    k = len(classes)
    present = np.unique(y_true)
    per_class = f1_score(y_true, y_pred, labels=list(range(k)), average=None, zero_division=np.nan)
    return {
        "n": int(len(y_true)),
        "wa": float(accuracy_score(y_true, y_pred)),
        "ua": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "per_class_f1": {c: float(f) for c, f in zip(classes, per_class)},
        "per_emotion": {c: _binary_acc_f1(y_true == i, y_pred == i) for i, c in enumerate(classes)},
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist(),
    }


def multilabel_binary_metrics(y_true, y_pred, names: Sequence[str]) -> dict:
    """IEMOCAP as the paper trained it: one binary head per emotion.

    y_true, y_pred: (N, E) 0/1 (or bool) arrays, column e = emotion names[e].
    Returns per-emotion accuracy and weighted F1, and their means over the emotions.
    """
    y_true, y_pred = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(names):
        raise ValueError(f"expected (N, {len(names)}) arrays, got {y_true.shape} and {y_pred.shape}")
    per = {name: _binary_acc_f1(y_true[:, e], y_pred[:, e]) for e, name in enumerate(names)}
    out = {
        "n": int(len(y_true)),
        "per_emotion": per,
        "mean_acc": float(np.mean([v["acc"] for v in per.values()])),
        "mean_f1": float(np.mean([v["f1"] for v in per.values()])),
    }
    for name, v in per.items():  # flat too, so tables can average them over seeds: acc_happy, f1_happy
        out[f"acc_{name}"], out[f"f1_{name}"] = v["acc"], v["f1"]
    return out


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    # r is undefined (0/0) when either side is constant; scipy returns NaN. We return 0.0: a constant
    # predictor carries no linear information about the truth, and a NaN would poison the mean over
    # seeds and any model selection that compares r.
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(pearsonr(a, b).statistic)


def _class_acc(truth: np.ndarray, pred: np.ndarray, bound: float) -> float:
    # np.round rounds half to even (banker's: 0.5 -> 0, 1.5 -> 2, -2.5 -> -2). The MulT and MMSA
    # evaluation code uses np.round too; we keep it so Acc-7 / Acc-5 compare with published numbers.
    return float(np.mean(np.round(np.clip(truth, -bound, bound)) == np.round(np.clip(pred, -bound, bound))))


def regression_metrics(y_true, y_pred) -> dict:
    """CMU-MOSI / CMU-MOSEI sentiment scores in [-3, 3].

    mae, corr (Pearson r; 0.0 when either side is constant), acc7 (round(clip(x, -3, 3)) on both
    sides), acc5 (clip to [-2, 2]), acc2_has0 / f1_has0 (negative < 0 vs non-negative >= 0, all
    samples), acc2_non0 / f1_non0 (positive > 0 vs negative < 0, truth == 0 removed for these two only;
    NaN plus a note when nothing remains). F1 is support-weighted, as in MulT / MMSA. MAE uses the raw
    (unclipped) predictions, as they do.
    """
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape or len(t) == 0:
        raise ValueError(f"need two non-empty arrays of one length, got {t.shape} and {p.shape}")
    has0 = _binary_acc_f1(t >= 0, p >= 0)
    non0 = t != 0
    notes = []
    if non0.any():
        nz = _binary_acc_f1(t[non0] > 0, p[non0] > 0)
    else:
        nz = {"acc": math.nan, "f1": math.nan}
        notes.append("every truth score is 0: acc2_non0 and f1_non0 are undefined (NaN)")
    return {
        "n": int(len(t)),
        "n_non0": int(non0.sum()),
        "mae": float(np.mean(np.abs(p - t))),
        "corr": _pearson(p, t),
        "acc7": _class_acc(t, p, 3.0),
        "acc5": _class_acc(t, p, 2.0),
        "acc2_has0": has0["acc"],
        "f1_has0": has0["f1"],
        "acc2_non0": nz["acc"],
        "f1_non0": nz["f1"],
        "notes": notes,
    }


def task_metrics(task: str, y_true, y_pred, classes: Sequence[str] | None = None) -> dict:
    """The metrics of a protocol's task: "classification" (class indices), "regression" (scores) or
    "multilabel" ((N, E) binary arrays, `classes` = the emotion names)."""
    if task == "classification":
        return classification_metrics(y_true, y_pred, classes)
    if task == "regression":
        return regression_metrics(y_true, y_pred)
    if task == "multilabel":
        return multilabel_binary_metrics(y_true, y_pred, classes)
    raise ValueError(f"unknown task {task!r}: expected classification, regression or multilabel")


# Early stopping watches one number per kind of task, unless train.select_metric names another.
PRIMARY = {"classification": "weighted_f1", "multilabel": "mean_f1", "regression": "mae"}
# What train.select_metric may name, per task (the scalar metrics above).
SELECTABLE = {
    "classification": ("wa", "ua", "weighted_f1", "macro_f1"),
    "multilabel": ("mean_acc", "mean_f1"),
    "regression": ("mae", "corr", "acc7", "acc5", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0"),
}
LOWER_IS_BETTER = {"mae"}


def is_better(metric_name: str, new: float, old: float | None) -> bool:
    """True when `new` improves on `old` (None or NaN = nothing yet). A NaN `new` never improves."""
    if new is None or math.isnan(new):
        return False
    if old is None or math.isnan(old):
        return True
    return new < old if metric_name in LOWER_IS_BETTER else new > old
