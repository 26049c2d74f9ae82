"""The building blocks of the fine-tuning methods, each small enough to read on its own:

    freeze_bottom(model, k)      partial fine-tuning: embeddings + the bottom k layers stay fixed
    LoRALinear / add_lora        low-rank adapters on the attention projections, merged on save
    info_nce                     the alignment loss of "bidirectional" fine-tuning
    FGM                          fast gradient method: adversarial steps on the word embeddings
    Verbalizer / Prompt / prompt_scores
                                 cloze prompts read through the masked-LM head

`minibert.finetune` wires them into one training loop; tests/test_strategies.py pins
each one against a direct computation.

Shape letters: B batch, T tokens, H hidden, V vocabulary, C classes, r LoRA rank.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .model import BertModel
from .tokenizer import Tokenizer, truncate_longest_first

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
            raise ValueError(f"--freeze-layers must be in 0..{L} or 'all', got {k}")
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


def add_lora(bert: BertModel, rank: int, alpha: float, dropout: float = 0.0, targets: Sequence[str] = LORA_TARGETS) -> int:
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

    Used inside a training step:
        loss.backward()        # clean gradient, which also gives g
        fgm.attack()           # E <- E + r_adv
        loss_adv.backward()    # gradients of the clean and the adversarial loss add up
        fgm.restore()          # E <- the saved copy, before the optimiser steps
    Only the rows of tokens in the batch have a gradient, so only they move.
    """

    def __init__(self, embedding: nn.Embedding, epsilon: float):
        self.weight = embedding.weight
        self.epsilon = epsilon
        self.backup: Optional[Tensor] = None

    @torch.no_grad()
    def attack(self) -> bool:
        g = self.weight.grad
        if g is None:
            raise RuntimeError("FGM needs the gradient of the word embeddings; call loss.backward() first")
        norm = torch.linalg.vector_norm(g)
        if norm == 0 or not torch.isfinite(norm):
            return False  # no direction to move in; skip the adversarial pass
        self.backup = self.weight.detach().clone()
        self.weight.add_(g, alpha=self.epsilon / norm.item())
        return True

    @torch.no_grad()
    def restore(self) -> None:
        if self.backup is not None:
            self.weight.copy_(self.backup)
            self.backup = None


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
                raise ValueError(f"--verbalizer: {item!r} is not LABEL:WORD (e.g. '0:terrible,1:great')")
            label, words = item.split(":", 1)
            by_label[label.strip()] = [w.strip() for w in words.split("|") if w.strip()]
        names = [str(n) for n in label_names]
        unknown = sorted(set(by_label) - set(names))
        missing = [n for n in names if n not in by_label]
        if unknown or missing:
            raise ValueError(f"--verbalizer labels {sorted(by_label)} do not match the data's labels {names}")
        words = [by_label[n] for n in names]
        pieces = []
        for c, ws in enumerate(words):
            if not ws:
                raise ValueError(f"--verbalizer: label {names[c]!r} has no word")
            ids = tok.encode_ids(ws)
            for w, p in zip(ws, ids):
                if not p or tok.unk_id in p:
                    raise ValueError(f"--verbalizer: word {w!r} is not in the vocabulary (got {tok.convert_ids_to_tokens(p)})")
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
            raise ValueError(f"--template must contain exactly one [MASK], got {template!r}")
        if "{text}" not in template:
            raise ValueError(f"--template must contain {{text}}, got {template!r}")
        self.template, self.verbalizer, self.tok, self.max_len = template, verbalizer, tok, max_len
        parts = [p for p in self._PARTS.split(template) if p.strip()]
        self.parts: list = [p if p in ("{text}", "{pair}", "[MASK]") else tok.encode_ids([p])[0] for p in parts]
        self.fixed = sum(len(p) for p in self.parts if isinstance(p, list)) + 2  # + [CLS] [SEP]
        if self.max_len - self.fixed - max(verbalizer.mask_counts) < 1:
            raise ValueError(f"--max-len {max_len} leaves no room for the text in the template {template!r}")

    def encode(self, texts: Sequence[str], pairs: Optional[Sequence[str]] = None) -> list[dict[int, tuple[list[int], int]]]:
        """One item per text: {n: (ids, position of the first of the n [MASK]s)}."""
        a_all = self.tok.encode_ids(texts)
        b_all = self.tok.encode_ids(pairs) if pairs is not None else [[] for _ in texts]
        items = []
        for a0, b0 in zip(a_all, b_all):
            item = {}
            for n in self.verbalizer.mask_counts:
                a, b = list(a0), list(b0)
                truncate_longest_first(a, b, self.max_len - self.fixed - n)
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
        mask_logits = {}
        for n, b in batch.items():
            h = mlm.bert(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
            pos = b["mask_at"][:, None] + torch.arange(n, device=h.device)  # (B, n)
            h_mask = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (B, n, H)
            # the V-wide decoder runs on the n [MASK] rows only, not on all T positions
            mask_logits[n] = mlm.mlm(h_mask)  # (B, n, V)
        return prompt_scores(mask_logits, self.verbalizer)

    def to_dict(self) -> dict:
        return {"template": self.template, "verbalizer": self.verbalizer.spec, "max_len": self.max_len}


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
