"""Read labeled text for fine-tuning (TSV, CSV, JSONL) and map raw labels to ids.

    data = read_labeled("sst2/train.tsv")          # header `sentence<TAB>label`
    label_map = LabelMap.from_data(data)           # labels [0, 1]
    ids = label_map.encode(data.labels, data.path, data.line_numbers)

Formats (picked from the file extension unless ``fmt`` is given):
  * ``tsv``   -- one row per line, fields split on tabs, no quoting: the way GLUE
                 ships its files, where a sentence may contain a bare ``"``;
  * ``csv``   -- Python's ``csv`` module, so quoted fields may hold commas, quotes
                 (doubled) and newlines;
  * ``jsonl`` -- one JSON object per line; columns are its keys.

Columns are named (when the file has a header, or in JSONL) or given as 0-based
indices. When a column is not given:
  * text  -- the column named ``sentence``, ``text`` or ``sentence1``; without a
             header, column 0;
  * pair  -- the column named ``sentence2``, ``text_pair`` or ``question`` if there
             is one; without a header, none;
  * label -- the column named ``label``; without a header, the last column of what
             most rows have (when there are at least two). A file with no label
             column (a test set) reads with ``labels = [None, ...]``; that is only
             allowed when ``label_col`` was not given.
A header that holds none of these names gets the headerless positions instead.
Default names match case-insensitively; names you pass match exactly.

Header detection for TSV/CSV (when ``has_header`` is None): the first row is a
header if
  (a) any column is given by name, or
  (b) one of its cells is a default column name above, or
  (c) its label cell (``label_col``, else the last column) is not a number while
      the label cells of the next rows (up to 20) all are.
Otherwise it is data. String-labelled files with unusual column names and no
header fall outside these rules: pass ``has_header`` for them.

Every problem with the file raises ``DataError`` (a ``ValueError``) whose message
starts ``path:line:`` with the 1-based line number, like a compiler error. Problems
confined to one row (a missing field, more fields than the header or most rows, an empty
text or label, a broken JSON line) are ``BadRowError``s: ``skip_bad_rows=True`` leaves such
rows out and lists them in ``LabeledData.skipped`` instead (real files are messy: one empty row in 3,000 is common).
Files are read whole into memory, which is fine for fine-tuning sets.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Format = Literal["tsv", "csv", "jsonl"]
Column = str | int | None
RawLabel = str | int | float | None

TEXT_NAMES = ("sentence", "text", "sentence1")
PAIR_NAMES = ("sentence2", "text_pair", "question")
LABEL_NAMES = ("label",)
_DEFAULT_NAMES = {name for names in (TEXT_NAMES, PAIR_NAMES, LABEL_NAMES) for name in names}

_EXTENSIONS: dict[str, Format] = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_HEADER_SAMPLE_ROWS = 20

# Written out instead of calling int()/float(), which also accept "1_000", "nan" and "inf".
_INT_RE = re.compile(r"[+-]?\d+")
_FLOAT_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class DataError(ValueError):
    """A problem in a data file, reported as ``path:line: problem``."""

    def __init__(self, path: str | os.PathLike[str], line: int, problem: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path}:{line}: {problem}")


# --errors of the commands that read labelled files (finetune, distill, predict)
ERRORS_HELP = ("bytes that are not UTF-8 in the data files: 'strict' stops at the first, naming its file, line and "
               "byte; 'replace' reads them as U+FFFD")


class NotUtf8Error(DataError):
    """Bytes that are not UTF-8. `how` names the way to read them anyway: the keyword here, and the
    flag in the copy a command with --errors reports (`on_command_line`)."""

    def __init__(self, path: str | os.PathLike[str], line: int, offset: int, bad: str,
                 how: str = "errors='replace'") -> None:
        self.offset, self.bad = offset, bad
        super().__init__(path, line, f"bytes that are not UTF-8 at byte offset {offset} (0x{bad}); re-encode the "
                         f"file as UTF-8, or read such bytes as U+FFFD ({how})")

    def on_command_line(self) -> "NotUtf8Error":
        return NotUtf8Error(self.path, self.line, self.offset, self.bad, how="--errors replace")


class BadRowError(DataError):
    """A problem confined to one row (a missing field, an extra field, an empty text or label, a
    broken JSON line): ``read_labeled(..., skip_bad_rows=True)`` skips such rows instead of raising."""


@dataclass
class LabeledData:
    """Rows read from one file, in file order.

    ``labels`` holds the raw values (strings from TSV/CSV, JSON values from JSONL),
    or None for every row when the file has no label column. ``line_numbers[i]`` is
    the 1-based line where row i starts, for error messages later on.
    """

    texts: list[str]
    pairs: list[str] | None
    labels: list[RawLabel]
    path: str
    line_numbers: list[int]
    skipped: list[BadRowError] = field(default_factory=list)  # rows left out by skip_bad_rows=True

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def has_labels(self) -> bool:
        return any(label is not None for label in self.labels)


# ----------------------------------------------------------------------------
# reading


def read_labeled(
    path: str | os.PathLike[str],
    text_col: Column = None,
    text_pair_col: Column = None,
    label_col: Column = None,
    fmt: Format | None = None,
    has_header: bool | None = None,
    errors: Literal["strict", "replace"] = "strict",
    skip_bad_rows: bool = False,
) -> LabeledData:
    """Read texts, optional second texts and raw labels from a TSV, CSV or JSONL file.

    See the module docstring for the column defaults and the header rule.
    ``errors="replace"`` turns bytes that are not UTF-8 into U+FFFD instead of failing.
    ``skip_bad_rows=True`` leaves out rows with a ``BadRowError`` (kept in ``skipped``, in
    file order) instead of raising the first one; problems with the whole file still raise.
    """
    path = os.fspath(path)
    if fmt is None:
        extension = os.path.splitext(path)[1].lower()
        if extension not in _EXTENSIONS:
            raise ValueError(
                f"{path}: cannot tell the format from the extension {extension!r}; "
                f"name it .tsv, .csv or .jsonl (in Python: pass fmt='tsv', 'csv' or 'jsonl')"
            )
        fmt = _EXTENSIONS[extension]
    if fmt not in ("tsv", "csv", "jsonl"):
        raise ValueError(f"fmt must be 'tsv', 'csv' or 'jsonl', got {fmt!r}")
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    for name, column in (("text_col", text_col), ("text_pair_col", text_pair_col), ("label_col", label_col)):
        if isinstance(column, bool) or not (column is None or isinstance(column, (str, int))):
            raise ValueError(f"{name} must be a column name, a 0-based index or None, got {column!r}")
        if isinstance(column, int) and column < 0:
            raise ValueError(f"{name} must be a 0-based index >= 0, got {column}")

    with open(path, "rb") as f:
        raw = f.read()
    text = _decode(raw, path, errors)
    if not text.strip():
        raise DataError(path, 1, "empty file: no rows")

    if fmt == "jsonl":
        if has_header is not None:
            raise ValueError(f"{path}: has_header applies to TSV/CSV only, not JSONL")
        data = _read_jsonl(text, path, text_col, text_pair_col, label_col, skip_bad_rows)
    else:
        rows = _split_tsv(text) if fmt == "tsv" else _split_csv(text, path)
        data = _read_table(rows, path, fmt, text_col, text_pair_col, label_col, has_header, skip_bad_rows)
    if not data.texts:
        first = data.skipped[0]
        problem = f"no usable rows: all {len(data.skipped)} are bad, the first one: {first.problem}"
        raise DataError(path, first.line, problem)
    return data


def _one_role_each(roles: list, describe: Callable[[Any], str], unit: str) -> None:
    """One column (or JSONL key) in two roles, a label column named like the text say, would train on
    the text as its own label, one class per row, without a word."""
    for (role_a, a), (role_b, b) in itertools.combinations(roles, 2):
        if a == b:
            raise ValueError(f"the {role_a} and the {role_b} are both {describe(a)}; give each its own {unit}")


def _decode(raw: bytes, path: str, errors: str) -> str:
    """UTF-8 (a leading byte-order mark is dropped); undecodable bytes name their offset."""
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = raw.count(b"\n", 0, offset) + 1
        bad = raw[offset : bom + e.end].hex(" ")
        raise NotUtf8Error(path, line, offset, bad) from None


def _split_tsv(text: str) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each non-blank line, split on tabs without any quoting."""
    rows = []
    # split("\n") rather than splitlines(): the latter also breaks on characters such as
    # U+2028 or \x1c that can sit inside a sentence.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if line.strip() == "" and "\t" not in line:
            continue
        rows.append((number, line.split("\t")))
    return rows


def _split_csv(text: str, path: str) -> list[tuple[int, list[str]]]:
    """(line where the record starts, fields) for each non-blank CSV record."""
    rows = []
    # newline="" hands line endings to the csv module, which needs them inside quoted fields.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    last_line = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(path, last_line + 1, f"malformed CSV: {e}") from None
        start, last_line = last_line + 1, reader.line_num
        if len(fields) > 1 or (fields and fields[0].strip()):  # skip blank lines
            rows.append((start, fields))
    return rows


def _is_number(cell: str) -> bool:
    return _FLOAT_RE.fullmatch(cell.strip()) is not None


def _detect_header(rows: list[tuple[int, list[str]]], label_col: Column) -> bool:
    """The header rule (b) and (c) from the module docstring."""
    first = rows[0][1]
    if any(cell.strip().lower() in _DEFAULT_NAMES for cell in first):
        return True
    if isinstance(label_col, int):
        label_index = label_col
    elif len(first) >= 2:
        label_index = len(first) - 1
    else:
        return False  # one column and no known name: nothing to tell a header by
    if label_index >= len(first) or _is_number(first[label_index]):
        return False
    sample = [fields for _, fields in rows[1 : 1 + _HEADER_SAMPLE_ROWS]]
    return bool(sample) and all(
        label_index < len(fields) and _is_number(fields[label_index]) for fields in sample
    )


def _find_default(names: list[str], candidates: Sequence[str]) -> int | None:
    lowered = [name.strip().lower() for name in names]
    for candidate in candidates:
        if candidate in lowered:
            return lowered.index(candidate)
    return None


def _resolve_named(
    column: Column, names: list[str], defaults: Sequence[str], role: str, path: str, header_line: int
) -> int | None:
    """Index of a column in a file with a header: by name, by index, or by default name."""
    available = ", ".join(repr(name) for name in names)
    if isinstance(column, str):
        if column not in names:
            raise DataError(
                path, header_line, f"no column named {column!r} for the {role}; the header has {available}"
            )
        return names.index(column)
    if isinstance(column, int):
        if column >= len(names):
            raise DataError(
                path,
                header_line,
                f"{role} column index {column} is out of range: "
                f"the header has {len(names)} columns ({available})",
            )
        return column
    return _find_default(names, defaults)


def _positional_label(num_columns: int, text_index: int, pair_index: int | None) -> int | None:
    """The last column is the label, unless it is already the text or pair (a test file)."""
    last = num_columns - 1
    return last if last not in (text_index, pair_index) else None


def _read_table(
    rows: list[tuple[int, list[str]]],
    path: str,
    fmt: Format,
    text_col: Column,
    text_pair_col: Column,
    label_col: Column,
    has_header: bool | None,
    skip_bad_rows: bool,
) -> LabeledData:
    named = [c for c in (text_col, text_pair_col, label_col) if isinstance(c, str)]
    if named and has_header is False:
        raise ValueError(f"{path}: columns {named} are given by name but has_header=False")
    header = has_header if has_header is not None else bool(named) or _detect_header(rows, label_col)

    if header:
        header_line, fields = rows[0]
        names = [name.strip() for name in fields]
        rows = rows[1:]
        if not rows:
            raise DataError(path, header_line, "the file has a header but no data rows")
        text_index = _resolve_named(text_col, names, TEXT_NAMES, "text", path, header_line)
        pair_index = _resolve_named(text_pair_col, names, PAIR_NAMES, "text pair", path, header_line)
        label_index = _resolve_named(label_col, names, LABEL_NAMES, "label", path, header_line)
        if _find_default(names, sorted(_DEFAULT_NAMES)) is None:
            # None of the usual names (a header found by rule (c), say): the columns not
            # given take the headerless positions.
            if text_index is None:
                text_index = 0
            if label_col is None:
                label_index = _positional_label(len(names), text_index, pair_index)
        if text_index is None:
            raise DataError(
                path,
                header_line,
                f"no text column: none of {list(TEXT_NAMES)} is in the header "
                f"({', '.join(map(repr, names))}); pass text_col",
            )
        column_names = names
        width, where_width = len(names), "the header has"
    else:
        # Without a header the file's width is what most of its rows have, so that a first row
        # with a stray separator is the one reported rather than every row after it.
        width = Counter(len(fields) for _, fields in rows).most_common(1)[0][0]
        where_width = "most rows have"
        text_index = text_col if isinstance(text_col, int) else 0
        pair_index = text_pair_col if isinstance(text_pair_col, int) else None
        if isinstance(label_col, int):
            label_index = label_col
        else:
            label_index = _positional_label(width, text_index, pair_index)
        column_names = []

    def describe(index: int) -> str:
        if index < len(column_names):
            return f"column {column_names[index]!r} (index {index})"
        return f"column {index}"

    roles = (("text", text_index), ("text pair", pair_index), ("label", label_index))
    needed = [(role, index) for role, index in roles if index is not None]
    _one_role_each(needed, describe, "column")
    # A row with more fields than the header (or than most rows, without one) most often holds
    # the separator inside its text (TSV has no quoting), and then every field after it, the
    # label included, comes from the wrong place: reading it would train on a wrong label or a
    # cut text without a word. Empty extra fields (trailing separators, as spreadsheets write
    # them) say nothing and are allowed.
    separator = "a tab" if fmt == "tsv" else "an unquoted comma"

    def parse(line: int, fields: list[str]) -> tuple[str, str | None, RawLabel]:
        if len(fields) > width and any(cell.strip() for cell in fields[width:]):
            raise BadRowError(
                path,
                line,
                f"row has {len(fields)} fields but {where_width} {width}: {separator} inside a text? "
                f"Every column after it would shift, the label's among them",
            )
        for role, index in needed:
            if index >= len(fields):
                raise BadRowError(
                    path,
                    line,
                    f"row has {len(fields)} field(s) but the {role} is {describe(index)}: missing column",
                )
        text = _check_text(fields[text_index], "text", describe(text_index), path, line)
        pair = None
        if pair_index is not None:
            pair = _check_text(fields[pair_index], "text pair", describe(pair_index), path, line)
        if label_index is None:
            return text, pair, None
        label = fields[label_index].strip()
        if not label:
            raise BadRowError(path, line, f"empty label in {describe(label_index)}")
        return text, pair, label

    return _collect(rows, parse, path, pair_index is not None, skip_bad_rows)


def _collect(rows: Iterable[tuple[int, Any]], parse, path: str, has_pairs: bool, skip_bad_rows: bool) -> LabeledData:
    """Parse each (line, row) into (text, pair, label); a BadRowError is raised or, when
    skipping, recorded."""
    data = LabeledData([], [] if has_pairs else None, [], path, [])
    for line, row in rows:
        try:
            text, pair, label = parse(line, row)
        except BadRowError as e:
            if not skip_bad_rows:
                raise
            data.skipped.append(e)
            continue
        data.texts.append(text)
        if data.pairs is not None:
            data.pairs.append(pair)
        data.labels.append(label)
        data.line_numbers.append(line)
    return data


def _check_text(value: Any, role: str, where: str, path: str, line: int) -> str:
    if not isinstance(value, str):
        got = f"{type(value).__name__} {value!r}"
        raise BadRowError(path, line, f"the {role} in {where} must be a string, got {got}")
    if not value.strip():
        raise BadRowError(path, line, f"empty {role} in {where}")
    return value


def _read_jsonl(
    text: str, path: str, text_col: Column, text_pair_col: Column, label_col: Column, skip_bad_rows: bool
) -> LabeledData:
    for name, column in (("text_col", text_col), ("text_pair_col", text_pair_col), ("label_col", label_col)):
        if isinstance(column, int):
            raise ValueError(f"{path}: JSONL columns are keys, so {name} must be a name, got index {column}")

    def parse_json(number: int, line: str) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRowError(path, number, f"malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(record, dict):
            raise BadRowError(path, number, f"expected a JSON object, got {type(record).__name__}")
        return record

    records: list[tuple[int, dict[str, Any]]] = []
    broken: list[BadRowError] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, parse_json(number, line)))
        except BadRowError as e:
            if not skip_bad_rows:
                raise
            broken.append(e)
    if not records:
        problem = f"no usable rows: all {len(broken)} are bad, the first one: {broken[0].problem}"
        raise DataError(path, broken[0].line, problem)

    # Defaults come from the first record's keys; every later record must then have them.
    first_line, first = records[0]
    keys = list(first)
    text_key = text_col if text_col is not None else _default_key(keys, TEXT_NAMES)
    if text_key is None:
        raise DataError(path, first_line, f"no text key: none of {list(TEXT_NAMES)} in {keys}; pass text_col")
    pair_key = text_pair_col if text_pair_col is not None else _default_key(keys, PAIR_NAMES)
    label_key = label_col if label_col is not None else _default_key(keys, LABEL_NAMES)
    _one_role_each([(role, key) for role, key in (("text", text_key), ("text pair", pair_key), ("label", label_key))
                    if key is not None], lambda key: f"key {key!r}", "key")

    def parse(line: int, record: dict[str, Any]) -> tuple[str, str | None, RawLabel]:
        for role, key in (("text", text_key), ("text pair", pair_key), ("label", label_key)):
            if key is not None and key not in record:
                raise BadRowError(
                    path, line, f"no key {key!r} for the {role}; this line has keys {list(record)}"
                )
        text = _check_text(record[text_key], "text", f"key {text_key!r}", path, line)
        pair = None if pair_key is None else _check_text(record[pair_key], "text pair", f"key {pair_key!r}", path, line)
        if label_key is None:
            return text, pair, None
        label = record[label_key]
        if _label_kind(label) == "bad":
            raise BadRowError(path, line, f"label {label!r} in key {label_key!r} is not a string or a number")
        return text, pair, label

    data = _collect(records, parse, path, pair_key is not None, skip_bad_rows)
    data.skipped = sorted(broken + data.skipped, key=lambda e: e.line)
    return data


def _default_key(keys: list[str], candidates: Sequence[str]) -> str | None:
    index = _find_default(keys, candidates)
    return None if index is None else keys[index]


# ----------------------------------------------------------------------------
# label <-> id


def _label_kind(value: Any) -> str:
    """'int', 'float' or 'str' for a raw label; anything else is not a label.

    A float with an integer value ("1.0", or 1.0 in JSON, as pandas writes a label column
    that had a missing value) counts as 'int': such a column names classes, not targets.
    """
    if isinstance(value, bool):
        return "int"  # JSON true/false: treated as 1/0
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return ("int" if value.is_integer() else "float") if math.isfinite(value) else "bad"
    if isinstance(value, str):
        stripped = value.strip()
        if _INT_RE.fullmatch(stripped):
            return "int"
        if _FLOAT_RE.fullmatch(stripped):
            return "int" if float(stripped).is_integer() else "float"
        return "str" if stripped else "bad"
    return "bad"


def _as_int(value: RawLabel) -> int:
    """A label of kind 'int' as an int: 3, "3", " 3", 3.0 and "3.0" all give 3."""
    if isinstance(value, str) and not _INT_RE.fullmatch(value.strip()):
        return int(float(value))
    return int(value)  # type: ignore[arg-type]


_NO_LABEL = "no label (does the file have a label column?)"


def _where(path: str, line_numbers: Sequence[int] | None, i: int) -> tuple[str, int]:
    return path, (line_numbers[i] if line_numbers is not None else i + 1)


@dataclass
class LabelMap:
    """The classes seen in training, in id order (or a regression target).

    ``labels[i]`` is the label with id i. Integer labels (also "0"/"1" strings, and
    floats with integer values such as "1.0") become ints sorted numerically; other
    labels are strings sorted as text; and when any label is a number with a fraction
    (3.8) the task is regression (``is_regression``, no classes, ``num_labels == 1`` as
    in Hugging Face). A classification map needs at least two classes: one output is
    what a regression model has, so a one-class "classifier" would be read back as one.
    """

    labels: list[int | str]
    is_regression: bool = False

    def __post_init__(self) -> None:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        if self.is_regression and self.labels:
            raise ValueError("a regression LabelMap has no class labels")

    # --- building

    @classmethod
    def from_labels(
        cls,
        labels: Iterable[RawLabel],
        path: str | os.PathLike[str] = "<labels>",
        line_numbers: Sequence[int] | None = None,
        regression: bool | None = None,
    ) -> LabelMap:
        """Build the map from training labels. ``regression`` forces the task type."""
        path = os.fspath(path)
        values = list(labels)
        if not values:
            raise ValueError(f"{path}: no labels to build a label map from")
        kinds = []
        for i, value in enumerate(values):
            kind = _label_kind(value)
            if kind == "bad":
                problem = _NO_LABEL if value is None else f"{value!r} is not a usable label"
                raise DataError(*_where(path, line_numbers, i), problem)
            kinds.append(kind)
        present = set(kinds)

        if regression is None and "str" in present and present & {"int", "float"}:
            # numbers and words in one label column: most often one typo ('pos' among 0/1, 'n/a' among scores),
            # which would otherwise silently add a class (or turn a regression into a many-class classifier)
            words = [i for i, k in enumerate(kinds) if k == "str"]
            odd = words if len(words) <= len(values) - len(words) else [i for i, k in enumerate(kinds) if k != "str"]
            i = odd[0]
            problem = (f"label {values[i]!r} is {'a word' if kinds[i] == 'str' else 'a number'} but "
                       f"{len(values) - len(odd)} other labels are {'numbers' if kinds[i] == 'str' else 'words'} "
                       f"({len(odd)} such row(s)); fix the row, or pass --task classification to take every label "
                       f"as a class name")
            raise DataError(*_where(path, line_numbers, i), problem)
        if regression is None:
            regression = "float" in present and present <= {"int", "float"}
        if regression:
            if "str" in present:
                i = kinds.index("str")
                problem = f"label {values[i]!r} is not a number, so it cannot be a regression target"
                raise DataError(*_where(path, line_numbers, i), problem)
            return cls([], is_regression=True)
        if present == {"int"}:
            label_map = cls(sorted({_as_int(value) for value in values}))
        else:
            label_map = cls(sorted({str(value) for value in values}))
        if label_map.num_labels < 2:
            hint = "; for a numeric target use regression (--task regression)" if present == {"int"} else ""
            problem = (f"every row has the label {label_map.labels[0]!r}: a classifier needs at least two classes "
                       f"(add rows of the other classes{hint})")
            raise DataError(*_where(path, line_numbers, 0), problem)
        return label_map

    @classmethod
    def from_data(cls, data: LabeledData, regression: bool | None = None) -> LabelMap:
        return cls.from_labels(data.labels, data.path, data.line_numbers, regression)

    # --- using

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def label2id(self) -> dict[int | str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def _key(self, value: RawLabel) -> int | str | None:
        """The form a raw label takes in ``labels``, or None if it cannot be one."""
        kind = _label_kind(value)
        if kind == "bad":
            return None
        if self.labels and isinstance(self.labels[0], int):
            return _as_int(value) if kind == "int" else None
        return str(value)

    def encode(
        self,
        labels: Iterable[RawLabel],
        path: str | os.PathLike[str] = "<labels>",
        line_numbers: Sequence[int] | None = None,
    ) -> list[int] | list[float]:
        """Raw labels -> class ids (or floats for regression); unknown labels name their line."""
        path = os.fspath(path)
        values = list(labels)
        if self.is_regression:
            targets = []
            for i, value in enumerate(values):
                if _label_kind(value) not in ("int", "float"):
                    problem = f"label {value!r} is not a finite number (regression target)"
                    raise DataError(*_where(path, line_numbers, i), problem)
                targets.append(float(value))
            return targets
        label2id = self.label2id
        ids = []
        for i, value in enumerate(values):
            key = self._key(value)
            if key not in label2id:
                known = ", ".join(map(repr, self.labels[:20])) + (", ..." if len(self.labels) > 20 else "")
                problem = _NO_LABEL if value is None else f"label {value!r} was not seen in training"
                raise DataError(*_where(path, line_numbers, i), f"{problem}; known labels: {known}")
            ids.append(label2id[key])
        return ids

    def decode(self, ids: Iterable[int]) -> list[int | str]:
        """Class ids -> labels, e.g. to write predictions in the dataset's own terms."""
        if self.is_regression:
            raise ValueError("a regression LabelMap has no labels to decode ids into")
        return [self.labels[int(i)] for i in ids]

    # --- Hugging Face config.json fields

    def to_json(self) -> dict[str, Any]:
        """``id2label``, ``label2id`` and ``problem_type`` as in a Hugging Face config.json.

        JSON keys are strings, so ``id2label`` maps "0" -> label; labels are written as
        strings too and integer labels come back as ints in ``from_json``.
        """
        if self.is_regression:
            # Hugging Face's convention for one regression output
            return {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "problem_type": "regression"}
        return {
            "id2label": {str(i): str(label) for i, label in enumerate(self.labels)},
            "label2id": {str(label): i for i, label in enumerate(self.labels)},
            "problem_type": "single_label_classification",
        }

    @classmethod
    def from_json(cls, config: dict[str, Any]) -> LabelMap:
        """Inverse of ``to_json``; also reads the same fields from a Hugging Face config.json."""
        # Hugging Face treats a single output as regression even without problem_type.
        single_output = config.get("num_labels") == 1 or len(config.get("id2label", {})) == 1
        if config.get("problem_type") == "regression" or single_output:
            return cls([], is_regression=True)
        if "id2label" not in config:
            raise ValueError(f"no 'id2label' in the config (keys: {sorted(config)})")
        id2label = {int(i): label for i, label in config["id2label"].items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
        names = [str(id2label[i]) for i in range(len(id2label))]
        labels: list[int | str] = list(names)
        if all(_INT_RE.fullmatch(name.strip()) for name in names):
            labels = [int(name) for name in names]
        label_map = cls(labels)
        if "label2id" in config:
            expected = {str(label): i for i, label in enumerate(label_map.labels)}
            if {str(k): int(v) for k, v in config["label2id"].items()} != expected:
                raise ValueError(
                    f"label2id {config['label2id']} does not invert id2label {config['id2label']}"
                )
        return label_map
