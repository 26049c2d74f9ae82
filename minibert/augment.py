"""Text augmentation for distillation: more transfer text for the teacher to label.

A student trained on the labels alone can only learn from the labelled rows; a distilled
student learns from any text the teacher labels. Tang et al. (2019, "Distilling task-specific
knowledge from BERT into simple neural networks") made that text by perturbing the training
rows, and TinyBERT (Jiao et al. 2020) did the same with a larger recipe. This module follows
Tang et al.'s three rules, word by word:

- masking: with probability p_mask a word becomes [MASK], so the teacher says what the
  rest of the sentence implies on its own;
- replacement: otherwise, with probability p_swap, a word becomes a word drawn from the
  corpus's unigram distribution (Tang et al. draw one with the same part-of-speech tag;
  that needs a tagger, so this draws from all words -- a deviation, stated here);
- n-gram sampling: then, with probability p_ngram, the text is cut to a random n-gram of
  itself, n uniform in 1..5, so the teacher also labels phrases.

Words are whitespace-separated. Each text gets `copies` distinct perturbed versions that
differ from it (fewer when a short text has no more); the copies carry no label: the
teacher's soft targets are their only supervision.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Sequence


def augment(texts: Sequence[str], copies: int, seed: int = 0, p_mask: float = 0.1, p_swap: float = 0.1,
            p_ngram: float = 0.25, mask_token: str = "[MASK]", max_tries: int = 4) -> list[str]:
    """Up to `copies` perturbed versions of each text, in text order, each one different from
    its text and from the text's other copies. Deterministic in `seed`."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    for name, p in (("p_mask", p_mask), ("p_swap", p_swap), ("p_ngram", p_ngram)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if p_mask + p_swap > 1.0:
        raise ValueError(f"p_mask + p_swap must be <= 1, got {p_mask + p_swap}")
    rng = random.Random(seed)
    split = [t.split() for t in texts]
    counts = Counter(w for words in split for w in words)
    vocab = list(counts)
    cum = list(itertools.accumulate(counts.values()))  # the unigram distribution of the corpus, cumulated once
    out: list[str] = []
    for words in split:
        seen = {" ".join(words)}
        for _ in range(copies * max_tries):  # a short text may have fewer distinct versions than asked
            if len(seen) > copies or not words:
                break
            new = []
            for w in words:
                x = rng.random()
                new.append(mask_token if x < p_mask else
                           rng.choices(vocab, cum_weights=cum)[0] if x < p_mask + p_swap else w)
            if rng.random() < p_ngram:
                n = rng.randint(1, 5)
                start = rng.randrange(max(1, len(new) - n + 1))
                new = new[start:start + n]
            text = " ".join(new)
            if text not in seen:
                seen.add(text)
                out.append(text)
    return out
