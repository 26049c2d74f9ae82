"""Pretrain BERT (masked LM, and next-sentence prediction with --nsp) on your own text.

    python -m minibert.pretrain                                   # tiny model, bundled text, recipe 'budget'
    python -m minibert.pretrain --recipe bert                     # the original BERT recipe (NSP, 15% masking)
    python -m minibert.pretrain --corpus 'my_texts/*.txt' --preset mini --max-steps 1200
    python -m minibert.pretrain --corpus 'my_texts/*.txt' --time-budget 60   # the best model in an hour (preset mini)
    python -m minibert.pretrain --init runs/pretrain --corpus reviews.txt --out runs/dapt  # continue on new text
    python -m minibert.pretrain --out runs/pretrain --resume      # continue a stopped run exactly
    torchrun --nproc_per_node=2 -m minibert.pretrain ...          # DistributedDataParallel, one shard per rank

The output is a run folder: model/ (a Hugging Face-format model folder: config.json,
model.safetensors, tokenizer files, and pretraining.json, which tells finetune the model was
pretrained here; `BertForPreTraining.from_pretrained(out)` or `finetune --init out` find it
there), best/ (the model with the lowest held-out loss, with its
eval.json), train_state.pt (everything --resume needs), metrics.jsonl, curves.png and
run_config.json. A folder that already holds a model or a run is only reused with --resume
(continue it) or --overwrite (replace it). Data handling is in minibert/pretraining_data.py,
what every job shares (CLI, device, precision, output folder, resume) in minibert/toolkit.py.

The loss is the model's own: BertForPreTraining returns the summed MLM and NSP cross-entropies
and their counts, and a step's loss is (MLM sum over the step's masked tokens) / (their number)
+ (NSP sum over its instances) / (their number), whatever the micro-batches and ranks.

Batches and DDP. --batch-size is per process and per micro-step; one optimizer step consumes
batch_size x world_size x grad_accum rows of the instance stream. Rank r reads rows r::world
of each micro-batch, and each rank's share of the loss is divided by the whole step's counts,
so the gradient is exactly that of one big batch: 2 processes x batch 8 train like
1 process x batch 16 (tests/test_pretrain.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from . import pretraining_data as pd
from .checkpoint import (MODEL_FILES, CheckpointError, atomic_write_text, here_mark, pretrained_here,
                         resolve_model_dir)
from .model import ATTN_IMPLS, PRESETS, BertConfig, BertForPreTraining, sinusoidal_encoding
from .optim import build_optimizer, warmup_linear, warmup_linear_by_time
from .tokenizer import Tokenizer
from .toolkit import (
    Dist,
    KeepBest,
    MetricsLog,
    RunOptions,
    StopRequest,
    UserError,
    autocast,
    check_resume,
    cli_main,
    cpu_has_bf16,
    field,
    grad_scaler,
    init_distributed,
    load_train_state,
    log_scalars,
    open_tensorboard,
    optimizer_step,
    pick_device,
    plot_curves,
    prepare_output,
    resolve_attention,
    resolve_precision,
    rng_state,
    save_train_state,
    seed_everything,
    set_rng_state,
    set_threads,
)

_DATA = Path(__file__).resolve().parent.parent / "data"
# the bundled text: invented documents of eight kinds, and invented review pages (data/README.md)
DEFAULT_CORPUS = [_DATA / "corpus" / "default_corpus.txt", _DATA / "reviews" / "review_pages.txt"]

# What a recipe sets: how a small budget of compute is spent. A flag given explicitly wins.
# 'budget' is what benchmarks/pretrain_results.md measured to transfer best for a tiny model in
# a few CPU minutes: no NSP (its loss and its 128-token pairs cost compute and teach the
# pooler, not the words), 40% masking (Wettig et al. 2023: more predictions per step), 64-token
# rows, dropout 0 (a tiny model's few minutes cannot overfit; wider presets: default_dropout),
# sinusoidal start for the learned position table, and 2,400 steps, because before about 1,000
# steps a tiny model only predicts frequent tokens and fine-tunes no better than random weights.
# 'bert' is the original recipe (Devlin et al. 2019: NSP, 15% masking, 128 tokens, the preset's
# dropout, N(0, 0.02) positions) at the former step count. Both train the same standard BERT architecture.
LR, INIT_LR = 2e-3, 5e-4  # peak AdamW rate from random weights / when --init continues a trained model
# Wider than tiny, post-LN BERT diverged at 2e-3 (benchmarks/pretrain_results.md, "What else was
# tried"); the mini hour of the fourth round trained smoothly at 1e-3. At width 512 (the small
# preset) 1e-3 held the model on the frequent-token plateau for a whole hour, while 5e-4 left it
# by step 2,000 (eleventh and twelfth rounds): the wider the post-LN model, the lower the rate it takes.
WIDE_LR, WIDER_LR = 1e-3, 5e-4  # hidden <= 256 / wider
TINY_WIDTH = 128  # the tiny preset's hidden size: up to it, the defaults below are those tiny was measured with
SMALL_VOCAB, WIDE_VOCAB = 4096, 16384  # WordPiece pieces for hidden <= TINY_WIDTH / wider (default_vocab_size)
WIDE_DROPOUT = 0.1  # the budget recipe's dropout wider than TINY_WIDTH (default_dropout)
WEIGHT_DECAY, WIDE_WEIGHT_DECAY = 0.01, 0.1  # BERT's / the budget recipe's wider than TINY_WIDTH (default_weight_decay)


def default_lr(hidden_size: int, init: bool) -> float:
    """Peak AdamW rate when --lr is not given."""
    if init:
        return INIT_LR
    return LR if hidden_size <= TINY_WIDTH else WIDE_LR if hidden_size <= 256 else WIDER_LR


def default_vocab_size(hidden_size: int) -> int:
    """WordPiece pieces to train when --vocab-size is not given. Width 128 and under: 4,096, since
    there the V-wide MLM decoder is most of a step, and 16,384 pieces cost the tiny model 2.7x its
    steps and left it on the frequent-token plateau (benchmarks/pretrain_results.md, sixth round).
    Wider: 16,384, which keeps four in five words of review text whole (4,096: two in three) for
    1.4x the mini step, and fine-tuned better on every task measured (thirteenth round)."""
    return SMALL_VOCAB if hidden_size <= TINY_WIDTH else WIDE_VOCAB


def default_dropout(hidden_size: int) -> float:
    """The budget recipe's dropout when --dropout is not given. Width 128 and under: 0, the
    recipe's own: the tiny preset's few minutes were measured without it (first to third rounds).
    Wider, 0.1: the mini hour reads a corpus of 1.5 M words some 16 times; without dropout its
    training loss ended 0.71 below its held-out loss (with 0.1: 0.28), and with 0.1 it ran 18%
    fewer steps yet fine-tuned better on SST-2's 4,000 rows (78.3 against 76.7; random weights
    74.1), full set (83.5 against 82.95) and wordnet (71.9 against 70.4), worse on fortunes (65.1
    against 67.1) (benchmarks/pretrain_results.md, fourteenth round).
    A budget that reads its text about once cannot memorise it: --dropout 0 buys back the steps."""
    return RECIPES["budget"]["dropout"] if hidden_size <= TINY_WIDTH else WIDE_DROPOUT


def default_weight_decay(recipe: str, hidden_size: int, init: bool) -> float:
    """AdamW's weight decay when --weight-decay is not given. BERT's 0.01, except for the budget
    recipe from random weights wider than TINY_WIDTH: 0.1. The mini hour rereads its corpus a dozen
    times; over two hours at each decay, 0.1 fine-tuned level on SST-2 and better on wordnet, the
    task no recipe was chosen on, with a lower held-out loss (benchmarks/pretrain_results.md,
    twenty-seventh and twenty-eighth rounds). A decay costs nothing per step. The tiny preset's
    minutes and continued pretraining (--init) were not measured with it."""
    return WIDE_WEIGHT_DECAY if recipe == "budget" and hidden_size > TINY_WIDTH and not init else WEIGHT_DECAY


# An hour or more of --time-budget gets the mini preset when --preset is not given: on 2 CPU cores
# the mini hour fine-tuned better than the tiny hour on SST-2 (4,000 rows: +1.3 over random weights
# against -1.6; full set: +3.1 against +2.3; fourth round). Under an hour only tiny was measured,
# and mini takes ~5x tiny's time per step, so it stays the default there.
MINI_FROM_MINUTES = 60
RECIPES = {
    "budget": dict(nsp=False, mlm_prob=0.4, seq_len=64, dropout=0.0, position_init="sinusoidal",
                   max_steps=2400, warmup=240),
    "bert": dict(nsp=True, mlm_prob=0.15, seq_len=128, dropout=None, position_init="random",
                 max_steps=600, warmup=60),
}


@dataclass
class PretrainConfig(RunOptions):
    # data
    corpus: list[str] = field([], "text files, globs or folders; documents separated by blank lines (default: the "
                              "bundled data/corpus/default_corpus.txt and data/reviews/review_pages.txt). --resume "
                              "checks their content, not their names")
    recipe: str = field("budget", "defaults for --nsp, --mlm-prob, --seq-len, --dropout, --weight-decay, "
                        "--position-init, --max-steps and --warmup (a flag given explicitly wins). 'budget': no NSP, "
                        "40%% masking, 64 tokens, dropout 0 and weight decay 0.01 (both 0.1 wider than tiny), "
                        "sinusoidal position start, 2400 steps, warmup 240; with "
                        "--time-budget the same settings over the budget instead of the steps (the recipe that "
                        "transferred best from a few CPU minutes; see benchmarks/pretrain_results.md). 'bert': the "
                        "original BERT recipe: NSP, 15%% masking, 128 tokens, the preset's dropout, weight decay "
                        "0.01, N(0, 0.02) positions, 600 steps, warmup 60", fixed=True, choices=list(RECIPES))
    tokenizer: Optional[str] = field(None, "reuse this tokenizer (folder, tokenizer.json or vocab.txt) instead of "
                                     "training one on the corpus")
    vocab_size: Optional[int] = field(None, "size of the WordPiece vocabulary trained on the corpus (without "
                                      "--tokenizer; default: 4,096 pieces for presets of width 128 or less, "
                                      "16,384 for wider ones)", fixed=True)
    errors: str = field("strict", "bytes that are not UTF-8: 'strict' stops with the file and byte offset, 'replace' "
                        "uses U+FFFD", fixed=True, choices=["strict", "replace"])
    cache_dir: Optional[str] = field(None, "where tokenized corpora are cached (default: $MINIBERT_CACHE or "
                                     "~/.cache/minibert)")
    seq_len: Optional[int] = field(None, "tokens per instance, [CLS] and [SEP]s included (default: by --recipe)",
                                   fixed=True)
    short_seq_prob: float = field(0.1, "probability that a document's instances aim for a random shorter length",
                                  fixed=True)
    mlm_prob: Optional[float] = field(None, "fraction of the tokens chosen for prediction (80%% [MASK], 10%% "
                                      "random, 10%% unchanged) (default: by --recipe)", fixed=True)
    whole_word_mask: bool = field(False, "choose whole words (a token and its ## pieces) for masking", fixed=True)
    static_masking: bool = field(False, "draw pairs and masks once and repeat them each epoch (default: fresh each "
                                 "epoch)", fixed=True)
    nsp: bool = field(False, "train next-sentence prediction too: sentence pairs, the NSP head and the pooler "
                      "(default: by --recipe)", fixed=True)
    no_nsp: bool = field(False, "no next-sentence prediction: one segment per instance, MLM loss only (RoBERTa-style; "
                         "default: by --recipe)", fixed=True)
    pack: bool = field(False, "lay several instances end to end in each row (block-diagonal attention) instead of "
                       "padding each to the longest: the same loss with fewer rows; --batch-size still counts "
                       "instances", fixed=True)
    eval_fraction: float = field(0.05, "fraction of the documents held out for evaluation", fixed=True)
    eval_size: int = field(512, "held-out instances evaluated (at most)", fixed=True)
    # model
    init: Optional[str] = field(None, "continue pretraining this model (domain-adaptive pretraining): a model or run "
                                "folder with a masked-LM head (a minibert pretraining run, or a Hugging Face "
                                "BertForPreTraining / BertForMaskedLM folder). Its architecture and tokenizer are "
                                "used: --preset, --vocab-size, --tokenizer, --position-init and --norm-position do "
                                "not apply", fixed=True)
    preset: Optional[str] = field(None, "model size (Google's small-BERT grid) (default: tiny; mini with the "
                                  f"budget recipe and a --time-budget of {MINI_FROM_MINUTES} minutes or more)",
                                  fixed=True, choices=list(PRESETS))
    dropout: Optional[float] = field(None, "dropout on hidden states and attention (default: by --recipe; recipe "
                                     "budget: 0 at width 128 or less and with --init, 0.1 wider, where an hour "
                                     "rereads a small corpus many times; recipe bert: the preset's or --init's)",
                                     fixed=True)
    position_init: Optional[str] = field(None, "initial learned position table: 'random' (BERT's N(0, 0.02)) or "
                                         "'sinusoidal' (the sinusoidal encoding scaled to the same std: nearby "
                                         "positions start out alike; still a standard BERT) (default: by --recipe)",
                                         fixed=True, choices=["random", "sinusoidal"])
    norm_position: str = field("post", "'post': BERT's LayerNorm after each residual; 'pre': before (a deviation: "
                               "stabler at high learning rates, but other libraries load such a model as post-LN, "
                               "i.e. wrongly)", fixed=True, choices=["post", "pre"])
    attn_impl: str = field("auto", "attention backend, all the same function: 'sdpa' (torch's fused kernel), 'math' "
                           "(the readable one), 'flex' (FlexAttention, with --compile), 'triton' (minibert's "
                           "FlashAttention kernel, CUDA); 'auto': math on the CPU under bf16 up to --seq-len 128, "
                           "where torch's fused kernel is the slower, else sdpa. flex and triton apply no dropout "
                           "to the attention probabilities", choices=["auto", *ATTN_IMPLS])
    fused_kernels: bool = field(False, "fused add+LayerNorm and bias+GELU (Triton kernels on CUDA) and the MLM "
                                "decoder + loss taken in chunks so the (masked tokens, vocab) logits are never stored "
                                "(any device); the same function")
    # optimisation
    batch_size: int = field(32, "rows per micro-batch, per process (--resume checks the global batch: processes x "
                            "--batch-size x --grad-accum)")
    grad_accum: int = field(1, "micro-batches accumulated per optimizer step")
    max_steps: Optional[int] = field(None, "optimizer steps (ignored with --time-budget) (default: by --recipe)",
                                     fixed=True)
    time_budget: Optional[float] = field(None, "minutes of training (wall clock, evaluations included): warmup and "
                                         "the linear decay to 0 follow elapsed time instead of steps, so the run "
                                         "ends at the budget with the learning rate at 0. Not reproducible step for "
                                         "step: the schedule depends on the machine's speed. Without --preset, "
                                         f"a budget of {MINI_FROM_MINUTES} minutes or more trains the mini preset "
                                         "(wider features that fine-tune better), a shorter one the tiny preset "
                                         "(more steps)", fixed=True)
    lr: Optional[float] = field(None, f"peak learning rate (AdamW) (default: {LR:g} for the tiny preset, "
                                f"{WIDE_LR:g} up to width 256, {WIDER_LR:g} wider: the rates at which post-LN BERT "
                                "left the frequent-token plateau at those widths; with --init "
                                f"{INIT_LR:g}: the weights are already trained, and a from-scratch rate undoes part "
                                "of it)", fixed=True)
    warmup: Optional[int] = field(None, "linear warmup steps, then linear decay to 0 at --max-steps (default: by "
                                  "--recipe; 10%% of --max-steps when that is given alone)", fixed=True)
    warmup_fraction: float = field(0.1, "with --time-budget: the share of the budget spent in linear warmup",
                                   fixed=True)
    weight_decay: Optional[float] = field(None, "AdamW weight decay, none on biases and LayerNorm (default: "
                                          f"{WIDE_WEIGHT_DECAY:g} for --recipe budget wider than the tiny preset, "
                                          f"else {WEIGHT_DECAY:g}, BERT's; with --init {WEIGHT_DECAY:g})", fixed=True)
    clip: float = field(1.0, "clip the gradient norm to this (0: no clipping)", fixed=True)
    # run
    out: str = field("runs/pretrain", "run folder: model/, best/, train_state.pt, metrics.jsonl, curves.png, "
                     "run_config.json")
    precision: str = field("auto", "arithmetic of the training steps: fp32; bf16 (bfloat16 autocast, weights and "
                           "optimizer state stay fp32); fp16 (float16 autocast with a loss scaler, GPUs only). auto: "
                           "bf16 on CUDA, and with --time-budget also on CPUs with bfloat16 instructions "
                           "(AVX512-BF16, AMX: more steps in the same minutes); fp32 otherwise, so --max-steps runs "
                           "reproduce across CPUs. Held-out evaluation is always fp32. Replaces the former "
                           "--bf16 / --fp16 / --fp32 switches", fixed=True, choices=("auto", "fp32", "bf16", "fp16"))
    eval_only: bool = field(False, "evaluate the model saved in --out on the held-out split, print and exit")
    eval_every: int = field(100, "evaluate on the held-out split every this many steps (and at the end)")
    save_every: int = field(100, "write a checkpoint every this many steps (and at the end, and on Ctrl-C)")
    debug_nan_at_step: int = field(0, "test hook: make the loss NaN at this step", hidden=True)

    def __post_init__(self):
        self.apply_recipe()
        positive = ("batch_size", "grad_accum", "max_steps", "eval_every", "save_every", "log_every", "eval_size")
        not_positive = ", ".join(f"--{k.replace('_', '-')} {getattr(self, k)}"
                                 for k in positive if getattr(self, k) <= 0)
        checks = [
            (8 <= self.seq_len <= 512, f"--seq-len must be in [8, 512] (512: the position table), got {self.seq_len}"),
            (0 < self.mlm_prob < 1, f"--mlm-prob must be in (0, 1), got {self.mlm_prob}"),
            (0 <= self.short_seq_prob <= 1, f"--short-seq-prob must be in [0, 1], got {self.short_seq_prob}"),
            (0 < self.eval_fraction < 1, f"--eval-fraction must be in (0, 1), got {self.eval_fraction}"),
            (not not_positive, f"{', '.join('--' + k.replace('_', '-') for k in positive)} must be positive; got "
                               f"{not_positive}"),
            (self.time_budget is None or self.time_budget > 0,
             f"--time-budget must be positive, got {self.time_budget}"),
            (0 <= self.warmup_fraction < 1, f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}"),
            (math.isfinite(self.lr) and self.lr >= 0, f"--lr must be >= 0, got {self.lr}"),
            (min(self.warmup, self.weight_decay, self.clip) >= 0, f"--warmup, --weight-decay and --clip must be >= 0; "
             f"got {self.warmup}, {self.weight_decay}, {self.clip}"),
            (self.dropout is None or 0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}"),
            (not (self.init and self.tokenizer), "--init brings its own tokenizer: drop --tokenizer"),
            (not self.cache_dir or not Path(self.cache_dir).exists() or Path(self.cache_dir).is_dir(),
             f"--cache-dir {self.cache_dir}: a file, not a folder"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)

    def apply_recipe(self):
        """Fill the fields left at None from --recipe; idempotent, so a saved run_config.json
        (already filled) reads back the same."""
        if self.nsp and self.no_nsp:
            raise UserError("--nsp and --no-nsp contradict each other: give one")
        recipe = RECIPES[self.recipe]
        if self.warmup is None and self.max_steps is not None:
            # --max-steps alone keeps the recipe's shape (10% warmup): its fixed 240 steps of
            # warmup would never end in a shorter run, and the rate would never decay
            self.warmup = round(self.max_steps * recipe["warmup"] / recipe["max_steps"])
        for name, value in recipe.items():
            if name not in ("nsp", "dropout") and getattr(self, name) is None:
                setattr(self, name, value)
        if self.preset is None:  # --init brings its own architecture; the preset is then unused
            long_budget = self.recipe == "budget" and (self.time_budget or 0) >= MINI_FROM_MINUTES
            self.preset = "mini" if long_budget and not self.init else "tiny"
        if self.dropout is None and recipe["dropout"] is not None:  # recipe bert: the preset's or --init's
            # continued pretraining (--init) keeps the recipe's 0, as measured (fifth round), also after an
            # hour with dropout 0.1: 0 fine-tuned better on 4,000 SST-2 rows, level on the full set (sixteenth)
            self.dropout = recipe["dropout"] if self.init else default_dropout(PRESETS[self.preset]["hidden_size"])
        if self.vocab_size is None:
            self.vocab_size = default_vocab_size(PRESETS[self.preset]["hidden_size"])
        if self.weight_decay is None:
            self.weight_decay = default_weight_decay(self.recipe, PRESETS[self.preset]["hidden_size"], bool(self.init))
        if self.lr is None:  # --init: continued pretraining (benchmarks/pretrain_results.md, fifth round)
            self.lr = default_lr(PRESETS[self.preset]["hidden_size"], bool(self.init))
        self.nsp = self.nsp or (recipe["nsp"] and not self.no_nsp)
        self.no_nsp = not self.nsp
        if self.precision == "auto" and self.time_budget and cpu_has_bf16() and pick_device(self.device).type == "cpu":
            # a budget is spent best on the most steps; bf16 autocast tracks fp32 step for step
            # (benchmarks/pretrain_results.md) and is faster where the CPU multiplies bf16
            self.precision = "bf16"


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    tok: Tokenizer
    stream: pd.InstanceStream
    collate: pd.Collator
    eval_batches: list[dict]
    baseline_id: int  # the most frequent training token: the constant-guess MLM baseline


def prepare_data(cfg: PretrainConfig, tok: Optional[Tokenizer], log=print) -> Data:
    files = pd.resolve_paths(cfg.corpus or DEFAULT_CORPUS)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else pd.default_cache_dir()
    if tok is None:
        tok = pd.get_tokenizer(cfg.tokenizer, files, cfg.vocab_size, cache_dir, cfg.errors, log)
    cache = pd.build_token_cache([str(f) for f in files], tok, cache_dir, cfg.errors, log)
    train_docs, eval_docs = pd.split_documents(cache.n_docs, cfg.eval_fraction)
    vocab = pd.Vocab.from_tokenizer(tok)
    nsp = not cfg.no_nsp
    stream = pd.InstanceStream(cache, train_docs, cfg.seq_len, cfg.seed, cfg.short_seq_prob, nsp, cfg.static_masking)
    if stream.epoch_size() == 0:  # else the stream would look for instances forever
        why = (" (next-sentence prediction pairs consecutive sentences of one document, and documents are "
               "separated by blank lines): give documents of several sentences, or pretrain without NSP "
               "(--no-nsp)") if nsp else ""
        raise pd.CorpusError(f"no training instances: none of the {len(train_docs):,} training documents has "
                             f"{'two sentences' if nsp else 'any text'}{why}")
    collate = pd.Collator(cache, vocab, cfg.seed, cfg.mlm_prob, cfg.whole_word_mask, nsp,
                          pack_len=cfg.seq_len if cfg.pack else None)
    insts, keys = pd.eval_instances(cache, eval_docs, train_docs, cfg.seq_len, nsp, cfg.eval_size)
    # held-out masks come from a fixed seed, not --seed: every run is scored on the same positions
    eval_collate = pd.Collator(cache, vocab, pd.EVAL_SPLIT_SEED, cfg.mlm_prob, cfg.whole_word_mask, nsp)
    eval_batches = [eval_collate(insts[i : i + 64], keys[i : i + 64]) for i in range(0, len(insts), 64)]
    baseline_id = pd.most_frequent_token(cache, train_docs, vocab)
    log(f"data: {len(train_docs):,} training documents ({stream.epoch_size():,} instances in epoch 0), "
        f"{len(eval_docs):,} held out ({len(insts):,} instances evaluated)")
    return Data(tok, stream, collate, eval_batches, baseline_id)


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


@torch.no_grad()
def evaluate(model: BertForPreTraining, batches: list[dict], baseline_id: int, device) -> dict:
    """Held-out MLM loss / accuracy / perplexity, NSP accuracy and the most-frequent-token baseline,
    from the model's own sums and counts. Always in float32, so a reloaded folder scores the same."""
    was_training = model.training
    model.eval()
    s = torch.zeros(7, dtype=torch.float64)  # MLM loss sum, correct, count; baseline hits; NSP loss sum, correct, count
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(**batch)
        parts = [out.mlm_loss_sum, out.mlm_correct, out.mlm_count, (batch["labels"] == baseline_id).sum()]
        if out.nsp_count is not None:
            parts += [out.nsp_loss_sum, out.nsp_correct, out.nsp_count]
        s[: len(parts)] += torch.stack([p.double().cpu() for p in parts])
    model.train(was_training)
    mlm_loss = (s[0] / s[2]).item()
    res = {"mlm_loss": mlm_loss, "mlm_acc": (s[1] / s[2]).item(), "ppl": math.exp(min(mlm_loss, 50.0)),
           "baseline_acc": (s[3] / s[2]).item(), "nsp_acc": (s[5] / s[6]).item() if s[6] else None}
    res["loss"] = mlm_loss + ((s[4] / s[6]).item() if s[6] else 0.0)
    return res


# ----------------------------------------------------------------------------- the run: set-up and checkpoints


@dataclass
class Clock:
    """Seconds of training over every session of a run (wall and process CPU; CPU time says how
    long the run would take on dedicated cores when the machine is shared). `now` is the wall
    time all ranks agreed on at the last step: the time schedule and the budget read it."""

    wall0: float = 0.0
    cpu0: float = 0.0
    now: float = 0.0

    def __post_init__(self):
        self.start = (time.time(), time.process_time())

    def elapsed(self) -> tuple[float, float]:
        return self.wall0 + time.time() - self.start[0], self.cpu0 + time.process_time() - self.start[1]


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
    device: torch.device
    amp: contextlib.AbstractContextManager
    out: Path
    metrics: Optional[MetricsLog]  # rank 0 only
    tb: object
    clock: Clock
    best: KeepBest
    checks: dict  # what --resume compares beside the fixed options (see resume_checks)
    short_pretraining: bool  # what save_model marks: from random weights here, or continuing such a model
    step: int = 0
    saved_step: Optional[int] = None  # the step train_state.pt holds; None before the first save

    def finished(self, cfg: PretrainConfig) -> bool:
        return self.clock.now >= 60 * cfg.time_budget if cfg.time_budget else self.step >= cfg.max_steps


def resume_checks(cfg: PretrainConfig, files: Sequence[Path], dist: Dist) -> dict:
    """What must match between a saved run and its --resume beside the fixed options (CHECK_NAMES says
    how the refusal names them): the corpus's content, not its file names, and the global batch, not
    how processes, batch size and accumulation make it up."""
    return {"corpus_sha256": pd.corpus_sha256(files)[:16], "global_batch": cfg.batch_size * cfg.grad_accum * dist.world}


CHECK_NAMES = {"corpus_sha256": "corpus content (sha256 of the files' bytes, first 16 hex digits)",
               "global_batch": "global batch (processes x --batch-size x --grad-accum)"}


def save_model(run: Run, cfg: PretrainConfig, folder: Path) -> None:
    """An HF-format model folder, marked as pretrained here (checkpoint.PRETRAINED_HERE). Continued
    pretraining of a published checkpoint (--init) keeps what it started from: mostly that
    checkpoint's training, so finetune treats it as a published checkpoint."""
    mark = here_mark(pretrained_by="minibert.pretrain", step=run.step, init=cfg.init,
                     short_pretraining=run.short_pretraining)
    # in the folder's swap, so model/ never holds one step's weights beside another step's mark
    run.model.save_pretrained(folder, tokenizer=run.data.tok, extra_files=mark)


def save_checkpoint(run: Run, cfg: PretrainConfig) -> None:
    """model/ (replaced as a whole), then train_state.pt (the whole state in one atomically written
    file: resume reads only this, and model/ is always there when it is). Every rank takes part
    (their RNG states are gathered)."""
    rngs = [rng_state()]
    if run.dist.enabled:
        rngs = [None] * run.dist.world
        torch.distributed.all_gather_object(rngs, rng_state())
    if not run.dist.main:
        run.saved_step = run.step  # rank 0 writes it
        return
    save_model(run, cfg, run.out / "model")
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng": rngs,  # one entry per rank
        "data": run.data.stream.state_dict(),  # (epoch, index) of the next training row
        "step": run.step,
        "best": run.best.state_dict(),
        "clock": list(run.clock.elapsed()),
        "world": run.dist.world,
        "config": asdict(cfg),
        "checks": run.checks,
    }
    save_train_state(run.out / "train_state.pt", state)
    run.saved_step = run.step


# What a pretraining run writes, removed when --overwrite starts a new run in its folder (with the
# model files of an older layout or of a model folder): nothing of the old run may survive into it.
RUN_ENTRIES = ("train_state.pt", "model", "best", "metrics.jsonl", "curves.png", "run_config.json", "tensorboard")


def clear_previous_run(out: Path) -> None:
    for name in (*RUN_ENTRIES, *MODEL_FILES):
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def build_model(cfg: PretrainConfig, tok: Tokenizer, attn_impl: str) -> BertForPreTraining:
    """A new model of --preset, or --init's weights (which must include a masked-LM head)."""
    dropout = {} if cfg.dropout is None else {"dropout": cfg.dropout, "attention_dropout": cfg.dropout}
    if cfg.init:
        model = BertForPreTraining.from_pretrained(cfg.init, attn_impl=attn_impl, fused_kernels=cfg.fused_kernels,
                                                   **dropout)
        if any(n.startswith("mlm.") for n in model.load_report["initialised"]):
            raise UserError(f"--init {cfg.init}: the checkpoint has no masked-LM head (cls.predictions.*), so there "
                            f"is nothing to continue; give a pretraining run or a BertForPreTraining / "
                            f"BertForMaskedLM folder")
        return model
    config = BertConfig.from_preset(cfg.preset, vocab_size=tok.vocab_size, norm_position=cfg.norm_position,
                                    attn_impl=attn_impl, fused_kernels=cfg.fused_kernels, **dropout)
    model = BertForPreTraining(config)
    if cfg.position_init == "sinusoidal":
        init_positions_sinusoidal(model)
    return model


def setup(cfg: PretrainConfig, device: torch.device, dist: Dist, log) -> Run:
    out = Path(cfg.out)
    files = pd.resolve_paths(cfg.corpus or DEFAULT_CORPUS)
    if cfg.init:  # a mistyped --init fails here, naming the flag, before any data preparation
        try:
            resolve_model_dir(cfg.init)
        except CheckpointError as e:
            raise UserError(f"--init {e}") from None
    # before any data preparation: never a finished run replaced unasked, never a write into an input
    prepare_output(out, overwrite=cfg.overwrite, resume=cfg.resume,
                   inputs={"--init": cfg.init, "--tokenizer": cfg.tokenizer, "--corpus file": files})
    checks = resume_checks(cfg, files, dist)
    state = load_train_state(out / "train_state.pt") if cfg.resume else None
    if state is not None:
        fixed = {f.name: "--" + f.name.replace("_", "-") for f in fields(cfg) if f.metadata.get("fixed")}
        saved = {**state["config"], **state.get("checks", {})}
        check_resume(saved, {**asdict(cfg), **checks}, {**fixed, **CHECK_NAMES})
    tok = None
    if state is not None:
        tok = Tokenizer.from_file(out / "model")
    elif cfg.init:
        folder = resolve_model_dir(cfg.init)
        try:
            tok = Tokenizer.from_file(folder)
        except (OSError, ValueError) as e:
            raise UserError(f"--init {cfg.init}: cannot load its tokenizer ({e}); continued pretraining keeps the "
                            f"model's vocabulary, so the folder needs its tokenizer files") from None
    # rank 0 trains the tokenizer and fills the token cache; the others then find them there
    if dist.enabled and not dist.main:
        torch.distributed.barrier()
    data = prepare_data(cfg, tok, log)
    if dist.enabled and dist.main:
        torch.distributed.barrier()

    seed_everything(cfg.seed)  # the same initial weights on every rank
    attn_impl = resolve_attention(cfg.attn_impl, device, cfg.precision, cfg.seq_len)
    model = build_model(cfg, data.tok, attn_impl).to(device)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    clock = Clock()
    if cfg.time_budget:
        budget_s = 60 * cfg.time_budget
        sched = warmup_linear_by_time(opt, lambda: clock.now, cfg.warmup_fraction * budget_s, budget_s)
    else:
        sched = warmup_linear(opt, cfg.warmup, cfg.max_steps)
    scaler = grad_scaler(cfg.precision, device)
    seed_everything(cfg.seed + dist.rank)  # then different dropout draws on each rank
    step, best = 0, KeepBest("min")
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        clock.wall0, clock.cpu0 = state["clock"]
        clock.now = clock.wall0
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        data.stream.load_state_dict(state["data"])
        best.load_state_dict(state["best"])
        step = int(state["step"])
        if state["world"] == dist.world:
            set_rng_state(state["rng"][dist.rank])
        else:
            log(f"note: resuming a {state['world']}-process run with {dist.world}: dropout draws will differ")
        log(f"resumed from {out / 'train_state.pt'} at step {step}")
    elif dist.main:
        if cfg.overwrite:  # only now: a corpus, tokenizer or --init that fails above leaves the old run as it was
            clear_previous_run(out)
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2) + "\n")

    net = torch.compile(model) if cfg.compile else model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        # without NSP the pooler and NSP head get no gradient; DDP must be told to expect that
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, find_unused_parameters=cfg.no_nsp)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=step if state is not None else None) if dist.main else None
    tb = open_tensorboard(out, cfg.tensorboard) if dist.main else None
    n_params = sum(p.numel() for p in model.parameters())
    source = f"--init {cfg.init}" if cfg.init else f"preset {cfg.preset}"
    log(f"model: {source}, {n_params / 1e6:.2f}M parameters, vocab {data.tok.vocab_size}, device {device}, "
        f"{resolve_precision(cfg.precision, device)}, attention {attn_impl}, {dist.world} process(es), "
        f"global batch {cfg.batch_size * cfg.grad_accum * dist.world}")
    return Run(model, net, opt, sched, scaler, data, dist, device, autocast(cfg.precision, device), out, metrics, tb,
               clock, best, checks, cfg.init is None or pretrained_here(cfg.init), step,
               saved_step=step if state is not None else None)


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


CURVES = {"loss (MLM + NSP)": [("train:loss", "train loss"), ("eval:loss", "held-out loss")],
          "held-out accuracy": [("eval:mlm_acc", "MLM"), ("eval:nsp_acc", "NSP"),
                                ("eval:baseline_acc", "most-frequent-token baseline", "--")]}


def evaluate_and_keep_best(run: Run, cfg: PretrainConfig) -> dict:
    """Score the held-out split, log it, redraw curves.png, and save best/ when the loss improved."""
    scores = evaluate(run.model, run.data.eval_batches, run.data.baseline_id, run.device)
    res = {"kind": "eval", "step": run.step, **scores}
    res["time_s"], res["cpu_s"] = run.clock.elapsed()
    run.metrics.write(res)
    log_scalars(run.tb, res)
    plot_curves(run.metrics.records, run.out / "curves.png", CURVES, f"{cfg.init or 'preset ' + cfg.preset}, "
                f"seq {cfg.seq_len}: {run.out}")
    if run.best.update(res["loss"], run.step):
        save_model(run, cfg, run.out / "best")
        atomic_write_text(run.out / "best" / "eval.json", json.dumps(res, indent=2) + "\n")
    return res


# ----------------------------------------------------------------------------- training


class NonFiniteLoss(UserError):
    pass


def train(cfg: PretrainConfig) -> dict:
    device = pick_device(cfg.device)
    resolve_precision(cfg.precision, device)  # an impossible choice fails before anything starts
    dist = init_distributed(device)
    set_threads(cfg.threads)
    if device.type == "cuda" and device.index is None and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    log = print if dist.main else (lambda *a, **k: None)
    try:
        run = setup(cfg, device, dist, log)
        result = train_loop(run, cfg, log)
        if dist.enabled:
            # Rank 0 saves and evaluates after the last step while the others are done: without
            # this wait a finished rank tears down its gloo connections under a peer still using
            # them, and it can abort at exit (seen once in CI, under load).
            torch.distributed.barrier()
        return result
    finally:
        if dist.enabled:
            torch.distributed.destroy_process_group()


def train_step(run: Run, cfg: PretrainConfig, stop_requested: bool) -> tuple[dict, bool]:
    """One optimizer step: forward and backward over this rank's micro-batches, then the update.
    Returns the log record and whether any rank was asked to stop."""
    t0, dist = time.time(), run.dist
    micro = rank_micro_batches(run.data, cfg, dist)
    # the step's masked tokens, instances, real tokens and rows over every micro-batch and rank
    n_masked, n_inst, n_tok, n_rows = all_sum(batch_counts(micro), dist).tolist()
    sums = torch.zeros(5)  # loss, MLM hits, NSP hits, stop requests, elapsed seconds: summed over ranks below
    for k, batch in enumerate(micro):
        batch = {key: v.to(run.device, non_blocking=True) for key, v in batch.items()}
        no_sync = dist.enabled and k < len(micro) - 1  # all-reduce the gradients once, after the last micro-batch
        with run.net.no_sync() if no_sync else contextlib.nullcontext(), run.amp:
            out = run.net(**batch)
        # this micro-batch's share of the step loss: the shares add up to it over micro-batches and ranks
        loss = out.mlm_loss_sum / n_masked + (out.nsp_loss_sum / n_inst if out.nsp_loss_sum is not None else 0.0)
        if run.step + 1 == cfg.debug_nan_at_step:
            loss = loss * float("nan")
        run.scaler.scale(loss * dist.world).backward()  # x world: DDP averages the gradients over ranks
        nsp_hits = out.nsp_correct if out.nsp_correct is not None else torch.zeros(())
        sums[:3] += torch.stack([t.detach().float().cpu() for t in (loss, out.mlm_correct, nsp_hits)])
    sums[3:] = torch.tensor([float(stop_requested), run.clock.elapsed()[0]])
    loss_v, mlm_hits, nsp_hits, stops, seconds = all_sum(sums, dist).tolist()
    if not math.isfinite(loss_v):
        if run.saved_step is None:
            kept = f"no checkpoint was saved before it (the first was due at step {cfg.save_every})"
        else:
            kept = f"the last good checkpoint, step {run.saved_step}, is in {run.out} (train_state.pt)"
        raise NonFiniteLoss(f"step {run.step + 1}: the loss is {loss_v} (not finite); stopped without updating; "
                            f"{kept}; try a lower --lr")
    run.clock.now = seconds / dist.world  # every rank's schedule and budget read the same time
    norm = optimizer_step(run.opt, run.sched, run.scaler, run.model.parameters(), cfg.clip)
    run.step += 1
    dt = time.time() - t0
    rec = {"kind": "train", "step": run.step, "loss": loss_v, "mlm_acc": mlm_hits / n_masked,
           "nsp_acc": None if cfg.no_nsp else nsp_hits / n_inst, "norm": norm, "lr": run.sched.get_last_lr()[0],
           "ms": 1000 * dt, "tok_s": n_tok / dt, "rows": int(n_rows)}
    rec["time_s"], rec["cpu_s"] = run.clock.elapsed()
    return rec, stops > 0


def train_loop(run: Run, cfg: PretrainConfig, log) -> dict:
    res = {}
    if run.finished(cfg):  # --resume of a run that had reached its end: say so rather than exit in silence
        log(f"done already: the run in {run.out} had finished at step {run.step}; its model is in "
            f"{run.out / 'model'} (to train it further, start a new run from it with --init)")
        return res
    total = None if cfg.time_budget else cfg.max_steps
    bar = tqdm(total=total, initial=run.step, disable=not (run.dist.main and cfg.progress), dynamic_ncols=True,
               mininterval=1.0)
    with StopRequest() as stop:
        while not run.finished(cfg):
            rec, stopping = train_step(run, cfg, stop.requested)
            last = run.finished(cfg)
            if run.dist.main:
                bar.update(1)
                bar.set_postfix_str(f"loss {rec['loss']:.3f} mlm {rec['mlm_acc']:.3f} lr {rec['lr']:.1e} "
                                    f"{rec['tok_s']:.0f} tok/s")
                if run.step % cfg.log_every == 0 or run.step == 1:
                    run.metrics.write(rec)
                    log_scalars(run.tb, rec)
                    bar.write(format_log(rec))
                if run.step % cfg.eval_every == 0 or last:
                    res = evaluate_and_keep_best(run, cfg)
                    bar.write(format_eval(res))
            if run.step % cfg.save_every == 0 or last or stopping:
                save_checkpoint(run, cfg)
            if stopping:
                bar.close()
                log(f"stopped at step {run.step}; checkpoint saved in {run.out} (continue with --resume)")
                raise KeyboardInterrupt
    bar.close()
    return res


# ----------------------------------------------------------------------------- logging and the command


def format_log(r: dict) -> str:
    nsp = f" | nsp {r['nsp_acc']:.3f}" if r["nsp_acc"] is not None else ""
    return (f"step {r['step']:5d} | loss {r['loss']:.4f} | mlm {r['mlm_acc']:.3f}{nsp} | norm {r['norm']:.2f} | "
            f"lr {r['lr']:.2e} | {r['ms']:.0f} ms | {r['tok_s']:.0f} tok/s")


def format_eval(r: dict) -> str:
    nsp = f" | NSP acc {r['nsp_acc']:.3f}" if r.get("nsp_acc") is not None else ""
    return (f"eval step {r['step']} | held-out MLM loss {r['mlm_loss']:.4f} | ppl {r['ppl']:.1f} | "
            f"MLM acc {r['mlm_acc']:.3f} (most-frequent-token baseline {r['baseline_acc']:.3f}){nsp}")


def eval_saved(cfg: PretrainConfig) -> dict:
    """--eval-only: score the model in --out (a run folder or a model folder) on the held-out split of --corpus."""
    folder = resolve_model_dir(cfg.out)
    device = pick_device(cfg.device)
    model = BertForPreTraining.from_pretrained(folder).to(device)
    if any(n.startswith("mlm.") for n in model.load_report["initialised"]):  # a fine-tuned classifier, say
        raise UserError(f"--eval-only --out {cfg.out}: the checkpoint has no masked-LM head (cls.predictions.*), "
                        f"so there is nothing to score; give a pretraining run or a BertForMaskedLM folder")
    data = prepare_data(cfg, Tokenizer.from_file(folder))
    res = {"step": "saved", **evaluate(model, data.eval_batches, data.baseline_id, device)}
    print(format_eval(res))
    return res


def run(cfg: PretrainConfig) -> int:
    if cfg.eval_only:
        eval_saved(cfg)
        return 0
    res = train(cfg)
    if res:
        nsp = f", NSP accuracy {res['nsp_acc']:.3f}" if res.get("nsp_acc") is not None else ""
        print(f"done: held-out MLM accuracy {res['mlm_acc']:.3f} vs most-frequent-token baseline "
              f"{res['baseline_acc']:.3f} ({res['mlm_acc'] / max(res['baseline_acc'], 1e-9):.1f}x){nsp}; "
              f"{res['time_s'] / 60:.1f} min of training ({res['cpu_s'] / 60:.1f} CPU-min); model in {cfg.out}/model")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main("python -m minibert.pretrain", run, argv, PretrainConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
