"""Compile every kernel for an H100 (sm_90) on a machine without a GPU, and report its
registers, spills and whether it uses the Hopper tensor cores.

    python -m minibert.kernels.compile_check          (TRITON_INTERPRET must be unset)

Triton's wheel ships the NVIDIA toolchain (ptxas, cuobjdump), so the whole pipeline down to
the cubin runs on a CPU. What it checks: that the kernels compile for the GPU at all (the
interpreter accepts things the compiler does not), that the launch configs chosen by
_triton_attention._config and _triton_rows._row_tile spill no registers to local memory (a
spilled FlashAttention runs several times slower), and that bf16 / fp16 attention uses
HGMMA (wgmma) instructions. It does not time anything: that needs the GPU.
Exit status 1 if any kernel spills or misses the tensor cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _triton_attention as attn
from . import _triton_rows as rows

H100 = GPUTarget("cuda", 90, 32)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")

# Argument types by name; integers (sizes, strides) are everything else.
_FP32_ARGS = {"LSE", "Delta", "Mean", "Rstd", "DW_part", "DB_part"}
_SCALAR_FLOATS = {"qk_scale", "scale", "eps"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _FP32_ARGS:
            sig[name] = "*fp32"
        elif name == "Doc":
            sig[name] = "*i32"
        elif name in _SCALAR_FLOATS:
            sig[name] = "fp32"
        elif name[0].isupper() and name != "T":  # T is the sequence length
            sig[name] = f"*{dtype}"  # every other pointer holds activations of the input dtype
        else:
            sig[name] = "i32"
    return sig


def inspect_kernel(kernel, dtype: str, constexprs: dict, num_warps: int, num_stages: int = 2) -> dict:
    """Compile one kernel for sm_90; return its register count, spill bytes and MMA kind."""
    src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=H100, options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_CUOBJDUMP, "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([_CUOBJDUMP, "-sass", cubin], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return dict(
        regs=int(m.group(1)),
        stack=int(m.group(2)),  # bytes of per-thread local memory: spills
        mma="HGMMA" if "HGMMA" in sass else ("HMMA" if "HMMA" in sass else "none"),
        shared=compiled.metadata.shared,
    )


def _attention_cases():
    fake = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    for name, torch_dtype in fake.items():
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[name]
        for hd in (16, 32, 64, 128):
            for kind, kernel in (
                ("fwd", attn._attn_fwd_kernel),
                ("dkdv", attn._attn_bwd_dkdv_kernel),
                ("dq", attn._attn_bwd_dq_kernel),
            ):
                cfg = attn._gpu_config(hd, torch_dtype, kind)
                consts = dict(
                    HAS_DOCS=True,
                    HEAD_DIM=hd,
                    DOT_PRECISION="ieee" if torch_dtype == torch.float32 else "tf32",
                    INTERP_BF16=False,
                    BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=cfg["BLOCK_N"],
                )
                tensor_cores = torch_dtype != torch.float32
                yield f"attn {kind:4s} {short} hd={hd:<3d}", kernel, short, consts, cfg, tensor_cores


def _row_cases():
    for width in (128, 256, 512, 768, 1024):
        bm, bn, nw = rows._row_tile(width)
        consts = dict(BLOCK_M=bm, BLOCK_N=bn, ROUND_BF16=False)
        cfg = dict(num_warps=nw, num_stages=2)
        yield f"add_layer_norm fwd H={width}", rows._add_layer_norm_fwd_kernel, "bf16", consts, cfg, False
        yield f"add_layer_norm bwd H={width}", rows._add_layer_norm_bwd_kernel, "bf16", consts, cfg, False
    bm, bn = rows._elementwise_tile(3072)
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, ROUND_BF16=False)
    yield "bias_gelu fwd", rows._bias_gelu_fwd_kernel, "bf16", consts, dict(num_warps=4, num_stages=2), False
    yield "bias_gelu bwd", rows._bias_gelu_bwd_kernel, "bf16", consts, dict(num_warps=4, num_stages=2), False


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the compiler")
        return 2
    failures = 0
    for label, kernel, dtype, consts, cfg, tensor_cores in [*_row_cases(), *_attention_cases()]:
        r = inspect_kernel(kernel, dtype, consts, cfg["num_warps"], cfg.get("num_stages", 2))
        bad = r["stack"] > 0 or (tensor_cores and r["mma"] != "HGMMA")
        failures += bad
        tiles = f"{consts['BLOCK_M']}x{consts['BLOCK_N']}"
        print(
            f"{label:30s} tile {tiles:8s} warps {cfg['num_warps']}  regs {r['regs']:3d}  "
            f"spill {r['stack']:4d} B  shared {r['shared']:6d} B  mma {r['mma']:5s}{'  <-- FAIL' if bad else ''}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
