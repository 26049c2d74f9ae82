"""Classification and regression metrics, written out by hand.

Everything here is a few lines of numpy so that a reader can check each formula
against its definition. The numbers match scikit-learn (tests/test_metrics.py
compares them), including its ``zero_division=0`` convention: a ratio whose
denominator is zero is reported as 0 instead of raising or warning.

Conventions used throughout:
  * labels are integer ids ``0 .. num_labels-1`` (a ``LabelMap`` in
    ``minibert.tabular`` turns raw labels into ids);
  * ``y_true`` and ``y_pred`` are 1-D sequences of the same length: lists, numpy
    arrays, or CPU tensors all work;
  * the confusion matrix has true labels on the rows, predictions on the columns.

The confusion-matrix plot draws on a private matplotlib ``Figure`` with the Agg
canvas, never through ``pyplot``: it opens no window, leaves no figure behind and
does not change matplotlib's global backend. (Training curves: ``toolkit.plot_curves``.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from .checkpoint import atomic_write

Average = Literal["binary", "macro", "weighted"] | None


class PRF(NamedTuple):
    """Precision, recall and F1: floats when averaged, one value per class otherwise."""

    precision: Any  # float, or np.ndarray of shape (num_labels,) when average is None
    recall: Any
    f1: Any


# ----------------------------------------------------------------------------
# input checks


def _as_1d(name: str, values: Any) -> np.ndarray:
    """Turn a list / array / CPU tensor into a 1-D numpy array, or say what is wrong."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one example")
    return array


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")


def _as_label_ids(name: str, values: Any, num_labels: int) -> np.ndarray:
    """Check that ``values`` are integer ids in ``[0, num_labels)``; return them as int64."""
    array = _as_1d(name, values)
    if array.dtype == np.bool_:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        # The usual cause is passing logits or probabilities instead of class ids.
        raise ValueError(
            f"{name} must hold integer label ids, got dtype {array.dtype} "
            "(pass predictions through argmax first)"
        )
    bad = np.flatnonzero((array < 0) | (array >= num_labels))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {array[i]} is not a label id in [0, {num_labels}) "
            f"({bad.size} such value(s))"
        )
    return array.astype(np.int64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, with 0 where the denominator is 0 (sklearn's zero_division=0)."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    nonzero = denominator != 0
    out[nonzero] = numerator[nonzero] / denominator[nonzero]
    return out


# ----------------------------------------------------------------------------
# classification


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of examples whose prediction equals the true label."""
    true = _as_1d("y_true", y_true)
    pred = _as_1d("y_pred", y_pred)
    _check_pair(true, pred)
    # accuracy = (number of i with pred_i == true_i) / N
    return float(np.mean(true == pred))


def confusion_matrix(y_true: Any, y_pred: Any, num_labels: int) -> np.ndarray:
    """Counts ``cm[t, p]`` of examples with true label ``t`` predicted as ``p``.

    Returns an int64 array of shape (num_labels, num_labels): rows are true labels,
    columns are predictions, so row sums are class supports and the diagonal holds
    the correct predictions.
    """
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    true = _as_label_ids("y_true", y_true, num_labels)
    pred = _as_label_ids("y_pred", y_pred, num_labels)
    _check_pair(true, pred)
    # Each (t, p) pair gets the flat cell index t * num_labels + p; counting those
    # indices and reshaping gives the whole matrix in one pass.
    counts = np.bincount(true * num_labels + pred, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def _per_class_prf(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall, F1 and support from a confusion matrix."""
    tp = np.diag(cm)  # predicted c and truly c
    fp = cm.sum(axis=0) - tp  # predicted c but truly something else
    fn = cm.sum(axis=1) - tp  # truly c but predicted something else
    support = cm.sum(axis=1)  # number of examples whose true label is c
    # precision = TP / (TP + FP): of the examples predicted as c, the share that are c
    precision = _safe_divide(tp, tp + fp)
    # recall = TP / (TP + FN): of the examples that are c, the share predicted as c
    recall = _safe_divide(tp, tp + fn)
    # F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN); the count form is 0, not 0/0, when TP = 0
    f1 = _safe_divide(2 * tp, 2 * tp + fp + fn)
    return precision, recall, f1, support


def precision_recall_f1(
    y_true: Any,
    y_pred: Any,
    num_labels: int,
    average: Average = "binary",
    pos_label: int = 1,
) -> PRF:
    """Precision, recall and F1 over the labels ``0 .. num_labels-1``.

    average:
      * ``"binary"``   -- the scores of class ``pos_label`` only (needs num_labels == 2);
      * ``"macro"``    -- the plain mean of the per-class scores, so every class counts
                          the same however rare it is;
      * ``"weighted"`` -- the per-class scores averaged with weights = class support;
      * ``None``       -- one score per class, as numpy arrays.

    A class that is never predicted has precision 0, a class that never occurs has
    recall 0, and F1 is 0 when both are 0 -- sklearn's ``zero_division=0``. Classes
    that occur in neither array still count in the macro mean (with scores 0), as in
    sklearn when ``labels=range(num_labels)`` is passed.
    """
    if average not in ("binary", "macro", "weighted", None):
        raise ValueError(f"average must be 'binary', 'macro', 'weighted' or None, got {average!r}")
    cm = confusion_matrix(y_true, y_pred, num_labels)
    precision, recall, f1, support = _per_class_prf(cm)

    if average is None:
        return PRF(precision, recall, f1)
    if average == "binary":
        if num_labels != 2:
            raise ValueError(
                f"average='binary' needs num_labels == 2, got {num_labels}; "
                "use 'macro', 'weighted' or None for more classes"
            )
        if pos_label not in (0, 1):
            raise ValueError(f"pos_label must be 0 or 1, got {pos_label!r}")
        return PRF(float(precision[pos_label]), float(recall[pos_label]), float(f1[pos_label]))
    if average == "macro":
        # macro = (1/K) * sum_c score_c
        return PRF(float(precision.mean()), float(recall.mean()), float(f1.mean()))
    # weighted = sum_c support_c * score_c / sum_c support_c
    weights = support / support.sum()
    return PRF(float(precision @ weights), float(recall @ weights), float(f1 @ weights))


def classification_report(y_true: Any, y_pred: Any, label_names: Sequence[str]) -> dict[str, Any]:
    """All the usual classification numbers in one plain dict (JSON-serialisable).

    Keys:
      ``accuracy``, ``num_examples``,
      ``binary``   -- {precision, recall, f1} of label id 1 (only when there are 2 labels),
      ``macro``, ``weighted`` -- {precision, recall, f1},
      ``per_class`` -- {label name: {precision, recall, f1, support}} in label-id order,
      ``confusion_matrix`` -- nested lists, rows = true, columns = predicted.
    """
    names = [str(name) for name in label_names]
    if len(set(names)) != len(names):
        raise ValueError(f"label_names has duplicates: {names}")
    num_labels = len(names)
    cm = confusion_matrix(y_true, y_pred, num_labels)
    precision, recall, f1, support = _per_class_prf(cm)

    def scores(prf: PRF) -> dict[str, float]:
        return {"precision": prf.precision, "recall": prf.recall, "f1": prf.f1}

    report: dict[str, Any] = {
        # accuracy = trace(cm) / N: the diagonal holds the correct predictions
        "accuracy": float(np.trace(cm) / cm.sum()),
        "num_examples": int(cm.sum()),
    }
    if num_labels == 2:
        report["binary"] = scores(precision_recall_f1(y_true, y_pred, 2, "binary", pos_label=1))
    report["macro"] = scores(precision_recall_f1(y_true, y_pred, num_labels, "macro"))
    report["weighted"] = scores(precision_recall_f1(y_true, y_pred, num_labels, "weighted"))
    report["per_class"] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    report["confusion_matrix"] = cm.tolist()
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """Render a ``classification_report`` dict as a small fixed-width table."""
    width = max([len(name) for name in report["per_class"]] + [len("weighted")])
    lines = [f"{'':<{width}}  precision  recall     f1  support"]
    for name, row in report["per_class"].items():
        lines.append(
            f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  "
            f"{row['f1']:6.4f}  {row['support']:7d}"
        )
    lines.append("")
    for key in ("binary", "macro", "weighted"):
        if key in report:
            row = report[key]
            lines.append(
                f"{key:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}"
            )
    lines.append(f"{'accuracy':<{width}}  {report['accuracy']:.4f}  (n = {report['num_examples']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# regression (e.g. STS-B similarity scores)


def _as_float_array(name: str, values: Any) -> np.ndarray:
    array = _as_1d(name, values).astype(np.float64)
    if not np.all(np.isfinite(array)):
        i = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name}[{i}] = {array[i]} is not a finite number")
    return array


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks where tied values share the mean of the ranks they span.

    [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]. This is the ranking Spearman's rho needs
    for data with ties (scipy calls it ``rankdata(method="average")``).
    """
    array = _as_float_array("values", values)
    # unique() sorts the distinct values; `inverse` maps each item to its distinct value.
    _, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # 1-based rank of the last copy of each distinct value
    first = last - counts + 1  # 1-based rank of its first copy
    # the ranks first..last are consecutive, so their mean is (first + last) / 2
    return ((first + last) / 2.0)[inverse]


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    # r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) * sum((y - mean y)^2))
    dx = x - x.mean()
    dy = y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    if denominator == 0:
        return float("nan")  # a constant input has no defined correlation (scipy also gives nan)
    return float(np.sum(dx * dy) / denominator)


def regression_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """MSE, MAE, Pearson's r and Spearman's rho between targets and predictions.

    Pearson and Spearman are ``nan`` when either input is constant (or has one item).
    """
    true = _as_float_array("y_true", y_true)
    pred = _as_float_array("y_pred", y_pred)
    _check_pair(true, pred)
    error = pred - true
    return {
        # MSE = mean((pred - true)^2)
        "mse": float(np.mean(error * error)),
        # MAE = mean(|pred - true|)
        "mae": float(np.mean(np.abs(error))),
        # Pearson: how well a straight line relates the two (covariance / product of std devs)
        "pearson": _pearson(true, pred),
        # Spearman: Pearson computed on the ranks, so any monotone relation scores 1
        "spearman": _pearson(average_ranks(true), average_ranks(pred)),
    }


# ----------------------------------------------------------------------------
# plots


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure bound to its own Agg canvas, bypassing pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_confusion_matrix(
    cm: Any,
    label_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "Confusion matrix",
) -> str:
    """Draw ``cm`` (rows = true, columns = predicted) with counts in each cell; write a PNG.

    Returns the path written.
    """
    matrix = np.asarray(cm)
    names = [str(name) for name in label_names]
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"cm must be a square 2-D array, got shape {matrix.shape}")
    if matrix.shape[0] != len(names):
        raise ValueError(f"cm is {matrix.shape[0]}x{matrix.shape[0]} but there are {len(names)} label names")

    size = 2.0 + 0.6 * len(names)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = np.arange(len(names))
    axes.set_xticks(ticks, labels=names, rotation=45 if max(map(len, names)) > 4 else 0)
    axes.set_yticks(ticks, labels=names)
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label")
    axes.set_title(title)
    # Dark text on light cells and light text on dark cells keeps every count legible.
    threshold = matrix.max() / 2 if matrix.size else 0
    for t in range(matrix.shape[0]):
        for p in range(matrix.shape[1]):
            value = matrix[t, p]
            text = f"{value:d}" if np.issubdtype(matrix.dtype, np.integer) else f"{value:.2f}"
            axes.text(p, t, text, ha="center", va="center", color="white" if value > threshold else "black")
    # atomically, like every file a run writes: a failed write names the path, a kill leaves no half PNG
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return os.fspath(path)
