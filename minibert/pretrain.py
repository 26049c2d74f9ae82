"""Pretrain BERT (masked LM + next-sentence prediction) on your own text.

    python -m minibert.pretrain                                    # tiny model, bundled corpus, ~3 min on 2 CPU cores
    python -m minibert.pretrain --corpus '../shared/data/corpus/*.txt' --preset mini --max-steps 1200
    python -m minibert.pretrain --out runs/pretrain --resume       # continue a stopped run exactly
    torchrun --nproc_per_node=2 -m minibert.pretrain ...           # DistributedDataParallel, one shard per rank

The output folder is a Hugging Face-format model folder (config.json, model.safetensors,
tokenizer files: `BertForPreTraining.from_pretrained(out)`, or any BERT library) plus
train_state.pt (everything --resume needs), metrics.jsonl, curves.png and best/ (the
checkpoint with the lowest held-out loss). Data handling is in minibert/pretraining_data.py.

Batches and DDP. --batch-size is per process and per micro-step; one optimizer step consumes
batch_size x world_size x grad_accum rows of the instance stream. Rank r reads rows r::world
of each micro-batch, and the loss of every micro-batch on every rank is scaled by its share
of the step's masked tokens (and rows, for NSP), so the gradient is exactly that of one big
batch: 2 processes x batch 8 train like 1 process x batch 16 (tests/test_pretrain.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import pretraining_data as pd
from .checkpoint import CheckpointError, atomic_write_text
from .model import ATTN_IMPLS, PRESETS, BertConfig, BertForPreTraining, sinusoidal_encoding
from .optim import build_optimizer, warmup_linear
from .text import CorpusError
from .tokenizer import Tokenizer
from .trainutil import (
    Dist,
    MetricsLog,
    StopRequest,
    init_distributed,
    load_train_state,
    parse_config,
    plot_pretrain_curves,
    rng_state,
    save_train_state,
    seed_everything,
    set_rng_state,
)

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "default_corpus.txt"


def _f(default, help: str, fixed: bool = False, **kw):
    """A config field. fixed: must be the same when a run is resumed (it shapes the model,
    the data or the optimisation)."""
    return field(default=default, metadata={"help": help, "fixed": fixed, **kw})


@dataclass
class PretrainConfig:
    # data
    corpus: list[str] = field(default_factory=list, metadata={"help": "text files, globs or folders; documents separated by blank lines (default: the bundled data/corpus/default_corpus.txt)", "fixed": True})
    tokenizer: Optional[str] = _f(None, "reuse this tokenizer (folder, tokenizer.json or vocab.txt) instead of training one on the corpus", True)
    vocab_size: int = _f(4096, "size of the WordPiece vocabulary trained on the corpus (without --tokenizer)", True)
    errors: str = _f("strict", "bytes that are not UTF-8: 'strict' stops with the file and byte offset, 'replace' uses U+FFFD", True, choices=["strict", "replace"])
    cache_dir: Optional[str] = _f(None, "where tokenized corpora are cached (default: $MINIBERT_CACHE or ~/.cache/minibert)")
    seq_len: int = _f(128, "tokens per instance, [CLS] and [SEP]s included", True)
    short_seq_prob: float = _f(0.1, "probability that a document's instances aim for a random shorter length", True)
    mlm_prob: float = _f(0.15, "fraction of the tokens chosen for prediction (80%% [MASK], 10%% random, 10%% unchanged)", True)
    whole_word_mask: bool = _f(False, "choose whole words (a token and its ## pieces) for masking", True)
    static_masking: bool = _f(False, "draw pairs and masks once and repeat them each epoch (default: fresh each epoch)", True)
    no_nsp: bool = _f(False, "no next-sentence prediction: one segment per instance, MLM loss only (RoBERTa-style)", True)
    pack: bool = _f(False, "lay several instances end to end in each row (block-diagonal attention) instead of padding each "
                    "to the longest: the same loss with fewer rows; --batch-size still counts instances", True)
    eval_fraction: float = _f(0.05, "fraction of the documents held out for evaluation", True)
    eval_size: int = _f(512, "held-out instances evaluated (at most)", True)
    # model
    preset: str = _f("tiny", "model size (Google's small-BERT grid)", True, choices=list(PRESETS))
    dropout: Optional[float] = _f(None, "dropout on hidden states and attention (default: the preset's 0.1)", True)
    position_init: str = _f("random", "initial learned position table: 'random' (BERT's N(0, 0.02)) or 'sinusoidal' "
                            "(the sinusoidal encoding scaled to the same std: nearby positions start out alike; still a standard BERT)",
                            True, choices=["random", "sinusoidal"])
    norm_position: str = _f("post", "'post': BERT's LayerNorm after each residual; 'pre': before (a deviation: stabler at high learning rates, "
                            "but other libraries load such a model as post-LN, i.e. wrongly)", True, choices=["post", "pre"])
    attn_impl: str = _f("sdpa", "attention backend, all the same function: 'sdpa' (torch's fused kernel), 'math' (the readable one), "
                        "'flex' (FlexAttention, with --compile), 'triton' (minibert's FlashAttention kernel, CUDA). flex and "
                        "triton apply no dropout to the attention probabilities", choices=list(ATTN_IMPLS))
    fused_kernels: bool = _f(False, "fused add+LayerNorm and bias+GELU (Triton kernels on CUDA) and the MLM decoder + loss "
                             "taken in chunks so the (masked tokens, vocab) logits are never stored (any device); the same function")
    # optimisation
    batch_size: int = _f(32, "rows per micro-batch, per process", True)
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step", True)
    max_steps: int = _f(600, "optimizer steps")
    lr: float = _f(2e-3, "peak learning rate (AdamW)", True)
    warmup: int = _f(60, "linear warmup steps, then linear decay to 0 at --max-steps", True)
    weight_decay: float = _f(0.01, "AdamW weight decay (none on biases and LayerNorm)", True)
    clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)", True)
    seed: int = _f(0, "seed for model init, data order, masks and dropout", True)
    # run
    out: str = _f("runs/pretrain", "output folder: Hugging Face model folder + train_state.pt, metrics.jsonl, curves.png, best/")
    resume: bool = _f(False, "continue the run saved in --out (model, optimizer, scheduler, RNG states, data position)")
    eval_only: bool = _f(False, "evaluate the model saved in --out on the held-out split, print and exit")
    eval_every: int = _f(100, "evaluate on the held-out split every this many steps (and at the end)")
    save_every: int = _f(100, "write a checkpoint every this many steps (and at the end, and on Ctrl-C)")
    log_every: int = _f(10, "print a log line every this many steps")
    device: str = _f("auto", "'cpu', 'cuda', 'cuda:1'... (auto: cuda when available)")
    threads: Optional[int] = _f(None, "CPU threads per process (default: torch's, one per core; on a busy shared machine 1 is often faster)")
    compile: bool = _f(False, "torch.compile the model (for GPUs: on 2 CPU cores a mini step was no faster, 460-518 vs 401-453 ms; benchmarks/RESULTS.md)")
    fp16: bool = _f(False, "CUDA: float16 autocast with a GradScaler instead of bfloat16", True)
    fp32: bool = _f(False, "CUDA: no autocast at all (default there: bfloat16)", True)
    bf16: bool = _f(False, "CPU: bfloat16 autocast for training steps (1.35x faster mini steps on a 2-core AVX512-BF16 EPYC, "
                    "with the float32 held-out curve step for step, benchmarks/pretrain_results.md; slower on CPUs without bf16 "
                    "instructions). Evaluation stays float32", True)
    tensorboard: bool = _f(False, "also log to <out>/tensorboard (needs the tensorboard package)")
    debug_nan_at_step: int = _f(0, "test hook: make the loss NaN at this step", hidden=True)

    def __post_init__(self):
        checks = [
            (self.seq_len >= 8, f"--seq-len must be at least 8, got {self.seq_len}"),
            (self.seq_len <= 512, f"--seq-len must be at most 512 (the position table), got {self.seq_len}"),
            (0 < self.mlm_prob < 1, f"--mlm-prob must be in (0, 1), got {self.mlm_prob}"),
            (0 <= self.short_seq_prob <= 1, f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}"),
            (0 < self.eval_fraction < 1, f"--eval-fraction must be in (0, 1), got {self.eval_fraction}"),
            (min(self.batch_size, self.grad_accum, self.max_steps, self.eval_every, self.save_every, self.log_every, self.eval_size) > 0,
             "--batch-size, --grad-accum, --max-steps, --eval-every, --save-every, --log-every and --eval-size must be positive"),
            (not (self.fp16 and self.fp32), "--fp16 and --fp32 exclude each other"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


# ----------------------------------------------------------------------------- set-up


@dataclass
class Data:
    tok: Tokenizer
    stream: pd.InstanceStream
    collate: pd.Collator
    eval_batches: list[dict]
    baseline_id: int  # the most frequent training token: the constant-guess MLM baseline


def prepare_data(cfg: PretrainConfig, tok: Optional[Tokenizer], log=print) -> Data:
    files = pd.resolve_paths(cfg.corpus or [DEFAULT_CORPUS])
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else pd.default_cache_dir()
    if tok is None:
        tok = pd.get_tokenizer(cfg.tokenizer, files, cfg.vocab_size, cache_dir, cfg.errors, log)
    cache = pd.build_token_cache([str(f) for f in files], tok, cache_dir, cfg.errors, log)
    train_docs, eval_docs = pd.split_documents(cache.n_docs, cfg.eval_fraction)
    vocab = pd.Vocab.from_tokenizer(tok)
    nsp = not cfg.no_nsp
    stream = pd.InstanceStream(cache, train_docs, cfg.seq_len, cfg.seed, cfg.short_seq_prob, nsp, cfg.static_masking)
    collate = pd.Collator(cache, vocab, cfg.seed, cfg.mlm_prob, cfg.whole_word_mask, nsp, pack_len=cfg.seq_len if cfg.pack else None)
    insts, keys = pd.eval_instances(cache, eval_docs, train_docs, cfg.seq_len, nsp, cfg.eval_size)
    # held-out masks come from a fixed seed, not --seed: every run is scored on the same positions
    eval_collate = pd.Collator(cache, vocab, pd.EVAL_SPLIT_SEED, cfg.mlm_prob, cfg.whole_word_mask, nsp)
    eval_batches = [eval_collate(insts[i : i + 64], keys[i : i + 64]) for i in range(0, len(insts), 64)]
    baseline_id = pd.most_frequent_token(cache, train_docs, vocab)
    log(
        f"data: {len(train_docs):,} training documents ({stream.epoch_size():,} instances in epoch 0), "
        f"{len(eval_docs):,} held out ({len(insts):,} instances evaluated)"
    )
    return Data(tok, stream, collate, eval_batches, baseline_id)


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def autocast_ctx(cfg: PretrainConfig, device: str, training: bool = True):
    if not device.startswith("cuda"):
        # CPU: float32 unless --bf16 (bf16 matmuls are fast only on CPUs with bf16 instructions).
        # Held-out scores are always float32 there, so a reloaded folder scores the same.
        return torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 and training else contextlib.nullcontext()
    if cfg.fp32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if cfg.fp16 else torch.bfloat16)


def rank_micro_batches(data: Data, cfg: PretrainConfig, dist: Dist) -> list[dict]:
    """This rank's micro-batches for one optimizer step: of each global micro-batch of
    batch_size x world rows, rows rank::world."""
    out = []
    for _ in range(cfg.grad_accum):
        rows, keys = data.stream.take(cfg.batch_size * dist.world)
        out.append(data.collate(rows[dist.rank :: dist.world], keys[dist.rank :: dist.world]))
    return out


def batch_counts(micro: list[dict]) -> torch.Tensor:
    """[masked tokens, instances, real tokens, rows] of a list of batches (packed or not)."""
    def counts(b: dict) -> list[float]:
        packed = "cls_index" in b
        n_inst = len(b["cls_index"]) if packed else len(b["labels"])
        n_tok = (b["doc_ids"] != 0).sum() if packed else b["attention_mask"].sum()
        return [float((b["labels"] != -100).sum()), float(n_inst), float(n_tok), float(len(b["input_ids"]))]
    return torch.tensor([counts(b) for b in micro]).sum(0)


def all_sum(x: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        torch.distributed.all_reduce(x)
    return x


def step_loss(out, batch: dict, n_masked: float, n_inst: float, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step loss, and its statistics.

    step loss = (sum of MLM cross-entropies over all masked tokens of the step) / n_masked
              + (sum of NSP cross-entropies over all instances of the step) / n_inst
    DDP averages gradients over ranks, so each rank's share is multiplied by world.
    """
    labels = batch["labels"]
    targets = labels[labels != -100]  # (N,), same order as out.mlm_logits
    mlm_sum, mlm_hits = mlm_sum_and_hits(out, targets)
    loss = mlm_sum / n_masked
    stats = [mlm_hits, torch.zeros(())]
    if "next_sentence_label" in batch:
        nsl = batch["next_sentence_label"]
        loss = loss + F.cross_entropy(out.nsp_logits.float(), nsl, reduction="sum") / n_inst
        stats[1] = (out.nsp_logits.argmax(-1) == nsl).sum()
    # stats: this share of the step loss (the shares add up to it over micro-batches and ranks),
    # MLM hits, NSP hits
    return loss * world, torch.stack([loss.detach().float().cpu(), *(s.float().cpu() for s in stats)])


def mlm_sum_and_hits(out, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed MLM cross-entropy over this batch's masked tokens and how many it got right.
    Sums, not means, so micro-batches with different numbers of masked tokens add up right.
    The model's own mean loss (fp32 under autocast) times the count: with or without
    fused_kernels, no second cross-entropy over the (N, V) logits."""
    if len(targets) == 0:  # a mean over no tokens is NaN; the sum is 0
        return torch.zeros((), device=targets.device), torch.zeros((), dtype=torch.long, device=targets.device)
    return out.mlm_loss.float() * len(targets), (out.mlm_predictions == targets).sum()


@torch.no_grad()
def evaluate(model: BertForPreTraining, batches: list[dict], baseline_id: int, device: str, amp=contextlib.nullcontext()) -> dict:
    """Held-out MLM loss / accuracy / perplexity, NSP accuracy and the most-frequent-token baseline."""
    was_training = model.training
    model.eval()
    s = torch.zeros(6, dtype=torch.float64)  # mlm loss sum, mlm correct, masked, baseline hits, nsp loss sum, nsp correct
    rows = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with amp:
            out = model(**batch)
        targets = batch["labels"][batch["labels"] != -100]
        mlm_sum, mlm_hits = mlm_sum_and_hits(out, targets)
        s[0] += mlm_sum.item()
        s[1] += mlm_hits.item()
        s[2] += len(targets)
        s[3] += (targets == baseline_id).sum().item()
        if "next_sentence_label" in batch:
            s[4] += F.cross_entropy(out.nsp_logits.float(), batch["next_sentence_label"], reduction="sum").item()
            s[5] += (out.nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum().item()
            rows += len(batch["next_sentence_label"])
    model.train(was_training)
    mlm_loss = s[0].item() / s[2].item()
    res = {"mlm_loss": mlm_loss, "mlm_acc": s[1].item() / s[2].item(), "ppl": math.exp(min(mlm_loss, 50.0)), "baseline_acc": s[3].item() / s[2].item()}
    res["nsp_acc"] = s[5].item() / rows if rows else None
    res["loss"] = mlm_loss + (s[4].item() / rows if rows else 0.0)
    return res


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: "Run", cfg: PretrainConfig) -> None:
    """train_state.pt (the whole state in one atomically written file: resume reads only this),
    then the Hugging Face model folder. Every rank takes part (their RNG states are gathered)."""
    rngs = [rng_state()]
    if run.dist.enabled:
        rngs = [None] * run.dist.world
        torch.distributed.all_gather_object(rngs, rng_state())
    if not run.dist.main:
        return
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rngs,  # one entry per rank
        "data": run.data.stream.state_dict(),  # (epoch, index) of the next training row
        "step": run.step,
        "best_loss": run.best_loss,
        "clock": list(run.elapsed()),
        "world": run.dist.world,
        "config": asdict(cfg),
    }
    save_train_state(run.out / "train_state.pt", state)
    run.model.save_pretrained(run.out)


def load_resume_state(cfg: PretrainConfig, out: Path) -> dict:
    """Read <out>/train_state.pt and check that the run it holds is the one asked for: resuming
    with other data, model or optimisation settings would silently train something else."""
    path = out / "train_state.pt"
    if not path.exists():
        raise CheckpointError(f"--resume: {path} not found (nothing to resume; start without --resume)")
    try:
        state = load_train_state(path)
    except Exception as e:  # truncated file, not a torch file, disallowed pickle content...
        raise CheckpointError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None
    saved, now = state["config"], asdict(cfg)
    diff = [f"--{f.name.replace('_', '-')}: saved {saved.get(f.name)!r}, now {now[f.name]!r}"
            for f in fields(cfg) if f.metadata.get("fixed") and saved.get(f.name) != now[f.name]]
    if diff:
        raise ValueError(f"--resume: these settings differ from the run saved in {out}:\n  " + "\n  ".join(diff))
    return state


@dataclass
class Run:
    """Everything the training loop touches."""

    model: BertForPreTraining
    net: torch.nn.Module  # the model as trained: maybe compiled, maybe DDP-wrapped
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: Data
    dist: Dist
    device: str
    amp: contextlib.AbstractContextManager
    out: Path
    metrics: Optional[MetricsLog]  # rank 0 only
    tb: object
    step: int = 0
    best_loss: float = float("inf")
    clock: list = field(default_factory=lambda: [0.0, 0.0])  # wall and CPU seconds of earlier sessions of this run
    t_start: tuple = field(default_factory=lambda: (time.time(), time.process_time()))

    def elapsed(self) -> tuple[float, float]:
        """(wall, process CPU) seconds spent training, over every session of the run. CPU time
        says how long the run would take on dedicated cores when the machine is shared."""
        return self.clock[0] + time.time() - self.t_start[0], self.clock[1] + time.process_time() - self.t_start[1]


def setup(cfg: PretrainConfig, device: str, dist: Dist, log) -> Run:
    out = Path(cfg.out)
    state = load_resume_state(cfg, out) if cfg.resume else None
    if state is None and dist.main and (out / "train_state.pt").exists():
        log(f"note: starting a new run in {out}, replacing the one there (use --resume to continue it)")
    # rank 0 trains the tokenizer and fills the token cache; the others then find them there
    tok = Tokenizer.from_file(out) if state is not None else None
    if dist.enabled and not dist.main:
        torch.distributed.barrier()
    data = prepare_data(cfg, tok, log)
    if dist.enabled and dist.main:
        torch.distributed.barrier()

    seed_everything(cfg.seed)  # the same initial weights on every rank
    overrides = {"norm_position": cfg.norm_position, "attn_impl": cfg.attn_impl, "fused_kernels": cfg.fused_kernels}
    if cfg.dropout is not None:
        overrides.update(dropout=cfg.dropout, attention_dropout=cfg.dropout)
    model = BertForPreTraining(BertConfig.from_preset(cfg.preset, vocab_size=data.tok.vocab_size, **overrides)).to(device)
    if cfg.position_init == "sinusoidal":
        init_positions_sinusoidal(model)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = warmup_linear(opt, cfg.warmup, cfg.max_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.fp16 and device.startswith("cuda"))
    seed_everything(cfg.seed + dist.rank)  # then different dropout draws on each rank
    step, best_loss, clock = 0, float("inf"), [0.0, 0.0]
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        data.stream.load_state_dict(state["data"])
        step, best_loss, clock = int(state["step"]), float(state["best_loss"]), list(state["clock"])
        if state["world"] == dist.world:
            set_rng_state(state["rng"][dist.rank])
        else:
            log(f"note: resuming a {state['world']}-process run with {dist.world}: dropout draws will differ")
        log(f"resumed from {out / 'train_state.pt'} at step {step}")
    elif dist.main:
        data.tok.save(out)
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    net = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        # without NSP the pooler and NSP head get no gradient; DDP must be told to expect that
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=cfg.no_nsp)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None) if dist.main else None
    tb = open_tensorboard(out, cfg.tensorboard) if dist.main else None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: preset {cfg.preset}, {n_params / 1e6:.2f}M parameters, vocab {data.tok.vocab_size}, "
        f"device {device}, {dist.world} process(es), global batch {cfg.batch_size * cfg.grad_accum * dist.world}")
    return Run(model, net, opt, sched, scaler, data, dist, device, autocast_ctx(cfg, device), out, metrics, tb, step, best_loss, clock)


def init_positions_sinusoidal(model: BertForPreTraining) -> None:
    """Start the learned position table from the sinusoidal encoding, scaled to BERT's init std.

    Randomly initialised positions carry no notion of "near": the model has to learn which
    positions neighbour each other before attention can use local context. Sinusoids give
    that from step 0. Only the starting point changes; the table is trained as usual, so the
    model is a standard BERT that any library loads.
    """
    table = model.bert.embeddings.pos.weight  # (max_position, H)
    pe = sinusoidal_encoding(table.size(0), table.size(1))  # (max_position, H), entries in [-1, 1]
    with torch.no_grad():
        table.copy_(pe * (model.config.initializer_range / pe.std()))


def evaluate_and_keep_best(run: Run, cfg: PretrainConfig) -> dict:
    """Score the held-out split, log it, redraw curves.png, and save best/ when the loss improved."""
    res = {"kind": "eval", "step": run.step, **evaluate(run.model, run.data.eval_batches, run.data.baseline_id, run.device, autocast_ctx(cfg, run.device, training=False))}
    res["time_s"], res["cpu_s"] = run.elapsed()
    run.metrics.write(res)
    log_scalars(run.tb, res)
    plot_pretrain_curves(run.metrics.records, run.out / "curves.png", f"preset {cfg.preset}, seq {cfg.seq_len}: {run.out}")
    if res["loss"] < run.best_loss:
        run.best_loss = res["loss"]
        run.model.save_pretrained(run.out / "best", tokenizer=run.data.tok)
        atomic_write_text(run.out / "best" / "eval.json", json.dumps(res, indent=2) + "\n")
    return res


# ----------------------------------------------------------------------------- training


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: PretrainConfig) -> dict:
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device == "cuda" and dist.enabled:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    log = print if dist.main else (lambda *a, **k: None)
    try:
        run = setup(cfg, device, dist, log)
        return train_loop(run, cfg, log)
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def train_loop(run: Run, cfg: PretrainConfig, log) -> dict:
    res, dist = {}, run.dist
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not dist.main, dynamic_ncols=True, mininterval=1.0)
    with StopRequest() as stop:
        while run.step < cfg.max_steps:
            t0 = time.time()
            micro = rank_micro_batches(run.data, cfg, dist)
            # the step's masked tokens, rows and real tokens over every micro-batch and rank
            n_masked, n_inst, n_tok, n_rows = all_sum(batch_counts(micro), dist).tolist()
            sums = torch.zeros(3)  # loss, MLM hits, NSP hits
            for k, batch in enumerate(micro):
                batch = {key: v.to(run.device, non_blocking=True) for key, v in batch.items()}
                no_sync = dist.enabled and k < len(micro) - 1  # all-reduce the gradients once, after the last micro-batch
                with run.net.no_sync() if no_sync else contextlib.nullcontext(), run.amp:
                    loss, stats = step_loss(run.net(**batch), batch, n_masked, n_inst, dist.world)
                    if run.step + 1 == cfg.debug_nan_at_step:
                        loss, stats = loss * float("nan"), stats * float("nan")
                run.scaler.scale(loss).backward()
                sums += stats
            loss_v, mlm_hits, nsp_hits = all_sum(sums, dist).tolist()
            if not math.isfinite(loss_v):
                raise NonFiniteLoss(f"step {run.step + 1}: the loss is {loss_v} (not finite); stopped without updating. "
                                    f"The last good checkpoint is in {run.out} (train_state.pt)")
            run.scaler.unscale_(run.opt)
            norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip if cfg.clip > 0 else float("inf")).item()
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
            run.sched.step()
            run.step += 1
            dt = time.time() - t0
            rec = {"kind": "train", "step": run.step, "loss": loss_v, "mlm_acc": mlm_hits / n_masked, "nsp_acc": None if cfg.no_nsp else nsp_hits / n_inst,
                   "norm": norm, "lr": run.sched.get_last_lr()[0], "ms": 1000 * dt, "tok_s": n_tok / dt, "rows": int(n_rows)}
            rec["time_s"], rec["cpu_s"] = run.elapsed()
            if dist.main:
                bar.update(1)
                bar.set_postfix_str(f"loss {loss_v:.3f} mlm {rec['mlm_acc']:.3f} nsp {rec['nsp_acc'] or 0:.3f} lr {rec['lr']:.1e} {rec['tok_s']:.0f} tok/s")
                if run.step % cfg.log_every == 0 or run.step == 1:
                    run.metrics.write(rec)
                    log_scalars(run.tb, rec)
                    bar.write(format_log(rec))
                if run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
                    res = evaluate_and_keep_best(run, cfg)
                    bar.write(format_eval(res))
            stopping = all_sum(torch.tensor(float(stop.requested)), dist).item() > 0  # every rank stops together
            if run.step % cfg.save_every == 0 or run.step == cfg.max_steps or stopping:
                save_checkpoint(run, cfg)
            if stopping:
                bar.close()
                log(f"stopped at step {run.step}; checkpoint saved in {run.out} (continue with --resume)")
                raise KeyboardInterrupt
    bar.close()
    return res


# ----------------------------------------------------------------------------- logging


def format_log(r: dict) -> str:
    nsp = f" | nsp {r['nsp_acc']:.3f}" if r["nsp_acc"] is not None else ""
    return (f"step {r['step']:5d} | loss {r['loss']:.4f} | mlm {r['mlm_acc']:.3f}{nsp} | norm {r['norm']:.2f} | "
            f"lr {r['lr']:.2e} | {r['ms']:.0f} ms | {r['tok_s']:.0f} tok/s")


def format_eval(r: dict, tok: Optional[Tokenizer] = None) -> str:
    nsp = f" | NSP acc {r['nsp_acc']:.3f}" if r.get("nsp_acc") is not None else ""
    return (f"eval step {r['step']} | held-out MLM loss {r['mlm_loss']:.4f} | ppl {r['ppl']:.1f} | "
            f"MLM acc {r['mlm_acc']:.3f} (most-frequent-token baseline {r['baseline_acc']:.3f}){nsp}")


def open_tensorboard(out: Path, wanted: bool):
    if not wanted:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: --tensorboard needs the tensorboard package (pip install tensorboard); logging to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(out / "tensorboard"))


def log_scalars(tb, rec: dict) -> None:
    if tb is None:
        return
    for k, v in rec.items():
        if isinstance(v, (int, float)) and k != "step":
            tb.add_scalar(f"{rec['kind']}/{k}", v, rec["step"])
    tb.flush()


def eval_saved(cfg: PretrainConfig) -> dict:
    """--eval-only: score the model folder --out on the held-out split of --corpus."""
    out = Path(cfg.out)
    model = BertForPreTraining.from_pretrained(out)
    data = prepare_data(cfg, Tokenizer.from_file(out))
    device = pick_device(cfg.device)
    res = {"step": "saved", **evaluate(model.to(device), data.eval_batches, data.baseline_id, device, autocast_ctx(cfg, device, training=False))}
    print(format_eval(res))
    return res


def main(argv: Optional[Sequence[str]] = None) -> int:
    prog = "python -m minibert.pretrain"
    try:
        cfg = parse_config(PretrainConfig, argv, prog, __doc__.split("\n\n")[0])
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        if cfg.eval_only:
            eval_saved(cfg)
            return 0
        res = train(cfg)
    except (CorpusError, CheckpointError, ValueError, NonFiniteLoss) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if res:
        nsp = f", NSP accuracy {res['nsp_acc']:.3f}" if res.get("nsp_acc") is not None else ""
        print(f"done: held-out MLM accuracy {res['mlm_acc']:.3f} vs most-frequent-token baseline {res['baseline_acc']:.3f}"
              f" ({res['mlm_acc'] / max(res['baseline_acc'], 1e-9):.1f}x){nsp}; {res['time_s'] / 60:.1f} min of training"
              f" ({res['cpu_s'] / 60:.1f} CPU-min); model in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
