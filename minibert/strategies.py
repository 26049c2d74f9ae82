"""The fine-tuning methods: their building blocks, each small enough to read on its own,
and one class per method behind the small interface the training loop uses.

Building blocks (tests/test_strategies.py pins each against a direct computation):

    PlainInputs / PackedInputs   text -> [CLS] A [SEP] (B [SEP]) rows, padded or packed per batch
    freeze_bottom(model, k)      partial fine-tuning: embeddings + the bottom k layers stay fixed
    LoRALinear / add_lora        low-rank adapters on the attention projections, merged on save
    info_nce                     the alignment loss of "bidirectional" fine-tuning
    FGM / PGD / FreeLB           fast gradient method, projected gradient ascent and its mean over
                                 every pass: adversarial steps on the word embeddings
    Verbalizer / Prompt / PackedPrompt / prompt_scores
                                 cloze prompts read through the masked-LM head

Methods (the end of this file): `Strategy` is the interface, `STRATEGIES` the table from
`--strategy NAME` to class. `minibert.finetune` looks a method up there and never asks which
one it has; adding a method is one class and one table entry (plus a FinetuneConfig field
per new option, and its test).

Shape letters: B batch, T tokens, H hidden, V vocabulary, C classes, r LoRA rank.
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model import BertForMaskedLM, BertForSequenceClassification, BertModel
from .packing import pack
from .tabular import LabelMap
from .tokenizer import Tokenizer, truncate_longest_first
from .toolkit import UserError

# -----------------------------------------------------------------------------
# Inputs: how texts become model inputs and model outputs become class scores (B, C).
# Every method has one: encode(texts, pairs) -> items, collate(items) -> batch,
# scores(model, batch) -> (B, C), length(item) for length-sorted evaluation.


class PlainInputs:
    """[CLS] A [SEP] (B [SEP]) rows for a sequence classifier, padded per batch."""

    def __init__(self, tok: Tokenizer, max_len: int):
        self.tok, self.max_len = tok, max_len

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> list[tuple[list[int], list[int]]]:
        a_all = self.tok.encode_ids(texts)  # batched in Rust
        b_all = self.tok.encode_ids(pairs) if pairs is not None else [None] * len(a_all)
        return [self.tok.build_inputs(a, b, self.max_len) for a, b in zip(a_all, b_all)]

    @staticmethod
    def length(item: tuple[list[int], list[int]]) -> int:
        return len(item[0])

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        return self.tok.pad(items)  # dynamic padding: T = the longest row of this batch

    @staticmethod
    def scores(model: BertForSequenceClassification, batch: dict[str, Tensor]) -> Tensor:
        return model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).logits  # (B, C)


class PackedInputs(PlainInputs):
    """The same rows, but a batch is packed end to end into rows of max_len tokens
    (minibert.packing) instead of padded to its longest row.

    Short texts waste most of a padded batch: 32 SST-2 sentences of ~13 tokens padded
    to their longest (~40) are two-thirds [PAD]; packed, the same 32 fill ~4 rows of 128.
    Each sentence keeps its own positions and attends only to itself, so the encoder
    computes what it computes for the sentence alone (only the dropout draws differ);
    each sentence's [CLS] state is gathered back and goes through the usual head."""

    def collate(self, items: Sequence[tuple[list[int], list[int]]]) -> dict[str, Tensor]:
        # no dense (R, T, T) mask: the model builds the block-diagonal mask it needs from doc_ids
        return pack([ids for ids, _ in items], self.max_len, [types for _, types in items], pad_id=self.tok.pad_id,
                    dense_mask=False)

    @staticmethod
    def scores(model: BertForSequenceClassification, batch: dict[str, Tensor]) -> Tensor:
        h = model.bert(batch["input_ids"], batch["token_type_ids"], position_ids=batch["position_ids"],
                       doc_ids=batch["doc_ids"])  # (R, T, H)
        pooled = model.bert.pool(h, batch["cls_index"])  # (N, H): each sentence's [CLS], in the batch's order
        return model.classifier(model.drop(pooled))  # (N, C): BertForSequenceClassification's head


# -----------------------------------------------------------------------------
# Partial fine-tuning


def freeze_bottom(bert: BertModel, k: int | str) -> list[str]:
    """Freeze the embeddings and the bottom k encoder layers; k = "all" freezes the whole
    backbone, pooler included, so only the task head on top trains (a linear probe).

    Lower layers hold general features (morphology, syntax) and upper layers the more
    task-specific ones, so freezing from the bottom keeps most of what pretraining bought
    while training fewer parameters. Returns the names of the frozen parameters.
    """
    L = len(bert.encoder.layers)
    if k == "all":
        frozen_modules: list[nn.Module] = [bert]
    else:
        if not str(k).isdigit() or not 0 <= int(k) <= L:
            raise UserError(f"--freeze-layers must be in 0..{L} (the model has {L} layers) or 'all', got {k}")
        frozen_modules = [bert.embeddings] + [bert.encoder.layers[i] for i in range(int(k))]
    names = []
    ids = {id(p) for m in frozen_modules for p in m.parameters()}
    for name, p in bert.named_parameters():
        if id(p) in ids:
            p.requires_grad_(False)
            names.append(name)
    return names


# -----------------------------------------------------------------------------
# LoRA (Hu et al. 2021): W x + (alpha / r) * B A x, with W frozen, A (r, in), B (out, r)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update.

    B starts at zero, so at step 0 the layer computes exactly what the pretrained one
    did; A starts random so the gradient on B is not zero. The update is scaled by
    alpha / r so that changing the rank does not change the effective learning rate.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear uses for its own weight
        self.scaling = alpha / rank
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # (..., in) @ (in, r) @ (r, out) -> (..., out): never builds the (out, in) product
        return self.base(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W' = W + (alpha / r) B A: the same function, no adapter."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + (self.lora_B @ self.lora_A) * self.scaling)  # (out, in)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


LORA_TARGETS = ("q", "k", "v", "o")


def add_lora(bert: BertModel, rank: int, alpha: float, dropout: float = 0.0,
             targets: Sequence[str] = LORA_TARGETS) -> int:
    """Freeze the whole backbone and wrap each layer's attention projections in LoRALinear.
    Returns the number of LoRA parameters added. The caller un-freezes its task head."""
    for p in bert.parameters():
        p.requires_grad_(False)
    added = 0
    for layer in bert.encoder.layers:
        for name in targets:
            wrapped = LoRALinear(getattr(layer.attn, name), rank, alpha, dropout)
            setattr(layer.attn, name, wrapped)
            added += wrapped.lora_A.numel() + wrapped.lora_B.numel()
    return added


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every LoRALinear inside `module` by its merged nn.Linear (in place).
    After this the module's state dict has plain BERT names again."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return module


# -----------------------------------------------------------------------------
# Bidirectional fine-tuning: align the fine-tuned and the pretrained model


def sentence_repr(h: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(B, T, H) hidden states -> (B, H): the [CLS] vector or the mean over real tokens."""
    if pooling == "cls":
        return h[:, 0]
    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, H)
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between two views of the same batch, (B, H) each.

    Row i of `a` and row i of `b` describe the same sentence (the positive pair); the
    other B - 1 rows of the batch are the negatives. With unit vectors and
    s_ij = a_i . b_j / tau:

        L = 1/2 * [ mean_i -log softmax_j(s_ij)[i]  +  mean_j -log softmax_i(s_ij)[j] ]

    i.e. cross-entropy with the diagonal as the target, taken both ways so that neither
    model is only ever the "query".
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    sim = a @ b.t() / temperature  # (B, B)
    target = torch.arange(a.size(0), device=a.device)
    return 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))


# -----------------------------------------------------------------------------
# FGM (Miyato et al. 2017): one adversarial step in word-embedding space


class FGM:
    """r_adv = epsilon * g / ||g||, g = d loss / d E (E = the word-embedding matrix).

    Used inside a training step (`run` does the last three):
        loss.backward()        # clean gradient, which also gives g
        fgm.attack()           # E <- E + r_adv
        loss_adv.backward()    # gradients of the clean and the adversarial loss add up
        fgm.restore()          # E <- the saved copy, before the optimiser steps
    Only the rows of tokens in the batch have a gradient, so only they move.
    """

    def __init__(self, embedding: nn.Embedding, epsilon: float):
        self.weight = embedding.weight
        self.epsilon = epsilon
        self.alpha = epsilon  # the length of one step: FGM takes one, to the edge of the ball
        self.backup: Optional[Tensor] = None

    @torch.no_grad()
    def attack(self) -> bool:
        g = self.weight.grad
        if g is None:
            raise RuntimeError(f"{type(self).__name__} needs the gradient of the word embeddings; "
                               "call loss.backward() first")
        norm = torch.linalg.vector_norm(g)
        if norm == 0 or not torch.isfinite(norm):
            return False  # no direction to move in; skip the adversarial pass
        if self.backup is None:  # the first step from E
            self.backup = self.weight.detach().clone()
        self.weight.add_(g, alpha=self.alpha / norm.item())
        self.project()
        return True

    def project(self) -> None:
        """FGM's one step of length epsilon ends on the ball already."""

    @torch.no_grad()
    def restore(self) -> None:
        if self.backup is not None:
            self.weight.copy_(self.backup)
            self.backup = None

    def run(self, loss_fn: Callable[[], Tensor]) -> None:
        """After the clean backward: the adversarial pass, its gradient added to the clean one.
        loss_fn computes the (scaled) loss on the current embeddings."""
        if self.attack():
            loss_fn().backward()
            self.restore()


class PGD(FGM):
    """Projected gradient ascent on the word embeddings (Madry et al. 2018): K steps, each of
    length alpha = 2 epsilon / K along the gradient at the point reached, the total perturbation
    projected back onto the ball of radius epsilon around E after each step. K = 1 is FGM (the
    one step of 2 epsilon is projected back to epsilon); more steps find a worse point inside
    the same ball. `run` leaves the clean gradient plus the last adversarial pass's: K + 1
    forward and backward passes a step, against FGM's 2.
    """

    average = False  # FreeLB: the mean of every pass's gradient instead of clean + last

    def __init__(self, embedding: nn.Embedding, epsilon: float, steps: int, params: Sequence[Tensor]):
        super().__init__(embedding, epsilon)
        self.steps, self.alpha = steps, 2 * epsilon / steps
        self.params = list(params)  # every tensor whose gradient the step uses, the embeddings among them

    @torch.no_grad()
    def project(self) -> None:
        r = self.weight - self.backup  # (V, H) the perturbation so far
        r_norm = torch.linalg.vector_norm(r)
        if r_norm > self.epsilon:  # back onto the ball
            self.weight.copy_(self.backup + r * (self.epsilon / r_norm))

    def keep(self, kept: dict) -> None:
        """Add the gradients of the pass just run to those kept, in place: each kept tensor is one
        that no parameter holds any more, so no step allocates a new copy of the model's gradients."""
        for p in self.params:
            if p.grad is not None:
                if p in kept:
                    kept[p].add_(p.grad)
                else:
                    kept[p] = p.grad

    def run(self, loss_fn: Callable[[], Tensor]) -> None:
        kept = {p: p.grad for p in self.params if p.grad is not None}  # the clean pass's
        passes = 1
        for _ in range(self.steps):
            if not self.attack():  # reads the embeddings' gradient of the pass just run
                break
            if self.average and passes > 1:
                self.keep(kept)
            for p in self.params:  # the next pass's gradient alone: the next step follows it
                p.grad = None
            loss_fn().backward()
            passes += 1
        self.restore()
        if passes > 1:
            self.keep(kept)
            for p, g in kept.items():
                p.grad = g.div_(passes) if self.average else g


class FreeLB(PGD):
    """PGD's passes, with the step's gradient the mean over all K + 1 of them (FreeLB, Zhu et al.
    2020): the model learns from every point the ascent visits, clean one included, as if the
    batch held K + 1 perturbed copies of itself, at PGD's cost. Deviations from the paper, for
    the sake of one ball shared with FGM and PGD: the ascent starts at the clean embeddings
    rather than a random point, and perturbs the embedding matrix under one norm rather than
    each sequence under its own.
    """

    average = True


# -----------------------------------------------------------------------------
# Prompt-based classification (cloze): "{text} It was [MASK]." + a verbalizer


@dataclass
class Verbalizer:
    """label id -> its words, each word a list of word-piece ids.

    Written on the command line as "0:terrible,1:great"; a label may list several
    words with "|" ("0:terrible|awful,1:great|good"), and a word may be several
    word-pieces or several words ("1:very good"), which are then scored with as many
    [MASK] tokens as it has pieces.
    """

    words: list[list[str]]  # words[c] = the surface words of label c
    pieces: list[list[list[int]]]  # pieces[c][w] = the word-piece ids of word w of label c

    @classmethod
    def parse(cls, spec: str, label_names: Sequence[str], tok: Tokenizer) -> "Verbalizer":
        by_label: dict[str, list[str]] = {}
        for item in spec.split(","):
            if ":" not in item:
                raise UserError(f"--verbalizer: {item!r} is not LABEL:WORD (e.g. '0:terrible,1:great')")
            label, words = item.split(":", 1)
            by_label[label.strip()] = [w.strip() for w in words.split("|") if w.strip()]
        names = [str(n) for n in label_names]
        unknown = sorted(set(by_label) - set(names))
        missing = [n for n in names if n not in by_label]
        if unknown or missing:
            raise UserError(f"--verbalizer labels {sorted(by_label)} do not match the data's labels {names}")
        words = [by_label[n] for n in names]
        pieces = []
        for c, ws in enumerate(words):
            if not ws:
                raise UserError(f"--verbalizer: label {names[c]!r} has no word")
            ids = tok.encode_ids(ws)
            for w, p in zip(ws, ids):
                if not p or tok.unk_id in p:
                    got = tok.convert_ids_to_tokens(p)
                    raise UserError(f"--verbalizer: word {w!r} is not in the vocabulary (got {got})")
            pieces.append(ids)
        return cls(words, pieces, names)

    @property
    def mask_counts(self) -> list[int]:
        """The distinct numbers of [MASK] tokens the words need (1 for single-piece words)."""
        return sorted({len(p) for ws in self.pieces for p in ws})

    label_names: list[str]

    @property
    def spec(self) -> str:
        """Back to the command-line form, e.g. "0:terrible,1:great"."""
        return ",".join(f"{n}:{'|'.join(ws)}" for n, ws in zip(self.label_names, self.words))


class Prompt:
    """Fill a template and read the verbalizer words at its [MASK]:

        "{text} It was [MASK]."  ->  [CLS] the film ... it was [MASK] . [SEP]
        class scores = log p(verbalizer word of each class | prompt)

    The template may use {text} and {pair}; literal parts are word-pieced once. When a
    row is too long the text (and pair) are truncated, never the template, so the
    [MASK] is always there. A verbalizer word of n pieces is read from a version of
    the prompt with n consecutive [MASK]s, so one forward pass per distinct n.
    """

    _PARTS = re.compile(r"(\{text\}|\{pair\}|\[MASK\])")

    def __init__(self, template: str, verbalizer: Verbalizer, tok: Tokenizer, max_len: int):
        if template.count("[MASK]") != 1:
            raise UserError(f"--template must contain exactly one [MASK], got {template!r}")
        if "{text}" not in template:
            raise UserError(f"--template must contain {{text}}, got {template!r}")
        self.template, self.verbalizer, self.tok, self.max_len = template, verbalizer, tok, max_len
        parts = [p for p in self._PARTS.split(template) if p.strip()]
        self.parts: list = [p if p in ("{text}", "{pair}", "[MASK]") else tok.encode_ids([p])[0] for p in parts]
        self.fixed = sum(len(p) for p in self.parts if isinstance(p, list)) + 2  # + [CLS] [SEP]
        if self.max_len - self.fixed - max(verbalizer.mask_counts) < 1:
            raise UserError(f"--max-len {max_len} leaves no room for the text in the template {template!r}")

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None
               ) -> list[dict[int, tuple[list[int], int]]]:
        """One item per text: {n: (ids, position of the first of the n [MASK]s)}."""
        a_all = self.tok.encode_ids(texts)
        b_all = self.tok.encode_ids(pairs) if pairs is not None else [[] for _ in texts]
        items = []
        for a0, b0 in zip(a_all, b_all):
            item = {}
            for n in self.verbalizer.mask_counts:
                a, b = list(a0), list(b0)
                cut_a, cut_b = truncate_longest_first(len(a), len(b), self.max_len - self.fixed - n)
                a, b = a[: len(a) - cut_a], b[: len(b) - cut_b]
                ids, mask_at = [self.tok.cls_id], -1
                for p in self.parts:
                    if p == "{text}":
                        ids += a
                    elif p == "{pair}":
                        ids += b
                    elif p == "[MASK]":
                        mask_at = len(ids)
                        ids += [self.tok.mask_id] * n
                    else:
                        ids += p
                item[n] = (ids + [self.tok.sep_id], mask_at)
            items.append(item)
        return items

    @staticmethod
    def length(item: dict[int, tuple[list[int], int]]) -> int:
        return max(len(ids) for ids, _ in item.values())

    def collate(self, items: Sequence[dict[int, tuple[list[int], int]]]) -> dict[int, dict[str, Tensor]]:
        """-> {n: input_ids, token_type_ids, attention_mask (B, T) and mask_at (B,)}, padded per n."""
        batch = {}
        for n in self.verbalizer.mask_counts:
            rows = [(it[n][0], [0] * len(it[n][0])) for it in items]
            b = self.tok.pad(rows)
            b["mask_at"] = torch.tensor([it[n][1] for it in items])
            batch[n] = b
        return batch

    def scores(self, mlm: nn.Module, batch: dict[int, dict[str, Tensor]]) -> Tensor:
        """(B, C) class scores from a BertForMaskedLM; differentiable, for few-shot training."""
        # the V-wide decoder runs on the n [MASK] rows only, not on all T positions
        mask_logits = {n: mlm.mlm(self.mask_states(mlm, b, n)) for n, b in batch.items()}  # (B, n, V)
        return prompt_scores(mask_logits, self.verbalizer)

    @staticmethod
    def mask_states(mlm: nn.Module, b: dict[str, Tensor], n: int) -> Tensor:
        """(B, n, H): the final hidden states at each prompt's n [MASK]s."""
        h = mlm.bert(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
        pos = b["mask_at"][:, None] + torch.arange(n, device=h.device)  # (B, n)
        return h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (B, n, H)

    def to_dict(self) -> dict:
        """What prompt.json holds: enough to rebuild this Prompt beside the model folder."""
        return {"template": self.template, "verbalizer": self.verbalizer.spec, "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict, label_names: Sequence[str], tok: Tokenizer, max_len: Optional[int] = None) -> "Prompt":
        return cls(d["template"], Verbalizer.parse(d["verbalizer"], label_names, tok), tok, max_len or d["max_len"])


class PackedPrompt(Prompt):
    """The same prompts, packed end to end into rows of max_len (minibert.packing) instead of
    padded: each prompt keeps its own positions and attends only to itself, so the [MASK]
    states are what the padded batch gives (only the dropout draws differ)."""

    def collate(self, items: Sequence[dict[int, tuple[list[int], int]]]) -> dict[int, dict[str, Tensor]]:
        """-> {n: the packed rows (minibert.packing.pack) and mask_index (N, 2): (row, column)
        of each prompt's first [MASK], in the batch's order}."""
        batch = {}
        for n in self.verbalizer.mask_counts:
            b = pack([it[n][0] for it in items], self.max_len, pad_id=self.tok.pad_id, dense_mask=False)
            b["mask_index"] = b.pop("cls_index") + torch.tensor([[0, it[n][1]] for it in items])  # (N, 2)
            batch[n] = b
        return batch

    @staticmethod
    def mask_states(mlm: nn.Module, b: dict[str, Tensor], n: int) -> Tensor:
        h = mlm.bert(b["input_ids"], b["token_type_ids"], position_ids=b["position_ids"],
                     doc_ids=b["doc_ids"])  # (R, T, H)
        rows = b["mask_index"][:, :1].expand(-1, n)  # (N, n)
        cols = b["mask_index"][:, 1:] + torch.arange(n, device=h.device)  # (N, n)
        return h[rows, cols]  # (N, n, H)


def prompt_scores(mask_logits: dict[int, Tensor], verbalizer: Verbalizer) -> Tensor:
    """Class scores (B, C) from the MLM logits at the [MASK] positions.

    mask_logits[n] is (B, n, V): the logits at the n consecutive [MASK]s of the
    n-mask version of the prompt. A word of n pieces scores the mean log-probability
    of its pieces; a label with several words scores the mean over its words. With
    one single-piece word per label this is log p(word | prompt), whose argmax over
    labels equals the argmax of the raw verbalizer-token logits.
    """
    logp = {n: F.log_softmax(x.float(), dim=-1) for n, x in mask_logits.items()}  # (B, n, V)
    cols = []
    for words in verbalizer.pieces:
        word_scores = []
        for p in words:
            lp = logp[len(p)]  # (B, n, V)
            idx = torch.tensor(p, device=lp.device)
            word_scores.append(lp[:, torch.arange(len(p), device=lp.device), idx].mean(-1))  # (B,)
        cols.append(torch.stack(word_scores, -1).mean(-1))  # (B,)
    return torch.stack(cols, -1)  # (B, C)


# -----------------------------------------------------------------------------
# The methods: one class each, behind the interface the training loop uses


def task_loss(logits: Tensor, y: Tensor, class_weight: Optional[Tensor]) -> Tensor:
    """Cross-entropy over the classes, or MSE for one output (regression)."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1).float(), y.float())
    return F.cross_entropy(logits.float(), y, weight=class_weight)


class Strategy:
    """A fine-tuning method, as the training loop sees it.

    Built from the run's config and the model the loop made for it (`model_class`, from --init
    or from scratch); `pretrained` is the folder the weights came from (None from scratch).
    A class lists the FinetuneConfig fields it reads in `options`: giving one that belongs to
    another method is an error (`check_options`). The base class is full fine-tuning.

        model, inputs          what is evaluated and saved: inputs.scores(model, batch) -> (B, C)
        modules()              every module that trains (optimizer, device, train/eval mode)
        loss(batch, y)         -> (loss, {name: detached part, for the log})
        embeddings()           the word embeddings (FGM perturbs them)
        save(out)              the kept model into the run folder: out/model (what predict
                               reads), plus whatever else the method keeps
        state_dict() / load_state_dict()   what --resume restores beyond the optimizer
        after_training(out, held_texts, device) -> extra fields for metrics.json
    """

    name: ClassVar[str] = "full"
    help: ClassVar[str] = "all parameters (the default)"
    model_class: ClassVar[type] = BertForSequenceClassification
    options: ClassVar[tuple[str, ...]] = ("pack",)

    def __init__(self, cfg: Any, model: nn.Module, tok: Tokenizer, label_map: LabelMap, pretrained: Optional[Path],
                 log: Callable[[str], None]):
        self.model, self.tok = model, tok
        self.inputs: Any = (PackedInputs if getattr(cfg, "pack", False) else PlainInputs)(tok, cfg.max_len)
        self.class_weight: Optional[Tensor] = None
        self.notes: dict = {}  # facts about the set-up, for metrics.json
        self.extra_files: dict[str, str] = {}  # name -> text, saved in the model folder (finetune's marks)

    @classmethod
    def check_options(cls, cfg: Any, defaults: Any) -> None:
        """Refuse another method's options (a value other than its default)."""
        for other in STRATEGIES.values():
            for name in other.options:
                if name not in cls.options and getattr(cfg, name) != getattr(defaults, name):
                    users = [n for n, c in STRATEGIES.items() if name in c.options]
                    flag = "--" + name.replace("_", "-")
                    raise UserError(f"{flag} goes with --strategy {' or '.join(users)}, not --strategy {cls.name}")

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        return task_loss(self.inputs.scores(self.model, batch), y, self.class_weight), {}

    def embeddings(self) -> nn.Embedding:
        return self.model.bert.embeddings.tok

    def save(self, out: Path) -> None:
        self.model.save_pretrained(out / "model", tokenizer=self.tok, extra_files=self.extra_files)

    def state_dict(self) -> dict:
        return {"modules": [m.state_dict() for m in self.modules()]}

    def load_state_dict(self, state: dict) -> None:
        for m, sd in zip(self.modules(), state["modules"]):
            m.load_state_dict(sd)

    def after_training(self, out: Path, held_texts: Sequence[str], device: torch.device) -> dict:
        return {}


class Partial(Strategy):
    name, help = "partial", "embeddings + bottom k layers frozen (--freeze-layers k); 'all' = linear probe"
    options = ("pack", "freeze_layers")

    def __init__(self, cfg, model, tok, label_map, pretrained, log):
        super().__init__(cfg, model, tok, label_map, pretrained, log)
        self.notes["frozen_parameters"] = len(freeze_bottom(model.bert, cfg.freeze_layers))


class LoRA(Strategy):
    name, help = "lora", "low-rank adapters on q/k/v/o, merged into the weights on save"
    options = ("pack", "lora_rank", "lora_alpha", "lora_dropout")

    def __init__(self, cfg, model, tok, label_map, pretrained, log):
        super().__init__(cfg, model, tok, label_map, pretrained, log)
        if cfg.lora_rank < 1:
            raise UserError(f"--lora-rank must be >= 1, got {cfg.lora_rank}")
        self.notes["lora_parameters"] = add_lora(model.bert, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)

    def save(self, out: Path) -> None:
        # the saved folder is a plain BERT: W + (alpha / r) B A, no adapters
        merge_lora(copy.deepcopy(self.model)).save_pretrained(out / "model", tokenizer=self.tok,
                                                              extra_files=self.extra_files)


class PromptTuning(Strategy):
    """BertForMaskedLM read at the [MASK] of a template; few-shot trains it with cross-entropy
    over the verbalizer scores (PET's objective). Saves prompt.json beside the model."""

    name, help = "prompt", "cloze through the masked-LM head: --template, --verbalizer (zero-shot: --epochs 0)"
    model_class = BertForMaskedLM
    options = ("pack", "template", "verbalizer")

    def __init__(self, cfg, model, tok, label_map, pretrained, log):
        super().__init__(cfg, model, tok, label_map, pretrained, log)
        if not cfg.verbalizer:
            raise UserError("--strategy prompt needs --verbalizer, e.g. '0:terrible,1:great'")
        if label_map.is_regression:
            raise UserError("--strategy prompt needs class labels, not regression targets (--task classification)")
        names = [str(x) for x in label_map.labels]
        prompt = PackedPrompt if cfg.pack else Prompt
        self.inputs = prompt(cfg.template, Verbalizer.parse(cfg.verbalizer, names, tok), tok, cfg.max_len)
        if any(n.startswith("mlm.") for n in getattr(model, "load_report", {}).get("initialised", [])):
            self.notes["warning"] = (f"{pretrained} has no masked-LM head (mlm.dense / mlm.norm / mlm.bias newly "
                                     "initialised): prompt scores come from an untrained head, so zero-shot accuracy "
                                     "will be near chance")
            log("WARNING: " + self.notes["warning"])

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        return F.cross_entropy(self.inputs.scores(self.model, batch), y, weight=self.class_weight), {}

    def save(self, out: Path) -> None:
        prompt = json.dumps(self.inputs.to_dict(), indent=2) + "\n"
        self.model.save_pretrained(out / "model", tokenizer=self.tok,
                                   extra_files={**self.extra_files, "prompt.json": prompt})


class Bidirectional(Strategy):
    """M_ft (the classifier) and M_pre (a copy of the pretrained encoder + MLM head), trained
    together on  loss = task(M_ft) + lambda * InfoNCE(repr_ft, repr_pre).

    The alignment pulls the two models' sentence vectors of the same sentence together
    and pushes the other sentences of the batch apart; its gradient reaches both
    encoders, so the task knowledge also flows back into M_pre, which is saved too
    (pretrained_updated/) and scored on held-out masked words before and after."""

    name, help = "bidirectional", "task loss + lambda * InfoNCE(M_ft, M_pre); both models learn"
    options = ("align_weight", "temperature", "align_pooling")

    def __init__(self, cfg, model, tok, label_map, pretrained, log):
        super().__init__(cfg, model, tok, label_map, pretrained, log)
        self.weight, self.temperature, self.pooling = cfg.align_weight, cfg.temperature, cfg.align_pooling
        self.max_len, self.data_seed = cfg.max_len, cfg.data_seed
        if pretrained is not None:
            c = model.config
            self.pre = BertForMaskedLM.from_pretrained(pretrained, dropout=c.dropout,
                                                       attention_dropout=c.attention_dropout)
            if any(n.startswith("mlm.") for n in self.pre.load_report["initialised"]):
                self.notes["warning"] = (f"{pretrained} has no masked-LM head: M_pre's held-out MLM accuracy is that "
                                         "of an untrained head")
                log("WARNING: " + self.notes["warning"])
        else:  # from scratch: M_pre starts as the same random encoder as M_ft
            self.pre = BertForMaskedLM(copy.deepcopy(model.config))
            self.pre.bert.load_state_dict(model.bert.state_dict())
        self.pre_before = copy.deepcopy(self.pre.state_dict())  # M_pre as it started, for "before"

    def modules(self) -> list[nn.Module]:
        return [self.model, self.pre]

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        m = self.model
        h_ft = m.bert(ids, types, mask)  # (B, T, H)
        logits = m.classifier(m.drop(m.bert.pool(h_ft)))  # (B, C), the same head as BertForSequenceClassification
        h_pre = self.pre.bert(ids, types, mask)  # (B, T, H)
        align = info_nce(sentence_repr(h_ft, mask, self.pooling), sentence_repr(h_pre, mask, self.pooling),
                         self.temperature)
        task = task_loss(logits, y, self.class_weight)
        return task + self.weight * align, {"task": task.detach(), "align": align.detach()}

    def save(self, out: Path) -> None:
        super().save(out)
        self.pre.save_pretrained(out / "pretrained_updated", tokenizer=self.tok, extra_files=self.extra_files)

    def after_training(self, out: Path, held_texts: Sequence[str], device: torch.device) -> dict:
        """M_pre's held-out MLM accuracy as it started and as kept (read back from disk)."""
        before = BertForMaskedLM(copy.deepcopy(self.pre.config))
        before.load_state_dict(self.pre_before)
        after = BertForMaskedLM.from_pretrained(out / "pretrained_updated")
        acc = [mlm_accuracy(m.to(device), self.tok, held_texts, self.max_len, device, self.data_seed)
               for m in (before, after)]
        return {"bidirectional": {"mlm_accuracy_before": acc[0]["accuracy"], "mlm_accuracy_after": acc[1]["accuracy"],
                                  "masked_tokens": acc[1]["masked_tokens"]}}


@torch.no_grad()
def mlm_accuracy(mlm: BertForMaskedLM, tok: Tokenizer, texts: Sequence[str], max_len: int, device: torch.device,
                 seed: int, batch_size: int = 64) -> dict:
    """Held-out MLM accuracy: 15% of the word-pieces of each text replaced by [MASK]
    (chosen with a fixed seed, so "before" and "after" see the same positions)."""
    g = torch.Generator().manual_seed(seed)
    rows = PlainInputs(tok, max_len).encode(list(texts))
    special = torch.tensor(sorted(tok.special_ids))
    correct = total = 0
    mlm.eval()
    for s in range(0, len(rows), batch_size):
        b = tok.pad(rows[s : s + batch_size])
        ids = b["input_ids"]  # (B, T)
        pick = (torch.rand(ids.shape, generator=g) < 0.15) & ~torch.isin(ids, special)  # (B, T)
        if not pick.any():
            continue
        labels = torch.where(pick, ids, torch.full_like(ids, -100))
        out = mlm(ids.masked_fill(pick, tok.mask_id).to(device), b["token_type_ids"].to(device),
                  b["attention_mask"].to(device), labels=labels.to(device))
        correct += int((out.logits.argmax(-1).cpu() == ids[pick]).sum())  # logits (N, V) at the picked positions
        total += int(pick.sum())
    return {"accuracy": correct / max(total, 1), "masked_tokens": total}


STRATEGIES: dict[str, type[Strategy]] = {
    "full": Strategy,
    "partial": Partial,
    "prompt": PromptTuning,
    "bidirectional": Bidirectional,
    "lora": LoRA,
}
