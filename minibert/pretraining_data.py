"""Pretraining data: text files -> cached token ids -> BERT instances -> masked batches.

    corpus files --text.iter_documents / document_sentences--> sentences of each document
      --Tokenizer.encode_ids--> token ids, written once to a cache folder (numpy memmaps)
      --make_instances (fresh each epoch)--> [CLS] A [SEP] B [SEP] pairs, 50% true next / 50% random
      --Collator (at batch time)--> masked input_ids, labels, next-sentence labels

The recipe is the original BERT one (Devlin et al. 2019, Google's create_pretraining_data.py),
re-derived here in numpy:

* Instances. Sentences of a document are gathered into a chunk until the chunk reaches the
  target length (seq_len - 3 tokens; with probability short_seq_prob, a random shorter target,
  drawn once per document, so the model also sees short inputs). A random number of the chunk's
  leading sentences become segment A. With probability 1/2 (always, if the chunk has one
  sentence) segment B is a run of sentences from a random *other* document, and the chunk's
  sentences not used for A are put back to start the next chunk; otherwise B is the rest of the
  chunk, the true continuation. The pair is then truncated longest-first, each token removed from
  the front or the back at random.
* Masking. mlm_prob of the non-special tokens of a row (at least one) are chosen; of those 80%
  become [MASK], 10% a random non-special token and 10% stay as they are. With whole-word
  masking the choice is made per word (a token and the `##` pieces that follow it).

What this module adds to the recipe, and why:

* Token cache. Tokenizing is the slow part of start-up, so the ids are written once to
  `<cache_dir>/tokens-<key>/` as flat binary files that are opened as numpy memmaps: the OS
  pages them in on demand, so a corpus larger than RAM is fine, and a second run starts at
  once. The key hashes every corpus file's path, size and modification time, the tokenizer's
  vocabulary and the decoding option, so any change rebuilds the cache.
* An instance is five integers: two token ranges in that flat file (A and B are runs of whole
  sentences, contiguous on disk, and truncation only trims their ends) and the NSP label. An
  epoch's instance table therefore costs 40 bytes per instance and no token is copied.
* Determinism by position. Epoch e's instances come from a generator seeded with (seed, e),
  its order from (seed, e, 1), and the masks of instance i from (seed, e, 2, i). A row's
  content depends only on where it sits in the stream, never on which process reads it or
  what came before. That is what makes resume exact and lets each DDP rank read only its own
  rows of the global batch while the global batch stays that of a single process.
* Dynamic masking (default): the pairs and the masks are drawn again each epoch, as RoBERTa
  recommends. --static-masking draws them once (epoch 0's) and only reshuffles their order,
  like running the original script with dupe_factor=1.
* Packing (--pack, not in the original): an instance is often shorter than seq_len (a short
  document, or the short_seq_prob draw), and padding it wastes the encoder's work on [PAD]
  slots (benchmarks/ has the share on a real corpus). With pack_len the Collator lays each batch's
  instances end to end in rows of pack_len tokens, each with its own [CLS] and positions from
  0, behind a block-diagonal attention mask: every instance gets exactly the outputs it would
  get alone, so the loss is the same and a batch of b instances just needs fewer rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .packing import pack
from .text import CorpusError, document_sentences, iter_documents, resolve_paths
from .tokenizer import Tokenizer, truncate_longest_first
from .toolkit import UserError

CACHE_VERSION = 1  # bump when the cache layout or the sentence splitting changes
EVAL_SPLIT_SEED = 1234  # the held-out documents and masks depend on the corpus only, not on --seed
EVAL_EPOCH = 2**31 - 1  # the "epoch" in the held-out masks' seed: one no training run reaches

# columns of an instance table (int64): token ranges of A and B in the flat token file, NSP label
A0, A1, B0, B1, NSP = range(5)
NOT_NEXT, IS_NEXT, NO_PAIR = 1, 0, -1  # label 1 = B is a random sentence (Hugging Face's convention)


def default_cache_dir() -> Path:
    return Path(os.environ.get("MINIBERT_CACHE", Path.home() / ".cache" / "minibert"))


# ----------------------------------------------------------------------------- cache keys


def corpus_fingerprint(files: Sequence[Path]) -> list[list]:
    """[path, size, mtime] of each file: any edit, or another file, gives another key."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append([str(f), st.st_size, st.st_mtime_ns])
    return out


def corpus_sha256(files: Sequence[Path]) -> str:
    """A hash of the corpus's content: the files' bytes, in order, not their names or dates, so
    --resume accepts a moved or copied corpus and refuses an edited one."""
    h = hashlib.sha256()
    for f in files:
        fh = hashlib.sha256()
        with open(f, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                fh.update(block)
        h.update(fh.digest())  # per-file digests: moving bytes from one file to the next changes the hash
    return h.hexdigest()


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    vocab = "\n".join(tok.id_to_token(i) or "" for i in range(tok.vocab_size))
    return hashlib.sha256(f"lowercase={tok.lowercase}\n{vocab}".encode("utf-8")).hexdigest()


def cache_key(**parts) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder into place; if another process won the race, keep theirs."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- tokenizer


def get_tokenizer(
    spec: Optional[str],
    files: Sequence[Path],
    vocab_size: int,
    cache_dir: Path,
    errors: str = "strict",
    log=print,
) -> Tokenizer:
    """Load `spec` (a folder, tokenizer.json or vocab.txt), or train a WordPiece vocabulary of
    `vocab_size` on the corpus (cached by corpus and size, so it is trained once)."""
    if spec is not None:
        try:
            return Tokenizer.from_file(spec)
        except Exception as e:  # OSError, ValueError, or the Rust loader's own exception type
            raise UserError(f"--tokenizer {spec}: cannot load it ({e})") from None
    # trainer: bump when Tokenizer.train changes what it makes, so no stale vocabulary is reused
    key = cache_key(kind="tokenizer", files=corpus_fingerprint(files), vocab_size=vocab_size, errors=errors, trainer=2)
    folder = Path(cache_dir) / f"tokenizer-{key}"
    if (folder / "tokenizer.json").exists():
        log(f"tokenizer: reusing {folder}")
        return Tokenizer.from_file(folder)
    t0 = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder.parent))
    try:
        # The Rust trainer reads files itself; feed it our own decoding (strict UTF-8 checks with
        # file and byte offset, or --errors replace) by writing the sentences out once, streaming.
        text_file = tmp / "sentences.txt"
        with open(text_file, "w", encoding="utf-8") as f:
            for doc in iter_documents(files, errors):
                for s in document_sentences(doc):
                    f.write(s + "\n")
        tok = Tokenizer.train([text_file], vocab_size=vocab_size)
        text_file.unlink()
        tok.save(tmp)
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenizer: trained a WordPiece vocabulary of {tok.vocab_size} in {time.time() - t0:.1f}s -> {folder}"
        + Tokenizer.size_note(vocab_size, tok.vocab_size))
    return Tokenizer.from_file(folder)


# ----------------------------------------------------------------------------- token cache


@dataclass
class TokenCache:
    """The tokenized corpus, memory-mapped.

    tokens[sent_off[s]:sent_off[s+1]] are the ids of sentence s;
    sentences doc_off[d]..doc_off[d+1]-1 belong to document d.
    """

    tokens: np.ndarray  # (n_tokens,) uint16 or uint32
    sent_off: np.ndarray  # (n_sentences + 1,) int64
    doc_off: np.ndarray  # (n_documents + 1,) int64
    folder: Path
    cache_hit: bool

    @property
    def n_docs(self) -> int:
        return len(self.doc_off) - 1

    def doc_tokens(self, d: int) -> tuple[int, int]:
        """[start, end) of document d in the flat token array."""
        return int(self.sent_off[self.doc_off[d]]), int(self.sent_off[self.doc_off[d + 1]])


def _open_cache(folder: Path, cache_hit: bool) -> TokenCache:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))

    def mm(name: str, dtype: str, n: int) -> np.ndarray:
        return np.memmap(folder / name, dtype=dtype, mode="r", shape=(n,))

    return TokenCache(
        tokens=mm("tokens.bin", meta["dtype"], meta["n_tokens"]),
        sent_off=mm("sentences.bin", "int64", meta["n_sentences"] + 1),
        doc_off=mm("documents.bin", "int64", meta["n_documents"] + 1),
        folder=folder,
        cache_hit=cache_hit,
    )


def _document_batches(files: Sequence[Path], errors: str,
                      max_sentences: int = 4096) -> Iterator[list[tuple[str, list[str]]]]:
    """(file, sentences) of each document, grouped so the Rust tokenizer gets large batches."""
    batch: list[tuple[str, list[str]]] = []
    n = 0
    for doc in iter_documents(files, errors):
        sents = document_sentences(doc)
        batch.append((doc.path, sents))
        n += len(sents)
        if n >= max_sentences:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def build_token_cache(
    corpus: Sequence[str],
    tok: Tokenizer,
    cache_dir: Path,
    errors: str = "strict",
    log=print,
) -> TokenCache:
    """Tokenize the corpus once into `cache_dir/tokens-<key>/`; later calls just open it.

    Streams: one batch of documents is in memory at a time, and ids go straight to disk.
    Sentences that tokenize to nothing are dropped, and so are documents left with none.
    """
    files = resolve_paths(corpus)
    key = cache_key(kind="tokens", files=corpus_fingerprint(files), tokenizer=tokenizer_fingerprint(tok), errors=errors)
    folder = Path(cache_dir) / f"tokens-{key}"
    if (folder / "meta.json").exists():
        log(f"data: token cache hit {folder}")
        return _open_cache(folder, cache_hit=True)

    t0 = time.time()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokens-", dir=folder.parent))
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    n_tok, n_sent, n_doc = 0, 0, 0
    per_file: dict[str, list[int]] = {str(f): [0, 0] for f in files}  # documents read, documents kept
    try:
        with (open(tmp / "tokens.bin", "wb") as ft, open(tmp / "sentences.bin", "wb") as fs,
              open(tmp / "documents.bin", "wb") as fd):
            fs.write(np.int64(0).tobytes())
            fd.write(np.int64(0).tobytes())
            for batch in _document_batches(files, errors):
                flat = [s for _, sents in batch for s in sents]
                ids = tok.encode_ids(flat) if flat else []
                i = 0
                for path, sents in batch:
                    per_file[path][0] += 1
                    doc_ids = [x for x in ids[i : i + len(sents)] if x]  # drop sentences with no token
                    i += len(sents)
                    if not doc_ids:
                        continue
                    per_file[path][1] += 1
                    lens = np.array([len(x) for x in doc_ids], dtype=np.int64)
                    ft.write(np.concatenate([np.asarray(x, dtype=dtype) for x in doc_ids]).tobytes())
                    fs.write((n_tok + np.cumsum(lens)).tobytes())
                    n_tok += int(lens.sum())
                    n_sent += len(doc_ids)
                    n_doc += 1
                    fd.write(np.int64(n_sent).tobytes())
        for path, (read, kept) in per_file.items():
            if kept == 0:
                raise CorpusError(f"file {path}: no usable document ({read} read, none holds a token after "
                                  f"tokenization)")
        meta = dict(
            version=CACHE_VERSION,
            dtype=np.dtype(dtype).name,
            n_tokens=n_tok,
            n_sentences=n_sent,
            n_documents=n_doc,
            vocab_size=tok.vocab_size,
            files={p: {"documents": r, "kept": k} for p, (r, k) in per_file.items()},
        )
        # written last: marks a complete cache
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"data: tokenized {n_doc:,} documents, {n_sent:,} sentences, {n_tok:,} tokens in {time.time() - t0:.1f}s "
        f"-> {folder}")
    return _open_cache(folder, cache_hit=False)


# ----------------------------------------------------------------------------- instances


def _split_trim(rng: np.random.Generator, start: int, end: int, cut: int) -> tuple[int, int]:
    """Remove `cut` tokens from [start, end), each from the front or the back with probability 1/2
    (the original recipe does this to avoid always losing sentence ends)."""
    front = int(rng.binomial(cut, 0.5)) if cut else 0
    return start + front, end - (cut - front)


def make_instances(
    data: TokenCache,
    docs: np.ndarray,
    seq_len: int,
    rng: np.random.Generator,
    short_seq_prob: float = 0.1,
    nsp: bool = True,
    random_pool: Optional[np.ndarray] = None,
) -> np.ndarray:
    """All instances of the documents `docs`, as an (N, 5) int64 table (columns A0, A1, B0, B1, NSP).

    random_pool: the documents a random B may come from (default: `docs`); it must hold a
    document other than the current one. With NSP, one-sentence documents give no instance.
    """
    max_tokens = seq_len - (3 if nsp else 2)  # room left for [CLS] A [SEP] (B [SEP])
    pool = docs if random_pool is None else random_pool
    if nsp and len(pool) < 2:
        raise CorpusError(f"next-sentence prediction needs at least 2 documents to draw random sentences from, "
                          f"got {len(pool)}")
    so, do = data.sent_off, data.doc_off
    rows: list[tuple[int, int, int, int, int]] = []
    for d in docs:
        first, last = int(do[d]), int(do[d + 1])  # sentences [first, last)
        if nsp and last - first < 2:
            continue  # a one-sentence document has no true pair; it still serves as random B material
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk_start, i = first, first
        while i < last:
            i += 1
            if i < last and so[i] - so[chunk_start] < target:
                continue
            # the chunk is sentences [chunk_start, i)
            if not nsp:
                a0, a1 = int(so[chunk_start]), int(so[i])
                a0, a1 = _split_trim(rng, a0, a1, max(0, a1 - a0 - max_tokens))
                rows.append((a0, a1, 0, 0, NO_PAIR))
                chunk_start = i
                continue
            is_random = rng.random() < 0.5
            if not is_random and i - chunk_start == 1:
                # DEVIATION: the original makes every one-sentence chunk a random pair, which tilts
                # the labels towards "random" (benchmarks/ has the share). Borrow the next sentence, or at
                # the document's end the one before, so the labels stay 50/50.
                if i < last:
                    i += 1
                else:
                    chunk_start -= 1
            chunk = i - chunk_start
            # A = sentences [chunk_start, a_end)
            a_end = chunk_start + (1 if chunk < 2 else int(rng.integers(1, chunk)))
            a0, a1 = int(so[chunk_start]), int(so[a_end])
            if is_random:
                label = NOT_NEXT
                other = int(pool[rng.integers(len(pool))])
                while other == d:  # never the same document, so never the true next sentence
                    other = int(pool[rng.integers(len(pool))])
                o_first, o_last = int(do[other]), int(do[other + 1])
                s = int(rng.integers(o_first, o_last))  # B: from a random sentence on, up to the length A left over
                b0, want = int(so[s]), max(1, target - (a1 - a0))
                while s < o_last and so[s] - b0 < want:
                    s += 1
                b1 = int(so[s])
                i = a_end  # put back the chunk's sentences that A did not use
            else:
                label = IS_NEXT
                b0, b1 = a1, int(so[i])
            cut_a, cut_b = truncate_longest_first(a1 - a0, b1 - b0, max_tokens)
            a0, a1 = _split_trim(rng, a0, a1, cut_a)
            b0, b1 = _split_trim(rng, b0, b1, cut_b)
            rows.append((a0, a1, b0, b1, label))
            chunk_start = i
    return np.array(rows, dtype=np.int64).reshape(-1, 5)  # (N, 5)


# ----------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class Vocab:
    """What masking needs to know about the vocabulary, as lookup tables over ids."""

    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    special: np.ndarray  # (V,) bool: never selected for prediction
    word_start: np.ndarray  # (V,) bool: False for "##" continuation pieces
    random_ids: np.ndarray  # (V - n_special,) ids a random replacement is drawn from

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> "Vocab":
        V = tok.vocab_size
        special = np.zeros(V, dtype=bool)
        special[list(tok.special_ids)] = True
        word_start = np.array([not (tok.id_to_token(i) or "").startswith("##") for i in range(V)])
        return cls(tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, special, word_start, np.flatnonzero(~special))


def mask_tokens(
    ids: np.ndarray,
    vocab: Vocab,
    rng: np.random.Generator,
    mlm_prob: float = 0.15,
    whole_word: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking of one row. Returns (inputs, labels); labels are -100 where not scored."""
    inputs, labels = ids.copy(), np.full_like(ids, -100)
    cand = np.flatnonzero(~vocab.special[ids])  # positions that may be chosen
    if len(cand) == 0:
        return inputs, labels
    # group candidate positions into units: single tokens, or whole words ([tok, ##piece, ...]);
    # a new unit also starts after any gap (a special token sits between the two positions)
    if whole_word:
        starts = vocab.word_start[ids[cand]] | np.r_[True, np.diff(cand) != 1]
    else:
        starts = np.ones(len(cand), dtype=bool)
    bounds = np.r_[np.flatnonzero(starts), len(cand)]  # unit u = cand[bounds[u]:bounds[u+1]]
    n_pred = max(1, int(round(len(cand) * mlm_prob)))
    chosen: list[int] = []
    for u in rng.permutation(len(bounds) - 1):
        size = bounds[u + 1] - bounds[u]
        if len(chosen) + size > n_pred:  # a word that would overshoot is skipped, as in BERT
            continue
        chosen.extend(cand[bounds[u] : bounds[u + 1]])
        if len(chosen) == n_pred:
            break
    pos = np.sort(np.array(chosen, dtype=np.int64))
    labels[pos] = ids[pos]
    r = rng.random(len(pos))
    inputs[pos[r < 0.8]] = vocab.mask_id  # 80%: [MASK]
    rand = pos[r >= 0.9]  # 10%: a random non-special token; the other 10% stay unchanged
    inputs[rand] = vocab.random_ids[rng.integers(len(vocab.random_ids), size=len(rand))]
    return inputs, labels


class Collator:
    """Instances -> a padded, masked batch. Each row's masks come from a generator seeded by
    (seed, epoch, 2, instance id), so a row is the same whichever process builds it.

    pack_len: lay the instances end to end in rows of this many tokens (minibert/packing.py)
    instead of one per row padded to the longest: the batch then has position_ids, doc_ids
    and cls_index instead of attention_mask, and usually fewer rows than instances.
    """

    def __init__(self, data: TokenCache, vocab: Vocab, seed: int, mlm_prob: float = 0.15, whole_word: bool = False,
                 nsp: bool = True, pack_len: Optional[int] = None):
        self.data, self.vocab, self.seed = data, vocab, seed
        self.mlm_prob, self.whole_word, self.nsp, self.pack_len = mlm_prob, whole_word, nsp, pack_len

    def row(self, inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[CLS] A [SEP] (B [SEP]) ids and segment ids of one instance."""
        v, tok = self.vocab, self.data.tokens
        a = tok[inst[A0] : inst[A1]].astype(np.int64)
        if inst[NSP] == NO_PAIR:
            ids = np.r_[v.cls_id, a, v.sep_id]
            return ids, np.zeros(len(ids), dtype=np.int64)
        b = tok[inst[B0] : inst[B1]].astype(np.int64)
        ids = np.r_[v.cls_id, a, v.sep_id, b, v.sep_id]
        types = np.r_[np.zeros(len(a) + 2, dtype=np.int64), np.ones(len(b) + 1, dtype=np.int64)]
        return ids, types

    def __call__(self, insts: np.ndarray, keys: Sequence[tuple[int, int]]) -> dict[str, torch.Tensor]:
        """insts: (B, 5) instance rows; keys: their (mask epoch, instance id)."""
        rows = []
        for inst, (epoch, idx) in zip(insts, keys):
            ids, types = self.row(inst)
            rng = np.random.default_rng([self.seed, epoch, 2, idx])
            inputs, labels = mask_tokens(ids, self.vocab, rng, self.mlm_prob, self.whole_word)
            rows.append((inputs, types, labels))
        if self.pack_len:
            inputs, types, labels = zip(*rows)
            # no dense (R, T, T) mask: the model builds the block-diagonal mask from doc_ids
            batch = pack(inputs, self.pack_len, token_types=types, pad_id=self.vocab.pad_id, labels=labels,
                         dense_mask=False)
            if self.nsp:
                batch["next_sentence_label"] = torch.from_numpy(insts[:, NSP].copy())  # (N,), cls_index's order
            return batch
        B, T = len(rows), max(len(r[0]) for r in rows)
        input_ids = np.full((B, T), self.vocab.pad_id, dtype=np.int64)
        token_type_ids = np.zeros((B, T), dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), -100, dtype=np.int64)
        for i, (inputs, types, lab) in enumerate(rows):
            n = len(inputs)
            input_ids[i, :n], token_type_ids[i, :n], attention_mask[i, :n], labels[i, :n] = inputs, types, 1, lab
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if self.nsp:
            batch["next_sentence_label"] = torch.from_numpy(insts[:, NSP].copy())
        return batch


# ----------------------------------------------------------------------------- the stream of training rows


def split_documents(n_docs: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train documents, held-out documents): a fixed random eval_fraction of the documents,
    chosen from the corpus alone so that runs with different seeds share the held-out set."""
    if n_docs < 2:
        raise CorpusError(f"the corpus has {n_docs} usable document; pretraining needs at least 2 (one is held out)")
    n_eval = min(n_docs - 1, max(1, int(round(n_docs * eval_fraction))))
    perm = np.random.default_rng(EVAL_SPLIT_SEED).permutation(n_docs)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class InstanceStream:
    """The endless, reproducible sequence of training instances: epoch after epoch, each epoch's
    instances (drawn from (seed, epoch)) in a shuffled order (from (seed, epoch, 1)).

    state = (epoch, index into that epoch's order); `take(n)` returns the next n rows and their
    mask keys and advances the state.
    """

    def __init__(self, data: TokenCache, docs: np.ndarray, seq_len: int, seed: int, short_seq_prob: float = 0.1,
                 nsp: bool = True, static: bool = False):
        self.data, self.docs, self.seq_len, self.seed = data, docs, seq_len, seed
        self.short_seq_prob, self.nsp, self.static = short_seq_prob, nsp, static
        self.epoch, self.index = 0, 0
        self._table_epoch = -1

    def _table(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._table_epoch != epoch:
            source = 0 if self.static else epoch  # static: epoch 0's pairs (and masks), reshuffled
            if self._table_epoch == -1 or not self.static:
                rng = np.random.default_rng([self.seed, source])
                self._insts = make_instances(self.data, self.docs, self.seq_len, rng, self.short_seq_prob, self.nsp)
            self._order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self._insts))
            self._table_epoch = epoch
        return self._insts, self._order

    def epoch_size(self) -> int:
        return len(self._table(self.epoch)[0])

    def take(self, n: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
        rows, keys = [], []
        while len(keys) < n:
            insts, order = self._table(self.epoch)
            if len(order) == 0:  # an epoch without instances: looping on would never return
                raise CorpusError(f"no training instances in epoch {self.epoch} (documents too short for the pairs "
                                  "or rows asked for)")
            idx = order[self.index : self.index + n - len(keys)]
            rows.append(insts[idx])
            mask_epoch = 0 if self.static else self.epoch
            keys.extend((mask_epoch, int(i)) for i in idx)
            self.index += len(idx)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return np.concatenate(rows), keys

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def eval_instances(data: TokenCache, eval_docs: np.ndarray, train_docs: np.ndarray, seq_len: int, nsp: bool,
                   max_rows: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A fixed held-out set: instances of the held-out documents with fixed masks, the same at
    every evaluation and in every run on this corpus. Random B sentences come from other
    held-out documents (from the whole corpus if there is only one)."""
    pool = eval_docs if len(eval_docs) >= 2 else np.sort(np.r_[eval_docs, train_docs])
    rng = np.random.default_rng([EVAL_SPLIT_SEED, 1])
    insts = make_instances(data, eval_docs, seq_len, rng, short_seq_prob=0.0, nsp=nsp, random_pool=pool)
    keep = np.sort(rng.permutation(len(insts))[:max_rows])
    return insts[keep], [(EVAL_EPOCH, int(i)) for i in keep]


def most_frequent_token(data: TokenCache, docs: np.ndarray, vocab: Vocab, chunk: int = 1 << 24) -> int:
    """The commonest non-special token of the given documents: the best constant MLM guess."""
    counts = np.zeros(len(vocab.special), dtype=np.int64)
    # documents are ranges in the flat file; count per run of consecutive documents, in chunks
    for d0, d1 in _runs(docs):
        start, end = data.doc_tokens(d0)[0], data.doc_tokens(d1 - 1)[1]
        for s in range(start, end, chunk):
            counts += np.bincount(data.tokens[s : min(end, s + chunk)], minlength=len(counts))
    counts[vocab.special] = 0
    return int(counts.argmax())


def _runs(docs: np.ndarray) -> list[tuple[int, int]]:
    """Sorted document ids -> [start, end) runs of consecutive ids."""
    if len(docs) == 0:
        return []
    breaks = np.flatnonzero(np.diff(docs) != 1) + 1
    starts = np.r_[0, breaks]
    ends = np.r_[breaks, len(docs)]
    return [(int(docs[s]), int(docs[e - 1]) + 1) for s, e in zip(starts, ends)]
