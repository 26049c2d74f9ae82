"""Tests for minibert.text: corpus files, document streaming and the sentence splitter."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from minibert.text import (
    CorpusError,
    Document,
    document_sentences,
    iter_documents,
    read_corpus,
    resolve_paths,
    split_sentences,
)

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "corpus"


# ----------------------------------------------------------------------------- sentence splitting

SPLIT_CASES = {
    # plain stops, and a last sentence with no stop at all
    "basic": ("One. Two! Three? Four", ["One.", "Two!", "Three?", "Four"]),
    "multiple spaces and tabs": ("  First   one.\t\tSecond\n one.  ", ["First one.", "Second one."]),
    "lowercase after stop": ("It was 5 p.m. and dark. Then rain.", ["It was 5 p.m. and dark.", "Then rain."]),
    # titles and introducers never end a sentence
    "titles": ("Mr. Smith met Dr. Watson and Mrs. Hudson at St. Paul's. They talked.",
               ["Mr. Smith met Dr. Watson and Mrs. Hudson at St. Paul's.", "They talked."]),
    "title after a dash": ("How could you?--Mr. Knightley!--Mr. Knightley! Yes.",
                           ["How could you?--Mr. Knightley!--Mr. Knightley!", "Yes."]),
    "title in quotes": ('"My dear Mr. Bennet," said his lady. "Have you heard?"',
                        ['"My dear Mr. Bennet," said his lady.', '"Have you heard?"']),
    "e.g. and i.e.": ("Use a fruit, e.g. Apples. Or a nut, i.e. Walnuts. Fine.",
                      ["Use a fruit, e.g. Apples.", "Or a nut, i.e. Walnuts.", "Fine."]),
    "vs. and cf.": ("Smith vs. Jones was heard. See cf. Brown. Done.",
                    ["Smith vs. Jones was heard.", "See cf. Brown.", "Done."]),
    "et al. before a year": ("Smith et al. (2019) found it. It holds.", ["Smith et al. (2019) found it.", "It holds."]),
    "etc. before lowercase": ("Pens, ink, etc. are sold here. Paper too.",
                              ["Pens, ink, etc. are sold here.", "Paper too."]),
    "etc. ends a sentence": ("He bought pens, ink, etc. The shop closed.",
                             ["He bought pens, ink, etc.", "The shop closed."]),
    # words before numbers
    "No. and Vol.": ("It was No. 5 in Vol. 2 on p. 45. Then No. It was not.",
                     ["It was No. 5 in Vol. 2 on p. 45.", "Then No.", "It was not."]),
    "circa and eras": ("Built c. 1500 and the 2nd c. BCE saw c. AD 30. Later.",
                       ["Built c. 1500 and the 2nd c. BCE saw c. AD 30.", "Later."]),
    # initialisms and initials
    "U.S. before a name": ("He joined the U.S. Army in 1990. He left.",
                           ["He joined the U.S. Army in 1990.", "He left."]),
    "U.S. ends a sentence": ("He moved to the U.S. He liked it.", ["He moved to the U.S.", "He liked it."]),
    "initials": ("J. R. R. Tolkien and George W. Bush met. A. A. Milne did not.",
                 ["J. R. R. Tolkien and George W. Bush met.", "A. A. Milne did not."]),
    "single letter ends a sentence": ("They chose plan B. The rest followed.",
                                      ["They chose plan B.", "The rest followed."]),
    "Inc. ends a sentence": ("She works at Apple Inc. The firm grew. Warner Bros. Studios hired.",
                             ["She works at Apple Inc.", "The firm grew.", "Warner Bros. Studios hired."]),
    # numbers
    "decimals": ("Pi is 3.14 and e is 2.718. Both are irrational.",
                 ["Pi is 3.14 and e is 2.718.", "Both are irrational."]),
    "number starts a sentence": ("It ended in 1918. 1919 was calm.", ["It ended in 1918.", "1919 was calm."]),
    "dotted names": ("Visit example.com or use Node.js today. Yes.",
                     ["Visit example.com or use Node.js today.", "Yes."]),
    # quotes and brackets
    "closing quote after stop": ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    "quote then lowercase": ('"Oh!" cried she. "Really?" "Yes."', ['"Oh!" cried she.', '"Really?"', '"Yes."']),
    "curly quotes": ("She said “Go.” “Now?” he asked.", ["She said “Go.”", "“Now?” he asked."]),
    "closing bracket": ("It is big (very big.) Then small.", ["It is big (very big.)", "Then small."]),
    "opening bracket": ("It ended. (It did.) Yes.", ["It ended.", "(It did.)", "Yes."]),
    "emphasis marks": ("She laughed. _You_ want it? _not_ me.", ["She laughed.", "_You_ want it? _not_ me."]),
    # ellipses and runs of stops
    "ellipsis before lowercase": ("Wait... and then it came. Yes.", ["Wait... and then it came.", "Yes."]),
    "ellipsis before uppercase": ("I was... Then it came…  Really.", ["I was...", "Then it came…", "Really."]),
    "?! and !!": ("Really?! Yes!! Why?? Because.", ["Really?!", "Yes!!", "Why??", "Because."]),
    "punctuation alone stays attached": ("... The start. Hi! (", ["... The start.", "Hi! ("]),
    # other scripts
    "CJK full stops": ("你好。我很好！你呢？", ["你好。", "我很好！", "你呢？"]),
    "CJK closing quote": ("他说：「好。」然后走了。", ["他说：「好。」", "然后走了。"]),
    "CJK and space": ("東京です。 Next one.", ["東京です。", "Next one."]),
    "uncased script after a stop": ("It is called Tokyo. 東京 is big.", ["It is called Tokyo.", "東京 is big."]),
    "zero-width after stop": ("It ends.\u200d\u200d Next one.", ["It ends.\u200d\u200d", "Next one."]),
    # empty input
    "empty": ("", []),
    "only whitespace": (" \t\n ", []),
    "only punctuation": ("...", ["..."]),
}


@pytest.mark.parametrize("text, expected", list(SPLIT_CASES.values()), ids=list(SPLIT_CASES))
def test_split_sentences_cases(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected


_WORDS = [
    "the", "cat", "Mr.", "Dr.", "U.S.", "J.", "e.g.", "etc.", "No.", "3.14", "1990.", "A.",
    "Hello.", "Why?", "Wow!", "Really?!", "...", "…", '"Stop."', "“Go.”", "(see", "this.)", "'quoted.'",
    "It", "The", "He", "_You_", "東京", "好。", "你呢？", "」", "x", ".", "!", "?", "(", ")", '"',
]
_SPACES = [" ", "  ", "\t", "\n", " \u00a0 ", "\u3000"]


def _random_text(rng: random.Random, with_cjk: bool) -> str:
    words = _WORDS if with_cjk else [w for w in _WORDS if not any(ord(c) > 0x2E80 for c in w)]
    n = rng.randrange(0, 25)
    parts = [rng.choice(_SPACES) if rng.random() < 0.2 else ""]
    for _ in range(n):
        parts.append(rng.choice(words))
        parts.append(rng.choice(_SPACES))
    return "".join(parts)


@pytest.mark.parametrize("with_cjk", [False, True])
def test_split_round_trip_on_random_text(with_cjk: bool) -> None:
    rng = random.Random(1234 + with_cjk)
    for _ in range(2000):
        text = _random_text(rng, with_cjk)
        out = split_sentences(text)
        assert all(s and s == " ".join(s.split()) for s in out), (text, out)
        # joining gives the input back modulo whitespace; CJK stops may split with no space
        if with_cjk:
            assert "".join("".join(out).split()) == "".join(text.split()), (text, out)
        else:
            assert " ".join(out) == " ".join(text.split()), (text, out)
        # rule 6: every sentence but a lone one holds a letter or digit
        if len(out) > 1:
            assert all(any(c.isalnum() for c in s) for s in out), (text, out)


def test_document_sentences_splits_each_line() -> None:
    doc = Document("x.txt", 0, ["One. Two.", "Three"], 1)
    assert document_sentences(doc) == ["One.", "Two.", "Three"]


# ----------------------------------------------------------------------------- documents


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_documents_split_on_blank_and_whitespace_lines(tmp_path: Path) -> None:
    text = "\n\n  a1  \na2\n\n\n \t \nb1\n\u3000\n\n\nc1\r\nc2\r\n\r\n   \n"
    f = _write(tmp_path / "c.txt", text)
    docs = list(iter_documents([f]))
    assert [d.lines for d in docs] == [["a1", "a2"], ["b1"], ["c1", "c2"]]
    assert [d.index for d in docs] == [0, 1, 2]
    assert [d.line for d in docs] == [3, 8, 12]
    assert {d.path for d in docs} == {str(f)}


def test_documents_without_trailing_newline(tmp_path: Path) -> None:
    f = _write(tmp_path / "c.txt", "a\n\nb")
    assert [d.lines for d in iter_documents([f])] == [["a"], ["b"]]


def test_documents_numbered_per_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.txt", "x\n\ny\n")
    b = _write(tmp_path / "b.txt", "z\n")
    assert [(Path(d.path).name, d.index) for d in iter_documents([a, b])] == [("a.txt", 0), ("a.txt", 1), ("b.txt", 0)]


def test_bom_is_skipped(tmp_path: Path) -> None:
    f = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfFirst line\n\nSecond\n")
    docs = list(iter_documents([f]))
    assert docs[0].lines == ["First line"]  # no U+FEFF glued to the first word
    assert docs[1].lines == ["Second"]


def test_bom_only_file_is_empty(tmp_path: Path) -> None:
    f = _write(tmp_path / "bom.txt", b"\xef\xbb\xbf\n  \n")
    with pytest.raises(CorpusError, match=r"bom\.txt is empty"):
        list(iter_documents([f]))


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_invalid_utf8_names_file_byte_and_line(tmp_path: Path, bom: bytes) -> None:
    head = bom + "first doc é\n\nsecond doc\n".encode()
    f = _write(tmp_path / "bad.txt", head + b"bad \xff here\nmore\n")
    offset = len(head) + len(b"bad ")
    with pytest.raises(CorpusError) as info:
        list(iter_documents([f]))
    assert str(info.value) == (f"file {f}: not valid UTF-8 at byte {offset} (line 4); re-encode it as UTF-8, or "
                               "read such bytes as U+FFFD (errors='replace'; --errors replace)")
    assert (head + b"bad \xff")[offset] == 0xFF  # the offset points at the bad byte


def test_truncated_character_at_end_of_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "t.txt", b"ok\ncaf\xc3\n")
    with pytest.raises(CorpusError, match=r"t\.txt: not valid UTF-8 at byte 6 \(line 2\)"):
        list(iter_documents([f]))


def test_utf16_gets_a_hint(tmp_path: Path) -> None:
    f = _write(tmp_path / "u16.txt", "hello\n".encode("utf-16"))
    with pytest.raises(CorpusError, match=r"at byte 0 \(line 1\).*UTF-16"):
        list(iter_documents([f]))


def test_errors_replace_goes_on(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.txt", b"good\n\nbad \xff\xfe here\n\nafter\n")
    docs = list(iter_documents([f], errors="replace"))
    assert [d.lines for d in docs] == [["good"], ["bad \ufffd\ufffd here"], ["after"]]


def test_errors_must_be_known() -> None:
    with pytest.raises(ValueError, match="errors"):
        list(iter_documents([], errors="ignore"))  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"\n\n", b"  \t \r\n \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    f = _write(tmp_path / "empty.txt", content)
    with pytest.raises(CorpusError, match=rf"file {f} is empty"):
        list(iter_documents([f]))


def test_missing_file_in_iter_documents(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"nope\.txt not found"):
        list(iter_documents([tmp_path / "nope.txt"]))


def test_streaming_reads_lazily(tmp_path: Path) -> None:
    # a bad byte at the very end: the first document comes out before the file is finished
    f = _write(tmp_path / "s.txt", b"first\n\nsecond\n\n" + b"x\n" * 1000 + b"\xff\n")
    docs = iter_documents([f])
    assert next(docs).lines == ["first"]
    assert next(docs).lines == ["second"]
    with pytest.raises(CorpusError, match="line 1005"):
        next(docs)


def test_streaming_a_50k_line_document(tmp_path: Path) -> None:
    n = 50_000
    with open(tmp_path / "big.txt", "w", encoding="utf-8") as fh:
        fh.write("intro.\n\n")
        for i in range(n):
            fh.write(f"Line {i} of the long document. It has two sentences.\n")
        fh.write("\noutro.\n")
    docs = list(iter_documents([tmp_path / "big.txt"]))
    assert [len(d.lines) for d in docs] == [1, n, 1]
    assert docs[1].lines[-1] == f"Line {n - 1} of the long document. It has two sentences."
    assert len(document_sentences(docs[1])) == 2 * n


# ----------------------------------------------------------------------------- paths


def _tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for rel in ["b.txt", "a.txt", "sub/c.txt", "sub/deeper/d.txt", ".hidden/h.txt", "notes.md"]:
        _write(root / rel, "text\n")


def test_folder_is_searched_recursively(tmp_path: Path) -> None:
    _tree(tmp_path)
    got = resolve_paths([tmp_path])
    rel = [p.relative_to(tmp_path.resolve()).as_posix() for p in got]
    assert rel == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]


def test_globs_files_sorted_and_deduplicated(tmp_path: Path) -> None:
    _tree(tmp_path)
    specs = [str(tmp_path / "b.txt"), str(tmp_path / "*.txt"), str(tmp_path / "**" / "d.txt"), str(tmp_path / "sub")]
    got = [p.relative_to(tmp_path.resolve()).as_posix() for p in resolve_paths(specs)]
    assert got == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]


def test_relative_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert [p.name for p in resolve_paths(["sub/**/*.txt"])] == ["c.txt", "d.txt"]
    assert all(p.is_absolute() for p in resolve_paths(["sub/**/*.txt"]))


def test_missing_file_names_spec(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"file .*missing\.txt not found"):
        resolve_paths([str(tmp_path / "missing.txt")])


def test_glob_without_match_names_spec(tmp_path: Path) -> None:
    _tree(tmp_path)
    with pytest.raises(CorpusError, match=r"glob .*\*\.csv matches no files"):
        resolve_paths([str(tmp_path / "*.csv")])


def test_folder_without_txt_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty" / "x.md", "no\n")
    with pytest.raises(CorpusError, match=r"folder .*empty holds no \.txt files"):
        resolve_paths([tmp_path / "empty"])


def test_read_corpus_needs_a_document(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match=r"no usable document in: \(no paths given\)"):
        read_corpus([])
    _tree(tmp_path)
    docs = list(read_corpus([str(tmp_path)]))
    assert [Path(d.path).name for d in docs] == ["a.txt", "b.txt", "c.txt", "d.txt"]


def test_read_corpus_reports_empty_file_at_start(tmp_path: Path) -> None:
    _write(tmp_path / "a.txt", "\n\n")
    _write(tmp_path / "b.txt", "text\n")
    with pytest.raises(CorpusError, match=r"a\.txt is empty"):
        read_corpus([tmp_path])  # raises on the call, before any training starts


# ----------------------------------------------------------------------------- real corpus

needs_corpus = pytest.mark.skipif(not CORPUS.is_dir(), reason=f"{CORPUS} not present")


@pytest.mark.real_data
@needs_corpus
def test_wiki_document_count() -> None:
    # The README says 9,915 articles. The file has 9,927 blank-line blocks: in about a dozen
    # articles a display formula was dropped and left a blank line, so the text after it
    # ("where ρ is the density...") reads as a document of its own.
    docs = list(iter_documents([CORPUS / "wiki_vital_en.txt"]))
    assert len(docs) == 9_927
    assert docs[0].lines[0].startswith("0 is a number")


@pytest.mark.real_data
@needs_corpus
@pytest.mark.parametrize("name, n_docs, n_sentences",
                         [("wiki_vital_en.txt", 9_927, 36_307), ("austen_novels.txt", 270, 31_459)])
def test_real_corpus_sentence_counts(name: str, n_docs: int, n_sentences: int) -> None:
    docs = list(iter_documents([CORPUS / name]))
    sentences = [s for d in docs for s in document_sentences(d)]
    assert len(docs) == n_docs
    # measured when the rules were last tuned; allow small deliberate changes, catch big ones
    assert abs(len(sentences) - n_sentences) <= n_sentences // 100
    assert all(s and s == " ".join(s.split()) for s in sentences)


def test_a_vocabulary_that_repeats_a_token_keeps_every_line_its_id(tmp_path: Path) -> None:
    # the first id wins for the text; the repeat's line keeps its id under a placeholder, so the
    # ids are the line numbers, the vocabulary size covers them all, and a save reloads to the same ids
    from minibert import Tokenizer

    lines = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "the", "was", "good"]
    (tmp_path / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = Tokenizer.from_file(tmp_path / "vocab.txt")
    assert tok.vocab_size == len(lines) == 10
    assert tok(["the film was good"])["input_ids"][0].tolist() == [2, 5, 6, 8, 9, 3]
    tok.save(tmp_path / "saved")
    again = Tokenizer.from_file(tmp_path / "saved")
    assert again.vocab_size == 10 and again(["the film was good"])["input_ids"][0].tolist() == [2, 5, 6, 8, 9, 3]
    assert again(["[repeat-of-line-6-at-8]"])["input_ids"][0].tolist().count(7) == 0  # no text reaches id 7
