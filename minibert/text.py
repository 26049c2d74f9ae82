"""Raw text for pretraining: find the corpus files, stream their documents, split sentences.

    specs ["data/*.txt", "more/"] --resolve_paths--> [Path, ...]    (files, globs, folders)
          --iter_documents--> Document(path, index, lines)          (blank lines separate documents)
          --document_sentences--> ["First sentence.", "Second one.", ...]

Corpus format
-------------
A corpus file is UTF-8 text (a BOM at the start is skipped). Documents are separated by one
or more blank lines; a line holding only whitespace counts as blank. Inside a document each
line is one paragraph, stripped of surrounding whitespace. Files are read line by line, so a
corpus file may be far larger than memory (only the current document is held). Any problem
raises `CorpusError` naming the file, and for bad bytes the byte offset and line.

Sentence splitting rules (`split_sentences`)
--------------------------------------------
BERT's next-sentence task needs sentences, and pulling in a trained splitter (NLTK's Punkt,
spaCy) for that would be a heavy dependency, so minibert has its own few rules. Whitespace is
first collapsed to single spaces. Then:

1. A sentence may end after a run of `.`, `!`, `?` or `…` (so `?!`, `!!`, `...` count as one
   end), optionally followed by closing quotes or brackets (`" ' ” ’ » ) ] }`).
2. It does end there only if a space follows and then the start of a new sentence: an
   uppercase letter, a digit, a letter of a script without case (Chinese, Arabic, Hebrew...),
   a currency sign, or an opening quote or bracket (`" ' “ ‘ « ( [ { ¿ ¡`). So `"Oh!" cried
   she` and `wait... and then` stay whole, and `3.14` or `example.com` never split (no space).
3. Not after these words ending in a single `.`:
   - titles that come before a name, never at the end of a sentence:
     `Mr. Mrs. Ms. Dr. Prof. St. Mt. Rev. Gen. Col. Capt. Lt. Sen. Gov.`... (`TITLES`);
   - words that introduce what follows: `e.g. i.e. vs. v. cf. viz. al.` (`et al.`);
   - words that come before a number, when a digit follows: `No. 5`, `Vol. 2`, `p. 45`,
     `Fig. 3`, `c. 1500`, `Jan. 6`... (`BEFORE_NUMBER`);
   - any word, when an era marker follows: `the 2nd c. BCE`, `c. AD 30` (`ERA_MARKERS`).
4. Ambiguous words split only if the next word is a common sentence opener such as `The`, `He`,
   `In`, `This` (`SENTENCE_OPENERS`): initialisms (`U.S.`, `D.C.`, `a.m.`, `Ph.D.`), single
   capital initials (`J. R. R. Tolkien`, `George W. Bush`) and `Jr. Sr. Inc. Ltd. Co. Bros.`.
   So `the U.S. Army` stays whole but `moved to the U.S. He then` splits.
   `etc.` is an ordinary word: it ends the sentence when an uppercase letter follows.
5. CJK full stops `。！？` (and `｡`) end a sentence without any space after them, together
   with any closing marks that follow (`」』）”`...).
6. A piece is only cut off as a sentence if it and the rest both hold a letter or digit, so
   punctuation on its own (`... `, a stray `(`) stays attached to its neighbour.
7. Zero-width characters (ZWSP, ZWJ, word joiner, BOM) right after a stop are kept with it.

What this gets wrong, knowingly: a proper name after `!` or `?` inside a quote
(`"Why?" Elizabeth asked.` splits), a Roman numeral or a lone letter ending a sentence before
a name (`after World War I. Mellon...` stays whole), a sentence ending in a title, a sentence
starting with a lowercase letter, and text in scripts whose stops are not listed above.

The output is whitespace-normalised, never holds an empty sentence, and joining it with
single spaces gives back the input with its whitespace collapsed (CJK stops with no space
after them are the one exception: there the join adds a space).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence, Union

PathLike = Union[str, "os.PathLike[str]"]
Errors = Literal["strict", "replace"]


class CorpusError(ValueError):
    """A corpus file is missing, empty or undecodable; the message names the file."""


@dataclass(frozen=True)
class Document:
    """One document of a corpus file: its non-blank lines (paragraphs), stripped."""

    path: str  # the file it came from
    index: int  # 0-based position among the documents of that file
    lines: list[str]  # its non-blank lines, stripped; never empty
    line: int = 0  # 1-based line number of its first line in the file (0: not known)


# ----------------------------------------------------------------------------- files


def _has_glob_magic(spec: str) -> bool:
    return any(ch in spec for ch in "*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    # files under .git/, .ipynb_checkpoints/ and the like are tool state, not corpus text
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def resolve_paths(specs: Sequence[PathLike]) -> list[Path]:
    """Expand files, globs and folders into a sorted list of distinct corpus files.

    Each spec is a file, a glob (`data/*.txt`, `data/**/*.txt`) or a folder, which stands for
    every `*.txt` file below it (hidden files and folders skipped). Paths come back absolute,
    sorted and without duplicates. A missing file, a glob that matches no file or a folder
    without `*.txt` files raises CorpusError naming the spec.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]  # a lone path would otherwise be iterated character by character
    found: set[Path] = set()
    for raw in specs:
        spec = os.path.expanduser(os.fspath(raw))
        path = Path(spec)
        if path.is_file():
            found.add(path.resolve())
        elif path.is_dir():
            files = [p for p in path.rglob("*.txt") if p.is_file() and not _is_hidden(p, path)]
            if not files:
                raise CorpusError(f"folder {spec} holds no .txt files")
            found.update(p.resolve() for p in files)
        elif _has_glob_magic(spec):
            files = [Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
            if not files:
                raise CorpusError(f"glob {spec} matches no files")
            found.update(p.resolve() for p in files)
        elif path.exists():
            raise CorpusError(f"{spec} is neither a file nor a folder")
        else:
            raise CorpusError(f"file {spec} not found")
    return sorted(found)


_BOM = b"\xef\xbb\xbf"


def _decode_error(path: str, raw: bytes, line_start: int, line_no: int, err: UnicodeDecodeError) -> CorpusError:
    offset = line_start + err.start
    if line_no == 1 and raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        hint = " (the file looks like UTF-16; convert it to UTF-8)"
    else:
        hint = "; re-encode it as UTF-8, or read such bytes as U+FFFD (errors='replace'; --errors replace)"
    return CorpusError(f"file {path}: not valid UTF-8 at byte {offset} (line {line_no}){hint}")


def _iter_file(path: str, errors: Errors) -> Iterator[Document]:
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"file {path} not found") from None
    except IsADirectoryError:
        raise CorpusError(f"{path} is a folder, not a file") from None
    except OSError as exc:
        raise CorpusError(f"file {path} cannot be read: {exc.strerror}") from None

    index = 0
    lines: list[str] = []
    first_line = 0
    offset = 0  # byte offset of the current line from the start of the file
    with fh:
        # Binary line iteration reads one line at a time, and splitting on b"\n" never cuts a
        # UTF-8 character (0x0A appears in no multi-byte sequence), so each line decodes alone.
        for line_no, raw in enumerate(fh, start=1):
            line_start, body = offset, raw
            offset += len(raw)
            if line_no == 1 and body.startswith(_BOM):
                body, line_start = body[len(_BOM) :], line_start + len(_BOM)
            try:
                text = body.decode("utf-8", errors=errors)
            except UnicodeDecodeError as err:
                raise _decode_error(path, raw, line_start, line_no, err) from None
            text = text.strip()
            if text:
                if not lines:
                    first_line = line_no
                lines.append(text)
            elif lines:
                yield Document(path, index, lines, first_line)
                index, lines = index + 1, []
    if lines:
        yield Document(path, index, lines, first_line)
        index += 1
    if index == 0:
        raise CorpusError(f"file {path} is empty")


def iter_documents(paths: Iterable[PathLike], errors: Errors = "strict") -> Iterator[Document]:
    """Stream the documents of each file in turn (see the module docstring for the format).

    errors="strict" raises CorpusError at the first byte sequence that is not UTF-8, naming the
    file, the 0-based byte offset from the start of the file and the 1-based line;
    errors="replace" puts U+FFFD in its place and goes on. An empty (or all-whitespace) file
    raises CorpusError once it has been read.
    """
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        yield from _iter_file(os.fspath(path), errors)


def read_corpus(specs: Sequence[PathLike], errors: Errors = "strict") -> Iterator[Document]:
    """Resolve `specs` (files, globs, folders) and stream their documents.

    Checks up front that there is at least one document to read, so a run fails at start-up
    rather than after building a model; every file is still checked as it is reached.
    """
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    docs = iter_documents(resolve_paths(specs), errors)
    first = next(docs, None)
    if first is None:
        named = ", ".join(os.fspath(s) for s in specs) or "(no paths given)"
        raise CorpusError(f"no usable document in: {named}")
    return itertools.chain([first], docs)


# ----------------------------------------------------------------------------- sentences

# Titles written before a name: a sentence practically never ends on them.
TITLES = frozenset(
    (
        "Mr Mrs Ms Messrs Mme Mlle Dr Prof St Mt Ft Rev Fr Hon Pres Gov Sen Rep "
        "Gen Col Maj Capt Lt Sgt Cpl Adm Cmdr Supt"
    ).split()
)
# Words that introduce what follows (lower-case, compared case-insensitively).
INTRODUCERS = frozenset("e.g i.e vs v cf viz al".split())
# Words that come before a number ("No. 5", "p. 45", "c. 1500", "Jan. 6"); lower-case keys,
# compared case-insensitively except single letters, which must match exactly.
BEFORE_NUMBER = frozenset(
    (
        "no nos vol vols fig figs p pp ch chap art sec sect eq eqs ref op c ca b d fl r est pop approx "
        "jan feb mar apr jun jul aug sep sept oct nov dec"
    ).split()
)
# Era markers follow a date or "c." ("the 2nd c. BCE", "c. AD 30") and do not open a sentence.
ERA_MARKERS = frozenset("BC BCE AD CE".split())
# Words after which a sentence may or may not end; they split only before a SENTENCE_OPENER.
AMBIGUOUS = frozenset("Jr Sr Inc Ltd Co Corp Bros Esq".split())
# Capitalised words that very often start an English sentence and rarely continue a name.
SENTENCE_OPENERS = frozenset(
    (
        "A An The This That These Those There Then Thus Its It He She They We I You His Her Their "
        "Our My In On At As By For From With After Before During Since When While Where If Although "
        "Though But And Or So Yet However Also Many Most Some Such Other One Each Both All No Not "
        "What Which Who Why How Today According Following Despite Because Under Over Between"
    ).split()
)

_CLOSERS = "\"'”’»›)]}" + "」』）】〉》〕］｝" + "\u200b\u200c\u200d\u2060\ufeff"
_OPENERS = "\"'“‘«‹([{¿¡" + "「『（【〈《〔［｛"
_LATIN_STOPS = ".!?…"
_CJK_STOPS = "。！？｡"

# A latin stop run (plus closers) followed by a space, or a CJK stop run (plus closers) anywhere.
_CANDIDATE = re.compile(
    rf"(?P<latin>[{re.escape(_LATIN_STOPS)}]+)[{re.escape(_CLOSERS)}]*(?= )"
    rf"|(?P<cjk>[{re.escape(_CJK_STOPS)}]+)[{re.escape(_CLOSERS)}]*"
)
# A word made of one- to three-letter parts joined by dots: U.S, a.m, Ph.D, U.S.A (the last dot
# is the stop itself, already cut off).
_INITIALISM = re.compile(r"(?:[^\W\d_]{1,3}\.)+[^\W\d_]{1,3}")
_ALNUM = re.compile(r"[^\W_]")
_WORD_BEFORE_STOP = re.compile(r"[^\W_](?:[^\W_]|\.)*$")


def _starts_sentence(s: str, i: int) -> bool:
    """Can a sentence start at s[i]? (rule 2)"""
    while i < len(s) and s[i] in "_*":  # emphasis marks, as in "_You_ want"
        i += 1
    if i >= len(s):
        return False
    ch = s[i]
    if ch in _OPENERS:
        return True
    return unicodedata.category(ch) in ("Lu", "Lt", "Lo", "Nd", "Sc")


def _word_span(s: str, i: int) -> tuple[int, int]:
    """Where the run of letters at s[i] starts and ends, after any opening quotes or brackets."""
    while i < len(s) and s[i] in _OPENERS:
        i += 1
    j = i
    while j < len(s) and s[j].isalpha():
        j += 1
    return i, j


def _ends_sentence(s: str, stop: str, word: str, nxt: int) -> bool:
    """Decide a latin candidate: `stop` is the stop run, `word` the word just before it (letters,
    digits and inner dots), `nxt` where the next token starts."""
    if not _starts_sentence(s, nxt):
        return False
    if stop != ".":
        return True  # abbreviations end in a single dot; "?", "!", "..." end sentences
    next_start, next_end = _word_span(s, nxt)
    next_word = s[next_start:next_end]
    if word in TITLES or word.lower() in INTRODUCERS or next_word in ERA_MARKERS:
        return False
    key = word if len(word) == 1 else word.lower()
    if key in BEFORE_NUMBER and s[nxt].isdigit():
        return False
    single_initial = len(word) == 1 and word.isupper()
    if single_initial or word in AMBIGUOUS or _INITIALISM.fullmatch(word):
        # rule 4; "A. A. Milne": a next word that is itself an initial is no opener
        next_is_initial = len(next_word) == 1 and s[next_end : next_end + 1] == "."
        return next_word in SENTENCE_OPENERS and not next_is_initial
    return True


def split_sentences(text: str) -> list[str]:
    """Split one paragraph into sentences by the rules in the module docstring."""
    s = " ".join(text.split())
    if not s:
        return []
    # rule 6: no sentence may start after the last letter or digit
    last_alnum = len(s) - 1
    while last_alnum >= 0 and not s[last_alnum].isalnum():
        last_alnum -= 1
    sentences: list[str] = []
    start = 0  # where the sentence being built starts
    scanned, has_alnum = 0, False  # s[start:scanned] searched for a letter or digit so far
    for m in _CANDIDATE.finditer(s):
        end = m.end()
        nxt = end + 1 if end < len(s) and s[end] == " " else end
        if nxt > last_alnum:
            break  # rule 6 for the rest
        if not has_alnum:  # rule 6 for this piece, searched once per character
            has_alnum, scanned = _ALNUM.search(s, scanned, end) is not None, end
            if not has_alnum:
                continue
        if m.group("latin") is not None:
            # the word before the stop: letters, digits and inner dots ("U.S", "Mr" in "thing?--Mr");
            # no more than 40 characters back, so a giant token costs no more than a short one
            lo = max(0, m.start() - 40)
            space = s.rfind(" ", lo, m.start())
            word_match = _WORD_BEFORE_STOP.search(s, space + 1 if space >= 0 else lo, m.start())
            word = word_match.group() if word_match else ""
            if not _ends_sentence(s, m.group("latin"), word, nxt):
                continue
        sentences.append(s[start:end])
        start = scanned = nxt
        has_alnum = False
    sentences.append(s[start:])
    return sentences


def document_sentences(doc: Document) -> list[str]:
    """All sentences of a document, line (paragraph) by line; no sentence spans two lines."""
    return [sentence for line in doc.lines for sentence in split_sentences(line)]


# ----------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minibert.text",
        description="Count the documents and sentences of a corpus, and show sample splits.",
    )
    parser.add_argument("specs", nargs="+", help="corpus files, globs or folders")
    parser.add_argument("--errors", choices=["strict", "replace"], default="strict", help="on bytes that are not UTF-8")
    parser.add_argument("--sample", type=int, default=0, help="print this many random sentence boundaries")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    boundaries: list[tuple[str, str]] = []  # reservoir sample of (sentence, next sentence)
    seen = 0
    per_file: dict[str, list[int]] = {}
    for doc in read_corpus(args.specs, args.errors):
        counts = per_file.setdefault(doc.path, [0, 0, 0])
        counts[0] += 1
        counts[1] += len(doc.lines)
        for line in doc.lines:
            sents = split_sentences(line)
            counts[2] += len(sents)
            for a, b in zip(sents, sents[1:]):
                seen += 1
                if len(boundaries) < args.sample:
                    boundaries.append((a, b))
                elif args.sample and rng.randrange(seen) < args.sample:
                    boundaries[rng.randrange(args.sample)] = (a, b)
    for path, (n_docs, n_lines, n_sents) in per_file.items():
        print(f"{path}: {n_docs:,} documents, {n_lines:,} lines, {n_sents:,} sentences")
    for a, b in boundaries:
        print(f"...{a[-60:]}\n   || {b[:60]}...\n")


if __name__ == "__main__":
    main()
