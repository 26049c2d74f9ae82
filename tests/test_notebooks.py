"""The chapters and their notebooks cannot rot.

* every notebook runs top to bottom (nbclient, kernel python3, in notebooks/) without an error;
* every number a notebook prints as `RESULT name = value` is quoted in its chapter at a
  marker `<!--R:name-->` that names it, and the value at each marker is the printed one;
* the committed .ipynb files are the jupytext .py sources, without outputs;
* every link in a chapter points at a file that exists, and a link to a Python file
  named after a symbol (`` [`MultiHeadAttention`](../minibert/model.py) ``) names a
  symbol defined in that file;
* every display formula in a chapter is followed by a link to the code that computes it;
* every chapter ends with exercises and answers to the common questions.

The notebook runs take a few minutes together; each is executed once per session and
shared by the tests that need its output.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("run_all", ROOT / "notebooks" / "run_all.py")
run_all = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_all)

NOTEBOOKS = run_all.NOTEBOOKS
CHAPTERS = sorted((ROOT / "chapters").glob("[0-9][0-9]_*.md"))
CELL_TIMEOUT = int(os.environ.get("MINIBERT_NOTEBOOK_CELL_TIMEOUT", "600"))
# The whole suite must stay well under 15 minutes on 2 cores, so each notebook has a
# compute budget. It is checked in CPU seconds of the kernel (each notebook prints them in
# its last line), not in wall time, so that a busy machine does not fail the test. A notebook
# should take under three minutes alone; the suite runs it beside a second test worker, which
# costs it 10-15% more CPU time, hence the margin. A notebook that grows past the budget is a
# failure to fix, not a reason to raise it.
MAX_CPU_SECONDS = float(os.environ.get("MINIBERT_NOTEBOOK_MAX_CPU_SECONDS", "210"))
CPU_LINE = re.compile(r"notebook ran in \d+ s \((\d+) s of CPU time in this kernel\)")


def test_there_are_six_chapters_each_with_a_notebook():
    assert [c.stem for c in CHAPTERS] == NOTEBOOKS
    assert len(NOTEBOOKS) == 6  # the five parts of the series, and compressing and deploying
    for stem in NOTEBOOKS:
        assert (ROOT / "notebooks" / f"{stem}.py").exists(), f"{stem}: no jupytext source"


# ----------------------------------------------------------------------------
# executing the notebooks


# The notebooks are split over two test files (this one runs the first half,
# test_notebooks_second_half.py the rest), so that pytest-xdist, which gives each file to one
# worker, runs them on both cores instead of one after the other.
FIRST_HALF, SECOND_HALF = NOTEBOOKS[:3], NOTEBOOKS[3:]
# Notebook 6 exports and quantizes: it needs the deploy extra, and skips without it.
NEEDS_DEPLOY = {"06_compressing_and_deploying": ("onnx", "onnxscript", "onnxruntime", "torchao")}


def execute_notebook(stem):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for module in NEEDS_DEPLOY.get(stem, ()):
        pytest.importorskip(module, reason=f"{stem} needs the deploy extra: pip install -e '.[deploy]'")
    nb, seconds = run_all.execute(stem, timeout=CELL_TIMEOUT)
    return stem, nb, seconds


@pytest.fixture(scope="module", params=FIRST_HALF)
def executed(request):
    return execute_notebook(request.param)


def test_notebook_runs(executed):
    stem, nb, seconds = executed  # execute() raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{stem}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    cpu = CPU_LINE.findall(run_all.stdout_text(nb))
    assert cpu, f"{stem} does not print its run time in its last cell"
    assert float(cpu[-1]) < MAX_CPU_SECONDS, (
        f"{stem} used {cpu[-1]} s of CPU time ({seconds:.0f} s of wall time); the budget is {MAX_CPU_SECONDS:.0f} s"
    )


def test_chapter_quotes_the_notebook_numbers(executed):
    stem, nb, _ = executed
    found = run_all.results(run_all.stdout_text(nb))
    assert len(found) >= 5, f"{stem} printed only {len(found)} RESULT lines"
    problems = run_all.chapter_problems(stem, found)
    assert not problems, f"chapters/{stem}.md:\n" + "\n".join(problems)
    # and the check can fail on this very chapter: a 9 written in front of the first marked value
    text = run_all.chapter_path(stem).read_text(encoding="utf-8")
    name = next(n for n, *_ in run_all.markers(text) if n in found)
    wrong = text.replace(f"<!--R:{name}-->", f"<!--R:{name}-->9", 1)
    caught = [p for p in run_all.quote_problems(wrong, found) if f"R:{name}" in p]
    assert caught, f"{stem}: a wrong quote of {name} passed the check"


def test_notebooks_draw_plots(executed):
    stem, nb, _ = executed
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, f"{stem} shows no plot"


# ----------------------------------------------------------------------------
# the result-matching mechanism itself


def test_results_parser():
    text = "x\nRESULT acc = 91.3%\nRESULT cm = [[1, 2], [3, 4]]\nRESULT ok = True\n"
    assert run_all.results(text) == {"acc": "91.3%", "cm": "[[1, 2], [3, 4]]", "ok": "True"}
    with pytest.raises(ValueError):
        run_all.results("RESULT a = 1\nRESULT a = 2\n")
    with pytest.raises(ValueError):
        run_all.results("RESULT a b = 1\n")  # a name with a space would otherwise be skipped silently


def test_a_marker_with_a_tolerance_takes_a_nearby_number_of_the_same_unit():
    found = {"acc": "66.9%", "f1": "0.711", "cm": "[[1, 2], [3, 4]]"}
    assert run_all.quote_problems("<!--R:acc~0.5-->66.7% and F1 <!--R:f1~0.005-->0.709.", found) == [
        "chapter: RESULT cm = [[1, 2], [3, 4]] is quoted nowhere (mark the quote: <!--R:cm-->[[1, 2], [3, 4]])"]
    for wrong in ("<!--R:acc~0.5-->66.3%", "<!--R:acc~0.5-->67.5%", "<!--R:acc~0.5-->66.7 points",
                  "<!--R:acc~0.5-->about 67%"):
        problems = run_all.quote_problems(wrong, {"acc": "66.9%"})
        assert problems and "(within 0.5)" in problems[0], wrong
    assert run_all.quote_problems("<!--R:acc-->66.7%", {"acc": "66.9%"})  # no tolerance: exact, as before
    with pytest.raises(ValueError, match="not a number"):
        run_all.quote_problems("<!--R:cm~1-->[[1, 2], [3, 4]]", found)


def test_a_quote_is_checked_at_its_marker_not_anywhere_in_the_chapter():
    found = {"acc": "91.3%", "loss": "0.87", "ok": "True", "cm": "[[1, 2], [3, 4]]"}
    good = ("reaches <!--R:acc-->91.3% on test, a loss of <!--R:loss-->0.87.\n"
            "`<!--R:ok-->ok = True`, and <!--R:cm-->`[[1, 2], [3, 4]]`; <!--R:real_sst2-->88%")
    assert run_all.quote_problems(good, found) == []
    # a deliberately wrong quote fails, although the right value appears elsewhere in the text
    wrong = good.replace("<!--R:acc-->91.3%", "<!--R:acc-->91.4%") + " (91.3% before)"
    problems = run_all.quote_problems(wrong, found)
    assert len(problems) == 1 and "<!--R:acc--> is followed by '91.4%" in problems[0], problems
    # a longer number that starts with the value is not the value
    for bad in ("<!--R:loss-->0.875", "<!--R:loss-->0.87.5", "<!--R:loss-->10.87"):
        assert run_all.quote_problems(good.replace("<!--R:loss-->0.87", bad), found), bad
    # a result nobody marks, and a marker naming no result, both fail
    assert "quoted nowhere" in run_all.quote_problems(good, {**found, "f1": "0.5"})[0]
    assert "names no result" in run_all.quote_problems(good + " <!--R:gone-->1", found)[0]


# ----------------------------------------------------------------------------
# committed notebooks = jupytext sources, without outputs


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_ipynb_is_stored_without_outputs(stem):
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{stem}.ipynb has outputs; strip them"


@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_ipynb_matches_its_jupytext_source(stem):
    jupytext = pytest.importorskip("jupytext")
    nbformat = pytest.importorskip("nbformat")
    source = jupytext.read(ROOT / "notebooks" / f"{stem}.py")
    stored = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    cells = lambda nb: [(c.cell_type, c.source) for c in nb.cells]  # noqa: E731
    assert cells(stored) == cells(source), (
        f"notebooks/{stem}.ipynb is out of date: run `jupytext --update --to ipynb notebooks/{stem}.py`"
    )


# ----------------------------------------------------------------------------
# chapters: links, formulas, closing sections

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def defined_symbols(py: Path) -> set[str]:
    """Names defined at any level of a Python file: classes, functions, methods, assignments."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(f"{node.name}.{item.name}")
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(f"{node.name}.{item.target.id}")
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def code_links(md: Path):
    """(symbol or None, file, anchor) for each relative link in a chapter."""
    for m in LINK.finditer(md.read_text(encoding="utf-8")):
        target = m["target"]
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web addresses and in-page anchors
        file, _, anchor = target.partition("#")
        text = m["text"].strip()
        symbol = None
        code = re.fullmatch(r"`(?:[\w/.]+\.py::)?(?P<sym>[A-Za-z_][\w.]*)(?:\(\))?`", text)
        if code and file.endswith(".py") and not code["sym"].endswith(".py"):  # `model.py` names the file itself
            symbol = code["sym"]
        yield symbol, (md.parent / file).resolve(), anchor


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_links_resolve(md):
    problems = []
    n_code = 0
    for symbol, file, anchor in code_links(md):
        if not file.exists():
            problems.append(f"missing file {file.relative_to(ROOT) if ROOT in file.parents else file}")
            continue
        if anchor.startswith("L") and anchor[1:].split("-")[0].isdigit():
            n_lines = len(file.read_text(encoding="utf-8").splitlines())
            if int(anchor[1:].split("-")[0]) > n_lines:
                problems.append(f"{file.name}#{anchor}: the file has {n_lines} lines")
        if symbol is not None:
            n_code += 1
            if symbol not in defined_symbols(file) and symbol.split(".")[-1] not in defined_symbols(file):
                problems.append(f"{file.name} defines no {symbol}")
    assert not problems, f"{md.name}: " + "; ".join(problems)
    assert n_code >= 3, f"{md.name} links to only {n_code} symbols in the code"


def test_link_checker_catches_a_wrong_symbol(tmp_path):
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    (tmp_path / "m.py").write_text("class Real:\n    def method(self):\n        pass\nX = 1\n")
    md = chapters / "c.md"
    md.write_text("[`Real`](../m.py) [`Real.method`](../m.py#L2) [`X`](../m.py) [`m.py`](../m.py) "
                  "[`Gone`](../m.py) [x](../nope.md)")
    links = list(code_links(md))
    defined = defined_symbols(tmp_path / "m.py")
    assert [s for s, f, _ in links if s and s not in defined] == ["Gone"]
    assert [f.name for _, f, _ in links if not f.exists()] == ["nope.md"]


DISPLAY_MATH = re.compile(r"^[ \t]*\$\$[ \t]*$(?P<body>.*?)^[ \t]*\$\$[ \t]*$", re.M | re.S)


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_every_display_formula_is_followed_by_its_code(md):
    """A `$$ ... $$` block must be followed, within the next paragraph, by a link into minibert/."""
    text = md.read_text(encoding="utf-8")
    unlinked = []
    for m in DISPLAY_MATH.finditer(text):
        after = text[m.end() :].lstrip("\n")
        paragraph = after.split("\n\n")[0]
        if "](../minibert/" not in paragraph:
            unlinked.append(m["body"].strip().splitlines()[0][:60])
    assert not unlinked, f"{md.name}: formulas without a code link right after them: {unlinked}"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_every_exercise_has_a_collapsed_answer(md):
    text = md.read_text(encoding="utf-8")
    section = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"^\d+\. ", section, flags=re.M)[1:]  # one chunk per numbered exercise
    assert items, f"{md.name}: no numbered exercises"
    unanswered = [i + 1 for i, item in enumerate(items)
                  if not re.search(r"<details><summary>Answer</summary>.+?</details>", item, re.S)]
    assert not unanswered, f"{md.name}: exercises without a <details> answer: {unanswered}"


@pytest.mark.parametrize("md", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_has_glossary_exercises_and_common_questions(md):
    text = md.read_text(encoding="utf-8")
    assert re.search(r"[\u4e00-\u9fff]", text), f"{md.name} glosses no Chinese term of the series"
    headings = [h.lower() for h in re.findall(r"^#+\s*(.+)$", text, re.M)]
    assert any("exercise" in h for h in headings), f"{md.name} has no exercises section"
    assert any("common questions" in h for h in headings), f"{md.name} has no common-questions section"
    for topic in ("512", "overfit", "hyper-parameter", "imbalance"):
        assert topic in text.lower(), f"{md.name}: the common questions do not cover {topic!r}"
    notebook = f"../notebooks/{md.stem}.ipynb"
    assert notebook in text, f"{md.name} does not link its notebook {notebook}"
