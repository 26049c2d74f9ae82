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
"""

from __future__ import annotations

import logging

from torch import nn

from .toolkit import UserError


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


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the encoder layers' linear layers of a minibert model in place; returns the model."""
    # On import torchao logs a line per optional GPU kernel library it cannot load (none is used
    # here), and torch's pytree a deprecation note on each Enum type torchao registers. Both are
    # logging records, not warnings: drop exactly those lines; any other message still shows.
    filters = {name: _drop_messages(*parts) for name, parts in _IMPORT_NOISE.items()}
    for name, f in filters.items():
        logging.getLogger(name).addFilter(f)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        raise UserError(f"int8 quantization in PyTorch needs torchao ({e}): pip install -e \".[deploy]\"") from None
    finally:
        for name, f in filters.items():
            logging.getLogger(name).removeFilter(f)
    quantize_(model, Int8DynamicActivationInt8WeightConfig(), filter_fn=_encoder_linear)
    return model
