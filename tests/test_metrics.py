"""minibert.metrics against scikit-learn (and scipy.stats for the correlations)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from sklearn import metrics as skm

from minibert import metrics

AVERAGES = ["binary", "macro", "weighted", None]


def sklearn_prf(y_true, y_pred, num_labels, average, pos_label=1):
    p, r, f, _ = skm.precision_recall_fscore_support(
        y_true,
        y_pred,
        labels=list(range(num_labels)),
        average=average,
        pos_label=pos_label,
        zero_division=0,
    )
    return p, r, f


def assert_prf_matches(y_true, y_pred, num_labels, average, pos_label=1):
    ours = metrics.precision_recall_f1(y_true, y_pred, num_labels, average, pos_label=pos_label)
    theirs = sklearn_prf(y_true, y_pred, num_labels, average, pos_label)
    for name, a, b in zip(("precision", "recall", "f1"), ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, err_msg=f"{name}, average={average}")


# ----------------------------------------------------------------------------
# accuracy and confusion matrix


@pytest.mark.parametrize("seed", range(5))
def test_accuracy_and_confusion_matrix_match_sklearn_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num_labels = int(rng.integers(2, 6))
    n = int(rng.integers(1, 200))
    y_true = rng.integers(0, num_labels, n)
    y_pred = rng.integers(0, num_labels, n)
    assert metrics.accuracy(y_true, y_pred) == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-15)
    np.testing.assert_array_equal(
        metrics.confusion_matrix(y_true, y_pred, num_labels),
        skm.confusion_matrix(y_true, y_pred, labels=list(range(num_labels))),
    )


def test_confusion_matrix_orientation_rows_true_columns_predicted() -> None:
    # Two examples of class 0 predicted as 2; the count must sit at row 0, column 2.
    cm = metrics.confusion_matrix([0, 0, 1], [2, 2, 1], num_labels=3)
    assert cm.tolist() == [[0, 0, 2], [0, 1, 0], [0, 0, 0]]
    np.testing.assert_array_equal(cm, skm.confusion_matrix([0, 0, 1], [2, 2, 1], labels=[0, 1, 2]))


def test_inputs_from_lists_tensors_and_bools() -> None:
    torch = pytest.importorskip("torch")
    y_true = torch.tensor([0, 1, 1, 0])
    y_pred = torch.tensor([0, 1, 0, 0])
    assert metrics.accuracy(y_true, y_pred) == 0.75
    np.testing.assert_array_equal(
        metrics.confusion_matrix([False, True, True], [False, True, False], 2),
        skm.confusion_matrix([0, 1, 1], [0, 1, 0]),
    )


# ----------------------------------------------------------------------------
# precision / recall / F1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("average", AVERAGES)
def test_prf_matches_sklearn_on_random_binary_labels(seed: int, average) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, 50)
    y_pred = rng.integers(0, 2, 50)
    assert_prf_matches(y_true, y_pred, 2, average)
    if average == "binary":
        assert_prf_matches(y_true, y_pred, 2, average, pos_label=0)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("average", ["macro", "weighted", None])
def test_prf_matches_sklearn_on_random_multiclass_labels(seed: int, average) -> None:
    rng = np.random.default_rng(100 + seed)
    num_labels = int(rng.integers(3, 8))
    n = int(rng.integers(5, 120))
    # skewed class frequencies so that weighted and macro averages differ
    probs = rng.dirichlet(np.ones(num_labels) * 0.5)
    y_true = rng.choice(num_labels, n, p=probs)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, num_labels, n))
    assert_prf_matches(y_true, y_pred, num_labels, average)


@pytest.mark.parametrize("average", ["macro", "weighted", None])
def test_prf_class_never_predicted_and_class_never_present(average) -> None:
    # class 2 is never predicted, class 3 never occurs in y_true, class 4 occurs nowhere
    y_true = [0, 0, 1, 1, 2, 2, 2, 0]
    y_pred = [0, 1, 1, 3, 0, 1, 3, 0]
    assert_prf_matches(y_true, y_pred, 5, average)
    p, r, f = metrics.precision_recall_f1(y_true, y_pred, 5, None)
    assert p[2] == 0.0 and r[2] == 0.0 and f[2] == 0.0  # never predicted: zero_division=0
    assert r[3] == 0.0 and p[3] == 0.0  # never present, predicted twice (both wrong)
    assert p[4] == r[4] == f[4] == 0.0


@pytest.mark.parametrize("average", ["binary", "macro", "weighted", None])
def test_prf_binary_with_positive_class_never_predicted(average) -> None:
    y_true = [1, 1, 0, 0, 0]
    y_pred = [0, 0, 0, 0, 0]
    assert_prf_matches(y_true, y_pred, 2, average)
    assert metrics.precision_recall_f1(y_true, y_pred, 2, "binary") == (0.0, 0.0, 0.0)


def test_prf_binary_with_positive_class_never_present() -> None:
    y_true = [0, 0, 0, 0]
    y_pred = [1, 0, 1, 0]
    assert_prf_matches(y_true, y_pred, 2, "binary")
    assert_prf_matches(y_true, y_pred, 2, "macro")


def test_prf_hand_computed_values() -> None:
    # TP=2, FP=1, FN=2 for class 1: P = 2/3, R = 1/2, F1 = 2*2 / (2*2 + 1 + 2) = 4/7
    y_true = [1, 1, 1, 1, 0, 0]
    y_pred = [1, 1, 0, 0, 1, 0]
    p, r, f = metrics.precision_recall_f1(y_true, y_pred, 2, "binary")
    assert (p, r, f) == pytest.approx((2 / 3, 1 / 2, 4 / 7), abs=1e-15)


def test_prf_rejects_binary_average_for_three_labels_and_bad_average() -> None:
    with pytest.raises(ValueError, match="num_labels == 2"):
        metrics.precision_recall_f1([0, 1, 2], [0, 1, 2], 3, "binary")
    with pytest.raises(ValueError, match="average must be"):
        metrics.precision_recall_f1([0, 1], [0, 1], 2, "micro")


def test_bad_inputs_have_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"y_pred\[1\] = 3 is not a label id in \[0, 2\)"):
        metrics.confusion_matrix([0, 1], [0, 3], 2)
    with pytest.raises(ValueError, match="integer label ids.*argmax"):
        metrics.confusion_matrix([0, 1], [0.2, 0.9], 2)
    with pytest.raises(ValueError, match="y_true has 2 items but y_pred has 3"):
        metrics.accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy([], [])
    with pytest.raises(ValueError, match="1-D"):
        metrics.confusion_matrix([[0, 1]], [[0, 1]], 2)


# ----------------------------------------------------------------------------
# classification_report


@pytest.mark.parametrize(
    "names, seed", [(["neg", "pos"], 0), (["neg", "pos"], 1), (["a", "b", "c", "d"], 2), (["x", "y", "z"], 3)]
)
def test_classification_report_matches_sklearn(names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = len(names)
    y_true = rng.integers(0, k, 80)
    y_pred = np.where(rng.random(80) < 0.5, y_true, rng.integers(0, k, 80))
    report = metrics.classification_report(y_true, y_pred, names)
    theirs = skm.classification_report(
        y_true, y_pred, labels=list(range(k)), target_names=names, output_dict=True, zero_division=0
    )
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert report["num_examples"] == 80
    for name in names:
        ours, ref = report["per_class"][name], theirs[name]
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]), abs=1e-12
        )
        assert ours["support"] == ref["support"]
    for ours_key, ref_key in (("macro", "macro avg"), ("weighted", "weighted avg")):
        ours, ref = report[ours_key], theirs[ref_key]
        assert (ours["precision"], ours["recall"], ours["f1"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1-score"]), abs=1e-12
        )
    if k == 2:
        expected = sklearn_prf(y_true, y_pred, 2, "binary")
        assert tuple(report["binary"].values()) == pytest.approx(expected, abs=1e-12)
    else:
        assert "binary" not in report
    json.dumps(report)  # plain Python types only, so it can go straight into a results file
    table = metrics.format_report(report)
    assert names[0] in table and "macro" in table and "accuracy" in table


def test_classification_report_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        metrics.classification_report([0, 1], [0, 1], ["a", "a"])


# ----------------------------------------------------------------------------
# regression


@pytest.mark.parametrize("seed", range(4))
def test_mse_mae_pearson_match_sklearn_and_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y_true = rng.uniform(0, 5, 60)
    y_pred = y_true + rng.normal(0, 1, 60)
    out = metrics.regression_metrics(y_true, y_pred)
    assert out["mse"] == pytest.approx(skm.mean_squared_error(y_true, y_pred), rel=1e-12)
    assert out["mae"] == pytest.approx(skm.mean_absolute_error(y_true, y_pred), rel=1e-12)
    assert out["pearson"] == pytest.approx(np.corrcoef(y_true, y_pred)[0, 1], abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_pearson_spearman_match_scipy_with_ties(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    # STS-B-like scores on a coarse grid, so both arrays have many ties
    y_true = rng.integers(0, 6, 40) * 1.0
    y_pred = np.round(y_true + rng.normal(0, 1.2, 40))
    out = metrics.regression_metrics(y_true, y_pred)
    assert out["pearson"] == pytest.approx(stats.pearsonr(y_true, y_pred)[0], abs=1e-12)
    assert out["spearman"] == pytest.approx(stats.spearmanr(y_true, y_pred)[0], abs=1e-12)
    np.testing.assert_allclose(metrics.average_ranks(y_pred), stats.rankdata(y_pred, method="average"))


def test_ranks_and_correlations_hand_computed() -> None:
    np.testing.assert_array_equal(metrics.average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(metrics.average_ranks([3, 1, 3, 3]), [3, 1, 3, 3])
    # any strictly increasing map of y_true has Spearman 1 but Pearson < 1
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    out = metrics.regression_metrics(y, np.exp(y))
    assert out["spearman"] == pytest.approx(1.0, abs=1e-15)
    assert out["pearson"] < 0.95
    constant = metrics.regression_metrics([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    assert np.isnan(constant["pearson"]) and np.isnan(constant["spearman"])


def test_regression_rejects_nan() -> None:
    with pytest.raises(ValueError, match=r"y_pred\[1\] = nan"):
        metrics.regression_metrics([1.0, 2.0], [1.0, float("nan")])


# ----------------------------------------------------------------------------
# plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_confusion_matrix_plot_writes_a_png_without_touching_pyplot_state(tmp_path) -> None:
    backend_before = matplotlib.get_backend()
    cm = metrics.confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 2, 1], 3)
    cm_path = metrics.plot_confusion_matrix(cm, ["negative", "neutral", "positive"], tmp_path / "cm.png")
    data = open(cm_path, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert matplotlib.get_backend() == backend_before
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # no figure left open in pyplot's registry


def test_plot_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="2 label names"):
        metrics.plot_confusion_matrix(np.zeros((3, 3), dtype=int), ["a", "b"], tmp_path / "x.png")
