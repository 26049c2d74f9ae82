"""int8 inference in PyTorch: torchao's dynamic quantization of an eager minibert model.

    from minibert import BertModel
    from minibert.quantize import quantize_int8
    model = quantize_int8(BertModel.from_pretrained("runs/sst2/model").eval())
    h = model(input_ids, token_type_ids, attention_mask)  # as before, int8 matmuls inside

Dynamic quantization (torchao's Int8DynamicActivationInt8WeightConfig), for each nn.Linear of
the encoder layers (Q, K, V, output projection, feed-forward up and down):
    weights      int8, symmetric, one scale per output channel: s_j = max_i |W_ji| / 127
    activations  int8, symmetric, one scale per token, taken from that token's own range at run
                 time (no calibration data): s_t = max_i |x_ti| / 127
    y = (x_q @ W_q^T) * s_t * s_j + b    -- the matmul in integers, rescaled to fp32
The pooler and the heads stay fp32: they run once per sequence, not per token. Attention's
activation-by-activation products (scores, mixing) stay fp32 too. The weights are replaced in
place by torchao tensor subclasses, so the model is for inference: no training, no
save_pretrained (quantize again after loading). Needs `pip install -e ".[deploy]"`.

On a CPU without int8 dot-product instructions (VNNI, AMX), i.e. with AVX2 only, this path is
SLOWER than fp32, eager or compiled: each int8 matmul goes to torch._int_mm, whose CPU kernel
without them is a slow generic loop; torch.compile(model, options={"freezing": True}) under
torch.inference_mode() speeds up a single layer but not the whole encoder
(benchmarks/deploy_results.md has the measurements). The fast int8 path on such CPUs is ONNX
Runtime's: `python -m minibert.export --model DIR --format onnx --out FILE --quantize int8`.
This one is for accuracy (one activation scale per token), and for CPUs with VNNI or AMX.

Static int8 (quantize_int8_static): the fastest int8 path on CPUs with VNNI or AMX, where it
runs oneDNN's int8 matmuls with the requantisation fused in. The model is captured with
torch.export (batch and length free), every linear layer is annotated by torchao's
X86InductorQuantizer, and a few calibration batches of real text fix the activation ranges once:
    weights      int8, symmetric, one scale per output channel (as above)
    activations  uint8, asymmetric, one scale s and zero point z per tensor, fixed by calibration:
                 s = (max - min) / 255, z = round(-min / s), x_q = clamp(round(x / s) + z, 0, 255)
    y = s_x * s_j * (sum_i (x_q,i - z) W_q,ji) + b
No range is computed at run time, so nothing but the int8 matmul is left to do per call; the
price is that a text whose activations fall outside the calibrated range is clipped. The result
is a graph module: as it stands it simulates int8 in fp32 (quantise, dequantise, fp32 matmul,
the same numbers); torch.compile(m) under torch._inductor.config.freezing replaces each pattern
by one int8 kernel. On CPUs without VNNI (AVX2 only) the activations use 7 bits (reduce_range):
the u8 x s8 AVX2 instruction saturates its 16-bit pair sums with 8.

    m = quantize_int8_static(model, calibration_batches)   # model: export.load_for_export's
    fast = compile_frozen(m)                                # under torch.no_grad / inference_mode
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .toolkit import UserError, cpu_info


# logger -> the text of the lines its import logs that say nothing about this use (see quantize_int8)
_IMPORT_NOISE = {
    "torchao": ("Failed to load ", ".so"),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported by torch.compile",),
}


def _drop_messages(*parts: str):
    """A logging filter that drops a record whose message contains every one of parts."""
    return lambda record: not all(part in record.getMessage() for part in parts)


def _encoder_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and ".layers." in f".{name}"


@contextlib.contextmanager
def _quiet_torchao() -> Iterator[None]:
    # On import torchao logs a line per optional GPU kernel library it cannot load (none is used
    # here), and torch's pytree a deprecation note on each Enum type torchao registers. Both are
    # logging records, not warnings: drop exactly those lines; any other message still shows.
    filters = {name: _drop_messages(*parts) for name, parts in _IMPORT_NOISE.items()}
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    try:
        yield
    except ImportError as e:
        raise UserError(f"int8 quantization in PyTorch needs torchao ({e}): pip install -e \".[deploy]\"") from None
    finally:
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the encoder layers' linear layers of a minibert model in place; returns the model."""
    with _quiet_torchao():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=_encoder_linear)
    return model


def cpu_has_vnni() -> bool:
    """Whether the CPU has an int8 dot-product instruction (AVX512-VNNI, AVX-VNNI or AMX)."""
    _, flags = cpu_info()
    if flags is None:  # not Linux: assume a current CPU
        return True
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize_int8_static(model: nn.Module, calibration: Iterable[tuple[Tensor, Tensor, Tensor]]) -> nn.Module:
    """Static int8 of a graph-signature model (export.load_for_export's: input_ids, attention_mask,
    token_type_ids -> one tensor), calibrated on the given batches; returns the converted graph
    module (int8 simulated in fp32 until compile_frozen)."""
    with _quiet_torchao():
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from .export import dynamic_shapes, example_inputs

    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise UserError("static int8 quantization needs at least one calibration batch")
    program = torch.export.export(model, example_inputs(model), dynamic_shapes=dynamic_shapes(model), strict=False)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=not cpu_has_vnni()))
    observed = prepare_pt2e(program.module(), quantizer)
    with torch.no_grad():
        for batch in (first, *batches):
            observed(*batch)  # the observers record each activation's range
    converted = convert_pt2e(observed)
    # the fp32 originals of the quantized weights stay attributes of the module though no node
    # reads them any more; drop them, or they would be saved and exported beside their int8 copies
    used = {n.target for n in converted.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in (*converted.named_parameters(), *converted.named_buffers()) if n not in used]:
        owner, _, attr = name.rpartition(".")
        delattr(converted.get_submodule(owner), attr)
    converted.delete_all_unused_submodules()
    return converted


def compile_frozen(module: nn.Module) -> nn.Module:
    """torch.compile with the weights frozen into the graph: inductor folds them into prepacked
    layouts and, for a quantize_int8_static module, replaces each quantise-matmul-dequantise
    pattern by one oneDNN int8 kernel. Call the result under torch.no_grad or inference_mode."""
    import torch._inductor.config as inductor_config

    # freezing must be on when the first call compiles, which happens later: set it for the
    # process (options={"freezing": True} would do for fp32, but the int8 patterns are only
    # matched by the process-wide setting)
    inductor_config.freezing = True
    return torch.compile(module)
