"""WordPiece tokenization, built on the `tokenizers` library (the Rust core does the
string work; the BERT-specific parts -- special tokens, segment ids, truncation,
padding -- are written out here).

    text --normalise--> "héllo, wörld!" -> "hello, world!"   (lower-case, strip accents, clean controls,
                                                              spaces around CJK characters)
         --pre-tokenise--> ["hello", ",", "world", "!"]      (split on whitespace and punctuation)
         --WordPiece--> ["hello", ",", "world", "!"]; "unaffable" -> ["una", "##ffa", "##ble"]
                        (greedy longest-match-first from the vocabulary; [UNK] if a word can't be built)
    pair:  [CLS] A [SEP] B [SEP],  token_type_ids 0 for [CLS] A [SEP], 1 for B [SEP]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wordpiece(vocab: Optional[dict[str, int]] = None) -> models.WordPiece:  # None: empty, to be trained
    # a word over 100 characters becomes one [UNK], as in the tokenizer.json files of BERT
    # checkpoints on the Hugging Face hub (Google's original tokenizer allows 200)
    return models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)


class TokenizerFileError(FileNotFoundError):
    """A tokenizer file, or a folder without one: the user's mistake, shown by every command as one
    line (toolkit.USER_ERRORS); still a FileNotFoundError for callers that catch OSError."""


def _pipeline(model: models.Model, lowercase: bool) -> _RustTokenizer:
    tok = _RustTokenizer(model)
    # BERT's normaliser: drop control chars, map whitespace to spaces, pad CJK chars with
    # spaces so each becomes its own word, lower-case and strip accents (uncased models)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace + every punctuation char
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class Tokenizer:
    """Encode text for BERT; train a vocabulary; load or save vocab.txt / tokenizer.json."""

    def __init__(self, rust_tokenizer: _RustTokenizer, lowercase: bool = True, model_max_length: int = 512):
        self._tok = rust_tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self.lowercase = lowercase
        self.model_max_length = model_max_length
        missing = [t for t in SPECIAL_TOKENS if self._tok.token_to_id(t) is None]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        # the specials are whole tokens wherever they appear in text, and decode() drops them
        # (as in Google's BERT tokenizer); they are in the vocabulary already, so no id changes
        self._tok.add_special_tokens(SPECIAL_TOKENS)
        ids = (self._tok.token_to_id(t) for t in SPECIAL_TOKENS)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        self.special_ids = frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))
        # saved tokenizer.json files add [CLS]/[SEP] themselves, so other libraries use them as-is;
        # minibert encodes without it and adds the specials below, where a reader can see it.
        self._tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)],
        )

    # -- construction ---------------------------------------------------------

    @classmethod
    def from_vocab(cls, vocab_file: Union[str, os.PathLike], lowercase: bool = True) -> "Tokenizer":
        vocab = {}
        with open(vocab_file, encoding="utf-8") as f:
            for i, line in enumerate(f):
                tok = line.rstrip("\n")
                if tok in vocab:
                    # some published vocabularies repeat a token: the first id wins, and the repeat's
                    # id keeps a placeholder no text can produce (the pre-tokenizer splits at "["),
                    # so the ids stay the line numbers and vocab_size covers them all
                    tok = f"[repeat-of-line-{vocab[tok] + 1}-at-{i + 1}]"
                vocab[tok] = i
        if not vocab:
            raise ValueError(f"{vocab_file}: empty vocabulary")
        return cls(_pipeline(_wordpiece(vocab), lowercase), lowercase)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike]) -> "Tokenizer":
        """The tokenizer of a model folder, or of a run folder's model/, found as the models'
        from_pretrained finds their weights. The way to load a saved model's tokenizer."""
        from .checkpoint import resolve_model_dir

        return cls.from_file(resolve_model_dir(folder))

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "Tokenizer":
        """The file-level loader: a tokenizer.json, a vocab.txt, or a folder holding either
        (tokenizer.json preferred) with no model beside it. For a model or run folder use
        from_pretrained."""
        path = Path(path)
        lowercase, max_len = True, 512
        folder = path if path.is_dir() else path.parent
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.exists():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            lowercase = bool(cfg.get("do_lower_case", True))
            max_len = int(min(cfg.get("model_max_length", 512), 1 << 20))
        if path.is_dir():
            if (path / "tokenizer.json").exists():
                path = path / "tokenizer.json"
            elif (path / "vocab.txt").exists():
                path = path / "vocab.txt"
            else:
                raise TokenizerFileError(f"{path}: no tokenizer.json or vocab.txt (a model folder keeps the "
                                         f"tokenizer it was trained with beside its weights)")
        if not path.exists():
            raise TokenizerFileError(f"{path}: no such tokenizer file")
        if path.suffix == ".json":
            tok = cls(_RustTokenizer.from_file(str(path)), lowercase)
        else:
            tok = cls.from_vocab(path, lowercase)
        tok.model_max_length = max_len
        return tok

    @classmethod
    def train(
        cls,
        files: Sequence[Union[str, os.PathLike]],
        vocab_size: int = 8000,
        lowercase: bool = True,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> "Tokenizer":
        """Learn a WordPiece vocabulary from text files (the specials get ids 0..4).

        The same files always give the same vocabulary. `tokenizers`' trainer on its own does
        not: it creates the "##c" continuation pieces while iterating over a hash map, so their
        ids -- which break ties between equally frequent merges -- change from process to
        process (huggingface/tokenizers#1794). Declaring those pieces up front, in sorted order,
        leaves nothing to create in hash order; afterwards the vocabulary is rebuilt as a plain
        WordPiece model so that they are ordinary tokens, not special ones. The pieces declared
        are exactly the ones the trainer would create -- "##c" for every character c that occurs
        inside a word -- so no vocabulary slot goes to a piece the text never needs.
        """
        files = [str(f) for f in files]
        pipe = _pipeline(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]"), lowercase)
        inner: set[str] = set()  # characters seen after the first of a pre-tokenised word
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    for word, _ in pipe.pre_tokenizer.pre_tokenize_str(pipe.normalizer.normalize_str(line)):
                        inner.update(word[1:])
        continuing = ["##" + c for c in sorted(inner)]
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=SPECIAL_TOKENS + continuing,
            continuing_subword_prefix="##",
            show_progress=show_progress,
        )
        tok = _pipeline(_wordpiece(), lowercase)
        tok.train(files, trainer)
        vocab = tok.get_vocab(with_added_tokens=False)
        return cls(_pipeline(_wordpiece(vocab), lowercase), lowercase)

    @staticmethod
    def size_note(asked: int, got: int) -> str:
        """Why a trained vocabulary is not the size asked for ("" when it is), for the log line."""
        if got > asked:
            return (f" (asked for {asked}: the specials and every character of the text need a piece of their own, "
                    f"so {got} is the smallest vocabulary for it)")
        if got < asked:
            return f" (asked for {asked}: no more pieces occur at least twice in the text)"
        return ""

    def save(self, folder: Union[str, os.PathLike]) -> None:
        """Write vocab.txt, tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
        from .checkpoint import atomic_write, atomic_write_text

        folder = Path(folder)
        vocab = sorted(self._tok.get_vocab().items(), key=lambda kv: kv[1])
        atomic_write_text(folder / "vocab.txt", "".join(t + "\n" for t, _ in vocab))
        atomic_write(folder / "tokenizer.json", lambda tmp: self._tok.save(tmp))
        specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "mask_token": "[MASK]"}
        cfg = {"tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
               "model_max_length": self.model_max_length, **specials}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(cfg, indent=2) + "\n")
        atomic_write_text(folder / "special_tokens_map.json", json.dumps(specials, indent=2) + "\n")

    # -- vocabulary -------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def __len__(self) -> int:
        return self.vocab_size

    def tokenize(self, text: str) -> list[str]:
        return self._tok.encode(text, add_special_tokens=False).tokens

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(i)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self._tok.id_to_token(int(i)) for i in ids]

    # -- encoding ---------------------------------------------------------------

    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids without special tokens, for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def build_inputs(
        self, a: list[int], b: Optional[list[int]] = None, max_length: Optional[int] = None
    ) -> tuple[list[int], list[int]]:
        """[CLS] A [SEP] (B [SEP]) with segment ids, after longest-first truncation to max_length."""
        a, b = list(a), (list(b) if b is not None else None)
        if max_length is not None:
            budget = max_length - (3 if b is not None else 2)  # room left after the specials
            if budget < 0:
                raise ValueError(f"max_length {max_length} leaves no room for the special tokens")
            cut_a, cut_b = truncate_longest_first(len(a), len(b or []), budget)
            a = a[: len(a) - cut_a]  # from the end
            b = b[: len(b) - cut_b] if b is not None else None
        ids = [self.cls_id] + a + [self.sep_id]
        types = [0] * len(ids)
        if b is not None:
            ids += b + [self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode(self, text: str, pair: Optional[str] = None, max_length: Optional[int] = None) -> dict[str, list[int]]:
        """One sentence (or pair) -> {'input_ids', 'token_type_ids', 'attention_mask'} as lists."""
        a = self.encode_ids([text])[0]
        b = self.encode_ids([pair])[0] if pair is not None else None
        ids, types = self.build_inputs(a, b, max_length)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": [1] * len(ids)}

    def __call__(
        self,
        texts: Union[str, Sequence[str]],
        pairs: Union[None, str, Sequence[str]] = None,
        max_length: Optional[int] = None,
        padding: str = "longest",
    ) -> dict[str, torch.Tensor]:
        """Batch encode to (B, T) long tensors. padding: 'longest' (dynamic) or 'max_length'."""
        if isinstance(texts, str):
            texts = [texts]
            pairs = [pairs] if isinstance(pairs, str) else pairs
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(pairs)} pairs")
        max_length = max_length or self.model_max_length
        a_ids = self.encode_ids(texts)
        b_ids = self.encode_ids(pairs) if pairs is not None else [None] * len(texts)
        rows = [self.build_inputs(a, b, max_length) for a, b in zip(a_ids, b_ids)]
        return self.pad(rows, max_length if padding == "max_length" else None)

    def pad(self, rows: Sequence[tuple[list[int], list[int]]], length: Optional[int] = None) -> dict[str, torch.Tensor]:
        """(ids, segment ids) rows -> padded (B, T) tensors; T = the longest row unless given."""
        T = length or max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        token_type_ids = torch.zeros((len(rows), T), dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (ids, types) in enumerate(rows):
            n = len(ids)
            input_ids[i, :n] = torch.tensor(ids)
            token_type_ids[i, :n] = torch.tensor(types)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def truncate_longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """How many tokens to drop from A and from B so that len_a + len_b <= budget, taking one token
    at a time from the longer segment (from B on ties): as much of the shorter text as possible is
    kept, as in BERT's data pipeline. The one truncation rule of minibert (fine-tuning inputs,
    prompts and pretraining pairs); the caller chooses which end the tokens come from.

    Closed form of that loop: first the longer one is cut down towards the shorter, then the
    two lose tokens in turn, B first.
    """
    excess = len_a + len_b - max(budget, 0)  # a budget below 0 keeps nothing, like 0
    if excess <= 0:
        return 0, 0
    gap = abs(len_a - len_b)
    if gap >= excess:
        return (excess, 0) if len_a > len_b else (0, excess)
    rest = excess - gap
    cut_a, cut_b = rest // 2, rest - rest // 2  # B goes first at each tie
    return (cut_a + gap, cut_b) if len_a > len_b else (cut_a, cut_b + gap)
