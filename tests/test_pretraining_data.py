"""Pretraining data: masking statistics, instance building (NSP, lengths, truncation),
dynamic vs static masking, the token cache and bad-input errors. All on synthetic data; ~10 s."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest

from minibert import pretraining_data as pd
from minibert.text import CorpusError
from minibert.tokenizer import Tokenizer, truncate_longest_first

# ----------------------------------------------------------------------------- fixtures


def make_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Made-up words in documents of 2-9 sentences, one paragraph per document."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po", "ve", "du", "an", "or"]
    words = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(400)})
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(2, 9)):
            w = [rng.choice(words) for _ in range(rng.randint(3, 12))]
            sents.append(" ".join(w).capitalize() + ".")
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[pd.TokenCache, Tokenizer, Path]:
    tmp = tmp_path_factory.mktemp("corpus")
    path = make_corpus(tmp / "c.txt")
    tok = Tokenizer.train([path], vocab_size=300)
    data = pd.build_token_cache([str(path)], tok, tmp / "cache", log=lambda *a: None)
    return data, tok, path


def toy_vocab(V: int = 1000, continuation: tuple[int, ...] = ()) -> pd.Vocab:
    """ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]; `continuation` ids are ## pieces."""
    special = np.zeros(V, dtype=bool)
    special[:5] = True
    word_start = np.ones(V, dtype=bool)
    word_start[list(continuation)] = False
    return pd.Vocab(cls_id=2, sep_id=3, pad_id=0, mask_id=4, special=special, word_start=word_start,
                    random_ids=np.flatnonzero(~special))


def toy_row(rng: np.random.Generator, n: int = 126, V: int = 1000) -> np.ndarray:
    a = rng.integers(5, V, size=n // 2)
    b = rng.integers(5, V, size=n - n // 2)
    return np.r_[2, a, 3, b, 3]  # [CLS] A [SEP] B [SEP]


# ----------------------------------------------------------------------------- masking


def test_masking_proportions_80_10_10():
    vocab, rng = toy_vocab(), np.random.default_rng(0)
    chosen = masked = kept = replaced = candidates = 0
    for _ in range(2000):
        ids = toy_row(rng)
        inputs, labels = pd.mask_tokens(ids, vocab, rng, mlm_prob=0.15)
        sel = labels != -100
        assert (labels[sel] == ids[sel]).all()  # labels are the original tokens
        candidates += (~vocab.special[ids]).sum()
        chosen += sel.sum()
        masked += (inputs[sel] == vocab.mask_id).sum()
        kept += (inputs[sel] == ids[sel]).sum()
        replaced += ((inputs[sel] != ids[sel]) & (inputs[sel] != vocab.mask_id)).sum()
        assert (inputs[~sel] == ids[~sel]).all()  # nothing outside the chosen positions changes
    assert abs(chosen / candidates - 0.15) < 0.002  # exactly round(0.15 n) per row
    n = chosen  # ~38k chosen tokens: 4 standard deviations of a proportion p is 4 sqrt(p(1-p)/n)
    for frac, p in ((masked / n, 0.8), (replaced / n, 0.1 * (1 - 1 / 995)), (kept / n, 0.1 + 0.1 / 995)):
        assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / n), (frac, p)


def test_special_tokens_never_selected():
    vocab, rng = toy_vocab(), np.random.default_rng(1)
    for _ in range(500):
        ids = toy_row(rng, n=rng.integers(1, 40))
        ids[rng.integers(1, len(ids) - 1, size=3)] = 1  # some [UNK]s inside the text
        inputs, labels = pd.mask_tokens(ids, vocab, rng, mlm_prob=0.5)
        spec = vocab.special[ids]
        assert (labels[spec] == -100).all()
        assert (inputs[spec] == ids[spec]).all()


def test_random_replacements_never_special():
    vocab, rng = toy_vocab(V=12), np.random.default_rng(2)  # 7 normal ids: specials would show up fast
    seen = 0
    for _ in range(3000):
        ids = toy_row(rng, n=20, V=12)
        inputs, labels = pd.mask_tokens(ids, vocab, rng, mlm_prob=0.5)
        sel = labels != -100
        repl = inputs[sel & (inputs != vocab.mask_id)]
        assert not vocab.special[repl].any()
        seen += len(repl)
    assert seen > 1000


def test_row_with_no_candidates_is_left_alone():
    vocab = toy_vocab()
    ids = np.array([2, 3, 3])
    inputs, labels = pd.mask_tokens(ids, vocab, np.random.default_rng(0))
    assert (inputs == ids).all() and (labels == -100).all()


def test_at_least_one_token_is_predicted_in_short_rows():
    vocab = toy_vocab()
    ids = np.array([2, 10, 11, 3])  # 2 candidates: round(0.3) = 0, raised to 1
    _, labels = pd.mask_tokens(ids, vocab, np.random.default_rng(0))
    assert (labels != -100).sum() == 1


def test_whole_word_masking_masks_whole_words():
    cont = tuple(range(500, 1000))  # ids >= 500 are ## continuation pieces
    vocab, rng = toy_vocab(continuation=cont), np.random.default_rng(3)
    total = chosen = 0
    for _ in range(500):
        words = [[int(rng.integers(5, 500))] + list(rng.integers(500, 1000, size=rng.integers(0, 3)))
                 for _ in range(30)]
        ids = np.r_[2, np.concatenate(words[:15]), 3, np.concatenate(words[15:]), 3]
        _, labels = pd.mask_tokens(ids, vocab, rng, mlm_prob=0.15, whole_word=True)
        sel = labels != -100
        # walk the words: all pieces of a word are chosen together, or none
        pos = 1
        for i, w in enumerate(words):
            if i == 15:
                pos += 1  # the [SEP] between the segments
            picked = sel[pos : pos + len(w)]
            assert picked.all() or not picked.any(), (w, picked)
            pos += len(w)
        total += (~vocab.special[ids]).sum()
        chosen += sel.sum()
    assert abs(chosen / total - 0.15) < 0.02  # words that would overshoot are skipped, so close but not exact


def test_whole_word_masking_treats_a_leading_piece_after_a_special_as_a_word():
    vocab = toy_vocab(continuation=(600, 601))
    ids = np.array([2, 10, 600, 3, 601, 11, 3])  # B starts with an orphan ## piece (A/B were trimmed)
    for seed in range(50):
        _, labels = pd.mask_tokens(ids, vocab, np.random.default_rng(seed), mlm_prob=0.5, whole_word=True)
        sel = labels != -100
        assert sel[1] == sel[2]  # "10 ##600" is one word; 601 after [SEP] is not glued to it


# ----------------------------------------------------------------------------- instances


def doc_of_token(data: pd.TokenCache, t: np.ndarray) -> np.ndarray:
    starts = np.asarray(data.sent_off)[np.asarray(data.doc_off)[:-1]]
    return np.searchsorted(starts, t, side="right") - 1


def test_nsp_is_balanced_and_random_next_comes_from_another_document(corpus):
    data, _, _ = corpus
    docs = np.arange(data.n_docs)
    labels = []
    for epoch in range(4):
        inst = pd.make_instances(data, docs, 64, np.random.default_rng([0, epoch]))
        da, db = doc_of_token(data, inst[:, pd.A0]), doc_of_token(data, inst[:, pd.B0])
        rand = inst[:, pd.NSP] == pd.NOT_NEXT
        assert (da[rand] != db[rand]).all()  # never the same document, so never the true next sentence
        nxt = ~rand
        assert (da[nxt] == db[nxt]).all() and (inst[nxt, pd.B0] >= inst[nxt, pd.A1]).all()
        assert (doc_of_token(data, inst[:, pd.B1] - 1) == db).all()  # B never runs into the next document
        labels.append(rand)
    rand = np.concatenate(labels)
    n = len(rand)
    assert n > 2000
    assert abs(rand.mean() - 0.5) < 4 * np.sqrt(0.25 / n), rand.mean()


def test_true_next_b_follows_a_at_a_sentence_boundary(corpus):
    data, _, _ = corpus
    inst = pd.make_instances(data, np.arange(data.n_docs), 512, np.random.default_rng(0), short_seq_prob=0.0)
    nxt = inst[inst[:, pd.NSP] == pd.IS_NEXT]
    # with seq_len 512 nothing is truncated, so A ends and B starts on the same sentence boundary
    assert (nxt[:, pd.A1] == nxt[:, pd.B0]).all()
    assert np.isin(nxt[:, pd.B0], np.asarray(data.sent_off)).all()


@pytest.mark.parametrize("seq_len", [8, 16, 48, 128])
@pytest.mark.parametrize("nsp", [True, False])
def test_instances_never_exceed_seq_len(corpus, seq_len, nsp):
    data, tok, _ = corpus
    inst = pd.make_instances(data, np.arange(data.n_docs), seq_len, np.random.default_rng(seq_len), short_seq_prob=0.3,
                             nsp=nsp)
    la, lb = inst[:, pd.A1] - inst[:, pd.A0], inst[:, pd.B1] - inst[:, pd.B0]
    assert (la >= 1).all()
    assert ((lb >= 1) if nsp else (lb == 0)).all()
    assert (la + lb + (3 if nsp else 2) <= seq_len).all()
    col = pd.Collator(data, pd.Vocab.from_tokenizer(tok), seed=0, nsp=nsp)
    batch = col(inst[:64], [(0, i) for i in range(64)])
    assert batch["input_ids"].shape[1] <= seq_len
    if nsp:
        assert set(batch["next_sentence_label"].tolist()) <= {0, 1}


def test_short_seq_prob_gives_shorter_instances(corpus):
    data, _, _ = corpus
    docs = np.arange(data.n_docs)
    full = pd.make_instances(data, docs, 128, np.random.default_rng(0), short_seq_prob=0.0)
    short = pd.make_instances(data, docs, 128, np.random.default_rng(0), short_seq_prob=1.0)
    length = lambda x: (x[:, pd.A1] - x[:, pd.A0] + x[:, pd.B1] - x[:, pd.B0]).mean()
    assert length(short) < 0.8 * length(full)


def test_longest_first_truncation_matches_the_one_token_at_a_time_loop():
    for la in range(0, 14):
        for lb in range(0, 14):
            for m in range(-2, 20):
                a, b = la, lb
                while a + b > max(m, 0):  # the rule as BERT's create_pretraining_data.py states it
                    if a > b:
                        a -= 1
                    else:
                        b -= 1
                assert truncate_longest_first(la, lb, m) == (la - a, lb - b), (la, lb, m)


def test_truncation_cuts_the_longer_segment(corpus):
    data, _, _ = corpus
    # seq_len 16: most pairs need truncating; the shorter segment keeps its length when the other can absorb the cut
    inst = pd.make_instances(data, np.arange(data.n_docs), 16, np.random.default_rng(5), short_seq_prob=0.0)
    la, lb = inst[:, pd.A1] - inst[:, pd.A0], inst[:, pd.B1] - inst[:, pd.B0]
    assert (la + lb == 13).mean() > 0.9  # filled to the budget
    assert (np.abs(la - lb) <= 1).mean() > 0.5  # both long: cut down to equal halves


def test_split_trim_cuts_from_both_ends():
    rng = np.random.default_rng(0)
    fronts = [pd._split_trim(rng, 100, 200, 10)[0] - 100 for _ in range(2000)]
    assert 4.8 < np.mean(fronts) < 5.2 and min(fronts) >= 0 and max(fronts) <= 10


def test_nsp_needs_two_documents(corpus):
    data, _, _ = corpus
    with pytest.raises(CorpusError, match="at least 2 documents"):
        pd.make_instances(data, np.array([0]), 64, np.random.default_rng(0))
    assert len(pd.make_instances(data, np.array([0]), 64, np.random.default_rng(0), nsp=False)) >= 1


# ----------------------------------------------------------------------------- stream, dynamic vs static


def rows_as_set(col: pd.Collator, stream: pd.InstanceStream, n: int) -> set:
    rows, keys = stream.take(n)
    b = col(rows, keys)
    return {tuple(x.tolist()) for x in b["input_ids"]}


def test_dynamic_masking_changes_each_epoch_static_does_not(corpus):
    data, tok, _ = corpus
    vocab, docs = pd.Vocab.from_tokenizer(tok), np.arange(data.n_docs)
    col = pd.Collator(data, vocab, seed=0)
    for static in (False, True):
        s = pd.InstanceStream(data, docs, 64, seed=0, static=static)
        n0 = s.epoch_size()
        rows, _ = s.take(n0)  # all of epoch 0
        first = rows_as_set(col, pd.InstanceStream(data, docs, 64, seed=0, static=static), n0)
        assert s.epoch == 1
        n1 = s.epoch_size()
        rows1, keys1 = s.take(n1)
        second = {tuple(x.tolist()) for x in col(rows1, keys1)["input_ids"]}
        if static:
            assert first == second  # the same instances with the same masks
            assert not np.array_equal(rows, rows1)  # in a new order
        else:
            assert len(first & second) < 0.05 * len(first)


def test_stream_resumes_exactly(corpus):
    data, _, _ = corpus
    docs = np.arange(data.n_docs)
    a = pd.InstanceStream(data, docs, 64, seed=3)
    ref_rows, ref_keys = a.take(3000)  # crosses an epoch boundary
    b = pd.InstanceStream(data, docs, 64, seed=3)
    r1, k1 = b.take(1234)
    c = pd.InstanceStream(data, docs, 64, seed=3)
    c.load_state_dict(b.state_dict())
    r2, k2 = c.take(3000 - 1234)
    assert np.array_equal(np.concatenate([r1, r2]), ref_rows) and k1 + k2 == ref_keys


def test_a_rows_masks_do_not_depend_on_its_batch(corpus):
    """What makes DDP sharding exact: row i is masked the same whichever rank collates it."""
    data, tok, _ = corpus
    col = pd.Collator(data, pd.Vocab.from_tokenizer(tok), seed=0)
    rows, keys = pd.InstanceStream(data, np.arange(data.n_docs), 64, seed=0).take(8)
    whole = col(rows, keys)
    for r in range(2):
        part = col(rows[r::2], keys[r::2])
        T = part["input_ids"].shape[1]
        assert (whole["input_ids"][r::2, :T] == part["input_ids"]).all()
        assert (whole["labels"][r::2, :T] == part["labels"]).all()


def test_eval_split_is_disjoint_and_independent_of_seed():
    tr, ev = pd.split_documents(1000, 0.05)
    assert len(ev) == 50 and len(np.intersect1d(tr, ev)) == 0 and len(tr) + len(ev) == 1000
    assert np.array_equal(pd.split_documents(1000, 0.05)[1], ev)
    with pytest.raises(CorpusError, match="at least 2"):
        pd.split_documents(1, 0.1)


# ----------------------------------------------------------------------------- cache


def test_cache_hit_on_second_run_and_miss_after_an_edit(tmp_path, corpus):
    _, tok, _ = corpus
    path = make_corpus(tmp_path / "c.txt", n_docs=2000, seed=1)
    logs = []
    t0 = time.perf_counter()
    first = pd.build_token_cache([str(path)], tok, tmp_path / "cache", log=logs.append)
    t1 = time.perf_counter()
    second = pd.build_token_cache([str(path)], tok, tmp_path / "cache", log=logs.append)
    t2 = time.perf_counter()
    assert not first.cache_hit and second.cache_hit and first.folder == second.folder
    assert t2 - t1 < (t1 - t0) / 3
    assert np.array_equal(first.tokens, second.tokens)
    assert isinstance(second.tokens, np.memmap)  # read from disk on demand, not loaded
    # the ids are the tokenizer's, sentence by sentence
    s0 = second.tokens[second.sent_off[0] : second.sent_off[1]]
    first_sentence = path.read_text(encoding="utf-8").split(".")[0] + "."
    assert s0.tolist() == tok.encode_ids([first_sentence])[0]
    # an edit changes size/mtime, hence the key
    path.write_text(path.read_text(encoding="utf-8") + "\nOne more document here.\n", encoding="utf-8")
    third = pd.build_token_cache([str(path)], tok, tmp_path / "cache", log=logs.append)
    assert not third.cache_hit and third.folder != first.folder


def test_trained_tokenizer_is_cached(tmp_path):
    path = make_corpus(tmp_path / "c.txt", n_docs=50)
    t1 = pd.get_tokenizer(None, [path], 200, tmp_path / "cache", log=lambda *a: None)
    msgs = []
    t2 = pd.get_tokenizer(None, [path], 200, tmp_path / "cache", log=msgs.append)
    assert "reusing" in msgs[0] and t1.vocab_size == t2.vocab_size


def test_a_vocabulary_of_another_size_than_asked_says_why(tmp_path):
    # --vocab-size 3 cannot be honoured: the five specials and every character (alone, and as a
    # "##c" piece where it occurs inside a word) need ids; the log line says so instead of quietly
    # giving another size
    path = tmp_path / "c.txt"
    path.write_text("The cat sat on the mat.\n\nThe dog sat on the log.\n", encoding="utf-8")
    msgs = []
    tok = pd.get_tokenizer(None, [path], 3, tmp_path / "cache", log=msgs.append)
    words = "the cat sat on mat . dog log".split()
    smallest = 5 + len(set("".join(words))) + len({c for w in words for c in w[1:]})
    assert tok.vocab_size == smallest == 25
    assert f"vocabulary of {smallest}" in msgs[-1] and "asked for 3" in msgs[-1] and "smallest" in msgs[-1]
    msgs.clear()
    pd.get_tokenizer(None, [path], 4000, tmp_path / "cache", log=msgs.append)
    assert "asked for 4000: no more pieces occur at least twice" in msgs[-1]
    msgs.clear()
    pd.get_tokenizer(None, [path], smallest, tmp_path / "cache", log=msgs.append)
    assert "asked" not in msgs[-1]


# ----------------------------------------------------------------------------- bad input


def build(tmp_path: Path, content: bytes | None, errors: str = "strict") -> pd.TokenCache:
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    tok = Tokenizer.train([make_corpus(tmp_path / "ok.txt", n_docs=30)], vocab_size=200)
    return pd.build_token_cache([str(path)], tok, tmp_path / "cache", errors=errors, log=lambda *a: None)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CorpusError, match="bad.txt"):
        build(tmp_path, None)


def test_empty_file_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"bad\.txt.*empty"):
        build(tmp_path, b"\n  \n\n")


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    content = b"Good text here.\n\nMore good text \xff\xfe and then.\n"
    with pytest.raises(CorpusError, match=r"bad\.txt.*byte 32"):
        build(tmp_path, content)
    data = build(tmp_path, content, errors="replace")  # --errors replace goes on
    assert data.n_docs == 2


def test_file_with_no_usable_document_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"bad\.txt: no usable document"):
        build(tmp_path, b"\x01\x02\x03\n\n\x07\n")  # control characters only: nothing left after normalising
