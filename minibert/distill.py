"""Knowledge distillation: train a small student to imitate a fine-tuned teacher.

    python -m minibert.distill --teacher runs/sst2 --student mini --train train.tsv --dev dev.tsv \\
        --unlabeled more_sentences.txt --out runs/sst2-mini
    --student PRESET                 random weights of a preset size, with the teacher's tokenizer
    --student DIR                    a pretrained minibert / BERT folder (its own tokenizer)
    --student teacher-layers:0,2,4   the teacher's embeddings, these layers, pooler and head

The loss (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"), with z_t and z_s
the teacher's and the student's logits, y the label, T the temperature:

    L = alpha * T^2 * KL( softmax(z_t / T) || softmax(z_s / T) ) + (1 - alpha) * CE(z_s, y)

A temperature T > 1 softens both distributions, so the student also learns how the teacher
ranks the wrong classes ("dark knowledge"). The gradient of the KL term with respect to z_s is
(softmax(z_s/T) - softmax(z_t/T)) / T, which shrinks like 1/T^2 as T grows (for the soft
probabilities differ by about (z_s - z_t) / T); multiplying by T^2 keeps the two terms in
proportion at every temperature. Rows without a label (the --unlabeled text, labelled by the
teacher alone) add to the KL term only; CE averages over the labelled rows of the batch.

Optional transfer from inside the network (TinyBERT, Jiao et al. 2020; MiniLM, Wang et al.
2020), on mapped layers (student layer s <- teacher layer t; by default s-th of Ls <- the
(s+1) * Lt / Ls - 1-th, or the copied layers of teacher-layers:):

    --hidden-weight beta      beta * mean over mapped layers (and the embeddings) of
                              MSE(h_s W, h_t) over real tokens; W is a learned (H_s, H_t) matrix
                              when the widths differ (trained with the student, then dropped)
    --attention-weight gamma  gamma * mean over mapped layers, heads and real query tokens of
                              KL(A_t || A_s), A the attention probabilities (needs the same head
                              count on both sides of each mapped layer)

Both need the teacher's tokenisation in the student (a preset or teacher-layers: student has it).

When only logits are compared (no hidden or attention term), the frozen teacher labels the
transfer set once before training instead of once per batch (its logits cannot change: eval
mode, no dropout), and --pack packs the student's batches as minibert.finetune --pack does.
--teacher-cache FILE keeps those logits in a safetensors file keyed by a hash of the teacher's
weights, the transfer set's token ids and the precision: a rerun that changes only the student
or its training reads them back instead of running the teacher again.
--alpha 0 trains on the labels alone and never runs the teacher: the baseline that shows what
the soft targets add.

The transfer set is the training text plus the --unlabeled text (one text per line) plus, with
--augment N, N perturbed copies of each training text (Tang et al. 2019; minibert/augment.py).
Text without a label is where distillation can teach what labels cannot: a student trained on
the labels alone never sees it. Writes a
run folder --out like minibert.finetune: model/ (what predict reads), metrics.json (dev metrics
of the kept student and of the teacher, the student's agreement with the teacher and KL to it,
at step 0 and at the best evaluation; the same on --test for the kept student), metrics.jsonl,
training_curve.png, run_config.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .augment import augment
from .checkpoint import atomic_write, atomic_write_text, here_mark, pretrained_here, resolve_model_dir
from .finetune import evaluate, random_batches, read_split
from .model import PRESETS, BertConfig, BertForSequenceClassification
from .optim import adamw, param_groups, warmup_linear
from .predict import Classifier, score_items, to_device
from .strategies import PackedInputs, PlainInputs
from .tabular import ERRORS_HELP
from .tokenizer import Tokenizer
from .toolkit import (
    KeepBest, MetricsLog, RunOptions, UserError, autocast, check_max_len, cli_main, field, grad_scaler, optimizer_step,
    pick_device, plot_curves, prepare_output, resolve_precision, seed_everything, set_threads,
)


@dataclass
class DistillConfig(RunOptions):
    teacher: Optional[str] = field(None, "the fine-tuned classifier to imitate: a model folder or a finetune run "
                                   "folder")
    student: Optional[str] = field(None, f"a preset ({', '.join(PRESETS)}: random weights, the teacher's "
                                   "tokenizer), a model folder, or teacher-layers:I,J,... (the teacher's embeddings, "
                                   "those layers, pooler and head)")
    train: Optional[str] = field(None, "labelled training file: TSV, CSV or JSONL (columns as in minibert.finetune)")
    dev: Optional[str] = field(None, "labelled dev file: evaluated after each pass (or every --eval-every steps); "
                               "the best student is kept")
    test: Optional[str] = field(None, "labelled test file: the kept student and the teacher are scored on it once, "
                                "at the end")
    unlabeled: Optional[str] = field(None, "text file, one text per line, added to the transfer set (the teacher "
                                     "labels it)")
    teacher_cache: Optional[str] = field(None, "file for the teacher's logits on the transfer set: read when it was "
                                         "made for the same teacher weights, texts and precision, else computed "
                                         "and written there (a rerun with another student, --alpha, "
                                         "--temperature or --lr skips the labelling)")
    augment: int = field(0, "add N perturbed copies of each training text to the transfer set, unlabelled "
                         "(words masked or replaced, n-grams cut out: minibert/augment.py); the teacher labels them")
    text_col: Optional[str] = field(None, "text column, by name or 0-based index")
    text_pair_col: Optional[str] = field(None, "second text column for sentence pairs")
    label_col: Optional[str] = field(None, "label column (default: 'label', else the last)")
    skip_bad_rows: bool = field(False, "leave out malformed rows and report their lines, instead of stopping")
    errors: str = field("strict", ERRORS_HELP, choices=("strict", "replace"))
    max_len: Optional[int] = field(None, "truncate rows to this many tokens (default: the teacher's tokenizer "
                                   "setting)")
    pack: bool = field(False, "pack each batch's texts into rows of --max-len instead of padding (same math, fewer "
                       "FLOPs on short texts; not with --hidden-weight / --attention-weight)")
    temperature: float = field(2.0, "T: softens the teacher's and the student's distributions in the KL term")
    alpha: float = field(0.5, "weight of the soft (KL) term; 1 - alpha weighs the cross-entropy with the labels "
                         "(0: the labels alone, the teacher unused in training: the baseline for a distilled student)")
    hidden_weight: float = field(0.0, "beta: weight of the hidden-state MSE on mapped layers (0 = off)")
    attention_weight: float = field(0.0, "gamma: weight of the attention KL on mapped layers (0 = off)")
    layer_map: Optional[str] = field(None, "student:teacher layer pairs for the hidden and attention terms, e.g. "
                                     "0:1,1:3 (default: evenly spread, or the copied layers)")
    epochs: float = field(3.0, "passes over the transfer set")
    max_steps: int = field(0, "stop after this many optimiser steps (0 = no limit)")
    batch_size: int = field(32, "rows per step")
    eval_batch_size: int = field(128, "rows per forward pass when evaluating")
    lr: float = field(1e-4, "peak learning rate")
    weight_decay: float = field(0.01, "AdamW weight decay (not on biases / LayerNorm)")
    warmup: float = field(0.06, "fraction of steps of linear warmup, then linear decay to 0")
    clip: float = field(1.0, "clip the gradient norm to this (0 = off)")
    log_every: int = field(50, "print a log line every N steps")
    eval_every: int = field(0, "evaluate on --dev every N steps and keep the best student so far in --out (without "
                            "--dev: save it every N steps; 0 = after each pass over the transfer set)")


# -----------------------------------------------------------------------------
# The losses


def distillation_loss(student_logits: Tensor, teacher_logits: Optional[Tensor], y: Tensor, temperature: float,
                      alpha: float) -> tuple[Tensor, dict]:
    """alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(z_s, y), the KL
    averaged over all rows, the CE over the rows whose label is not -100 (0 when there is none).
    Returns (loss, {"soft": KL term before weighting, "hard": CE}) for the log."""
    T = temperature
    if teacher_logits is None:  # alpha = 0: the labels alone, the baseline a distilled student is measured against
        soft = student_logits.new_zeros((), dtype=torch.float32)
    else:
        log_p_s = F.log_softmax(student_logits.float() / T, dim=-1)  # (B, C)
        log_p_t = F.log_softmax(teacher_logits.float() / T, dim=-1)  # (B, C)
        soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)  # sum p_t (log p_t - log p_s) / B
    labelled = y != -100
    hard_sum = F.cross_entropy(student_logits.float(), y, ignore_index=-100, reduction="sum")
    hard = hard_sum / labelled.sum().clamp(min=1)
    loss = alpha * T * T * soft + (1 - alpha) * hard
    return loss, {"soft": soft.detach(), "hard": hard.detach()}


def hidden_mse(h_s: Tensor, h_t: Tensor, keep: Tensor) -> Tensor:
    """Mean squared error between (B, T, H) states over the real tokens (keep (B, T) = 1)."""
    k = keep.to(h_s.dtype)[..., None]  # (B, T, 1)
    return ((h_s.float() - h_t.float()) ** 2 * k).sum() / (k.sum() * h_t.size(-1)).clamp(min=1)


def attention_kl(a_s: Tensor, a_t: Tensor, keep: Tensor) -> Tensor:
    """KL(A_t || A_s) per (head, query row) of (B, nh, T, T) attention probabilities, averaged over
    heads and real query tokens. Masked keys have probability 0 on both sides and add nothing."""
    a_s, a_t = a_s.float(), a_t.float()
    log_a_s = a_s.clamp(min=torch.finfo(torch.float32).tiny).log()  # 0 -> a finite number, times a_t = 0 there
    kl = (torch.xlogy(a_t, a_t) - a_t * log_a_s).sum(-1)  # (B, nh, T)
    q = keep.to(kl.dtype)[:, None, :]  # (B, 1, T)
    return (kl * q).sum() / (q.sum() * a_t.size(1)).clamp(min=1)


# -----------------------------------------------------------------------------
# Students


def student_from_teacher_layers(teacher: BertForSequenceClassification, layers: Sequence[int]
                                ) -> BertForSequenceClassification:
    """A student with the teacher's embeddings, pooler and head and its encoder layers `layers`
    (student layer i = teacher layer layers[i]), as DistilBERT started from every other layer."""
    cfg = teacher.config
    pick = lambda sizes: None if sizes is None else [sizes[i] for i in layers]  # noqa: E731
    student_cfg = dataclasses.replace(cfg, num_layers=len(layers), heads_per_layer=pick(cfg.heads_per_layer),
                                      intermediate_per_layer=pick(cfg.intermediate_per_layer))
    student = BertForSequenceClassification(student_cfg)
    source = teacher.state_dict()
    wanted = {}
    for name in student.state_dict():
        m = re.match(r"bert\.encoder\.layers\.(\d+)\.(.*)", name)
        wanted[name] = source[f"bert.encoder.layers.{layers[int(m[1])]}.{m[2]}" if m else name]
    student.load_state_dict(wanted)
    return student


TEACHER_LAYERS = "teacher-layers:"


def build_student(spec: str, teacher: Classifier, log) -> tuple[BertForSequenceClassification, Tokenizer, str]:
    """--student -> (model, tokenizer, what it is, for the log)."""
    t_cfg = teacher.model.config
    labels = dict(num_labels=t_cfg.num_labels, id2label=dict(t_cfg.id2label), text_pair=t_cfg.text_pair)
    if spec.startswith(TEACHER_LAYERS):
        L = t_cfg.num_layers
        try:
            layers = [int(x) for x in spec.split(":", 1)[1].split(",")]
        except ValueError:
            raise UserError(f"--student {spec}: list the teacher's layers as numbers, e.g. teacher-layers:0,2,4") \
                from None
        if not layers or not all(0 <= i < L for i in layers):
            raise UserError(f"--student {spec}: the teacher has layers 0..{L - 1}")
        return student_from_teacher_layers(teacher.model, layers), teacher.tok, f"teacher layers {layers}"
    if spec in PRESETS:
        cfg = BertConfig.from_preset(spec, vocab_size=t_cfg.vocab_size, max_position=t_cfg.max_position,
                                     type_vocab_size=t_cfg.type_vocab_size, pad_token_id=t_cfg.pad_token_id, **labels)
        return BertForSequenceClassification(cfg), teacher.tok, f"preset {spec}, random weights"
    folder = resolve_model_dir(spec)
    model = BertForSequenceClassification.from_pretrained(folder, **labels)
    return model, Tokenizer.from_pretrained(folder), f"{folder}"


def parse_layer_map(spec: Optional[str], ls: int, lt: int, copied: Optional[list[int]]) -> list[tuple[int, int]]:
    """[(student layer, teacher layer)]: --layer-map, else the copied layers, else evenly spread
    (student layer s of Ls <- teacher layer (s + 1) * Lt // Ls - 1, so the last meets the last)."""
    if spec is None:
        return list(enumerate(copied)) if copied is not None else [(s, (s + 1) * lt // ls - 1) for s in range(ls)]
    try:
        pairs = [tuple(int(x) for x in p.split(":")) for p in spec.split(",")]
        assert all(len(p) == 2 for p in pairs)
    except (ValueError, AssertionError):
        raise UserError(f"--layer-map {spec}: write student:teacher pairs, e.g. 0:1,1:3") from None
    for s, t in pairs:
        if not (0 <= s < ls and 0 <= t < lt):
            raise UserError(f"--layer-map {spec}: the student has layers 0..{ls - 1}, the teacher 0..{lt - 1}")
    return pairs


# -----------------------------------------------------------------------------
# Forward passes that also keep the states the transfer terms compare


@dataclass
class Pass:
    logits: Tensor  # (B, C)
    hidden: list[Tensor]  # [embeddings output, layer 0 output, ...], each (B, T, H); empty if not asked
    attention: list[Tensor]  # one (B, nh, T, T) per layer; empty if not asked


def forward_states(model: BertForSequenceClassification, batch: dict, hidden: bool, attention: bool) -> Pass:
    """model's logits (BertForSequenceClassification's head, written out), and with `hidden` the
    output of the embeddings and of every layer (caught by forward hooks), with `attention` every
    layer's attention probabilities (the math path, which returns them)."""
    bert = model.bert
    states: list[Tensor] = []
    handles = []
    if hidden:
        handles.append(bert.embeddings.register_forward_hook(lambda m, a, out: states.append(out)))
        handles += [layer.register_forward_hook(lambda m, a, out: states.append(out[0])) for layer in
                    bert.encoder.layers]
    try:
        args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        h, maps = bert.forward_with_attention(*args) if attention else (bert(*args), [])
    finally:
        for handle in handles:
            handle.remove()
    return Pass(model.classifier(model.drop(bert.pool(h))), states, maps)


class Distiller:
    """The teacher (frozen, eval mode), the student, and the objective of the module docstring."""

    def __init__(self, cfg: DistillConfig, teacher: Classifier, student: BertForSequenceClassification,
                 layer_map: list[tuple[int, int]]):
        self.cfg, self.teacher, self.student, self.layer_map = cfg, teacher, student, layer_map
        self.teacher.model.eval().requires_grad_(False)
        self.hidden, self.attention = cfg.hidden_weight > 0, cfg.attention_weight > 0
        hs, ht = student.config.hidden_size, teacher.model.config.hidden_size
        # TinyBERT's W_h: only where the widths differ; trained with the student, not saved
        self.proj = nn.Linear(hs, ht, bias=False) if self.hidden and hs != ht else None
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=student.config.initializer_range)
        if self.attention:
            for s, t in layer_map:
                a, b = student.config.layer_heads(s), teacher.model.config.layer_heads(t)
                if a != b:
                    raise UserError(f"--attention-weight: student layer {s} has {a} heads, teacher layer {t} has {b}; "
                                    "attention maps are compared head by head (choose --layer-map or a student "
                                    "with as many heads)")

    def modules(self) -> list[nn.Module]:
        return [self.student] + ([self.proj] if self.proj is not None else [])

    def loss(self, s_batch: dict, t: dict | Tensor | None, y: Tensor, packed: bool = False) -> tuple[Tensor, dict]:
        """t: the teacher's batch, or its logits (B, C), computed once in run() when only logits are compared,
        or None with alpha = 0 (labels only). packed: s_batch comes from PackedInputs (logits only)."""
        if t is None:
            t = Pass(None, [], [])
        elif isinstance(t, Tensor):
            t = Pass(t, [], [])
        else:
            with torch.no_grad():
                if self.hidden or self.attention:
                    t = forward_states(self.teacher.model, t, self.hidden, self.attention)
                else:  # the teacher's own inputs: also a prompt-trained teacher
                    t = Pass(self.teacher.inputs.scores(self.teacher.model, t), [], [])
        if packed:
            s = Pass(PackedInputs.scores(self.student, s_batch), [], [])
        else:
            s = forward_states(self.student, s_batch, self.hidden, self.attention)
        loss, parts = distillation_loss(s.logits, t.logits, y, self.cfg.temperature, self.cfg.alpha)
        if self.hidden:
            keep = s_batch["attention_mask"]
            pairs = [(0, 0)] + [(i + 1, j + 1) for i, j in self.layer_map]  # the embeddings, then the layers
            proj = self.proj if self.proj is not None else (lambda x: x)
            hid = torch.stack([hidden_mse(proj(s.hidden[i]), t.hidden[j], keep) for i, j in pairs]).mean()
            loss = loss + self.cfg.hidden_weight * hid
            parts["hidden"] = hid.detach()
        if self.attention:
            keep = s_batch["attention_mask"]
            att = torch.stack([attention_kl(s.attention[i], t.attention[j], keep) for i, j in self.layer_map]).mean()
            loss = loss + self.cfg.attention_weight * att
            parts["attention"] = att.detach()
        return loss, parts


# -----------------------------------------------------------------------------
# The command


def check_config(cfg: DistillConfig) -> None:
    if cfg.teacher is None or cfg.student is None or cfg.train is None or cfg.out is None:
        raise UserError("--teacher, --student, --train and --out are required")
    if cfg.resume:
        raise UserError("--resume is not supported by distill; start again with --overwrite")
    if cfg.temperature <= 0 or not 0 <= cfg.alpha <= 1:
        raise UserError(f"need --temperature > 0 and --alpha in [0, 1]; got {cfg.temperature:g}, {cfg.alpha:g}")
    if cfg.hidden_weight < 0 or cfg.attention_weight < 0:
        raise UserError("--hidden-weight and --attention-weight must be >= 0")
    if not (cfg.student in PRESETS or cfg.student.startswith(TEACHER_LAYERS) or Path(cfg.student).exists()):
        raise UserError(f"--student {cfg.student}: not a preset ({', '.join(PRESETS)}), not a folder, and not "
                        f"{TEACHER_LAYERS}I,J,...")
    if cfg.pack and (cfg.hidden_weight or cfg.attention_weight):
        raise UserError("--pack compares logits only; it cannot be combined with --hidden-weight / --attention-weight")
    if cfg.teacher_cache and (cfg.hidden_weight or cfg.attention_weight):
        raise UserError("--teacher-cache keeps the teacher's logits; --hidden-weight / --attention-weight need its "
                        "inner states at every step, so there is nothing to cache")
    if cfg.augment < 0:
        raise UserError(f"--augment must be >= 0, got {cfg.augment}")
    if cfg.alpha == 0 and (cfg.augment or cfg.unlabeled):
        raise UserError("--alpha 0 trains on the labels alone, so the unlabelled texts of --augment / --unlabeled "
                        "would add steps and teach nothing; give --alpha > 0, or leave them out")
    if cfg.epochs <= 0 or cfg.max_steps < 0 or cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise UserError(f"need --epochs > 0, --max-steps >= 0 and --batch-size, --eval-batch-size >= 1 (a student "
                        f"that takes no step is the random start); got {cfg.epochs:g}, {cfg.max_steps}, "
                        f"{cfg.batch_size}, {cfg.eval_batch_size}")
    if not (cfg.lr > 0 and 0 <= cfg.warmup <= 1 and cfg.clip >= 0 and cfg.weight_decay >= 0):
        raise UserError(f"need --lr > 0, --warmup in [0, 1] (a fraction of the steps), --clip >= 0 and "
                        f"--weight-decay >= 0; got {cfg.lr:g}, {cfg.warmup:g}, {cfg.clip:g}, {cfg.weight_decay:g}")
    check_max_len(cfg.max_len)
    if cfg.eval_every < 0:
        raise UserError(f"--eval-every must be >= 0 (0: after each pass), got {cfg.eval_every}")


def cache_key(t_dir: Path, t_items: list, precision: str) -> str:
    """What the teacher's logits depend on: its weights and config, the token ids it reads (the texts
    after its tokenizer) and the arithmetic. The same key means the same logits, up to the rounding
    of another device."""
    h = hashlib.sha256()
    for f in sorted(t_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(precision.encode() + b"\0" + json.dumps(t_items, separators=(",", ":")).encode())
    return h.hexdigest()


def cached_logits(path: Path, key: str, compute, log) -> Tensor:
    """compute()'s (N, C) logits, or the ones path holds when its key matches. A cache that is
    missing or made for other inputs is (re)computed and written atomically. A file that is not a
    teacher cache (unreadable as one, or without its key) is never written over: it may be the
    user's data or model, named by a slip of the pen."""
    if path.is_dir():
        raise UserError(f"--teacher-cache {path}: a folder; give a file name such as {path / 'teacher.safetensors'}")
    if path.exists():
        try:
            with safe_open(str(path), "pt") as f:
                found = (f.metadata() or {}).get("key") if "logits" in f.keys() else None
                if found == key:
                    log(f"teacher logits read from {path}")
                    return f.get_tensor("logits")
        except Exception:  # safetensors raises its own error types for a file it cannot parse
            found = None
        if found is None:
            raise UserError(f"--teacher-cache {path}: the file exists and is not a teacher cache that distill "
                            "wrote; give a new file name (or delete the file, if it is a cache cut short)")
        log(f"--teacher-cache {path}: made for another teacher, transfer set or precision; recomputing")
    logits = compute().float().contiguous()
    atomic_write(path, lambda tmp: save_file({"logits": logits}, tmp, metadata={"key": key}))  # "cannot write"
    log(f"teacher logits written to {path}")
    return logits


def read_unlabeled(path: str, errors: str = "strict") -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8-sig", errors=errors)  # -sig: a leading BOM is dropped
    except OSError as e:
        raise UserError(f"--unlabeled {path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--unlabeled {path}: not UTF-8 text (byte {e.start}); re-encode it as UTF-8, or pass "
                        f"--errors replace to read such bytes as U+FFFD") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def float_metrics(scores: Tensor, y: Tensor, teacher: Classifier) -> dict:
    """evaluate()'s numbers (not its per-class lists), for metrics.json and the log."""
    return {k: v for k, v in evaluate(scores, y, teacher.label_map).items() if isinstance(v, float)}


@torch.no_grad()
def compare(student: nn.Module, s_inputs, s_items, teacher_scores: Tensor, y: Tensor, teacher: Classifier,
            cfg: DistillConfig, device: torch.device) -> dict:
    """Dev metrics of the student, how often it agrees with the teacher, and KL(teacher || student) at T = 1."""
    with autocast(cfg.precision, device):
        scores = score_items(student, s_inputs, s_items, cfg.eval_batch_size, device)
    d = float_metrics(scores, y, teacher)
    d["agreement"] = float((scores.argmax(-1) == teacher_scores.argmax(-1)).float().mean())
    d["kl_to_teacher"] = float(F.kl_div(scores.log_softmax(-1), teacher_scores.log_softmax(-1), reduction="batchmean",
                                        log_target=True))
    return d


def run(cfg: DistillConfig, log=print) -> dict:
    check_config(cfg)
    t_dir = resolve_model_dir(cfg.teacher)
    student_dir = None if cfg.student in PRESETS or cfg.student.startswith(TEACHER_LAYERS) else cfg.student
    out = prepare_output(cfg.out, overwrite=cfg.overwrite, resume=False,
                         inputs={"--teacher": t_dir, "--student": student_dir})
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    teacher = Classifier(t_dir, device=str(device), batch_size=cfg.eval_batch_size, max_len=cfg.max_len)
    if teacher.label_map.is_regression:
        raise UserError(f"--teacher {cfg.teacher}: a regression model; distill imitates class probabilities")
    max_len = cfg.max_len or teacher.tok.model_max_length
    def labelled(path: Optional[str], flag: str):
        if not path:
            return None
        split = read_split(path, cfg, teacher.label_map, flag)[0]
        if split.y is None:
            raise UserError(f"{flag} {path}: no label column (name it with --label-col)")
        return split

    train, dev, test = labelled(cfg.train, "--train"), labelled(cfg.dev, "--dev"), labelled(cfg.test, "--test")
    extra = read_unlabeled(cfg.unlabeled, cfg.errors) if cfg.unlabeled else []
    if (extra or cfg.augment) and train.pairs is not None:
        raise UserError("--unlabeled and --augment give single texts, but --train has sentence pairs")
    extra += augment(train.texts, cfg.augment, seed=cfg.seed)
    texts = train.texts + extra
    pairs = train.pairs
    y = torch.cat([train.y, torch.full((len(extra),), -100, dtype=torch.long)])  # -100: the teacher's label only

    seed_everything(cfg.seed)  # a random student's initialisation depends on --seed only
    student, s_tok, what = build_student(cfg.student, teacher, log)
    # the student's weights come from a preset's random start, the teacher's layers or a folder; if
    # that is no published checkpoint, the saved student is marked, and a later fine-tune of it gets
    # a short pretraining's schedule (finetune.default_schedule)
    start = ("random" if cfg.student in PRESETS else
             "here" if pretrained_here(t_dir if student_dir is None else student_dir) else "checkpoint")
    mark = here_mark(distilled_by="minibert.distill", init=cfg.student, teacher=str(t_dir), start=start,
                     short_pretraining=True) if start != "checkpoint" else None
    s_tok.model_max_length = max_len  # saved with the tokenizer, so predict truncates the same way
    s_inputs = PlainInputs(s_tok, max_len)
    s_items, t_items = s_inputs.encode(texts, pairs), teacher.inputs.encode(texts, pairs)
    s_train = PackedInputs(s_tok, max_len) if cfg.pack else s_inputs  # how training batches are built
    if (cfg.hidden_weight or cfg.attention_weight) and (s_items != t_items or not isinstance(teacher.inputs,
                                                                                               PlainInputs)):
        raise UserError("--hidden-weight / --attention-weight compare token by token: the student needs the "
                        "teacher's tokenizer and a plain (not prompt) teacher; use a preset or teacher-layers: student")
    copied = [int(x) for x in cfg.student.split(":", 1)[1].split(",")] if cfg.student.startswith(TEACHER_LAYERS) \
        else None
    layer_map = parse_layer_map(cfg.layer_map, student.config.num_layers, teacher.model.config.num_layers, copied)
    student.to(device)
    distiller = Distiller(cfg, teacher, student, layer_map)
    for m in distiller.modules():
        m.to(device)
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher.model))
    log(f"teacher {t_dir} ({n_t:,} parameters); student: {what} ({n_s:,} parameters); transfer set {len(texts):,} "
        f"texts ({len(extra):,} unlabelled); device {device}")
    atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    dev_eval = None
    results: dict = {"teacher": str(t_dir), "student": what, "student_parameters": n_s, "teacher_parameters": n_t}
    if dev is not None:
        t_dev = teacher.scores(dev.texts, dev.pairs)  # (N, C), once
        d_items = s_inputs.encode(dev.texts, dev.pairs)
        results["teacher_dev"] = float_metrics(t_dev, dev.y, teacher)
        dev_eval = lambda: compare(student, s_inputs, d_items, t_dev, dev.y, teacher, cfg, device)  # noqa: E731
        results["dev_step0"] = dev_eval()

    # The teacher is frozen and in eval mode (no dropout), so its logits for a text are the same at
    # every step: with logits the only thing compared, they are computed once, length-sorted, instead
    # of once per epoch inside the loop. The internal transfer terms need its states each step.
    per_step = distiller.hidden or distiller.attention  # the teacher's states, batch by batch
    labels_only = cfg.alpha == 0 and not per_step  # the teacher is not consulted at all
    t_logits = None
    if not per_step and not labels_only:
        t0 = time.perf_counter()

        def label() -> Tensor:
            with autocast(cfg.precision, device):
                return score_items(teacher.model, teacher.inputs, t_items, cfg.eval_batch_size, device)  # (N, C)

        if cfg.teacher_cache:
            key = cache_key(t_dir, t_items, resolve_precision(cfg.precision, device))
            t_logits = cached_logits(Path(cfg.teacher_cache), key, label, log)
        else:
            t_logits = label()
        log(f"teacher logits for the {len(texts):,} transfer texts in {time.perf_counter() - t0:.1f}s")

    def teacher_side(idx: list[int]) -> dict | Tensor | None:
        """What Distiller.loss takes from the teacher for these rows."""
        if per_step:
            return to_device(teacher.inputs.collate([t_items[i] for i in idx]), device)
        return None if labels_only else t_logits[idx].to(device)

    steps_per_epoch = math.ceil(len(texts) / cfg.batch_size)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    groups = [g for m in distiller.modules() for g in param_groups(m, cfg.lr, cfg.weight_decay)]
    params = [p for g in groups for p in g["params"]]
    opt = adamw(groups, cfg.lr)
    sched = warmup_linear(opt, round(cfg.warmup * total), total)
    scaler = grad_scaler(cfg.precision, device)
    keep = KeepBest("max")
    log_file = MetricsLog(out / "metrics.jsonl")
    if dev_eval is not None:
        log_file.write({"kind": "eval", "step": 0, **{f"dev_{k}": v for k, v in results["dev_step0"].items()}})
    g = torch.Generator().manual_seed(cfg.seed)  # batch order
    step, t0, best = 0, time.perf_counter(), {"step": 0, "dev": results.get("dev_step0", {})}
    for m in distiller.modules():
        m.train()
    while step < total:
        for idx in random_batches(len(texts), cfg.batch_size, g):
            s_batch = to_device(s_train.collate([s_items[i] for i in idx]), device)
            with autocast(cfg.precision, device):
                loss, parts = distiller.loss(s_batch, teacher_side(idx), y[idx].to(device), packed=cfg.pack)
            scaler.scale(loss).backward()
            norm = optimizer_step(opt, sched, scaler, params, cfg.clip)
            step += 1
            if step % cfg.log_every == 0 or step == total:
                rec = {"kind": "train", "step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0], "norm": norm,
                       **{k: float(v) for k, v in parts.items()}}
                log_file.write(rec)
                log(f"step {step}/{total} | loss {rec['loss']:.4f} | " + " | ".join(
                    f"{k} {float(v):.4f}" for k, v in parts.items()) + f" | norm {norm:.2f} | lr {rec['lr']:.2e}")
            at_check = step % cfg.eval_every == 0 if cfg.eval_every else step % steps_per_epoch == 0
            if at_check or step == total:
                if dev_eval is None:
                    student.save_pretrained(out / "model", tokenizer=s_tok, extra_files=mark)
                else:
                    d = dev_eval()
                    log_file.write({"kind": "eval", "step": step, **{f"dev_{k}": v for k, v in d.items()}})
                    log(f"eval step {step}: dev " + " ".join(f"{k} {v:.4f}" for k, v in d.items()))
                    metric = "accuracy" if "accuracy" in d else "pearson"
                    if keep.update(d[metric], step):
                        student.save_pretrained(out / "model", tokenizer=s_tok, extra_files=mark)
                        best = {"step": step, "dev": d}
                    student.train()
            if step >= total:
                break
    if total == 0:
        student.save_pretrained(out / "model", tokenizer=s_tok, extra_files=mark)
    results.update(dev=best["dev"], train={"steps": step, "seconds": round(time.perf_counter() - t0, 2),
                                           "best_step": best["step"], "device": str(device)})
    if test is not None:  # the kept student (best on dev), as predict will load it, never chosen on test
        kept = BertForSequenceClassification.from_pretrained(out / "model").to(device).eval()
        t_test = teacher.scores(test.texts, test.pairs)  # (N, C)
        results["teacher_test"] = float_metrics(t_test, test.y, teacher)
        results["test"] = compare(kept, s_inputs, s_inputs.encode(test.texts, test.pairs), t_test, test.y, teacher,
                                  cfg, device)
        log("test: student " + " ".join(f"{k} {v:.4f}" for k, v in results["test"].items())
            + " | teacher " + " ".join(f"{k} {v:.4f}" for k, v in results["teacher_test"].items()))
    if any(r.get("kind") == "train" for r in log_file.records):
        panels = {"loss": [("train:loss", "loss"), ("train:soft", "KL (soft)"), ("train:hard", "CE (hard)")]}
        if dev is not None:
            panels["dev"] = [("eval:dev_accuracy", "student accuracy"), ("eval:dev_agreement", "agreement w/ teacher")]
        plot_curves(log_file.records, out / "training_curve.png", panels, title="distill")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
    log(f"done: student in {out / 'model'}" + (f"; dev {best['dev']}" if dev is not None else ""))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main("python -m minibert.distill", run, argv, DistillConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
