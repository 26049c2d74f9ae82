"""Two helpers that make Triton's CPU interpreter give the GPU's bf16 numbers.

Triton 3.9's interpreter (TRITON_INTERPRET=1, used by the tests) differs from the GPU for
bf16 in two ways, both checked by hand on that version:

* fp32 -> bf16 casts truncate (round toward zero) instead of rounding to nearest even, so
  every bf16 output is biased low by up to 2^-8 relative and errors double;
* tl.dot on bf16 tiles multiplies their raw 16-bit patterns as integers (garbage).

Each fix is behind a constexpr flag that only the CPU launch sets, so GPU code is unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreter_bf16(dtype: torch.dtype, device: torch.device) -> bool:
    """True when a kernel handling `dtype` runs under the interpreter and needs the fixes."""
    return dtype == torch.bfloat16 and device.type == "cpu"


@triton.jit
def round_bf16(x, ENABLE: tl.constexpr):
    """Round fp32 x to the nearest bf16 value (ties to even), still held in fp32, so the
    interpreter's truncating cast that follows is exact. A no-op unless ENABLE."""
    if ENABLE:
        bits = x.to(tl.uint32, bitcast=True)
        # Add just under half of the dropped 16 bits' range, plus the kept lowest bit (ties
        # to even), then clear the dropped bits.
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. With UPCAST the bf16 operands are widened to fp32 first;
    bf16 x bf16 products are exact in fp32, so the result is what bf16 tensor cores give."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)
