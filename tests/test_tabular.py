"""minibert.tabular: reading TSV/CSV/JSONL, header detection, label maps and error messages."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from minibert.tabular import DataError, LabeledData, LabelMap, read_labeled

# The shared data sits beside the project root, at ../shared/data.
SST2_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "test.tsv"


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return str(path)


def error_of(excinfo: pytest.ExceptionInfo, path: str, line: int) -> str:
    """Check the DataError names the file and line; return the problem text."""
    error = excinfo.value
    assert isinstance(error, DataError) and isinstance(error, ValueError)
    assert (error.path, error.line) == (path, line)
    assert str(error).startswith(f"{path}:{line}: ")
    return error.problem


# ----------------------------------------------------------------------------
# TSV


def test_tsv_with_header_uses_default_names(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "label\tsentence\n1\tgood film \n0\tbad \"film\n")
    data = read_labeled(path)
    assert data.texts == ["good film ", 'bad "film']  # raw text, a bare quote is just a character
    assert data.labels == ["1", "0"]
    assert data.pairs is None
    assert data.line_numbers == [2, 3]
    assert data.path == path and len(data) == 2 and data.has_labels


def test_tsv_without_header_defaults_to_first_and_last_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "a fine film\tignored\t1\r\n\r\nawful\tignored\t0\r\n")
    data = read_labeled(path)
    assert data.texts == ["a fine film", "awful"]
    assert data.labels == ["1", "0"]
    assert data.line_numbers == [1, 3]  # the blank line 2 is skipped but still counted


def test_tsv_by_name_and_by_index_give_the_same_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "id\treview\tscore\n7\tgreat\tpos\n8\tdull\tneg\n")
    by_name = read_labeled(path, text_col="review", label_col="score")
    by_index = read_labeled(path, text_col=1, label_col=2, has_header=True)
    assert by_name.texts == by_index.texts == ["great", "dull"]
    assert by_name.labels == by_index.labels == ["pos", "neg"]
    assert by_name.line_numbers == by_index.line_numbers == [2, 3]


def test_tsv_headerless_by_index_with_pairs(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "0\tis it?\tit is.\tentailment\n1\twhy\tbecause\tneutral\n")
    data = read_labeled(path, text_col=1, text_pair_col=2, label_col=3)
    assert data.texts == ["is it?", "why"]
    assert data.pairs == ["it is.", "because"]
    assert data.labels == ["entailment", "neutral"]


def test_tsv_pairs_by_default_names(tmp_path: Path) -> None:
    content = "index\tsentence1\tsentence2\tlabel\n0\tA man eats.\tSomeone eats.\tentailment\n"
    path = write(tmp_path, "rte.tsv", content)
    data = read_labeled(path)
    assert (data.texts, data.pairs, data.labels) == (["A man eats."], ["Someone eats."], ["entailment"])


def test_test_file_without_label_column(tmp_path: Path) -> None:
    with_header = read_labeled(write(tmp_path, "a.tsv", "sentence\nfirst\nsecond\n"))
    assert with_header.texts == ["first", "second"] and with_header.labels == [None, None]
    assert not with_header.has_labels
    headerless = read_labeled(write(tmp_path, "b.tsv", "first\nsecond\n"))
    assert headerless.texts == ["first", "second"] and headerless.labels == [None, None]


# ----------------------------------------------------------------------------
# header detection and override


def test_header_detected_from_numeric_label_column(tmp_path: Path) -> None:
    # no default column names: rule (c), a non-numeric label cell above numeric ones
    path = write(tmp_path, "x.tsv", "review\tscore\ngood\t1\nbad\t0\n")
    data = read_labeled(path)
    assert data.texts == ["good", "bad"] and data.line_numbers == [2, 3]


def test_numeric_first_row_is_data(tmp_path: Path) -> None:
    data = read_labeled(write(tmp_path, "x.tsv", "good\t1\nbad\t0\n"))
    assert data.texts == ["good", "bad"] and data.labels == ["1", "0"]


def test_single_row_file_is_data(tmp_path: Path) -> None:
    # with no other rows to compare against, rule (c) cannot call the row a header
    data = read_labeled(write(tmp_path, "x.tsv", "great film\tpos\n"))
    assert data.texts == ["great film"] and data.labels == ["pos"]


def test_has_header_overrides_detection(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "movie\tsentiment\ngood\tpos\nbad\tneg\n")
    # string labels and unusual names: the rules cannot tell, so the first row reads as data
    assert read_labeled(path).texts == ["movie", "good", "bad"]
    assert read_labeled(path, has_header=True).texts == ["good", "bad"]
    numeric = write(tmp_path, "y.tsv", "good\t1\nbad\t0\n")
    assert read_labeled(numeric, has_header=True).texts == ["bad"]


# ----------------------------------------------------------------------------
# CSV


def test_csv_with_quotes_commas_and_newlines(tmp_path: Path) -> None:
    content = 'text,label\n"a film, yes",pos\n"two\nlines ""quoted""",neg\nplain,pos\n'
    path = write(tmp_path, "x.csv", content)
    data = read_labeled(path)
    assert data.texts == ["a film, yes", 'two\nlines "quoted"', "plain"]
    assert data.labels == ["pos", "neg", "pos"]
    assert data.line_numbers == [2, 3, 5]  # the record on line 3 spans two lines
    # the same rows as Python's csv module reads them
    reference = list(csv.reader(open(path, newline="", encoding="utf-8")))[1:]
    assert data.texts == [row[0] for row in reference]


def test_csv_without_header_by_index_with_pairs(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", '"q1","a1",2.5\n"q2","a2",4.0\n')
    data = read_labeled(path, text_col=0, text_pair_col=1, label_col=2)
    assert (data.texts, data.pairs, data.labels) == (["q1", "q2"], ["a1", "a2"], ["2.5", "4.0"])


def test_fmt_overrides_extension(tmp_path: Path) -> None:
    path = write(tmp_path, "data.txt", "sentence,label\nhi,1\n")
    assert read_labeled(path, fmt="csv").texts == ["hi"]
    with pytest.raises(ValueError, match="cannot tell the format.*'.txt'"):
        read_labeled(path)


# ----------------------------------------------------------------------------
# JSONL


def test_jsonl_default_keys_pairs_and_typed_labels(tmp_path: Path) -> None:
    lines = [
        {"idx": 0, "sentence1": "A", "sentence2": "B", "label": 1},
        {"idx": 1, "sentence1": "C", "sentence2": "D", "label": 0},
    ]
    path = write(tmp_path, "x.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = read_labeled(path)
    assert (data.texts, data.pairs, data.labels) == (["A", "C"], ["B", "D"], [1, 0])
    assert data.line_numbers == [1, 2]


def test_jsonl_by_name_and_without_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"review": "ok", "stars": "4"}\n\n{"review": "meh", "stars": "2"}\n')
    data = read_labeled(path, text_col="review", label_col="stars")
    assert data.texts == ["ok", "meh"] and data.labels == ["4", "2"] and data.line_numbers == [1, 3]
    unlabeled = read_labeled(write(tmp_path, "t.jsonl", '{"text": "a"}\n{"text": "b"}\n'))
    assert unlabeled.labels == [None, None]
    with pytest.raises(ValueError, match="JSONL columns are keys"):
        read_labeled(path, text_col=0)


# ----------------------------------------------------------------------------
# errors, each naming the file and line


def test_error_missing_column(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "sentence\tlabel\ngood\t1\nno label here\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    problem = error_of(excinfo, path, 3)
    assert problem == "row has 1 field(s) but the label is column 'label' (index 1): missing column"


def test_error_missing_column_headerless_by_index(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "a,b,1\nc,d,0\ne,f\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path, label_col=2)
    assert error_of(excinfo, path, 3) == "row has 2 field(s) but the label is column 2: missing column"


def problem_of_reading(path: str, line: int) -> str:
    """read_labeled(path) must stop at `line`; return its problem text."""
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    return error_of(excinfo, path, line)


def test_error_extra_field_names_the_row_instead_of_shifting_the_label(tmp_path: Path) -> None:
    # A tab inside a TSV sentence splits it: without the check the label would be read from
    # the sentence's second half ("still fun", a new class) and the text cut at the tab.
    path = write(tmp_path, "x.tsv", "sentence\tlabel\ngood\t1\nslow\tstill fun\t1\nbad\t0\n")
    assert problem_of_reading(path, 3) == (
        "row has 3 fields but the header has 2: a tab inside a text? "
        "Every column after it would shift, the label's among them"
    )
    data = read_labeled(path, skip_bad_rows=True)
    assert (data.texts, data.labels, [e.line for e in data.skipped]) == (["good", "bad"], ["1", "0"], [3])
    # Without a header the width is what most rows have, so a stray tab in the first row is
    # the row reported, and the label stays the last column of the others.
    path = write(tmp_path, "y.tsv", "slow\tstill fun\t1\ngood\t1\nbad\t0\n")
    assert problem_of_reading(path, 1).startswith("row has 3 fields but most rows have 2: a tab")
    data = read_labeled(path, skip_bad_rows=True)
    assert (data.texts, data.labels) == (["good", "bad"], ["1", "0"])
    # A text-only file (what predict reads): a line is not cut at a tab without a word.
    path = write(tmp_path, "z.tsv", "a fine film\nslow\tstill fun\nbad\n")
    assert problem_of_reading(path, 2).startswith("row has 2 fields but most rows have 1")
    # CSV: a comma outside quotes.
    path = write(tmp_path, "x.csv", 'text,label\n"slow, still fun",1\nslow, still fun,1\n')
    assert problem_of_reading(path, 3).startswith("row has 3 fields but the header has 2: an unquoted comma")


def test_empty_extra_fields_and_unused_named_columns_are_read(tmp_path: Path) -> None:
    # Trailing separators (spreadsheets write them) add empty fields that carry nothing.
    path = write(tmp_path, "x.tsv", "sentence\tlabel\ngood\t1\t\nbad\t0\t\t\n")
    data = read_labeled(path)
    assert (data.texts, data.labels) == (["good", "bad"], ["1", "0"])
    # Columns the header names but nothing reads are no problem, nor rows that stop short of them.
    path = write(tmp_path, "y.tsv", "idx\tsentence\tlabel\tnote\n0\tgood\t1\tx\n1\tbad\t0\n")
    data = read_labeled(path)
    assert (data.texts, data.labels) == (["good", "bad"], ["1", "0"])


def test_error_unknown_column_name_lists_available(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "\nsentence\tlabel\ngood\t1\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path, label_col="sentiment")
    problem = error_of(excinfo, path, 2)  # line 1 is blank, the header is on line 2
    assert problem == "no column named 'sentiment' for the label; the header has 'sentence', 'label'"


def test_error_explicit_label_col_must_exist(tmp_path: Path) -> None:
    # A test file may lack labels, but not when a label column was asked for.
    path = write(tmp_path, "x.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(DataError) as excinfo:
        read_labeled(path, label_col="label")
    assert error_of(excinfo, path, 2) == "no key 'label' for the label; this line has keys ['text']"


def test_error_empty_text(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "sentence\tlabel\ngood\t1\n  \t0\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 3) == "empty text in column 'sentence' (index 0)"
    jsonl = write(tmp_path, "x.jsonl", '{"text": "a", "label": 1}\n{"text": "", "label": 0}\n')
    with pytest.raises(DataError) as excinfo:
        read_labeled(jsonl)
    assert error_of(excinfo, jsonl, 2) == "empty text in key 'text'"


def test_error_empty_label(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", "text,label\ngood,1\nbad, \n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 3) == "empty label in column 'label' (index 1)"


def test_error_undecodable_bytes_names_offset_and_replace_mode(tmp_path: Path) -> None:
    content = b"sentence\tlabel\ngood\t1\ncaf\xe9\t0\n"
    path = write(tmp_path, "x.tsv", content)
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    offset = content.index(b"\xe9")  # 25
    problem = error_of(excinfo, path, 3)
    assert f"byte offset {offset} (0xe9)" in problem and "errors='replace'" in problem
    assert "--errors" not in problem  # the library names its keyword; only the commands with the flag name it
    data = read_labeled(path, errors="replace")
    assert data.texts == ["good", "caf\ufffd"]


def test_utf8_bom_is_dropped_and_counted_in_offsets(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "\ufeffsentence\tlabel\nnaïve\t1\n".encode())
    data = read_labeled(path)
    assert data.texts == ["naïve"] and data.labels == ["1"]
    bad = write(tmp_path, "y.tsv", b"\xef\xbb\xbfsentence\tlabel\nna\xefve\t1\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(bad)
    assert "byte offset 20 (0xef)" in error_of(excinfo, bad, 2)  # 3 BOM bytes + 15 + "na"


@pytest.mark.parametrize("name, content", [("x.tsv", ""), ("x.csv", "\n\n"), ("x.jsonl", "  \n")])
def test_error_empty_file(tmp_path: Path, name: str, content: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 1) == "empty file: no rows"


def test_error_header_without_rows(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "sentence\tlabel\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 1) == "the file has a header but no data rows"


def test_error_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": }\n')
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 3) == "malformed JSON at column 24: Expecting value"
    not_object = write(tmp_path, "y.jsonl", '{"text": "a", "label": 1}\n["b", 0]\n')
    with pytest.raises(DataError) as excinfo:
        read_labeled(not_object)
    assert error_of(excinfo, not_object, 2) == "expected a JSON object, got list"


def test_error_malformed_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "x.csv", 'text,label\ngood,1\n"bad"x,0\n')
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert error_of(excinfo, path, 3).startswith("malformed CSV:")


def test_error_no_text_column(tmp_path: Path) -> None:
    path = write(tmp_path, "x.tsv", "review\tlabel\ngood\t1\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path)
    assert "pass text_col" in error_of(excinfo, path, 1)


def test_skip_bad_rows_keeps_the_good_rows_and_names_the_bad_lines(tmp_path: Path) -> None:
    content = "sentence\tlabel\na fine film\t1\n\t0\nno label here\nbad\t\nworse\t0\n"
    path = write(tmp_path, "train.tsv", content)
    with pytest.raises(DataError) as excinfo:  # strict by default: the first bad row stops the read
        read_labeled(path)
    assert error_of(excinfo, path, 3).startswith("empty text")
    data = read_labeled(path, skip_bad_rows=True)
    assert (data.texts, data.labels, data.line_numbers) == (["a fine film", "worse"], ["1", "0"], [2, 6])
    assert [(e.line, e.problem.split(" ")[0]) for e in data.skipped] == [(3, "empty"), (4, "row"), (5, "empty")]
    assert read_labeled(write(tmp_path, "ok.tsv", "a\t1\nb\t0\n"), skip_bad_rows=True).skipped == []


def test_skip_bad_rows_in_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = write(tmp_path, "train.csv", 'text,label\n"a, b",1\n"  ",0\nc,0\n')
    data = read_labeled(csv_path, skip_bad_rows=True)
    assert data.texts == ["a, b", "c"] and [e.line for e in data.skipped] == [3]
    lines = ['{"text": "good", "label": 1}', '{"text": "cut', '[1, 2]', '{"label": 0}',
             '{"text": "bad", "label": null}',
             '{"text": "ok", "label": 0}']
    jsonl = write(tmp_path, "train.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(jsonl)
    assert error_of(excinfo, jsonl, 2).startswith("malformed JSON")
    data = read_labeled(jsonl, skip_bad_rows=True)
    assert (data.texts, data.labels) == (["good", "ok"], [1, 0])
    assert [e.line for e in data.skipped] == [2, 3, 4, 5]


def test_skip_bad_rows_still_fails_on_a_file_with_no_good_row_or_a_bad_header(tmp_path: Path) -> None:
    path = write(tmp_path, "all_bad.tsv", "sentence\tlabel\n\t1\nx\t\n")
    with pytest.raises(DataError) as excinfo:
        read_labeled(path, skip_bad_rows=True)
    assert error_of(excinfo, path, 2).startswith("no usable rows: all 2 are bad")
    path = write(tmp_path, "header.tsv", "sentence\tlabel\na\t1\n")
    with pytest.raises(DataError):
        read_labeled(path, label_col="score", skip_bad_rows=True)  # a wrong column is not a bad row


# ----------------------------------------------------------------------------
# LabelMap


def test_label_map_integer_strings_become_ints_sorted_numerically() -> None:
    label_map = LabelMap.from_labels(["10", "2", "-1", "2", " 10"])
    assert label_map.labels == [-1, 2, 10]  # numeric, not text order ("-1", "10", "2")
    assert not label_map.is_regression and label_map.num_labels == 3
    assert label_map.encode(["2", 10, "-1"]) == [1, 2, 0]
    assert label_map.decode([2, 0]) == [10, -1]


def test_label_map_string_labels(tmp_path: Path) -> None:
    path = write(tmp_path, "train.tsv", "sentence\tlabel\na\tneutral\nb\tentailment\nc\tcontradiction\n")
    train = read_labeled(path)
    label_map = LabelMap.from_data(train)
    assert label_map.labels == ["contradiction", "entailment", "neutral"]
    assert label_map.encode(train.labels, train.path, train.line_numbers) == [2, 1, 0]


def test_label_map_unseen_label_names_file_and_line(tmp_path: Path) -> None:
    label_map = LabelMap.from_labels(["neg", "pos"])
    dev = read_labeled(write(tmp_path, "dev.tsv", "sentence\tlabel\na\tpos\n\nb\tmixed\n"))
    with pytest.raises(DataError) as excinfo:
        label_map.encode(dev.labels, dev.path, dev.line_numbers)
    problem = error_of(excinfo, dev.path, 4)
    assert problem == "label 'mixed' was not seen in training; known labels: 'neg', 'pos'"
    # a file without labels cannot be encoded
    test = read_labeled(write(tmp_path, "test.tsv", "sentence\na\n"))
    with pytest.raises(DataError) as excinfo:
        label_map.encode(test.labels, test.path, test.line_numbers)
    assert error_of(excinfo, test.path, 2).startswith("no label")


def test_label_map_float_labels_mean_regression(tmp_path: Path) -> None:
    path = write(tmp_path, "stsb.tsv", "sentence1\tsentence2\tlabel\na\tb\t3.800\nc\td\t5\ne\tf\t0.5\n")
    data = read_labeled(path)
    label_map = LabelMap.from_data(data)
    assert label_map.is_regression and label_map.num_labels == 1 and label_map.labels == []
    assert label_map.encode(data.labels) == [3.8, 5.0, 0.5]
    assert LabelMap.from_labels([0.5, 1.0]).is_regression  # JSON floats
    assert LabelMap.from_labels([1, 2, 5], regression=True).is_regression
    with pytest.raises(DataError) as excinfo:
        label_map.encode(["2.0", "high"], data.path, [7, 9])
    assert error_of(excinfo, data.path, 9) == "label 'high' is not a finite number (regression target)"


def test_label_map_floats_with_integer_values_are_classes(tmp_path: Path) -> None:
    # what pandas writes for a 0/1 column that had a missing value: users mean two classes
    label_map = LabelMap.from_labels(["1.0", "0.0", "1.0"])
    assert not label_map.is_regression and label_map.labels == [0, 1]
    assert LabelMap.from_labels([0.0, 1.0, 2.0]).labels == [0, 1, 2]  # JSON floats
    assert label_map.encode(["1", 0, "0.0", 1.0]) == [1, 0, 0, 1]
    assert LabelMap.from_labels(["1.0", "0.0"], regression=True).is_regression  # asked for: a target


@pytest.mark.parametrize(
    "labels, shown, suggests_regression",
    [(["pos", "pos"], "'pos'", False), (["1", "1", "1"], "1", True), ([2.0, 2.0], "2", True)],
)
def test_label_map_with_one_class_is_an_error_naming_the_label(labels, shown, suggests_regression) -> None:
    with pytest.raises(DataError) as excinfo:
        LabelMap.from_labels(labels, "train.tsv", [2, 3, 4])
    problem = error_of(excinfo, "train.tsv", 2)
    assert problem.startswith(f"every row has the label {shown}: a classifier needs at least two classes")
    assert ("--task regression" in problem) == suggests_regression
    if suggests_regression:  # and the suggestion works
        assert LabelMap.from_labels(labels, regression=True).is_regression


def test_label_map_to_json_round_trip_and_hf_config() -> None:
    for label_map in (LabelMap([0, 1]), LabelMap(["neg", "neu", "pos"]), LabelMap([], is_regression=True)):
        config = label_map.to_json()
        assert LabelMap.from_json(json.loads(json.dumps(config))) == label_map
    # the fields are the ones a Hugging Face config carries
    transformers = pytest.importorskip("transformers")
    hf = transformers.PretrainedConfig(**LabelMap(["neg", "neu", "pos"]).to_json())
    assert hf.num_labels == 3 and hf.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert LabelMap.from_json(hf.to_dict()) == LabelMap(["neg", "neu", "pos"])
    regression = transformers.PretrainedConfig(**LabelMap([], is_regression=True).to_json())
    assert regression.num_labels == 1 and regression.problem_type == "regression"


def test_label_map_from_json_rejects_inconsistent_maps() -> None:
    with pytest.raises(ValueError, match="ids must be 0..1"):
        LabelMap.from_json({"id2label": {"0": "a", "2": "b"}})
    with pytest.raises(ValueError, match="does not invert"):
        LabelMap.from_json({"id2label": {"0": "a", "1": "b"}, "label2id": {"a": 1, "b": 0}})


# ----------------------------------------------------------------------------
# real data


@pytest.mark.real_data
@pytest.mark.skipif(not SST2_TEST.exists(), reason="needs ../shared/data/sst2")
def test_sst2_test_tsv() -> None:
    data = read_labeled(SST2_TEST)
    assert isinstance(data, LabeledData)
    assert len(data) == 872 and data.line_numbers[0] == 2 and data.line_numbers[-1] == 873
    assert data.pairs is None
    label_map = LabelMap.from_data(data)
    assert label_map.labels == [0, 1]
    ids = label_map.encode(data.labels, data.path, data.line_numbers)
    assert set(ids) == {0, 1}
    # independent count: the lines of the file split on the last tab
    with open(SST2_TEST, encoding="utf-8") as f:
        rows = [line.rstrip("\n").rsplit("\t", 1) for line in f][1:]
    assert [int(label) for _, label in rows] == ids
    assert [text for text, _ in rows] == data.texts
    assert os.fspath(SST2_TEST) == data.path


@pytest.mark.parametrize("cols", [dict(text_col="sentence", label_col="sentence"), dict(label_col=0),
                                  dict(text_col=1, text_pair_col=1)])
def test_one_column_in_two_roles_is_an_error(tmp_path, cols):
    # --label-col naming the text column trained one class per row without a word
    f = tmp_path / "d.tsv"
    f.write_text("sentence\tlabel\na good film\t1\na bad film\t0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="are both column"):
        read_labeled(f, **cols)


@pytest.mark.parametrize("cols", [dict(label_col="text"), dict(text_col="label"), dict(text_pair_col="text"),
                                  dict(text_col="b", text_pair_col="b")])
def test_one_jsonl_key_in_two_roles_is_an_error(tmp_path, cols):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a good film", "b": "x", "label": 1}\n{"text": "a bad film", "b": "y", "label": 0}\n',
                 encoding="utf-8")
    with pytest.raises(ValueError, match="are both key"):
        read_labeled(f, **cols)
    assert read_labeled(f, text_pair_col="b").pairs == ["x", "y"]
