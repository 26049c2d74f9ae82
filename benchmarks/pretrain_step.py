"""Time one `minibert.pretrain` training step under several settings, in turns, in one process.

    python benchmarks/pretrain_step.py --variant sdpa="--attn-impl sdpa" --variant math="--attn-impl math" \
        -- --corpus ../shared/data/corpus --preset mini --precision bf16 --threads 2

Everything after `--` is pretrain's own command line, shared by every variant; each --variant adds
its flags to it (later flags win). Each variant gets its own run (model, optimizer, data stream)
built by pretrain's `setup` and stepped by its `train_step`, so what is timed is the job's step:
forward, backward, clipping and the fused AdamW update, for the same batches in every variant.
After --warmup untimed steps (compilation happens there), --rounds rounds time --steps steps of
each variant in turn, so a machine that slows down mid-run slows every variant alike. Printed:
the median over rounds of the time per step, its ratio to the first variant, and the arithmetic
rate, with each variant's FLOPs per step counted by torch's FlopCounterMode, beside the
rate of the step's largest matrix product alone (the FFN up-projection, batch x seq tokens at
width H to 4H), in the precision of the first variant.

--profile then runs --steps more steps of each variant under torch.profiler and sums the ops'
self CPU time into kinds (matrix products, attention, dropout, the optimizer and clipping, ...),
so the step's time that is not arithmetic at the product's rate can be read off.

A variant whose flags include --torch-loss or --torch-dropout (not pretrain flags) runs with
F.cross_entropy in place of model.py's CPU vocabulary loss, or F.dropout in place of its CPU
dropout, so each can be timed against torch's own in one process:

    python benchmarks/pretrain_step.py --variant ours="" --variant torch="--torch-loss --torch-dropout" \
        -- --corpus ../shared/data/corpus --preset mini --precision bf16 --threads 2
"""

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemm_ceiling import rate  # noqa: E402  (this folder is on the path when run as a script)
from profile_cpu import KINDS, kind  # noqa: E402
from minibert import model, pretrain  # noqa: E402
from minibert.bench import cpu_name  # noqa: E402
from minibert.toolkit import init_distributed, parse_config, pick_device, resolve_precision, set_threads  # noqa: E402


TORCH_LOSS, TORCH_DROPOUT = "--torch-loss", "--torch-dropout"


def build(argv: list[str], out: Path):
    torch_loss, torch_dropout = TORCH_LOSS in argv, TORCH_DROPOUT in argv
    argv = [a for a in argv if a not in (TORCH_LOSS, TORCH_DROPOUT)]
    cfg = parse_config(pretrain.PretrainConfig, argv + ["--max-steps", "1000000", "--out", str(out), "--overwrite",
                                                        "--no-progress"], "pretrain_step", "")
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    run = pretrain.setup(cfg, device, init_distributed(device), lambda *a, **k: None)
    run.torch_loss, run.torch_dropout = torch_loss, torch_dropout
    return cfg, run


def step(run, cfg):
    """One pretrain step; with --torch-loss, model.py's MLM loss is torch's F.cross_entropy for it,
    with --torch-dropout its dropout is F.dropout."""
    saved = model.vocab_cross_entropy, model.dropout
    if run.torch_loss:
        model.vocab_cross_entropy = model.torch_vocab_cross_entropy
    if run.torch_dropout:
        model.dropout = F.dropout
    try:
        pretrain.train_step(run, cfg, False)
    finally:
        model.vocab_cross_entropy, model.dropout = saved


def step_flops(run, cfg) -> float:
    """FLOPs of one step, counted on the uncompiled model (the same arithmetic)."""
    net, run.net = run.net, run.model
    with FlopCounterMode(display=False) as counter:
        step(run, cfg)
    run.net = net
    return counter.get_total_flops()


def matmul_rate(tokens: int, hidden: int, precision: str) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, 4 * hidden, dtype=dtype)
    return rate(lambda: a @ b, 2 * tokens * hidden * 4 * hidden)


# a training step's own kinds first (log_softmax is the loss, not attention), then the forward's
TRAIN_KINDS = [("dropout", r"bernoulli|dropout|random_"),
               ("optimizer and clipping", r"adam|_foreach|clamp|vector_norm"),
               ("loss and embeddings", r"cross_entropy|nll_loss|log_softmax|embedding"), *KINDS]


def profile(run, cfg, steps: int) -> dict[str, float]:
    """Self CPU milliseconds per step, summed by TRAIN_KINDS (the first pattern that matches)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(run, cfg)
    kinds = dict.fromkeys([k for k, _ in TRAIN_KINDS] + ["the rest"], 0.0)
    for e in prof.key_averages():
        kinds[kind(e.key, TRAIN_KINDS)] += e.self_cpu_time_total / steps / 1e3
    return kinds


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", action="append", required=True, metavar='NAME="FLAGS"',
                   help="a named set of pretrain flags added to the shared ones; the first is the reference")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per variant first (compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="then where each variant's step time goes, by kind of op")
    p.add_argument("shared", nargs=argparse.REMAINDER, help="-- then pretrain's flags for every variant")
    args = p.parse_args()
    shared = args.shared[1:] if args.shared[:1] == ["--"] else args.shared
    variants = [v.partition("=") for v in args.variant]
    tmp = tempfile.TemporaryDirectory(prefix="pretrain_step-")  # each run's folder; removed at exit
    runs = [build(shared + shlex.split(flags), Path(tmp.name) / name) for name, _, flags in variants]
    cfg0, run0 = runs[0]
    flops = [step_flops(run, cfg) for cfg, run in runs]
    for cfg, run in runs:
        for _ in range(args.warmup):
            step(run, cfg)
    seen = [[] for _ in runs]
    for _ in range(args.rounds):
        for k, (cfg, run) in enumerate(runs):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(run, cfg)
            seen[k].append((time.perf_counter() - t0) / args.steps)
    precision = resolve_precision(cfg0.precision, run0.device)
    tokens, hidden = cfg0.batch_size * cfg0.seq_len, run0.model.config.hidden_size
    print(f"{cpu_name()}, torch {torch.__version__}, {cfg0.threads} threads: pretrain {' '.join(shared)}")
    print(f"one step of the first variant: {flops[0] / 1e9:.1f} GFLOP; the FFN product alone "
          f"({tokens} x {hidden} @ {hidden} x {4 * hidden}, {precision}): "
          f"{matmul_rate(tokens, hidden, precision) / 1e9:.0f} GFLOP/s\n")
    print("| variant | flags | ms per step (rounds) | vs first | GFLOP/s |")
    print("| --- | --- | --- | ---: | ---: |")
    ref = statistics.median(seen[0])
    for (name, _, flags), times, n in zip(variants, seen, flops):
        med = statistics.median(times)
        print(f"| {name} | `{flags}` | {1000 * med:.0f} ({', '.join(f'{1000 * t:.0f}' for t in times)}) | "
              f"{ref / med:.2f}x | {n / med / 1e9:.0f} |")
    if args.profile:
        seen = [profile(run, cfg, args.steps) for cfg, run in runs]
        print("\n| self CPU ms per step | " + " | ".join(name for name, _, _ in variants) + " |")
        print("| --- |" + " ---: |" * len(variants))
        for k in seen[0]:
            print(f"| {k} | " + " | ".join(f"{ms[k]:.0f}" for ms in seen) + " |")
        print("| all profiled ops | " + " | ".join(f"{sum(ms.values()):.0f}" for ms in seen) + " |")
        print("| GFLOP/s of matrix products and attention | " + " | ".join(
            f"{n / (ms['matmul'] + ms['attention']) / 1e6:.0f}" for n, ms in zip(flops, seen)) + " |")


if __name__ == "__main__":
    main()
