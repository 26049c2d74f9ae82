"""minibert.augment: Tang et al.'s (2019) three perturbation rules, checked rule by rule on a
corpus where every effect can be counted: the masking and replacement rates against p_mask and
p_swap (binomial tolerances), replacement words against the corpus's unigram frequencies, n-gram
sampling against the definition (a contiguous piece of 1..5 words of the text)."""

import math
from collections import Counter

import pytest

from minibert.augment import augment

# 2,000 distinct words, so a replacement almost never draws the word it replaces
CORPUS = [" ".join(f"w{i}_{j}" for j in range(20)) for i in range(100)]


def test_copies_are_distinct_from_their_text_and_each_other_and_fixed_by_the_seed():
    texts = ["a good film , not a bad one", "dull", "the plot is thin but the acting is fine"]
    out = augment(texts, 3, seed=1)
    assert out == augment(texts, 3, seed=1) and out != augment(texts, 3, seed=2)
    assert len(out) == len(set(out)) and not set(out) & set(texts)
    assert len(out) <= 9 and len(out) >= 6  # a one-word text may run out of distinct versions
    assert augment(texts, 0) == [] and augment([""], 2) == []


def test_masking_and_replacement_rates_match_the_probabilities():
    n_words = sum(len(t.split()) for t in CORPUS)
    out = augment(CORPUS, 1, seed=0, p_mask=0.2, p_swap=0.1, p_ngram=0.0)
    assert len(out) == len(CORPUS)  # no n-grams: one copy per text, word for word aligned
    masked = replaced = 0
    for text, copy in zip(CORPUS, out):
        for w, v in zip(text.split(), copy.split(), strict=True):
            masked += v == "[MASK]"
            replaced += v not in ("[MASK]", w)
    for count, p in ((masked, 0.2), (replaced, 0.1)):
        sd = math.sqrt(n_words * p * (1 - p))
        assert abs(count - n_words * p) < 4 * sd, (count, n_words * p)


def test_replacements_follow_the_corpus_unigram_frequencies():
    # "x" is half of all words, "y" a quarter, "z1".."z5" a twentieth each
    texts = ["x x y z1", "x x y z2", "x x y z3", "x x y z4", "x x y z5"] * 40
    counts = Counter(w for t in texts for w in t.split())
    drawn = Counter()
    for copy in augment(texts, 3, seed=0, p_mask=0.0, p_swap=1.0, p_ngram=0.0):
        drawn.update(copy.split())
    total = sum(drawn.values())
    for w, c in counts.items():
        p = c / sum(counts.values())
        assert abs(drawn[w] / total - p) < 4 * math.sqrt(p * (1 - p) / total), (w, drawn[w] / total, p)


def test_ngram_sampling_cuts_a_contiguous_piece_of_one_to_five_words():
    text = "one two three four five six seven eight nine ten"
    out = augment([text], 20, seed=0, p_mask=0.0, p_swap=0.0, p_ngram=1.0)
    assert len(out) == 20
    words = text.split()
    pieces = {" ".join(words[i:i + n]) for n in range(1, 6) for i in range(len(words) - n + 1)}
    assert set(out) <= pieces
    assert {len(c.split()) for c in out} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("kwargs, words", [
    ({"copies": -1}, "copies must be >= 0"),
    ({"copies": 1, "p_mask": 1.5}, "p_mask must be in [0, 1]"),
    ({"copies": 1, "p_mask": 0.6, "p_swap": 0.6}, "p_mask + p_swap must be <= 1"),
])
def test_bad_arguments_say_which(kwargs, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("+", r"\+")):
        augment(["a b c"], **kwargs)
