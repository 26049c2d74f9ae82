"""The matmul ceiling the deployment targets are read against: one product, alone, in each runtime.

    python benchmarks/gemm_ceiling.py --threads 2 [--rounds 4]

Times the largest product of a MiniLM forward pass at batch 32 x 128 (4096 x 384 @ 384 x 1536,
the FFN up-projection; --shape for another) in torch fp32, in ONNX Runtime fp32 (a one-node
MatMul graph, with B a constant as in an exported model, and with B fed at every call as
training's changing weights would be) and in
ONNX Runtime int8 (a one-node MatMulInteger graph, u8 activations x s8 weights, as its dynamic
quantization emits). A whole model cannot run faster than its largest matmul runs alone, so
these rates, beside the hardware's peak from benchmarks/cpu_peak.c, bound every row of
`python -m minibert.bench --deploy`. Needs onnx and onnxruntime (the deploy extra).

The int8 inputs are random bytes over the full u8 range. On CPUs without VNNI the u8 x s8
instruction saturates the 16-bit sum of two neighbouring products, so some of the int32 results
are then off; the time does not depend on the values (tests/test_bench.py checks the product
exactly with 7-bit activations).
"""
import argparse
import statistics

import numpy as np
import torch

from minibert.bench import cpu_name, timed

CPU = torch.device("cpu")


def rate(fn, ops, calls=30):
    """Median operations per second over `calls` calls, after three untimed ones."""
    for _ in range(3):
        fn()
    return ops / statistics.median(timed(fn, CPU) for _ in range(calls))


def one_node_session(op, a, b, threads, b_constant=True):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem = {np.float32: TensorProto.FLOAT, np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}
    out_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("a", elem[a.dtype.type], a.shape)]
    if not b_constant:  # fed with every call, as a weight that training changes each step
        inputs.append(helper.make_tensor_value_info("b", elem[b.dtype.type], b.shape))
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["y"])], "product", inputs,
        [helper.make_tensor_value_info("y", out_type, (a.shape[0], b.shape[1]))],
        # a constant weight, as in an exported model, which ONNX Runtime packs once when it loads
        initializer=[onnx.numpy_helper.from_array(b, "b")] if b_constant else [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {"a": a} if b_constant else {"a": a, "b": b}
    return lambda: session.run(None, feeds)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4, help="rounds of the three products, in turns")
    p.add_argument("--shape", type=int, nargs=3, default=(4096, 384, 1536), metavar=("M", "K", "N"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m, k, n = args.shape
    rng = np.random.default_rng(0)
    a32 = rng.standard_normal((m, k), dtype=np.float32)
    b32 = rng.standard_normal((k, n), dtype=np.float32)
    a8 = rng.integers(0, 256, (m, k), dtype=np.uint8)
    b8 = rng.integers(-128, 128, (k, n), dtype=np.int8)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    runs = {
        "torch fp32 matmul (GFLOP/s)": lambda: ta @ tb,
        "ONNX Runtime fp32 MatMul (GFLOP/s)": one_node_session("MatMul", a32, b32, args.threads),
        "ONNX Runtime fp32 MatMul, B fed each call (GFLOP/s)": one_node_session("MatMul", a32, b32, args.threads,
                                                                               b_constant=False),
        "ONNX Runtime int8 MatMulInteger u8 x s8 (GOP/s)": one_node_session("MatMulInteger", a8, b8, args.threads),
    }
    seen = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            seen[name].append(rate(fn, 2 * m * k * n) / 1e9)
    print(f"{cpu_name()}: {m} x {k} @ {k} x {n}, {args.threads} threads, {args.rounds} rounds "
          f"(median of 30 calls each)")
    for name, rates in seen.items():
        print(f"| {name} | {min(rates):.0f}-{max(rates):.0f} |")


if __name__ == "__main__":
    main()
