"""Execute the chapter notebooks and print the numbers their chapters quote.

    python notebooks/run_all.py              # run them all, print RESULT lines and run times
    python notebooks/run_all.py 02 05        # only the notebooks whose names start with these
    python notebooks/run_all.py --check      # also check each chapter quotes every RESULT value
    python notebooks/run_all.py --save DIR   # keep the executed notebooks (with outputs) in DIR
    python notebooks/run_all.py --saved DIR --check   # check chapters against notebooks saved earlier

Each notebook prints the numbers its chapter quotes as lines of the form

    RESULT name = value

where `value` is already formatted the way the chapter writes it ("0.873", "91.3%",
"22,713,216"). Only deterministic numbers (seeded, independent of the machine's speed)
are printed this way; timings are printed as plain text and never checked.

The chapter marks each place where it quotes a result with the result's name, in an
HTML comment that the rendered page does not show:

    the probe reaches <!--R:probe_dev_accuracy-->61.0% dev accuracy

and the check reads the value AT that place: the text right after the marker (after any
opening `, *, _ or quote, and an optional "name = ") must be the printed value, as a whole
token. So a value repeated elsewhere in the chapter cannot stand in for a wrong quote.
Every RESULT must be marked at least once, and every marker must name a RESULT (markers
of `real_*` results are skipped when the notebook ran without the real data).

"Deterministic" holds on one CPU; a result near a decision boundary can move on another,
whose vector units sum in another order (two of SST-2's 872 sentences flip between an AVX2
and an AVX-512 CPU in notebook 5). Such a quote carries its tolerance in the marker,

    <!--R:real_sst2_transfer_accuracy~0.5-->66.7% accuracy

and passes when the number after the marker is within 0.5 (in the quote's own unit) of the
printed value, the rest of the token (a % sign) equal. Only quotes that need one have it. The test
suite (tests/test_notebooks.py) uses the functions below, so what this script reports is
exactly what the tests check.

The notebooks are stored without outputs; their sources of truth are the jupytext
percent-format `.py` files next to them (`jupytext --update --to ipynb notebooks/NN_*.py`
rebuilds one and keeps its cell ids).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Optional

NOTEBOOK_DIR = Path(__file__).resolve().parent
ROOT = NOTEBOOK_DIR.parent
CHAPTER_DIR = ROOT / "chapters"

# notebook stem -> chapter file; one chapter per notebook, same number and name
NOTEBOOKS = sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))

RESULT_RE = re.compile(r"^RESULT (?P<name>[A-Za-z0-9_.-]+) = (?P<value>.+?)\s*$", re.M)


def chapter_path(stem: str) -> Path:
    return CHAPTER_DIR / f"{stem}.md"


def kernel_env() -> dict[str, str]:
    """The environment the notebook kernel runs in.

    PYTHONPATH gets the checkout, so the kernel imports this minibert even when it is not
    pip-installed. The number of CPU threads is fixed (MINIBERT_NOTEBOOK_THREADS, default
    1): float sums are split differently across threads, so the last bits of every result
    depend on the thread count, and a fixed count keeps the RESULT lines reproducible on any
    machine size. One thread also runs best on a machine shared with other jobs.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    threads = env.get("MINIBERT_NOTEBOOK_THREADS", "1")
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return env


def execute(stem: str, timeout: int = 300, kernel: str = "python3"):
    """Run notebooks/<stem>.ipynb top to bottom in notebooks/; return (notebook, seconds).

    Raises nbclient's CellExecutionError on the first failing cell.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / f"{stem}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute(env=kernel_env())
    return nb, time.perf_counter() - start


def stdout_text(nb) -> str:
    """Everything the notebook printed (stream outputs), in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                parts.append(out.get("text", ""))
    return "".join(parts)


def results(text: str) -> dict[str, str]:
    """The `RESULT name = value` lines of a notebook's output, as {name: value}."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("RESULT ") and not RESULT_RE.match(line):
            raise ValueError(f"malformed result line (want 'RESULT name = value'): {line!r}")
    for m in RESULT_RE.finditer(text):
        if m["name"] in found and found[m["name"]] != m["value"]:
            raise ValueError(f"RESULT {m['name']} printed twice with different values")
        found[m["name"]] = m["value"]
    return found


MARKER_RE = re.compile(r"<!--R:(?P<name>[A-Za-z0-9_.-]+?)(?:~(?P<tol>\d+(?:\.\d+)?))?-->")
_OPENERS = "`*_\"'“("  # formatting that may sit between a marker and its value
_NUMBER_RE = re.compile(r"(?P<num>-?\d[\d,]*(?:\.\d+)?)(?P<unit>%?)")


def markers(text: str) -> list[tuple[str, int, str, Optional[float]]]:
    """(name, line number, the text that follows, tolerance or None) for each `<!--R:name-->`
    (or `<!--R:name~tol-->`) marker."""
    return [(m["name"], text.count("\n", 0, m.start()) + 1, text[m.end() :], float(m["tol"]) if m["tol"] else None)
            for m in MARKER_RE.finditer(text)]


def value_at(name: str, value: str, after: str, tol: Optional[float] = None) -> bool:
    """Does the text right after a marker start with `value` (or `name = value`) as a whole token?
    With tol: a number within tol of value's, with the same unit."""
    after = after.lstrip(_OPENERS)
    if after.startswith(f"{name} = "):
        after = after[len(name) + 3 :]
    if tol is None:
        return re.match(re.escape(value) + r"(?![\w]|\.\d)", after) is not None
    want, got = _NUMBER_RE.fullmatch(value), re.match(_NUMBER_RE.pattern + r"(?![\w]|\.\d)", after)
    if want is None:
        raise ValueError(f"<!--R:{name}~{tol:g}-->: the result {value!r} is not a number")
    return (got is not None and got["unit"] == want["unit"]
            and abs(float(got["num"].replace(",", "")) - float(want["num"].replace(",", ""))) <= tol + 1e-9)


def quote_problems(text: str, found: dict[str, str], where: str = "chapter") -> list[str]:
    """Every way the quotes in `text` disagree with the results in `found` (empty when they agree)."""
    problems = []
    marked = set()
    for name, line, after, tol in markers(text):
        marked.add(name)
        if name not in found:
            if not name.startswith("real_"):  # real-data results exist only when the data does
                problems.append(f"{where}:{line}: <!--R:{name}--> names no result the notebook printed")
        elif not value_at(name, found[name], after, tol):
            shown = after.lstrip(_OPENERS)[: len(found[name]) + 12].replace("\n", " ")
            within = "" if tol is None else f" (within {tol:g})"
            problems.append(f"{where}:{line}: <!--R:{name}--> is followed by {shown!r}, "
                            f"but the result is {found[name]!r}{within}")
    for name, value in found.items():
        if name not in marked:
            problems.append(f"{where}: RESULT {name} = {value} is quoted nowhere "
                            f"(mark the quote: <!--R:{name}-->{value})")
    return problems


def chapter_problems(stem: str, found: dict[str, str]) -> list[str]:
    """The quote problems of chapters/<stem>.md against the results its notebook printed."""
    path = chapter_path(stem)
    return quote_problems(path.read_text(encoding="utf-8"), found, where=str(path.relative_to(ROOT)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("only", nargs="*", help="notebook name prefixes (default: all)")
    ap.add_argument("--check", action="store_true", help="fail if a chapter's quote at a result's marker is wrong")
    ap.add_argument("--save", type=Path, help="folder for the executed notebooks")
    ap.add_argument("--saved", type=Path, help="read executed notebooks from this folder instead of running them")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = ap.parse_args(argv)

    stems = [s for s in NOTEBOOKS if not args.only or any(s.startswith(p) for p in args.only)]
    if not stems:
        print(f"no notebook matches {args.only}", file=sys.stderr)
        return 2
    failed = False
    for stem in stems:
        if args.saved:
            import nbformat

            nb, seconds = nbformat.read(args.saved / f"{stem}.ipynb", as_version=4), 0.0
        else:
            nb, seconds = execute(stem, timeout=args.timeout)
        found = results(stdout_text(nb))
        print(f"== {stem}: {seconds:.1f} s, {len(found)} results")
        for k, v in found.items():
            print(f"RESULT {k} = {v}")
        if args.save:
            import nbformat

            args.save.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.save / f"{stem}.ipynb")
        if args.check:
            for line in chapter_problems(stem, found):
                print(f"  {line}")
                failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
