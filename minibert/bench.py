"""Time a BERT pretraining step and encoder inference, optionally side by side with transformers;
or, with --deploy, the deployment table: one model folder served on the CPU five ways, and its
compressed variants.

    python -m minibert.bench --preset mini --seq-len 128 --batch-size 16 --compare-hf
    python -m minibert.bench --deploy --model runs/sst2 --test test.tsv --student runs/sst2-student \
        --pruned runs/sst2-pruned --threads 2 --steps 5 --latency-steps 20

Like nanoGPT's bench.py, this is the training loop with everything but timing removed:
    train  one step of BertForPreTraining: forward with MLM + NSP labels, backward, AdamW
           (the project's build_optimizer), on a fresh zero_grad
    infer  BertModel forward in eval mode under torch.inference_mode
The batch is random ids from the real BERT vocabulary (V = 30,522) laid out as
[CLS] A [SEP] B [SEP], with BERT's masking: 15% of the ordinary positions labelled (80%
[MASK], 10% a random id, 10% unchanged) and random NSP labels.

Timing: warm-up steps first (allocator, kernel selection, compilation), then `--steps`
timed steps; on CUDA the device is synchronised before each clock read, since kernels run
asynchronously. We print the median and the 10th/90th percentiles. With --compare-hf the two
models take turns, one step each (A, B, A, B, ...), so a burst of load from elsewhere on the
machine hits both; the speed-up is the median of the per-round ratios t_transformers / t_minibert.

FLOPs per trained token (the numerator of MFU). A multiply-add is 2 FLOPs and the backward
pass costs twice the forward (one matmul for the input's gradient, one for the weight's):

    6 * P            P = L * (4 H^2 + 2 H I): every token meets each encoder weight once,
                     in the Q, K, V and output projections (4 H^2) and the feed-forward (2 H I);
                     2 FLOPs per weight forward, 4 backward
  + 12 * L * H * T   attention: in each layer a query scores T keys (2 H T: nh heads of hs
                     dims, nh * hs = H) and mixes T values (2 H T), 4 H T forward, x3 in all
  + 6 * H * V * f    the tied MLM decoder, run only on the fraction f of tokens predicted
                     (f ~ 0.15: minibert gathers the labelled rows first; transformers runs
                     the decoder on every token, work MFU does not count as useful)

Left out as small: embeddings (lookups, no matmul), LayerNorm / GELU / softmax (elementwise),
the MLM transform (H^2 per predicted token), the pooler and NSP (per row, not per token).
tests/test_bench.py checks this against torch's own count of every matmul.
Inference is the forward alone: 2 * P + 4 * L * H * T per token.

MFU = FLOPs per token * tokens/s, divided by two ceilings, both printed: the rate of one large
matmul in the same dtype timed in the same run (what this machine really delivers now), and
the datasheet peak where we know it.

--deploy: CPU inference of --model (a classifier folder, or an encoder), each row called with
the same (input_ids, attention_mask, token_type_ids) batch:
    transformers fp32         transformers reading the same folder (when it is installed; the
                              reference, built by benchmarks/hf_reference.py as for --compare-hf)
    minibert fp32             eager minibert
    minibert bf16 (autocast)  eager minibert under CPU bf16 autocast: matmuls in bf16, LayerNorm and
                              softmax in fp32; only on CPUs with bf16 instructions (AVX512-BF16, AMX)
    minibert int8 static      minibert.quantize.quantize_int8_static: torch.export + torchao's
      (torchao PT2E)          X86InductorQuantizer, calibrated on --calibrate's texts, compiled
                              (oneDNN int8 kernels); left out without --calibrate
    minibert int8 (torchao)   minibert.quantize, compiled with frozen weights (eager, each int8
                              matmul would run torch._int_mm's CPU kernel; see minibert/quantize.py);
                              eager with --no-compile-int8
    ONNX Runtime fp32, int8   minibert.export's graph (--quantize int8 for the second)
    pruned: / student: NAME   each --pruned / --student folder, as eager minibert fp32, so that its
                              row reads against minibert fp32's (export it for the ONNX figures)
Rows whose optional package is missing (onnx, onnxscript, onnxruntime, torchao, transformers) are
left out with a note. Columns: latency at batch 1 and throughput at --infer-batch-size (32 unless
given), both at --seq-len, the rows taking turns as above (--latency-steps and --steps rounds);
the size of what the row loads from disk (the weights file of a folder, the .onnx file, the int8
state_dict as torch.save writes it); and with --test, accuracy on that labelled file (read as
minibert.finetune reads --test), computed from each row's own predictions, and how many of them
agree with minibert fp32's. Speed batches are random ids without padding (dense kernels take as
long whatever the ids); --test batches are the file's rows sorted by length, padded per batch.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import export
from .checkpoint import resolve_model_dir
from .finetune import FinetuneConfig, read_split
from .model import ATTN_IMPLS, PRESETS, BertConfig, BertForPreTraining, BertModel
from .optim import build_optimizer
from .strategies import PlainInputs
from .tabular import ERRORS_HELP, LabelMap
from .tokenizer import Tokenizer
from .toolkit import (
    UserError, autocast, cli_main, cpu_has_bf16, cpu_info, field, pick_device, resolve_precision, set_threads,
)

# bert-base-uncased's vocabulary: ids below 999 are [PAD], [unusedN], [UNK], [CLS], [SEP], [MASK]
CLS_ID, SEP_ID, MASK_ID, FIRST_WORD_ID = 101, 102, 103, 999

# Dense bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s (without 2:4 sparsity).
DATASHEET_BF16_TFLOPS = {"H100 SXM": 989.0, "H200": 989.0}


# -----------------------------------------------------------------------------
# FLOPs


def encoder_matmul_params(cfg: BertConfig) -> int:
    """P: the weights every token is multiplied by in the encoder (Q, K, V, O, up, down)."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_layers * (4 * H * H + 2 * H * I)


def train_flops_per_token(cfg: BertConfig, seq_len: int, predicted_fraction: float) -> float:
    """6 P + 12 L H T + 6 H V f: forward + backward of one token (see the module docstring)."""
    L, H, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    return 6 * encoder_matmul_params(cfg) + 12 * L * H * seq_len + 6 * H * V * predicted_fraction


def infer_flops_per_token(cfg: BertConfig, seq_len: int) -> float:
    """2 P + 4 L H T: the encoder's forward alone."""
    return 2 * encoder_matmul_params(cfg) + 4 * cfg.num_layers * cfg.hidden_size * seq_len


def datasheet_peak(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """FLOP/s from the datasheet table, or None where we do not know it."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return DATASHEET_BF16_TFLOPS["H200"] * 1e12
    if "H100" in name and ("SXM" in name or "HBM3" in name):  # the SXM part calls itself "H100 80GB HBM3"
        return DATASHEET_BF16_TFLOPS["H100 SXM"] * 1e12
    return None


# -----------------------------------------------------------------------------
# Inputs


def make_batch(cfg: BertConfig, batch_size: int, seq_len: int, gen: torch.Generator,
               mlm_prob: float = 0.15) -> dict[str, Tensor]:
    """A pretraining batch of random real-vocabulary ids: [CLS] A [SEP] B [SEP], BERT-masked."""
    if cfg.vocab_size <= FIRST_WORD_ID or seq_len < 8:
        raise ValueError("the bench needs BERT's vocabulary (vocab_size > 999) and seq_len >= 8")
    B, T = batch_size, seq_len
    mid = T // 2  # the [SEP] between the two segments
    ids = torch.randint(FIRST_WORD_ID, cfg.vocab_size, (B, T), generator=gen)  # (B, T)
    ids[:, 0], ids[:, mid], ids[:, -1] = CLS_ID, SEP_ID, SEP_ID
    token_type_ids = (torch.arange(T) > mid).long().expand(B, T).contiguous()  # (B, T) 0 for A, 1 for B
    # exactly round(15%) of the ordinary positions per row, as BERT picks them
    n_pred = max(1, round(mlm_prob * (T - 3)))
    score = torch.rand(B, T, generator=gen)
    score[:, [0, mid, T - 1]] = -1.0  # never pick [CLS] / [SEP]
    pos = score.topk(n_pred, dim=1).indices  # (B, n_pred) distinct random positions
    target = ids.gather(1, pos)  # (B, n_pred)
    labels = torch.full((B, T), -100, dtype=torch.long).scatter_(1, pos, target)
    r = torch.rand(B, n_pred, generator=gen)
    random_ids = torch.randint(FIRST_WORD_ID, cfg.vocab_size, (B, n_pred), generator=gen)
    shown = torch.where(r < 0.8, MASK_ID, torch.where(r < 0.9, random_ids, target))  # 80 / 10 / 10
    return {
        "input_ids": ids.scatter(1, pos, shown),
        "token_type_ids": token_type_ids,
        "attention_mask": torch.ones(B, T, dtype=torch.long),  # what a collator hands over
        "labels": labels,
        "next_sentence_label": torch.randint(0, 2, (B,), generator=gen),
    }


# -----------------------------------------------------------------------------
# Clocks and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are queued asynchronously; wait before reading the clock


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def step_memory(fn: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes one call needs on top of what is already resident (weights, optimizer state).

    CUDA: max_memory_allocated over the call, minus memory_allocated before it.
    CPU: the peak resident set over the call (VmHWM, reset by writing 5 to
    /proc/self/clear_refs) minus the resident set before it. Freed heap is first handed back
    to the OS (glibc malloc_trim), otherwise a call could reuse pages an earlier call left
    behind and look free. None where this is not Linux.
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kib("VmRSS")
        fn()
        return (_proc_status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError, AttributeError):
        return None


def matmul_probe(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], None], float]:
    """A large square matmul in the bench dtype and its FLOPs: the rate this machine delivers."""
    n, reps = (8192, 10) if device.type == "cuda" else (2048, 1)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(reps):
            a @ b

    return run, 2.0 * n**3 * reps


# -----------------------------------------------------------------------------
# The two steps


def train_step(model: nn.Module, batch: dict[str, Tensor], amp: Callable) -> Callable[[], None]:
    """One full pretraining step; the same function drives minibert and transformers."""
    opt = build_optimizer(model, lr=1e-4)
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = model(**batch).loss
        loss.backward()
        opt.step()

    return step


def infer_step(model: nn.Module, batch: dict[str, Tensor], amp: Callable) -> Callable[[], None]:
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    model.eval()

    def step() -> None:
        with torch.inference_mode(), amp():
            model(**inputs)

    return step


HF_REFERENCE = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_reference.py"


def hf_reference(flag: str):
    """benchmarks/hf_reference.py, the module that builds transformers' models: in the repository
    but outside the package -- minibert itself never imports transformers."""
    if not HF_REFERENCE.exists():
        raise UserError(f"{flag} needs a checkout of the repository ({HF_REFERENCE} is missing) and transformers")
    spec = importlib.util.spec_from_file_location("minibert_hf_reference", HF_REFERENCE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_hf_models() -> Callable[[BertConfig], tuple[nn.Module, nn.Module]]:
    """--compare-hf: transformers' BertForPreTraining and BertModel for a minibert config."""
    return hf_reference("--compare-hf").hf_models


# -----------------------------------------------------------------------------
# Measuring


def measure(
    steps: dict[str, Callable[[], None]],
    probe: Callable[[], None],
    n_steps: int,
    warmup: int,
    device: torch.device,
) -> tuple[dict[str, list[float]], dict[str, Optional[int]], list[float]]:
    """Warm every step up, measure its memory once, then time them in turns (A, B, probe, A, B, ...)."""
    warm_up(steps, warmup)
    probe()
    memory = {name: step_memory(fn, device) for name, fn in steps.items()}
    times = time_in_turns({**steps, PROBE: probe}, n_steps, device)
    return times, memory, times.pop(PROBE)


PROBE = " matmul probe"  # its key among the steps timed in turns


def warm_up(steps: dict[str, Callable[[], object]], n: int) -> None:
    for fn in steps.values():
        for _ in range(n):
            fn()


def time_in_turns(steps: dict[str, Callable[[], object]], rounds: int, device: torch.device
                  ) -> dict[str, list[float]]:
    """Seconds of each call, each round calling every step once in turn (A, B, C, A, B, C, ...),
    so that a burst of load from elsewhere on the machine hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    return times


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    p10, p50, p90 = torch.tensor(xs, dtype=torch.float64).quantile(q).tolist()
    return p10, p50, p90


def cpu_name() -> str:
    """The CPU's model name, and the SIMD extensions that decide int8 and bf16 speed."""
    name, flags = cpu_info()
    flags = flags or []
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(have) or 'no AVX2'}; {os.cpu_count()} cores)"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


@dataclass
class BenchConfig:
    preset: str = field("mini", "model size", choices=list(PRESETS))
    seq_len: int = field(128, "tokens per row")
    batch_size: int = field(16, "rows per training step")
    infer_batch_size: Optional[int] = field(None, "rows per inference call (default: --batch-size; 32 with "
                                           "--deploy)")
    device: str = field("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    precision: str = field("auto", "arithmetic of the timed steps and of the matmul probe: fp32, bf16 or fp16 autocast "
                           "(no loss scaler: only the time counts). auto: bf16 on CUDA, fp32 on the CPU and MPS",
                           choices=("auto", "fp32", "bf16", "fp16"))
    threads: int = field(0, "CPU threads (0: torch's default, one per core)")
    attn_impl: str = field("sdpa", "minibert's attention backend", choices=list(ATTN_IMPLS))
    fused_kernels: bool = field(False, "minibert's fused ops: add+LayerNorm, bias+GELU, chunked MLM decoder + loss")
    compile: bool = field(False, "torch.compile minibert's models (--deploy: more rows, minibert fp32 and bf16 "
                          "compiled with frozen weights)")
    compile_hf: bool = field(False, "with --compare-hf: torch.compile transformers' models too (without it, minibert "
                             "compiled meets transformers run as most people run it)")
    steps: int = field(20, "timed steps (per model and task)")
    warmup: int = field(3, "untimed steps first (allocator, kernel selection, compilation)")
    compare_hf: bool = field(False, "time transformers' BERT in the same run, in turns")
    seed: int = field(0, "seed for the weights and the batch")
    json: bool = field(False, "print one JSON object instead of the markdown table")
    deploy: bool = field(False, "the deployment table instead: CPU inference of --model as transformers fp32, "
                         "minibert fp32, bf16 and int8 (torchao), ONNX Runtime fp32 and int8, and of each --pruned "
                         "and --student folder; latency, throughput, size on disk, --test accuracy")
    model: Optional[str] = field(None, "--deploy: the model folder, or a finetune run folder (a classifier, for "
                                 "--test accuracy; an encoder otherwise)")
    student: list[str] = field([], "--deploy: distilled students (model or run folders), one row each")
    pruned: list[str] = field([], "--deploy: pruned models (model or run folders), one row each")
    test: Optional[str] = field(None, "--deploy: labelled file (TSV, CSV or JSONL) each row's accuracy is measured on")
    calibrate: Optional[str] = field(None, "--deploy: texts (TSV, CSV or JSONL; labels unused) to calibrate the "
                                     "static int8 row on, 256 rows drawn at random; use training text, not --test")
    errors: str = field("strict", "--deploy: " + ERRORS_HELP + " (--test and --calibrate)",
                        choices=("strict", "replace"))
    latency_steps: int = field(20, "--deploy: timed rounds at batch 1 (--steps: at --infer-batch-size)")
    leave_out: list[str] = field([], "--deploy: leave out the rows whose name contains one of these words (e.g. "
                                 "torchao: its int8 kernels are slow on CPUs without VNNI)")
    compile_int8: bool = field(True, "--deploy: compile the torchao int8 row with frozen weights (a minute or more "
                               "on the CPU); --no-compile-int8 runs it eager, where each int8 matmul goes to "
                               "torch._int_mm, slow on CPUs without VNNI")

    def __post_init__(self):
        if self.compile_hf and not (self.compile and self.compare_hf):
            raise UserError("--compile-hf compiles transformers beside minibert: it needs --compile and --compare-hf")
        if min(self.steps, self.batch_size, self.seq_len, self.latency_steps) < 1 or self.warmup < 0:
            raise UserError("--steps, --latency-steps, --batch-size and --seq-len must be positive, --warmup at "
                            "least 0")
        if not self.model and self.seq_len > BertConfig.max_position:
            raise UserError(f"--seq-len {self.seq_len}: a preset's position table has {BertConfig.max_position} rows")
        if self.deploy:
            if self.model is None:
                raise UserError("--deploy needs --model (a model folder)")
            if self.compare_hf or self.fused_kernels or self.precision not in ("auto", "fp32"):
                raise UserError("--deploy builds its own rows, transformers among them, in fp32 and int8: leave out "
                                "--compare-hf, --fused-kernels and --precision (--compile adds a compiled minibert "
                                "row)")
        elif self.model or self.student or self.pruned or self.test or self.leave_out or self.calibrate:
            raise UserError("--model, --student, --pruned, --test, --calibrate and --leave-out are for the deployment "
                            "table: add --deploy")


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main("python -m minibert.bench", run, argv, BenchConfig, __doc__.split("\n\n")[0])


def run(args: BenchConfig) -> dict:
    """Build, time and report; returns the result that --json prints."""
    if args.deploy:
        return run_deploy(args)
    set_threads(args.threads)
    device = pick_device(args.device)
    dtype_name = resolve_precision(args.precision, device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    compiled = ("both" if args.compile_hf else "minibert") if args.compile else None

    def amp() -> contextlib.AbstractContextManager:
        return autocast(dtype_name, device)  # matmuls in 16 bits, weights and optimizer state stay fp32

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = BertConfig.from_preset(args.preset, attn_impl=args.attn_impl, fused_kernels=args.fused_kernels)
    T = args.seq_len
    B_infer = args.infer_batch_size or args.batch_size
    train_batch = {k: v.to(device) for k, v in make_batch(cfg, args.batch_size, T, gen).items()}
    infer_batch = {k: v.to(device) for k, v in make_batch(cfg, B_infer, T, gen).items()}
    predicted = (train_batch["labels"] != -100).float().mean().item()  # f, ~0.15

    models = {"minibert": (BertForPreTraining(cfg), BertModel(cfg))}
    if args.compare_hf:
        models["transformers"] = load_hf_models()(cfg)
    train_steps, infer_steps = {}, {}
    for name, (pretrain, encoder) in models.items():
        pretrain, encoder = pretrain.to(device), encoder.to(device)
        if compiled == "both" or (compiled == "minibert" and name == "minibert"):
            pretrain, encoder = torch.compile(pretrain), torch.compile(encoder)
        train_steps[name] = train_step(pretrain, train_batch, amp)
        infer_steps[name] = infer_step(encoder, infer_batch, amp)

    probe, probe_flops = matmul_probe(device, dtype)
    peak = datasheet_peak(device, dtype)
    tasks = {
        "train": (train_steps, args.batch_size * T, train_flops_per_token(cfg, T, predicted)),
        "infer": (infer_steps, B_infer * T, infer_flops_per_token(cfg, T)),
    }
    rows, speedups, spreads, probe_all = [], {}, {}, []
    for task, (steps, tokens, flops_per_token) in tasks.items():
        times, memory, probe_times = measure(steps, probe, args.steps, args.warmup, device)
        probe_all += probe_times
        rate = probe_flops / quantiles(probe_times)[1]  # FLOP/s of the big matmul, timed between these steps
        for name, ts in times.items():
            p10, p50, p90 = quantiles(ts)
            achieved = flops_per_token * tokens / p50
            rows.append(
                {
                    "model": name,
                    "task": task,
                    "ms_p50": p50 * 1e3,
                    "ms_p10": p10 * 1e3,
                    "ms_p90": p90 * 1e3,
                    "tokens_per_s": tokens / p50,
                    "step_mem_bytes": memory[name],
                    "mfu_vs_matmul": achieved / rate,
                    "mfu_vs_datasheet": achieved / peak if peak else None,
                    "times_ms": [t * 1e3 for t in ts],
                }
            )
        if "transformers" in times:
            ratios = [hf / ours for ours, hf in zip(times["minibert"], times["transformers"])]
            lo, speedups[task], hi = quantiles(ratios)
            spreads[task] = (lo, hi)

    result = {
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "preset": args.preset,
        "seq_len": T,
        "batch_size": args.batch_size,
        "infer_batch_size": B_infer,
        "dtype": dtype_name,
        "attn_impl": args.attn_impl,
        "fused_kernels": args.fused_kernels,
        "compile": compiled,  # None, "both" or "minibert"
        "predicted_fraction": predicted,
        "matmul_flops_per_s": probe_flops / quantiles(probe_all)[1],
        "datasheet_flops_per_s": peak,
        "rows": rows,
        "speedup": speedups,  # median over rounds of t_transformers / t_minibert
        "speedup_p10_p90": spreads,
        # FLOPs of transformers' step over minibert's: the speed-up if both ran their FLOPs
        # equally fast. Training differs only in the decoder, which transformers runs on
        # every token (f = 1); inference is the same function and the same FLOPs.
        "flop_ratio": {"train": train_flops_per_token(cfg, T, 1.0) / train_flops_per_token(cfg, T, predicted),
                       "infer": 1.0} if args.compare_hf else {},
        # glibc's malloc hands big freed blocks back to the OS, and the next step pays page
        # faults to get them again; these variables change that (RESULTS.md, run E)
        "malloc_env": {k: os.environ[k] for k in ("GLIBC_TUNABLES", "LD_PRELOAD") if k in os.environ},
    }
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return result


COMPILED = {"both": ", both models compiled", "minibert": ", minibert compiled (transformers eager)"}


def format_report(r: dict) -> str:
    peak = f"{r['datasheet_flops_per_s'] / 1e12:.0f} TFLOP/s" if r["datasheet_flops_per_s"] else "unknown"
    lines = [
        f"device: {r['device']} ({r['threads']} threads), torch {r['torch']}, {r['dtype']}"
        f"{COMPILED.get(r['compile'], '')}; minibert attention {r['attn_impl']}"
        f"{', fused kernels' if r['fused_kernels'] else ''}; matmul rate measured "
        f"{r['matmul_flops_per_s'] / 1e12:.3f} TFLOP/s, "
        f"datasheet peak {peak}; MLM predicts {r['predicted_fraction']:.1%} of tokens"
        + "".join(f"; {k}={v}" for k, v in r["malloc_env"].items()),
        "",
        "| model | task | preset | batch | seq | ms/step median (p10-p90) | tokens/s | step mem MiB | MFU vs matmul "
        "| MFU vs datasheet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        batch = r["batch_size"] if row["task"] == "train" else r["infer_batch_size"]
        mem = f"{row['step_mem_bytes'] / 2**20:.0f}" if row["step_mem_bytes"] is not None else "n/a"
        ds = f"{row['mfu_vs_datasheet']:.1%}" if row["mfu_vs_datasheet"] is not None else "n/a"
        lines.append(
            f"| {row['model']} | {row['task']} | {r['preset']} | {batch} | {r['seq_len']} | "
            f"{row['ms_p50']:.1f} ({row['ms_p10']:.1f}-{row['ms_p90']:.1f}) | {row['tokens_per_s']:,.0f} | {mem} | "
            f"{row['mfu_vs_matmul']:.1%} | {ds} |"
        )
    if r["speedup"]:
        spread = r["speedup_p10_p90"]
        lines += [
            "",
            "speed-up minibert / transformers (median of per-round time ratios, p10-p90): "
            + ", ".join(f"{t} {s:.2f}x ({spread[t][0]:.2f}-{spread[t][1]:.2f})" for t, s in r["speedup"].items()),
            "FLOPs of transformers / minibert (the speed-up if both ran equally fast; transformers decodes every "
            "token): "
            + ", ".join(f"{t} {x:.2f}x" for t, x in r["flop_ratio"].items()),
        ]
    return "\n".join(lines)



# -----------------------------------------------------------------------------
# The deployment table (--deploy)

Batch = dict[str, Tensor]  # input_ids, attention_mask, token_type_ids: (B, T) int64 each


class Skipped(Exception):
    """A row this machine cannot build (an optional package is missing); the table says why."""


@dataclass
class Served:
    """One row of the table, ready to call: a batch -> logits (B, C), or hidden states (B, T, H)."""

    forward: Callable[[Batch], Tensor]
    size_bytes: int  # what it loads from disk
    folder: Path  # the model folder it came from: its tokenizer and labels read --test
    vocab_size: int


@dataclass
class Source:
    """What every row is built from: a model folder, and where the exported files go."""

    folder: Path
    task: str  # "classifier" or "encoder", as minibert.export decides it
    tmp: Path
    threads: int
    compile_int8: bool = True
    calibrate: Optional[str] = None  # --calibrate: texts the static int8 row takes its ranges from
    errors: str = "strict"  # --errors: how --calibrate's bytes that are not UTF-8 are read


def needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skipped(f"needs {', '.join(missing)}: pip install -e \".[deploy]\"")


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def call_graph_forward(module: nn.Module) -> Callable[[Batch], Tensor]:
    return lambda b: module(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def serve_transformers(src: Source) -> Served:
    if importlib.util.find_spec("transformers") is None:
        raise Skipped("transformers is not installed")
    if not HF_REFERENCE.exists():
        raise Skipped(f"needs a checkout of the repository ({HF_REFERENCE})")
    model = hf_reference("--deploy").hf_pretrained(str(src.folder), src.task)
    # transformers reads the same weights file as minibert fp32
    return Served(call_graph_forward(model), weights_bytes(src.folder), src.folder, model.model.config.vocab_size)


def serve_minibert(src: Source, compiled: bool = False) -> Served:
    model, _ = export.load_for_export(str(src.folder), src.task)  # eval mode, the graph runtimes' signature
    # freezing: the weights become constants, so inductor folds them into prepacked matmul layouts
    # and fuses the elementwise ops (bias, GELU, residual, LayerNorm) around the matmuls
    run_as = torch.compile(model, options={"freezing": True}) if compiled else model
    return Served(call_graph_forward(run_as), weights_bytes(src.folder), src.folder, model.model.config.vocab_size)


def bf16_supported() -> bool:
    """Whether the bf16 rows can measure anything: without bf16 instructions the row would time
    an emulation (toolkit.cpu_has_bf16)."""
    return cpu_has_bf16()


def serve_minibert_bf16(src: Source, compiled: bool = False) -> Served:
    if not bf16_supported():
        raise Skipped("this CPU has no bf16 instructions (avx512_bf16 or amx_bf16)")
    model, _ = export.load_for_export(str(src.folder), src.task)
    # autocast, not model.to(bfloat16): the matmuls run in bf16, while LayerNorm, softmax and the
    # residual sums stay fp32, as autocast's CPU op lists decide; the weights stay fp32 on disk and
    # in memory (compiled with frozen weights, inductor folds their bf16 copies into constants)
    run_as = call_graph_forward(torch.compile(model, options={"freezing": True}) if compiled else model)

    def forward(b: Batch) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run_as(b).float()

    return Served(forward, weights_bytes(src.folder), src.folder, model.model.config.vocab_size)


def serve_torchao_int8(src: Source) -> Served:
    needs("torchao")
    from .quantize import quantize_int8

    model, _ = export.load_for_export(str(src.folder), src.task)
    model = quantize_int8(model)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # int8 weights and their scales, as a user would store them
    # frozen weights: inductor generates the int8 matmuls itself instead of calling torch._int_mm
    run_as = torch.compile(model, options={"freezing": True}) if src.compile_int8 else model
    return Served(call_graph_forward(run_as), buf.tell(), src.folder, model.model.config.vocab_size)


def serve_int8_static(src: Source) -> Served:
    needs("torchao")
    if src.calibrate is None:
        raise Skipped("needs --calibrate FILE: texts to take the activation ranges from")
    from .quantize import compile_frozen, quantize_int8_static

    model, _ = export.load_for_export(str(src.folder), src.task)
    m = quantize_int8_static(model, export.read_calibration(src.calibrate, src.folder, errors=src.errors))
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)  # int8 weights, their scales and the fp32 rest, as a user would store them
    return Served(call_graph_forward(compile_frozen(m)), buf.tell(), src.folder, model.model.config.vocab_size)


def onnx_session(path: Path, threads: int, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session on `threads` threads, as every timed ONNX row runs; with
    profile_prefix, its node profiler on (benchmarks/profile_cpu.py)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1  # as many threads as torch
    # ONNX Runtime's threads spin, busy, for a while after each call, in case another comes; the
    # row timed next (torch's) would then share the cores with them, so they sleep instead
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def serve_onnx(src: Source, int8: bool) -> Served:
    needs("onnx", "onnxscript", "onnxruntime")
    fp32 = src.tmp / "fp32.onnx"
    model, task = export.load_for_export(str(src.folder), src.task)
    if not fp32.exists():  # the int8 row quantizes the fp32 row's graph
        export.export_onnx(model, fp32, export.TASKS[task][1])
    path = fp32
    if int8:
        path = src.tmp / "int8.onnx"
        export.quantize_int8(fp32, path)
    session = onnx_session(path, src.threads)
    names = [i.name for i in session.get_inputs()]

    def forward(b: Batch) -> Tensor:
        return torch.from_numpy(session.run(None, {n: b[n].numpy() for n in names})[0])

    return Served(forward, path.stat().st_size, src.folder, model.model.config.vocab_size)


# The rows built from --model; adding a runtime is one entry here.
SERVINGS: dict[str, Callable[[Source], Served]] = {
    "transformers fp32": serve_transformers,
    "minibert fp32": serve_minibert,
    "minibert bf16 (autocast)": serve_minibert_bf16,
    "minibert int8 static (torchao PT2E)": serve_int8_static,
    "minibert int8 (torchao)": serve_torchao_int8,
    "ONNX Runtime fp32": partial(serve_onnx, int8=False),
    "ONNX Runtime int8": partial(serve_onnx, int8=True),
}
AGREEMENT_REFERENCE = "minibert fp32"  # the predictions every row is compared with
COMPILED_ROWS = {  # the rows --deploy --compile adds, each after the eager row it compiles
    "minibert fp32": ("minibert fp32 (compiled)", serve_minibert),
    "minibert bf16 (autocast)": ("minibert bf16 (autocast, compiled)", serve_minibert_bf16),
}


def random_inputs(vocab_size: int, rows: int, seq_len: int, gen: torch.Generator) -> Batch:
    """rows x seq_len ids from the whole vocabulary, no padding: a dense kernel takes as long
    whatever the ids are, and every row of the table gets the same batch."""
    ids = torch.randint(0, vocab_size, (rows, seq_len), generator=gen)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


@dataclass
class TestSet:
    """A labelled file tokenized for one model: batches of rows sorted by length (each padded to
    its longest row), the labels in file order, and where each batch row sits in the file."""

    batches: list[Batch]
    order: Tensor  # (N,) file index of the i-th row of the concatenated batches
    y: Tensor  # (N,) class ids, in file order


def read_test(path: str, folder: Path, batch_size: int, errors: str = "strict") -> TestSet:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "id2label" not in config:
        raise UserError(f"--test: {folder} is not a classifier (no id2label in its config.json)")
    label_map = LabelMap.from_json(config)
    if label_map.is_regression:
        raise UserError(f"--test: {folder} is a regression model; the table reports class accuracy")
    split, _ = read_split(path, FinetuneConfig(errors=errors), label_map, "--test")  # as finetune reads --test
    if split.y is None:
        raise UserError(f"--test {path}: no label column")
    tok = Tokenizer.from_pretrained(folder)
    inputs = PlainInputs(tok, tok.model_max_length)
    items = inputs.encode(split.texts, split.pairs)
    order = sorted(range(len(items)), key=lambda i: inputs.length(items[i]))  # batches of like length pad little
    batches = [inputs.collate([items[i] for i in order[s : s + batch_size]]) for s in range(0, len(order), batch_size)]
    return TestSet(batches, torch.tensor(order), split.y)


def predictions(forward: Callable[[Batch], Tensor], test: TestSet) -> Tensor:
    """(N,) predicted class ids, in file order."""
    sorted_preds = torch.cat([forward(b).argmax(-1) for b in test.batches])
    return torch.empty_like(sorted_preds).scatter_(0, test.order, sorted_preds)


def package_versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for name in ("onnxruntime", "onnx", "torchao", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def serve_all(args: BenchConfig, tmp: Path, threads: int) -> tuple[dict[str, Served], dict[str, str], str]:
    """Every row of the table, the rows left out (name -> why), and --model's task."""
    base = resolve_model_dir(args.model)
    _, task = export.load_for_export(str(base), "auto")
    served, skipped = {}, {}
    for name, build in SERVINGS.items():
        if any(word in name for word in args.leave_out):
            skipped[name] = "left out (--leave-out)"
            continue
        try:
            served[name] = build(Source(base, task, tmp, threads, args.compile_int8, args.calibrate, args.errors))
        except Skipped as e:
            skipped[name] = str(e)
        if args.compile and name in COMPILED_ROWS and name in served:
            compiled_name, build_compiled = COMPILED_ROWS[name]
            served[compiled_name] = build_compiled(Source(base, task, tmp, threads), compiled=True)
    for kind, folders in (("pruned", args.pruned), ("student", args.student)):
        for folder in folders:
            resolved = resolve_model_dir(folder)
            served[f"{kind}: {Path(folder).name}"] = serve_minibert(Source(resolved, "auto", tmp, threads))
    return served, skipped, task


def run_deploy(args: BenchConfig) -> dict:
    if pick_device(args.device).type != "cpu":
        raise UserError("--deploy times CPU inference (ONNX Runtime's CPU provider, torchao's CPU kernels): add "
                        "--device cpu")
    set_threads(args.threads)
    threads = torch.get_num_threads()
    B, T = args.infer_batch_size or 32, args.seq_len
    with tempfile.TemporaryDirectory(prefix="minibert-deploy-") as tmp:
        served, skipped, task = serve_all(args, Path(tmp), threads)
        if args.test and task != "classifier":
            raise UserError(f"--test: {args.model} is not a sequence classifier; the table reports class accuracy")
        tests = ({s.folder: read_test(args.test, s.folder, B, args.errors) for s in served.values()}
                 if args.test else {})
        cpu = torch.device("cpu")
        gen = torch.Generator().manual_seed(args.seed)
        vocabs = sorted({s.vocab_size for s in served.values()})
        big = {v: random_inputs(v, B, T, gen) for v in vocabs}
        one = {v: random_inputs(v, 1, T, gen) for v in vocabs}
        with torch.inference_mode():
            steps = {name: partial(s.forward, big[s.vocab_size]) for name, s in served.items()}
            warm_up(steps, args.warmup)
            t_big = time_in_turns(steps, args.steps, cpu)
            steps = {name: partial(s.forward, one[s.vocab_size]) for name, s in served.items()}
            warm_up(steps, args.warmup)
            t_one = time_in_turns(steps, args.latency_steps, cpu)
            preds = {name: predictions(s.forward, tests[s.folder]) for name, s in served.items()} if tests else {}

    ref = "transformers fp32" if "transformers fp32" in served else "minibert fp32"
    rows = []
    for name, s in served.items():
        row = {
            "name": name,
            "size_bytes": s.size_bytes,
            "latency_ms": quantiles(t_one[name])[1] * 1e3,
            "latency_speedup": quantiles([r / t for r, t in zip(t_one[ref], t_one[name])])[1],
            "throughput_seq_per_s": B / quantiles(t_big[name])[1],
            "throughput_speedup": quantiles([r / t for r, t in zip(t_big[ref], t_big[name])])[1],
            "accuracy": None,
            "agreement": None,
            "times_ms": {"batch_1": [t * 1e3 for t in t_one[name]], f"batch_{B}": [t * 1e3 for t in t_big[name]]},
        }
        if preds:
            y = tests[s.folder].y
            row["accuracy"] = (preds[name] == y).float().mean().item()
            if AGREEMENT_REFERENCE in preds:
                row["agreement"] = (preds[name] == preds[AGREEMENT_REFERENCE]).float().mean().item()
        rows.append(row)
    result = {
        "cpu": cpu_name(),
        "threads": threads,
        "versions": package_versions(),
        "model": str(resolve_model_dir(args.model)),
        "task": task,
        "seq_len": T,
        "batch_size": B,
        "steps": args.steps,
        "latency_steps": args.latency_steps,
        "reference": ref,
        "int8_compiled": args.compile_int8,
        "test": args.test,
        "test_rows": len(next(iter(tests.values())).y) if tests else None,
        "rows": rows,
        "skipped": skipped,
    }
    print(json.dumps(result, indent=2) if args.json else format_deploy_report(result))
    return result


def format_deploy_report(r: dict) -> str:
    ref, B, T = r["reference"], r["batch_size"], r["seq_len"]
    versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    lines = [
        f"CPU: {r['cpu']}, {r['threads']} threads; {versions}",
        f"model: {r['model']} ({r['task']}); batch {B} x {T}: {r['steps']} rounds, batch 1 x {T}: "
        f"{r['latency_steps']} rounds, the rows in turns; medians; x = median of per-round time ratios vs {ref}; "
        f"torchao int8 {'compiled' if r['int8_compiled'] else 'eager'}"
        + (f"; test: {r['test']} ({r['test_rows']} rows)" if r["test"] else ""),
        "",
        f"| | size MiB | batch 1 x {T} ms | x {ref} | batch {B} x {T} seq/s | x {ref} | test accuracy "
        f"| same prediction as {AGREEMENT_REFERENCE} |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pct = lambda x: "n/a" if x is None else f"{100 * x:.2f}%"  # noqa: E731
    for row in r["rows"]:
        lines.append(
            f"| {row['name']} | {row['size_bytes'] / 2**20:.1f} | {row['latency_ms']:.1f} "
            f"| {row['latency_speedup']:.2f}x "
            f"| {row['throughput_seq_per_s']:.1f} | {row['throughput_speedup']:.2f}x | {pct(row['accuracy'])} "
            f"| {pct(row['agreement'])} |"
        )
    if r["skipped"]:
        lines += ["", *(f"left out: {name} ({why})" for name, why in r["skipped"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
