"""BERT, written out by hand: embeddings -> multi-head attention -> feed-forward ->
encoder block -> encoder -> pooler -> task heads. Read it top to bottom.

Shape letters used in every comment below:
    B  batch size               T  sequence length (tokens)
    H  hidden size              nh number of attention heads
    hs head size (H // nh)      I  intermediate (feed-forward) size
    V  vocabulary size          N  number of labelled (masked) positions

Deviations from the original BERT (Devlin et al., 2019) are all opt-in config
fields, flagged where they are implemented and pinned by tests:
    position_embedding="sinusoidal"  (Vaswani et al. 2017 encoding instead of learned)
    norm_position="pre"              (pre-LN blocks + a final LayerNorm)
    attn_impl="sdpa"                 (same math through torch's fused kernel)
    attn_impl="flex" | "triton"      (same math, fused kernels; NO attention-probability
                                      dropout -- a deviation while training, none at eval)
    fused_kernels=True               (same math: fused add+LayerNorm and bias+GELU, the MLM
                                      decoder + loss in chunks, no logits kept)
    heads_per_layer, intermediate_per_layer
                                     (structured pruning, minibert/prune.py: each layer keeps its
                                      own number of heads and feed-forward neurons)
With the defaults the module computes exactly what Google's / Hugging Face's BERT
computes, to float precision (tests/test_parity.py).

attn_impl and fused_kernels say how to run, not what the model is: modules copy them when
built, and `model.set_backend(attn_impl=..., fused_kernels=...)` switches them later.
The fast attention backends live in minibert/kernels/attention.py, a table by name.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import PretrainedMixin
from .kernels.attention import ATTENTION_BACKENDS


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768  # H
    num_layers: int = 12  # L
    num_heads: int = 12  # nh; hs = H / nh
    intermediate_size: int = 3072  # I, 4H in every published BERT
    max_position: int = 512
    type_vocab_size: int = 2  # segment A / segment B
    dropout: float = 0.1  # on embeddings, sublayer outputs and the classifier
    attention_dropout: float = 0.1  # on the attention probabilities
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    position_embedding: str = "learned"  # "learned" (BERT) | "sinusoidal" (deviation)
    norm_position: str = "post"  # "post" (BERT) | "pre" (deviation)
    # how to run (copied by the modules when built; not saved in config.json; see set_backend):
    attn_impl: str = "sdpa"  # "math" (readable, returns weights) | "sdpa" | "flex" | "triton"
    fused_kernels: bool = False  # add+LayerNorm, bias+GELU and the MLM decoder+loss as fused ops (minibert/kernels)
    num_labels: int = 2  # for the classification heads
    classifier_dropout: Optional[float] = None  # None -> use `dropout`
    # label names for classification heads, saved in config.json like Hugging Face does
    id2label: dict = field(default_factory=dict)
    # whether the classifier was fine-tuned on text pairs, so that predict can refuse the other
    # kind of input; None: not recorded (published checkpoints, pretrained models)
    text_pair: Optional[bool] = None
    # DEVIATION (structured pruning, minibert/prune.py): per-layer sizes, num_layers counts each.
    # None = every layer has num_heads heads and intermediate_size neurons, as in BERT. The head
    # size stays hidden_size // num_heads; a layer may keep 0 heads or 0 neurons (then that
    # sublayer outputs its output projection's bias alone).
    heads_per_layer: Optional[list[int]] = None
    intermediate_per_layer: Optional[list[int]] = None

    def __post_init__(self):
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.position_embedding not in ("learned", "sinusoidal"):
            raise ValueError(f"position_embedding must be 'learned' or 'sinusoidal', got {self.position_embedding!r}")
        if self.norm_position not in ("post", "pre"):
            raise ValueError(f"norm_position must be 'post' or 'pre', got {self.norm_position!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {self.attn_impl!r}")
        if self.position_embedding == "sinusoidal" and self.hidden_size % 2:
            raise ValueError("the sinusoidal encoding needs an even hidden_size")
        # JSON turns int keys into strings; keep them ints here
        self.id2label = {int(k): v for k, v in self.id2label.items()}
        for name, high in (("heads_per_layer", self.num_heads), ("intermediate_per_layer", None)):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            sizes = list(sizes)
            if len(sizes) != self.num_layers or not all(isinstance(n, int) and n >= 0 for n in sizes):
                raise ValueError(f"{name} must list {self.num_layers} counts >= 0 (one per layer), got {sizes}")
            if high is not None and max(sizes) > high:
                raise ValueError(f"{name} = {sizes}: a layer cannot have more than num_heads = {high} heads")
            setattr(self, name, sizes)

    def layer_heads(self, i: int) -> int:
        """Attention heads of layer i (num_heads unless pruned)."""
        return self.num_heads if self.heads_per_layer is None else self.heads_per_layer[i]

    def layer_intermediate(self, i: int) -> int:
        """Feed-forward neurons of layer i (intermediate_size unless pruned)."""
        return self.intermediate_size if self.intermediate_per_layer is None else self.intermediate_per_layer[i]

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "BertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


ATTN_IMPLS = ("math", *ATTENTION_BACKENDS)  # "math" is written out below; the rest are kernels


def _size(L: int, H: int) -> dict:
    # Google's small-BERT grid: A = H/64 heads, intermediate = 4H.
    return dict(num_layers=L, hidden_size=H, num_heads=H // 64, intermediate_size=4 * H)


PRESETS: dict[str, dict] = {
    "tiny": _size(2, 128),
    "mini": _size(4, 256),
    "small": _size(4, 512),
    "medium": _size(8, 512),
    "base": _size(12, 768),
    "large": _size(24, 1024),
}


# -----------------------------------------------------------------------------
# Dropout


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """F.dropout(x, p, training), with the CPU's mask drawn from 16 random bits per element.

    torch's CPU dropout draws a random number for every element, and its masks took an eighth
    of a small BERT's training step (benchmarks/pretrain_results.md, twenty-fourth round); one
    64-bit draw split into four 16-bit lanes costs a sixth as much. p is rounded to a multiple of
    1/65,536 (0.1 -> 0.100006) and the kept elements are scaled by 1/(1 - that p), so each element
    keeps its expectation, as with F.dropout. The draws come from torch's generator, so seeds and
    resumed runs stay reproducible. Other devices keep F.dropout, which is fused there."""
    if not training or p <= 0.0 or p >= 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    dropped = round(p * 65536)  # of the 65,536 values a 16-bit lane takes
    n = x.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)  # (ceil(n/4),) 64 bits each
    lanes = bits.view(torch.int16)[:n].view(x.shape)  # same shape as x, uniform on [-32768, 32767]
    keep = lanes >= dropped - 32768  # True with probability 1 - dropped / 65536
    # the mask in x's dtype, scaled, then one product: what F.dropout computes with its own mask
    return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


class Dropout(nn.Dropout):
    """nn.Dropout through dropout() above: the same module, state and eval() behaviour."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


# -----------------------------------------------------------------------------
# Embeddings


def sinusoidal_encoding(max_len: int, dim: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, dim, 2, dtype=torch.float64)  # (d/2,)
    angle = pos / torch.pow(10000.0, two_i / dim)  # (T, d/2)
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.float()  # computed in float64 so large positions stay accurate


class Embeddings(nn.Module):
    """token + segment + position, then LayerNorm and dropout."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.seg = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        if cfg.position_embedding == "learned":
            self.pos = nn.Embedding(cfg.max_position, cfg.hidden_size)
        else:
            # DEVIATION from BERT: fixed sinusoidal positions (Vaswani et al. 2017), not trained.
            # A non-persistent buffer, so it is never saved and cannot be loaded wrongly.
            self.register_buffer("pe", sinusoidal_encoding(cfg.max_position, cfg.hidden_size), persistent=False)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)

    def position_table(self) -> Tensor:
        return self.pos.weight if hasattr(self, "pos") else self.pe

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, position_ids: Optional[Tensor] = None) -> Tensor:
        T = input_ids.size(1)  # BertModel.check_inputs has checked T <= max_position
        if position_ids is None:
            pos = self.position_table()[:T]  # (T, H), broadcast over the batch
        else:
            pos = self.position_table()[position_ids]  # (B, T, H), packed rows restart at 0
        x = self.tok(input_ids) + self.seg(token_type_ids) + pos  # (B, T, H)
        return self.drop(self.norm(x))


# -----------------------------------------------------------------------------
# Multi-head attention


def attention_bias(attention_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Turn a keep-mask into an additive bias that broadcasts against the (B, nh, T, T) scores.

    attention_mask is (B, T) with 1 = real token, 0 = padding (the usual BERT input), or
    (B, T, T) with mask[b, i, j] = 1 when query i may look at key j (packed rows).
    Masked scores get the most negative finite number rather than -inf: exp() of it is
    exactly 0 after the max is subtracted, and a row with nothing to attend to (a
    padding query in a packed batch) stays finite instead of turning into NaN.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        keep = attention_mask[:, None, None, :]  # (B, 1, 1, T): the same for every query and head
    elif attention_mask.dim() == 3:
        keep = attention_mask[:, None, :, :]  # (B, 1, T, T)
    else:
        raise ValueError(f"attention_mask must be (B, T) or (B, T, T), got shape {tuple(attention_mask.shape)}")
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    return bias.masked_fill(keep == 0, torch.finfo(dtype).min)


def doc_mask(doc_ids: Tensor) -> Tensor:
    """Packed rows: doc_ids (B, T) says which sequence each token belongs to (0 = padding).
    A token may look at the tokens of its own sequence only: a block-diagonal (B, T, T) mask."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) & (doc_ids[:, None, :] != 0)  # (B, T, T)


@dataclass
class AttentionMask:
    """The mask in the form the attention backend wants, built once per forward pass."""

    bias: Optional[Tensor] = None  # additive (B, 1, 1|T, T): the math path, and backends that take it
    prepared: object = None  # what a backend's own mask builder made from the (B, T) ids (kernels/attention.py)


def build_attention_mask(
    attention_mask: Optional[Tensor], doc_ids: Optional[Tensor], impl: str, dtype: torch.dtype, need_weights: bool
) -> AttentionMask:
    if attention_mask is not None and doc_ids is not None:
        raise ValueError("give either attention_mask or doc_ids, not both")
    from_ids = None if impl == "math" or need_weights else ATTENTION_BACKENDS[impl].mask_from_ids
    if from_ids is None:
        return AttentionMask(bias=attention_bias(doc_mask(doc_ids) if doc_ids is not None else attention_mask, dtype))
    if attention_mask is not None and attention_mask.dim() == 3:
        raise ValueError(f"attn_impl={impl!r} takes (B, T) padding masks or doc_ids, not a (B, T, T) mask; "
                         "use attn_impl='sdpa' or 'math'")
    ids = doc_ids if doc_ids is not None else attention_mask  # a 0/1 padding mask is the one-sequence case
    return AttentionMask(prepared=None if ids is None else from_ids(ids))


def linear(n_in: int, n_out: int) -> nn.Linear:
    """nn.Linear(n_in, n_out). A layer whose heads or neurons were all pruned has one with no rows
    or no columns, and torch's default initialisation warns that it has nothing to do each time such
    a model is built; the warning is kept quiet for those only (a layer without inputs gets a zero bias)."""
    if n_in and n_out:
        return nn.Linear(n_in, n_out)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        return nn.Linear(n_in, n_out)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_nh) W_o,  head_i = softmax(Q_i K_i^T / sqrt(hs)) V_i."""

    def __init__(self, cfg: BertConfig, layer: int = 0):
        super().__init__()
        H = cfg.hidden_size
        self.nh, self.hs = cfg.layer_heads(layer), cfg.head_size  # nh * hs = H unless heads were pruned
        A = self.nh * self.hs
        self.q = linear(H, A)
        self.k = linear(H, A)
        self.v = linear(H, A)
        self.o = linear(A, H)
        self.attention_dropout = cfg.attention_dropout
        self.attn_impl = cfg.attn_impl  # how to run; switched by set_backend

    def forward(self, x: Tensor, mask: AttentionMask, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        B, T, H = x.shape
        if self.nh == 0:  # every head pruned: what is left is the output projection's bias
            weights = x.new_zeros(B, 0, T, T) if need_weights else None
            return self.o(x.new_zeros(B, T, 0)), weights
        # 1) project, then split H into nh heads of size hs (nh * hs = H unless heads were pruned)
        q = self.q(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        p_drop = self.attention_dropout if self.training else 0.0
        weights = None
        if self.attn_impl == "math" or need_weights:
            # 2) scaled scores: dividing by sqrt(hs) keeps their variance ~1 so softmax is not saturated
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hs)  # (B, nh, T, T)
            # 3) padding mask: masked keys get ~-inf and so zero probability
            if mask.bias is not None:
                scores = scores + mask.bias
            # 4) softmax over the keys, then dropout on the probabilities (as in BERT)
            weights = scores.softmax(dim=-1)  # (B, nh, T, T)
            y = dropout(weights, p_drop, self.training) @ v  # (B, nh, T, hs)
        else:
            # 2-4) the same function in one fused kernel, which never stores the (T, T) scores
            backend = ATTENTION_BACKENDS[self.attn_impl]
            m = mask.bias if backend.mask_from_ids is None else mask.prepared
            y = backend.attend(q, k, v, m, p_drop, 1.0 / math.sqrt(self.hs))  # (B, nh, T, hs)
        # 5) merge the heads back and mix them with the output projection
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, nh * hs)
        return self.o(y), weights


# -----------------------------------------------------------------------------
# Feed-forward and the encoder block


def gelu(x: Tensor) -> Tensor:
    """GELU(x) = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), the exact form: transformers' "gelu", which
    released BERT checkpoints are evaluated with. Google's original BERT code used the tanh fit
    (transformers' "gelu_new"); the two differ by at most ~5e-4 (chapter 5)."""
    return F.gelu(x)  # torch's erf GELU, one fused kernel; tests pin it to the formula above


class FeedForward(nn.Module):
    """FFN(x) = W_2 GELU(W_1 x + b_1) + b_2, applied to every position independently."""

    def __init__(self, cfg: BertConfig, layer: int = 0):
        super().__init__()
        I = cfg.layer_intermediate(layer)  # noqa: E741
        self.up = linear(cfg.hidden_size, I)
        self.down = linear(I, cfg.hidden_size)
        self.fused_kernels = cfg.fused_kernels  # how to run; switched by set_backend

    def forward(self, x: Tensor) -> Tensor:
        if self.fused_kernels and self.up.out_features > 0:  # a layer pruned to 0 neurons has nothing to fuse
            # the same function: a bias-free matmul, then bias + GELU in one pass over (B, T, I)
            from .kernels import bias_gelu

            return self.down(bias_gelu(F.linear(x, self.up.weight), self.up.bias))
        return self.down(gelu(self.up(x)))


class EncoderLayer(nn.Module):
    """post-LN (BERT):  x = LN(x + Drop(Attn(x)));  x = LN(x + Drop(FFN(x)))
    pre-LN (deviation): x = x + Drop(Attn(LN(x)));  x = x + Drop(FFN(LN(x)))

    Pre-LN (Xiong et al. 2020) keeps the residual stream un-normalised, which trains
    deep stacks stably without warmup; post-LN is what every released BERT uses.
    """

    def __init__(self, cfg: BertConfig, layer: int = 0):
        super().__init__()
        self.attn = MultiHeadAttention(cfg, layer)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg, layer)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.pre_ln = cfg.norm_position == "pre"
        self.fused_kernels = cfg.fused_kernels  # how to run; switched by set_backend

    def add_norm(self, x: Tensor, residual: Tensor, norm: nn.LayerNorm) -> Tensor:
        """LN(x + residual); with fused_kernels the add and the LayerNorm are one kernel."""
        if self.fused_kernels:
            from .kernels import add_layer_norm

            return add_layer_norm(x, residual, norm.weight, norm.bias, norm.eps)
        return norm(x + residual)

    def forward(self, x: Tensor, mask: AttentionMask, need_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if self.pre_ln:
            a, w = self.attn(self.norm1(x), mask, need_weights)
            x = x + self.drop(a)
            x = x + self.drop(self.ffn(self.norm2(x)))
        else:
            a, w = self.attn(x, mask, need_weights)
            x = self.add_norm(self.drop(a), x, self.norm1)
            x = self.add_norm(self.drop(self.ffn(x)), x, self.norm2)
        return x, w


class Encoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))
        # DEVIATION (pre-LN only): the residual stream is never normalised inside the blocks,
        # so a final LayerNorm brings the output back to BERT's scale for the heads.
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_position == "pre" else None

    def forward(self, x: Tensor, mask: AttentionMask, need_weights: bool = False) -> tuple[Tensor, list[Tensor]]:
        maps = []
        for layer in self.layers:
            x, w = layer(x, mask, need_weights)
            if need_weights:
                maps.append(w)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, maps


# -----------------------------------------------------------------------------
# Input checks: a bad input is named in the model's terms, not by an index error deep in torch


def check_shape(t: Optional[Tensor], name: str, allowed: list[tuple[int, ...]], integer: bool = True) -> None:
    if t is None:
        return
    if integer and (t.is_floating_point() or t.is_complex()):
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if tuple(t.shape) not in allowed:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be " + " or ".join(str(a) for a in allowed))


def check_values(*checks: tuple[str, Optional[Tensor], int, str]) -> None:
    """Each check (name, t, high, what): every value of t lies in [0, high), `what` saying where
    high comes from. Labels (a name ending in "label(s)") may also be -100, "no label".
    One device sync for all the checks together; skipped inside torch.compile, where a
    data-dependent branch would break the graph."""
    checks = tuple(c for c in checks if c[1] is not None and c[1].numel() > 0)
    if not checks or torch.compiler.is_compiling():
        return

    def ok(name: str, t: Tensor, high: int) -> Tensor:
        inside = (t >= 0) & (t < high)
        return inside | (t == -100) if name.endswith(("label", "labels")) else inside

    bad = torch.stack([~ok(n, t, hi).all() for n, t, hi, _ in checks])  # (len(checks),)
    if not bad.any().item():  # the sync point
        return
    name, t, high, what = checks[int(bad.nonzero()[0])]
    value = t[~ok(name, t, high)][0].item()
    no_label = " or -100 (no label)" if name.endswith(("label", "labels")) else ""
    raise ValueError(f"{name} holds {value}; allowed values are 0..{high - 1} ({what}){no_label}")


# -----------------------------------------------------------------------------
# The encoder model


class PretrainedModel(PretrainedMixin, nn.Module):
    """What every minibert model shares: from_pretrained / save_pretrained (minibert/checkpoint.py)
    and set_backend, the one way to change how a built model runs."""

    config_class = BertConfig

    def set_backend(self, attn_impl: Optional[str] = None, fused_kernels: Optional[bool] = None) -> "PretrainedModel":
        """Switch every layer to another attention backend and/or the fused kernels (None: keep).
        The weights and what the model computes stay the same. Returns the model."""
        if attn_impl is not None and attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {attn_impl!r}")
        for m in self.modules():  # the modules that copied these fields when built
            if attn_impl is not None and hasattr(m, "attn_impl"):
                m.attn_impl = attn_impl
            if fused_kernels is not None and hasattr(m, "fused_kernels"):
                m.fused_kernels = bool(fused_kernels)
        # and the config, so a model built from it (a copy, a new head) runs the same way
        self.config.attn_impl = self.config.attn_impl if attn_impl is None else attn_impl
        self.config.fused_kernels = self.config.fused_kernels if fused_kernels is None else bool(fused_kernels)
        return self


class BertModel(PretrainedModel):
    """input ids (B, T) -> final hidden states (B, T, H).  `pool(h)` gives the [CLS] summary (B, H)."""

    head_prefixes = ("pooler.",)  # parts a checkpoint may lack; they are initialised and reported
    backbone_only = True  # its tensor names have no `bert.` prefix, as transformers saves them

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        # pooler: dense + tanh on [CLS], trained by NSP; the sentence vector for classification
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn_impl = cfg.attn_impl  # how to run (the mask's form); switched by set_backend
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # BERT's init: N(0, 0.02) for every matrix, zero biases, LayerNorm = identity
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def check_inputs(self, input_ids, token_type_ids, attention_mask, position_ids, doc_ids) -> None:
        """ValueError naming the input, its wrong shape or value, and what is allowed."""
        if not isinstance(input_ids, Tensor):
            raise ValueError(f"input_ids must be a (B, T) tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T) = (batch, tokens), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        max_position = self.embeddings.position_table().size(0)
        if T > max_position:
            raise ValueError(f"sequence length {T} exceeds max_position {max_position}; "
                             f"truncate input_ids to {max_position} tokens")
        check_shape(input_ids, "input_ids", [(B, T)])
        check_shape(token_type_ids, "token_type_ids", [(B, T)])
        check_shape(attention_mask, "attention_mask", [(B, T), (B, T, T)], integer=False)
        check_shape(position_ids, "position_ids", [(B, T)])
        check_shape(doc_ids, "doc_ids", [(B, T)])
        check_values(
            ("input_ids", input_ids, self.embeddings.tok.num_embeddings, "vocab_size"),
            ("token_type_ids", token_type_ids, self.embeddings.seg.num_embeddings, "type_vocab_size"),
            ("position_ids", position_ids, max_position, "max_position"),
        )

    def _encode(self, input_ids, token_type_ids, attention_mask, position_ids, doc_ids, need_weights):
        self.check_inputs(input_ids, token_type_ids, attention_mask, position_ids, doc_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        mask = build_attention_mask(attention_mask, doc_ids, self.attn_impl, x.dtype, need_weights)
        return self.encoder(x, mask, need_weights)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        doc_ids: Optional[Tensor] = None,
    ) -> Tensor:
        """attention_mask (B, T): 1 = token, 0 = padding. For packed rows (several sequences in
        one row, see minibert/packing.py) pass doc_ids (B, T) instead -- 0 = padding, k = the
        k-th sequence of the row -- and position_ids that restart at 0 for each sequence."""
        h, _ = self._encode(input_ids, token_type_ids, attention_mask, position_ids, doc_ids, need_weights=False)
        return h  # (B, T, H)

    def forward_with_attention(
        self,
        input_ids: Tensor,
        token_type_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """Hidden states and every layer's attention probabilities, a list of L (B, nh, T, T)."""
        return self._encode(input_ids, token_type_ids, attention_mask, None, None, need_weights=True)

    def pool(self, h: Tensor, cls_index: Optional[Tensor] = None) -> Tensor:
        """tanh(dense(h at [CLS])). Packed rows hold several [CLS]: cls_index (N, 2) gives each
        one's (row, column), and the result is (N, H) in that order."""
        cls = h[:, 0] if cls_index is None else h[cls_index[:, 0], cls_index[:, 1]]  # (B, H) or (N, H)
        return torch.tanh(self.pooler(cls))


# -----------------------------------------------------------------------------
# Heads


class MLMHead(nn.Module):
    """hidden -> dense -> GELU -> LayerNorm -> decoder (tied to the word embeddings) + own bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list so the tied matrix is not registered twice
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, h: Tensor) -> Tensor:
        return self.norm(gelu(self.dense(h)))  # (..., H)

    def decode(self, x: Tensor) -> Tensor:
        return F.linear(x, self.word_embeddings[0].weight, self.bias)  # (..., V)

    def forward(self, h: Tensor) -> Tensor:
        return self.decode(self.transform(h))  # (..., V)


def summed_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The loss, defined once for every head that scores chosen positions (NSP, tagging):
    (fp32 sum of the cross-entropy over the rows whose label is not -100, how many of them
    the argmax gets right, how many there are). A trainer adds sums and counts over
    micro-batches and processes and divides once, so no batch is weighted by its size
    twice; with no labelled row the sum is 0, not the NaN a mean would be."""
    logits = logits.reshape(-1, logits.size(-1))  # (N, C)
    labels = labels.reshape(-1)  # (N,)
    keep = labels != -100
    # in fp32 even under autocast: a bf16 sum of thousands of losses would lose digits
    loss_sum = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    # max().indices, not argmax(): the same first maximum, but argmax over bf16 rows is a slow
    # scalar loop on CPUs
    correct = ((logits.detach().max(-1).indices == labels) & keep).sum()
    return loss_sum, correct, keep.sum()


class _RowsCrossEntropy(torch.autograd.Function):
    """sum_i (logsumexp(x_i) - x_i[y_i]) over the (N, V) logits, and each row's argmax, taken
    ROWS rows at a time in fp32. The same numbers as F.cross_entropy(x.float(), y, reduction="sum");
    on a CPU it is about twice as fast for bf16 logits: it never writes the (N, V) fp32 copy, log-
    probabilities, zeroed gradient and bf16 cast that the general path stores and reads back."""

    ROWS = 64  # a (64, 16384) fp32 block is 4 MB: it stays in cache between the passes over it

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        N, R = logits.size(0), _RowsCrossEntropy.ROWS
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,) logsumexp of each row
        pred = torch.empty(N, dtype=torch.long, device=logits.device)  # (N,)
        for i in range(0, N, R):
            x = logits[i:i + R].to(torch.float32, copy=True)  # (R, V) a copy: the passes below are in place
            m, pred[i:i + R] = x.max(-1)  # the first maximum, as argmax
            lse[i:i + R] = x.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)  # shifted by the max: no overflow
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(pred)
        target = logits.gather(1, labels[:, None]).squeeze(1).float()  # (N,) x_i[y_i]
        return (lse - target).sum(), pred

    @staticmethod
    def backward(ctx, grad: Tensor, _pred_grad) -> tuple[Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        out, R = torch.empty_like(logits), _RowsCrossEntropy.ROWS
        for i in range(0, logits.size(0), R):
            p = logits[i:i + R].to(torch.float32, copy=True).sub_(lse[i:i + R, None]).exp_()  # (R, V) softmax
            p[torch.arange(p.size(0)), labels[i:i + R]] -= 1.0  # d/dx of -x[y]
            out[i:i + R] = p.mul_(grad)
        return out, None


def torch_vocab_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """vocab_cross_entropy by F.cross_entropy, whose fused GPU kernel does not write the copies."""
    # in fp32 even under autocast: a bf16 sum of thousands of losses would lose digits
    return F.cross_entropy(logits.float(), labels, reduction="sum"), logits.detach().max(-1).indices


def vocab_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(fp32 sum of the cross-entropy, argmax of each row) for (N, V) logits whose N labels are
    all real (the MLM heads gather the masked positions first): on a CPU by _RowsCrossEntropy,
    elsewhere by torch_vocab_cross_entropy."""
    if logits.device.type == "cpu":
        return _RowsCrossEntropy.apply(logits, labels)
    return torch_vocab_cross_entropy(logits, labels)


@dataclass
class PreTrainingOutput:
    loss: Optional[Tensor]  # mlm_loss + nsp_loss (or just mlm_loss without NSP labels)
    mlm_logits: Optional[Tensor]  # (B, T, V) without labels; (N, V) at the labelled positions with
    # labels; None with labels and fused_kernels (the chunked loss never keeps them)
    nsp_logits: Tensor  # (B, 2); (N, 2), one row per instance, for packed rows
    mlm_loss: Optional[Tensor] = None  # mean over the labelled positions = mlm_loss_sum / mlm_count
    nsp_loss: Optional[Tensor] = None  # mean = nsp_loss_sum / nsp_count
    mlm_predictions: Optional[Tensor] = None  # (N,) argmax at the labelled positions, with labels
    # sums and counts (see summed_cross_entropy), with labels / next_sentence_label:
    mlm_loss_sum: Optional[Tensor] = None  # fp32 scalar, 0 when no position is labelled
    mlm_correct: Optional[Tensor] = None  # long scalar
    mlm_count: Optional[Tensor] = None  # long scalar
    nsp_loss_sum: Optional[Tensor] = None
    nsp_correct: Optional[Tensor] = None
    nsp_count: Optional[Tensor] = None


class BertForPreTraining(PretrainedModel):
    """Masked LM + next-sentence prediction, the two objectives of BERT's pretraining."""

    head_prefixes = ("mlm.", "nsp.", "bert.pooler.")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.fused_kernels = cfg.fused_kernels
        self.bert = BertModel(cfg)
        self.mlm = MLMHead(cfg, self.bert.embeddings.tok)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self.mlm.apply(self.bert._init_weights)
        self.nsp.apply(self.bert._init_weights)

    def forward(
        self,
        input_ids: Tensor,
        token_type_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        next_sentence_label: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        doc_ids: Optional[Tensor] = None,
        cls_index: Optional[Tensor] = None,
    ) -> PreTrainingOutput:
        """Packed rows (minibert/packing.py: several instances per row) take position_ids,
        doc_ids and cls_index instead of attention_mask; nsp_logits then has one row per
        instance, in cls_index's order."""
        h = self.bert(input_ids, token_type_ids, attention_mask, position_ids, doc_ids)  # (B, T, H)
        nsp_logits = self.nsp(self.bert.pool(h, cls_index))  # (B, 2), or (N, 2) packed
        check_shape(labels, "labels", [tuple(input_ids.shape)])
        check_shape(next_sentence_label, "next_sentence_label", [tuple(nsp_logits.shape[:1])])
        check_values(("labels", labels, self.config.vocab_size, "vocab_size"),
                     ("next_sentence_label", next_sentence_label, 2, "is-next / random"))
        if labels is None:
            return PreTrainingOutput(None, self.mlm(h), nsp_logits)
        # Only the labelled ~15% of positions are ever scored: gather them first so the
        # V-wide decoder runs on N rows instead of B*T (the loss is the same either way).
        sel = labels.reshape(-1) != -100  # (B*T,)
        x = self.mlm.transform(h.reshape(-1, h.size(-1))[sel])  # (N, H)
        targets = labels.reshape(-1)[sel]  # (N,)
        if self.fused_kernels:
            # the same loss, with the decoder and the cross-entropy taken a chunk of rows at a
            # time: the (N, V) logits, their softmax and gradient are never all in memory
            from .kernels import linear_cross_entropy

            mlm_logits = None
            weight = self.mlm.word_embeddings[0].weight
            m_mean, mlm_pred = linear_cross_entropy(x, weight, self.mlm.bias, targets, return_predictions=True)
            m_count = sel.sum()
            # the kernel returns the mean (NaN for no row); its sum is 0 there, as above
            m_sum = torch.where(m_count > 0, m_mean * m_count, torch.zeros_like(m_mean))
            m_correct = (mlm_pred == targets).sum()
        else:
            mlm_logits = self.mlm.decode(x)  # (N, V)
            m_sum, mlm_pred = vocab_cross_entropy(mlm_logits, targets)
            m_count, m_correct = sel.sum(), (mlm_pred == targets).sum()
            m_mean = m_sum / m_count
        out = PreTrainingOutput(m_mean, mlm_logits, nsp_logits, m_mean, None, mlm_pred, m_sum, m_correct, m_count)
        if next_sentence_label is not None:
            out.nsp_loss_sum, out.nsp_correct, out.nsp_count = summed_cross_entropy(nsp_logits, next_sentence_label)
            out.nsp_loss = out.nsp_loss_sum / out.nsp_count
            out.loss = m_mean + out.nsp_loss
        return out


@dataclass
class MaskedLMOutput:
    loss: Optional[Tensor]  # mean over the labelled positions = loss_sum / count
    logits: Tensor  # (B, T, V), or (N, V) at the labelled positions when labels are given
    loss_sum: Optional[Tensor] = None  # with labels: fp32 summed cross-entropy, 0 when none is labelled
    correct: Optional[Tensor] = None  # long scalar: labelled positions whose argmax is the label
    count: Optional[Tensor] = None  # long scalar: labelled positions


class BertForMaskedLM(PretrainedModel):
    """The MLM head alone (RoBERTa-style pretraining, and the cloze prompts of fine-tuning).
    It always keeps the logits (prompts read them), so fused_kernels changes only the encoder."""

    head_prefixes = ("mlm.", "bert.pooler.")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.mlm = MLMHead(cfg, self.bert.embeddings.tok)
        self.mlm.apply(self.bert._init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> MaskedLMOutput:
        h = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        check_shape(labels, "labels", [tuple(input_ids.shape)])
        check_values(("labels", labels, self.config.vocab_size, "vocab_size"))
        if labels is None:
            return MaskedLMOutput(None, self.mlm(h))
        sel = labels.reshape(-1) != -100  # (B*T,)
        logits = self.mlm(h.reshape(-1, h.size(-1))[sel])  # (N, V)
        targets = labels.reshape(-1)[sel]  # (N,)
        loss_sum, pred = vocab_cross_entropy(logits, targets)
        count = sel.sum()
        return MaskedLMOutput(loss_sum / count, logits, loss_sum, (pred == targets).sum(), count)


@dataclass
class ClassifierOutput:
    loss: Optional[Tensor]
    logits: Tensor  # (B, num_labels) for sequences, (B, T, num_labels) for tokens


class BertForSequenceClassification(PretrainedModel):
    """[CLS] -> pooler -> dropout -> linear. Cross-entropy, or MSE when num_labels == 1 (regression)."""

    head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        p = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.drop = Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.classifier.apply(self.bert._init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ClassifierOutput:
        h = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        logits = self.classifier(self.drop(self.bert.pool(h)))  # (B, num_labels)
        loss = None
        if labels is not None:
            check_shape(labels, "labels", [tuple(input_ids.shape[:1])], integer=self.config.num_labels > 1)
            if self.config.num_labels > 1:
                check_values(("labels", labels, self.config.num_labels, "num_labels"))
            if self.config.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return ClassifierOutput(loss, logits)


class BertForTokenClassification(PretrainedModel):
    """Every token's hidden state -> dropout -> linear (tagging, NER). Labels -100 are ignored."""

    head_prefixes = ("classifier.", "bert.pooler.")

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        p = cfg.dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.drop = Dropout(p)
        self.classifier = nn.Linear(cfg.hidden_size, cfg.num_labels)
        self.classifier.apply(self.bert._init_weights)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, labels=None) -> ClassifierOutput:
        h = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, H)
        logits = self.classifier(self.drop(h))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            check_shape(labels, "labels", [tuple(input_ids.shape)])
            check_values(("labels", labels, self.config.num_labels, "num_labels"))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        return ClassifierOutput(loss, logits)
