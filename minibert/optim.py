"""The optimiser recipe shared by pretraining and fine-tuning: AdamW without weight decay
on biases and LayerNorm, linear warmup then linear decay (BERT's schedule)."""

from __future__ import annotations

import re
from typing import Callable, Optional

import torch
from torch import nn


def _layer_depth(name: str, num_layers: int) -> int:
    """0 for the embeddings, i+1 for encoder layer i, num_layers+1 for everything above."""
    if "embeddings." in name:
        return 0
    m = re.search(r"encoder\.layers\.(\d+)\.", name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: Optional[float] = None,
                 l2sp: float = 0.0) -> list[dict]:
    """Parameter groups for AdamW.

    Biases and LayerNorm weights get no weight decay: they set offsets and scales, and
    pulling them to zero only hurts (as in BERT's original optimiser). With layer_decay
    (e.g. 0.9), layer i's learning rate is lr * layer_decay^(depth_top - i): the lower
    layers, which hold general features, move less during fine-tuning. With l2sp > 0 every
    weight of the encoder (`bert.*`, biases and LayerNorm included) decays toward its value at
    the start instead of toward zero (see PullToStart); the task head keeps weight_decay.
    """
    num_layers = getattr(getattr(model, "config", None), "num_layers", 0)
    groups: dict[tuple[float, float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2  # biases, LayerNorm weights and biases, the MLM output bias
        pull = l2sp if name.startswith("bert.") else 0.0
        wd = 0.0 if no_decay or pull else weight_decay
        scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - _layer_depth(name, num_layers))
        groups.setdefault((wd, scale, pull), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr": lr * s, "l2sp": pull} for (wd, s, pull), ps in groups.items()]


class PullToStart:
    """L2-SP (Li et al. 2018), decoupled from the gradient as AdamW decouples its weight decay:
    before each update, a weight w of a group with "l2sp" = s > 0 moves to w - lr * s * (w - w0),
    where w0 is its value when this object was made, as AdamW moves w to w - lr * wd * w. Plain
    decay forgets what pretraining put in the weights at a steady rate; this holds the fine-tuned
    model within reach of its start. Over a schedule the pull adds up to s * (sum of lr), so s
    must be of order 1 / (that sum) to matter (BERT's 0.01 decay toward zero barely does).
    From random weights the start is the random draw, the same rule for the no-pretraining
    baseline. Hooked on opt.step, so a step the fp16 scaler skips pulls nothing."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.start = [[p.detach().clone() for p in g["params"]] if g.get("l2sp") else None for g in opt.param_groups]
        opt.register_step_pre_hook(self.pull)

    @torch.no_grad()
    def pull(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        for g, start in zip(opt.param_groups, self.start):
            if start is not None:
                for p, p0 in zip(g["params"], start):
                    p.lerp_(p0, g["lr"] * g["l2sp"])  # w + c (w0 - w)


def adamw(groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.999),
          eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over parameter groups, taking torch's fused kernel where it exists."""
    params = [p for g in groups for p in g["params"]]
    # The fused kernel updates each tensor in one pass instead of ~10 elementwise passes
    # (benchmarks/ has the gain). It exists for CPU and CUDA floating-point tensors;
    # anything else (e.g. MPS in older torch) takes the default.
    fusable = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fusable or None)


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    layer_decay: Optional[float] = None,
) -> torch.optim.AdamW:
    return adamw(param_groups(model, lr, weight_decay, layer_decay), lr, betas, eps)


def warmup_linear(optimizer: torch.optim.Optimizer, warmup_steps: int,
                  total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr(t) = base * t / warmup for t < warmup, then base * (total - t) / (total - warmup)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)  # +1: the first step already trains
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_linear_by_time(optimizer: torch.optim.Optimizer, seconds: Callable[[], float], warmup_s: float,
                          total_s: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The same shape over training time instead of steps, for a time budget: with t = seconds()
    read at each scheduler step, lr(t) = base * t / warmup, then base * (total - t) / (total - warmup),
    reaching 0 when the budget is spent."""

    def factor(_step: int) -> float:
        t = seconds()
        if t < warmup_s:
            return t / warmup_s
        return max(0.0, (total_s - t) / max(1e-9, total_s - warmup_s))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
