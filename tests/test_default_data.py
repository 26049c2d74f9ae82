"""The embedded default data in data/: reproducible, well formed, learnable but not trivial.

The files are committed so that a fresh checkout runs with no download; these tests make
sure they never drift from data/generate.py, which is the only thing allowed to write them.
"""

from __future__ import annotations

import ast
import collections
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
CORPUS = DATA / "corpus" / "default_corpus.txt"
SPLITS = {"train": 2000, "dev": 300, "test": 300}
REVIEWS = DATA / "reviews" / "review_pages.txt"
GENERATED = ["corpus/default_corpus.txt", "reviews/review_pages.txt"] + [f"sentiment/{s}.tsv" for s in SPLITS]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the generator exactly as the README says, but into a temporary folder."""
    out = tmp_path_factory.mktemp("regenerated")
    subprocess.run([sys.executable, str(DATA / "generate.py"), "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    return out


@pytest.mark.parametrize("name", GENERATED)
def test_generator_reproduces_committed_file_byte_for_byte(regenerated: Path, name: str) -> None:
    fresh, committed = (regenerated / name).read_bytes(), (DATA / name).read_bytes()
    assert fresh == committed, (
        f"data/{name} is not what data/generate.py writes: run `python data/generate.py` and commit both")


def test_generator_uses_only_the_standard_library() -> None:
    tree = ast.parse((DATA / "generate.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_files_stay_small() -> None:
    sizes = {p: p.stat().st_size for p in DATA.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert all(size < 1_000_000 for size in sizes.values()), sizes
    assert sum(sizes.values()) < 2_000_000


def corpus_documents() -> list[str]:
    text = CORPUS.read_bytes().decode("utf-8")  # strict: fails on any invalid byte
    return text[:-1].split("\n\n")


def test_corpus_format() -> None:
    text = CORPUS.read_bytes().decode("utf-8")
    # Documents separated by exactly one blank line, one paragraph per line, as in
    # ../shared/data/corpus/*.txt, so the same reader handles both.
    assert text.endswith("\n") and not text.endswith("\n\n") and not text.startswith("\n")
    assert "\n\n\n" not in text and "\r" not in text and "\t" not in text
    docs = corpus_documents()
    assert len(docs) >= 1000
    assert len(set(docs)) == len(docs), "duplicate documents"
    for doc in docs:
        for line in doc.split("\n"):
            assert line and line == line.strip(), repr(line)
    paragraphs = [line for doc in docs for line in doc.split("\n")]
    # Several sentences per paragraph on average (". " is a fair proxy here).
    assert sum(p.count(". ") + 1 for p in paragraphs) / len(paragraphs) > 3
    # The sentence splitter must meet abbreviations, quotes and non-ASCII text.
    for needle in ["Dr. ", "e.g. ", "\"", "°C", "–"]:
        assert needle in text, needle


def test_corpus_has_structure_a_model_can_learn() -> None:
    docs = corpus_documents()
    words = re.findall(r"[a-z0-9]+", "\n".join(docs).lower())
    top_word, top_count = collections.Counter(words).most_common(1)[0]
    assert top_count / len(words) < 0.06, (top_word, top_count / len(words))

    # A bigram model must beat a unigram model by far on held-out documents: the next
    # word depends on the previous one. Noise would give a ratio near 1.
    def tokens(doc: str) -> list[str]:
        return ["<s>", *re.findall(r"[a-z0-9]+|[^\sa-z0-9]", doc.lower()), "</s>"]

    train = [tokens(d) for i, d in enumerate(docs) if i % 10]
    held_out = [tokens(d) for i, d in enumerate(docs) if i % 10 == 0]
    unigrams = collections.Counter(t for seq in train for t in seq)
    bigrams = collections.Counter(pair for seq in train for pair in zip(seq, seq[1:]))
    n, vocab = sum(unigrams.values()), len(unigrams) + 1

    def p_unigram(word: str) -> float:
        return (unigrams[word] + 1) / (n + vocab)

    def p_bigram(prev: str, word: str) -> float:
        seen = bigrams[(prev, word)] / unigrams[prev] if unigrams[prev] else 0.0
        return 0.9 * seen + 0.1 * p_unigram(word)

    def perplexity(p) -> float:
        pairs = [pair for seq in held_out for pair in zip(seq, seq[1:])]
        return math.exp(-sum(math.log(p(a, b)) for a, b in pairs) / len(pairs))

    uni, bi = perplexity(lambda a, b: p_unigram(b)), perplexity(p_bigram)
    assert bi < uni / 4, (uni, bi)


def read_tsv(split: str) -> list[tuple[str, int]]:
    lines = (DATA / "sentiment" / f"{split}.tsv").read_bytes().decode("utf-8").split("\n")
    assert lines[0] == "sentence\tlabel" and lines[-1] == ""
    rows = []
    for line in lines[1:-1]:
        fields = line.split("\t")
        assert len(fields) == 2 and fields[1] in ("0", "1"), repr(line)
        sentence = fields[0]
        assert sentence and sentence == sentence.strip() and sentence == sentence.lower(), repr(line)
        rows.append((sentence, int(fields[1])))
    return rows


@pytest.mark.parametrize("split", list(SPLITS))
def test_sentiment_split_is_well_formed(split: str) -> None:
    rows = read_tsv(split)
    assert len(rows) == SPLITS[split]
    positive = sum(label for _, label in rows) / len(rows)
    assert 0.4 < positive < 0.7, positive  # both classes, mildly imbalanced
    assert len({s for s, _ in rows}) == len(rows), "duplicate sentences"


def test_no_sentence_is_in_two_splits() -> None:
    sentences = {split: {s for s, _ in read_tsv(split)} for split in SPLITS}
    assert not sentences["train"] & sentences["test"]
    assert not sentences["train"] & sentences["dev"]
    assert not sentences["dev"] & sentences["test"]


def test_review_pages_hold_no_labelled_sentence_and_no_label() -> None:
    """The unlabelled review pages are pretraining text: none of their sentences is a row of a
    labelled split (or fine-tuning would be tested on text seen in pretraining), they carry no
    label column, and each page keeps one verdict, as one reviewer's page does."""
    labelled = {line.split("\t")[0] for split in SPLITS
                for line in (DATA / "sentiment" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]}
    pages = REVIEWS.read_text(encoding="utf-8")[:-1].split("\n\n")
    assert len(pages) >= 300 and "\t" not in "".join(pages)
    # a sentence of a page is the text up to and including its final " ." or " !"
    sentences = [s.strip() for page in pages for s in re.findall(r".+? [.!](?= |$|\n)", page.replace("\n", " "))]
    assert len(sentences) > 5 * len(pages) * 0.8
    for s in sentences:
        assert s not in labelled and s.rstrip(" .!") not in labelled, s


def test_bag_of_words_is_good_but_not_perfect() -> None:
    """Learnable (far above chance) yet not separable by word counts alone."""
    pytest.importorskip("sklearn")
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = read_tsv("train"), read_tsv("test")
    vectorizer = CountVectorizer(token_pattern=r"\S+")  # keep "n't" and punctuation tokens
    x_train = vectorizer.fit_transform([s for s, _ in train])
    model = LogisticRegression(max_iter=2000).fit(x_train, [y for _, y in train])
    accuracy = model.score(vectorizer.transform([s for s, _ in test]), [y for _, y in test])
    assert 0.70 <= accuracy <= 0.97, accuracy
