"""Prune a fine-tuned classifier: whole attention heads and feed-forward neurons (the matrices
shrink), or single weights by magnitude (they only turn to zero).

    python -m minibert.prune --model runs/sst2 --data train.tsv --heads 0.5 --ffn 0.0 --out runs/sst2-pruned
    python -m minibert.finetune --init runs/sst2-pruned --train train.tsv --dev dev.tsv --epochs 1 \\
        --out runs/sst2-recovered                    # a short recovery fine-tune of the pruned model
    python -m minibert.prune --model runs/sst2 --data train.tsv --dev dev.tsv \\
        --curve 0,0.25,0.5,0.75 --out runs/sst2-curve    # dev accuracy against the fraction pruned

Head importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"). Put a gate
xi_h = 1 on every head's output, just before the output projection mixes the heads:

    MultiHead(x) = sum_h xi_h * head_h(x) W_o[h-th block of rows]

and score each head by how much the task loss L cares about its gate, over the task's data:

    I_h = sum over batches of | dL / d xi_h |

The gradient is exact and costs one backward pass per batch for every head at once; a head
whose removal (xi_h = 0) would barely move the loss to first order scores near 0. Feed-forward
neurons get the same score with a gate on each GELU output a_j(x) before W_2 (so dL/d xi_j =
sum over tokens of a_j * dL/da_j: gradient times activation). As in the paper, scores are
divided by their layer's L2 norm, so that layers with larger gradients do not take all the
cuts, and then the lowest-scoring fraction across all layers is removed: a head by deleting its
hs rows of W_q, W_k, W_v (and biases) and its hs columns of W_o; a neuron by deleting its row of
W_1 (and bias) and its column of W_2. The model that comes out is smaller and faster on any
kernel; its config.json lists the heads and neurons left in each layer (heads_per_layer,
intermediate_per_layer: a minibert deviation, see model.py).

Magnitude pruning (--magnitude f) zeroes the fraction f of the encoder's matrix weights with the
smallest |w|, ranked across all layers (torch.nn.utils.prune.global_unstructured). The matrices
keep their shapes: dense kernels multiply the zeros like any other number, so it saves neither
time nor disk space; it is here for the accuracy-vs-sparsity curve. A later fine-tune
(recovery) may make the zeros non-zero again.

The pruned model is a model folder like any other: predict, finetune --init and export read it.
A model pretrained here (checkpoint.pretrained_here) keeps its mark when pruned, so a recovery
fine-tune gets the schedule of a short pretraining.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.utils import prune as torch_prune
from torch.nn.utils import skip_init

from .checkpoint import atomic_write, atomic_write_text, here_mark, pretrained_here, resolve_model_dir
from .finetune import evaluate, read_labeled_file
from .model import BertModel
from .predict import Classifier, score_items, to_device
from .strategies import task_loss
from .tabular import ERRORS_HELP, DataError
from .toolkit import (RunOptions, UserError, autocast, check_max_len, cli_main, field, pick_device, prepare_output,
                      set_threads)


@dataclass
class PruneConfig(RunOptions):
    model: Optional[str] = field(None, "the fine-tuned classifier to prune: a model folder or a finetune run folder")
    data: Optional[str] = field(None, "labelled task data the importance scores are computed on (TSV, CSV or "
                                "JSONL, columns as in minibert.finetune), usually the training file")
    dev: Optional[str] = field(None, "labelled dev file: --curve evaluates on it; otherwise reported before and "
                               "after pruning")
    text_col: Optional[str] = field(None, "text column, by name or 0-based index")
    text_pair_col: Optional[str] = field(None, "second text column for sentence pairs")
    label_col: Optional[str] = field(None, "label column (default: 'label', else the last)")
    errors: str = field("strict", ERRORS_HELP, choices=("strict", "replace"))
    data_limit: int = field(2048, "score importance on this many random rows of --data (0 = all)")
    heads: float = field(0.0, "fraction of all attention heads to remove, the least important first")
    ffn: float = field(0.0, "fraction of all feed-forward neurons to remove, the least important first")
    magnitude: float = field(0.0, "fraction of the encoder's matrix weights to set to zero, the smallest |w| "
                             "first (unstructured: no speed-up with dense kernels)")
    curve: Optional[str] = field(None, "comma list of fractions, e.g. 0,0.25,0.5: evaluate heads, ffn and magnitude "
                                 "pruning at each on --dev, without recovery; writes curve.json and curve.png")
    batch_size: int = field(32, "rows per forward/backward pass")
    max_len: Optional[int] = field(None, "truncate rows to this many tokens (default: the model's tokenizer setting)")


# -----------------------------------------------------------------------------
# Importance: gates on heads and neurons, and the gradient of the loss with respect to them


@contextlib.contextmanager
def gates(bert: BertModel) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """Inside the block every head's output (before W_o) and every feed-forward neuron's output
    (before W_2) is multiplied by its own gate xi = 1, a leaf tensor that requires a gradient.
    Yields (head gates: one (nh,) per layer, neuron gates: one (I,) per layer). The model
    computes exactly what it computed before; the hooks are removed on exit."""
    head_gates, neuron_gates, handles = [], [], []
    for layer in bert.encoder.layers:
        attn, ffn = layer.attn, layer.ffn
        dev = attn.o.weight.device
        g_h = torch.ones(attn.nh, device=dev, requires_grad=True)
        g_n = torch.ones(ffn.down.in_features, device=dev, requires_grad=True)

        def gate_heads(module, args, g=g_h, nh=attn.nh, hs=attn.hs):
            y = args[0]  # (B, T, nh * hs): the heads side by side
            B, T, _ = y.shape
            return ((y.view(B, T, nh, hs) * g[:, None].to(y.dtype)).view(B, T, nh * hs),)

        def gate_neurons(module, args, g=g_n):
            return (args[0] * g.to(args[0].dtype),)  # (B, T, I) * (I,)

        handles += [attn.o.register_forward_pre_hook(gate_heads), ffn.down.register_forward_pre_hook(gate_neurons)]
        head_gates.append(g_h)
        neuron_gates.append(g_n)
    try:
        yield head_gates, neuron_gates
    finally:
        for h in handles:
            h.remove()


def importance(clf: Classifier, items: Sequence, y: Tensor, batch_size: int, device: torch.device,
               precision: str = "fp32") -> tuple[list[Tensor], list[Tensor]]:
    """I = sum over batches of |dL/d xi| for every head and every feed-forward neuron (the module
    docstring), L the task loss of the batch (cross-entropy, or MSE for regression), the model in
    eval mode (no dropout). Returns (one (nh,) tensor per layer, one (I,) tensor per layer)."""
    model = clf.model
    model.eval()
    with gates(model.bert) as (head_gates, neuron_gates):
        h_score = [torch.zeros_like(g) for g in head_gates]
        n_score = [torch.zeros_like(g) for g in neuron_gates]
        for s in range(0, len(items), batch_size):
            batch = to_device(clf.inputs.collate(items[s : s + batch_size]), device)
            with autocast(precision, device):
                loss = task_loss(clf.inputs.scores(model, batch), y[s : s + batch_size].to(device), None)
            # the gradient with respect to the gates only: no weight gradient is computed or kept
            grads = torch.autograd.grad(loss, head_gates + neuron_gates, allow_unused=True)
            for acc, g in zip(h_score + n_score, grads):
                if g is not None:  # a gate on a layer with nothing left
                    acc += g.detach().abs()
    return [s.cpu() for s in h_score], [s.cpu() for s in n_score]


def choose(scores: Sequence[Tensor], fraction: float) -> dict[int, list[int]]:
    """The units to remove: each layer's scores divided by their L2 norm (Michel et al.), then the
    round(fraction * total) lowest across all layers. Returns {layer: sorted unit indices}."""
    normed = [s / (s.norm() + 1e-20) for s in scores]
    flat = torch.cat(normed) if normed else torch.zeros(0)
    n = round(fraction * flat.numel())
    where = [(i, j) for i, s in enumerate(normed) for j in range(s.numel())]
    picked = sorted(where[k] for k in torch.argsort(flat, stable=True)[:n].tolist())
    out: dict[int, list[int]] = {}
    for i, j in picked:
        out.setdefault(i, []).append(j)
    return out


# -----------------------------------------------------------------------------
# Structured pruning: the rows and columns really go


def _keep(linear: nn.Linear, idx: Tensor, dim: int) -> nn.Linear:
    """A new nn.Linear with only the output rows (dim 0) or input columns (dim 1) in idx."""
    w = linear.weight.detach().index_select(dim, idx.to(linear.weight.device)).clone()
    # skip_init: the weights are copied in next, so no random initialisation first
    out = skip_init(nn.Linear, w.size(1), w.size(0), bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if linear.bias is not None:
            out.bias.copy_(linear.bias[idx] if dim == 0 else linear.bias)
    out.train(linear.training)
    return out


def prune_heads(bert: BertModel, remove: dict[int, Sequence[int]]) -> None:
    """Delete heads in place: {layer: head indices}. Head h of a layer owns rows h*hs..(h+1)*hs-1
    of W_q, W_k, W_v and the same columns of W_o. The config's heads_per_layer follows."""
    if not remove:  # nothing to do: the config keeps its uniform sizes (None)
        return
    cfg = bert.config
    counts = [cfg.layer_heads(i) for i in range(cfg.num_layers)]
    for i, heads in remove.items():
        attn = bert.encoder.layers[i].attn
        gone = set(heads)
        kept = [h for h in range(attn.nh) if h not in gone]
        idx = torch.tensor([h * attn.hs + d for h in kept for d in range(attn.hs)], dtype=torch.long)
        attn.q, attn.k, attn.v = (_keep(m, idx, 0) for m in (attn.q, attn.k, attn.v))
        attn.o = _keep(attn.o, idx, 1)
        attn.nh = counts[i] = len(kept)
    cfg.heads_per_layer = counts


def prune_neurons(bert: BertModel, remove: dict[int, Sequence[int]]) -> None:
    """Delete feed-forward neurons in place: {layer: neuron indices}; neuron j owns row j of W_1
    (and b_1[j]) and column j of W_2. The config's intermediate_per_layer follows."""
    if not remove:  # nothing to do: the config keeps its uniform sizes (None)
        return
    cfg = bert.config
    counts = [cfg.layer_intermediate(i) for i in range(cfg.num_layers)]
    for i, neurons in remove.items():
        ffn = bert.encoder.layers[i].ffn
        gone = set(neurons)
        idx = torch.tensor([j for j in range(ffn.up.out_features) if j not in gone], dtype=torch.long)
        ffn.up, ffn.down = _keep(ffn.up, idx, 0), _keep(ffn.down, idx, 1)
        counts[i] = len(idx)
    cfg.intermediate_per_layer = counts


def magnitude_prune(bert: BertModel, fraction: float) -> float:
    """Zero the `fraction` of the encoder's matrix weights (W_q, W_k, W_v, W_o, W_1, W_2 of every
    layer) with the smallest |w|, ranked across all of them, and make it permanent (no mask
    left behind). Returns the fraction of those weights that are now zero."""
    targets = [(m, "weight") for layer in bert.encoder.layers
               for m in (layer.attn.q, layer.attn.k, layer.attn.v, layer.attn.o, layer.ffn.up, layer.ffn.down)
               if m.weight.numel() > 0]
    if fraction > 0 and targets:
        torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=fraction)
        for m, name in targets:
            torch_prune.remove(m, name)  # weight = weight_orig * mask, as a plain parameter again
    total = sum(m.weight.numel() for m, _ in targets)
    return sum(int((m.weight == 0).sum()) for m, _ in targets) / max(total, 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# The command


def check_config(cfg: PruneConfig) -> list[float]:
    """Option combinations, before anything is read; returns the --curve fractions."""
    if cfg.model is None or cfg.out is None:
        raise UserError("--model and --out are required")
    if cfg.resume:
        raise UserError("--resume: pruning is one pass with nothing to resume; run it again with --overwrite")
    for flag, v in (("--heads", cfg.heads), ("--ffn", cfg.ffn), ("--magnitude", cfg.magnitude)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{flag} is a fraction in [0, 1], got {v:g}")
    curve = []
    if cfg.curve is not None:
        try:
            curve = [float(x) for x in cfg.curve.split(",")]
        except ValueError:
            raise UserError(f"--curve must be fractions separated by commas, like 0,0.25,0.5; got {cfg.curve!r}") \
                from None
        if not all(0.0 <= f <= 1.0 for f in curve):
            raise UserError(f"--curve fractions must lie in [0, 1], got {cfg.curve}")
        if cfg.dev is None:
            raise UserError("--curve evaluates on --dev: give --dev")
    if not curve and cfg.heads == cfg.ffn == cfg.magnitude == 0:
        raise UserError("nothing to do: give --heads, --ffn and/or --magnitude (fractions), or --curve")
    if (cfg.heads or cfg.ffn or curve) and cfg.data is None:
        raise UserError("--heads, --ffn and --curve rank units by their importance on task data: give --data")
    if cfg.batch_size < 1 or cfg.data_limit < 0:
        raise UserError(f"need --batch-size >= 1 and --data-limit >= 0, got {cfg.batch_size}, {cfg.data_limit}")
    check_max_len(cfg.max_len)
    return curve


def read_task_rows(path: str, flag: str, cfg: PruneConfig, clf: Classifier, limit: int = 0
                   ) -> tuple[list, Tensor]:
    """A labelled file -> (items encoded for the model, labels as the model's class ids)."""
    data = read_labeled_file(path, flag, cfg)
    if not data.has_labels:
        raise DataError(data.path, 1, "no label column; importance and accuracy need labels (name it with "
                        "--label-col)")
    ids = clf.label_map.encode(data.labels, data.path, data.line_numbers)
    y = torch.tensor(ids, dtype=torch.float if clf.label_map.is_regression else torch.long)
    texts, pairs = data.texts, data.pairs
    if limit and limit < len(texts):
        idx = sorted(torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed))[:limit].tolist())
        texts, pairs, y = [texts[i] for i in idx], [pairs[i] for i in idx] if pairs else None, y[idx]
    return clf.inputs.encode(texts, pairs), y


def dev_score(clf: Classifier, items: Sequence, y: Tensor, cfg: PruneConfig, device: torch.device) -> float:
    """Accuracy (pearson for regression) of clf.model on encoded rows."""
    with autocast(cfg.precision, device):
        scores = score_items(clf.model, clf.inputs, items, cfg.batch_size, device)
    d = evaluate(scores, y, clf.label_map)
    return d["pearson"] if clf.label_map.is_regression else d["accuracy"]


def pruned_copy(clf: Classifier, head_scores, neuron_scores, heads: float, ffn: float, magnitude: float
                ) -> tuple[nn.Module, dict]:
    """A deep copy of clf.model with the fractions removed, and what was removed."""
    model = copy.deepcopy(clf.model)
    removed_heads = choose(head_scores, heads) if heads else {}
    removed_neurons = choose(neuron_scores, ffn) if ffn else {}
    prune_heads(model.bert, removed_heads)
    prune_neurons(model.bert, removed_neurons)
    sparsity = magnitude_prune(model.bert, magnitude) if magnitude else None
    return model, {"removed_heads": {str(k): v for k, v in removed_heads.items()},
                   "removed_neurons": sum(len(v) for v in removed_neurons.values()),
                   "encoder_weight_sparsity": sparsity}


def plot_curve(curve: dict, path: Path, metric: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.4), layout="constrained")
    FigureCanvasAgg(fig)  # own canvas: no pyplot, no global backend change
    ax = fig.subplots()
    labels = {"heads": "attention heads (structured)", "ffn": "FFN neurons (structured)",
              "magnitude": "weights by |w| (unstructured)"}
    for kind, pts in curve.items():
        ax.plot([p["fraction"] for p in pts], [p[metric] for p in pts], "o-", ms=3, lw=1, label=labels[kind])
    ax.set(xlabel="fraction pruned (no recovery fine-tune)", ylabel=f"dev {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))


def run(cfg: PruneConfig, log=print) -> dict:
    curve_fractions = check_config(cfg)
    src = resolve_model_dir(cfg.model)
    out = prepare_output(cfg.out, overwrite=cfg.overwrite, resume=False, inputs={"--model": src})
    device = pick_device(cfg.device)
    set_threads(cfg.threads)
    clf = Classifier(src, device=str(device), batch_size=cfg.batch_size, max_len=cfg.max_len)
    data = read_task_rows(cfg.data, "--data", cfg, clf, cfg.data_limit) if cfg.data else None
    dev = read_task_rows(cfg.dev, "--dev", cfg, clf) if cfg.dev else None
    metric = "pearson" if clf.label_map.is_regression else "accuracy"
    report: dict = {"model": str(src), "parameters_before": count_parameters(clf.model)}
    head_scores = neuron_scores = None
    if data is not None:
        head_scores, neuron_scores = importance(clf, data[0], data[1], cfg.batch_size, device, cfg.precision)
        log(f"importance of {sum(s.numel() for s in head_scores)} heads and {sum(s.numel() for s in neuron_scores):,} "
            f"neurons scored on {len(data[0]):,} rows of {cfg.data}")
        report["head_importance"] = [s.tolist() for s in head_scores]
    if dev is not None:
        report[f"dev_{metric}_before"] = dev_score(clf, *dev, cfg, device)
    if cfg.heads or cfg.ffn or cfg.magnitude:
        model, what = pruned_copy(clf, head_scores, neuron_scores, cfg.heads, cfg.ffn, cfg.magnitude)
        report.update(what, parameters_after=count_parameters(model), heads_per_layer=model.config.heads_per_layer,
                      intermediate_per_layer=model.config.intermediate_per_layer)
        prompt = src / "prompt.json"
        extra = {"prompt.json": prompt.read_text(encoding="utf-8")} if prompt.exists() else {}
        if pretrained_here(src):  # a pruned short pretraining is still one: a later fine-tune keeps its schedule
            extra.update(here_mark(pruned_by="minibert.prune", init=str(src), short_pretraining=True))
        model.save_pretrained(out, tokenizer=clf.tok, extra_files=extra)
        if dev is not None:
            pruned = Classifier(out, device=str(device), batch_size=cfg.batch_size, max_len=cfg.max_len)
            report[f"dev_{metric}_after"] = dev_score(pruned, *dev, cfg, device)
        log(f"pruned: {report['parameters_before']:,} -> {report['parameters_after']:,} parameters; heads per layer "
            f"{[model.config.layer_heads(i) for i in range(model.config.num_layers)]}; saved to {out}")
    if curve_fractions:
        curve: dict = {"heads": [], "ffn": [], "magnitude": []}
        for kind in curve:
            for f in curve_fractions:
                if f == 0:  # the unpruned model, scored above
                    model, score = clf.model, report[f"dev_{metric}_before"]
                else:
                    model, _ = pruned_copy(clf, head_scores, neuron_scores, *[f if k == kind else 0.0 for k in curve])
                    score = dev_score(_with_model(clf, model), *dev, cfg, device)
                curve[kind].append({"fraction": f, metric: score, "parameters": count_parameters(model)})
                log(f"curve: {kind} {f:g} -> dev {metric} {score:.4f}")
        report["curve"] = curve
        atomic_write_text(out / "curve.json", json.dumps(curve, indent=2) + "\n")
        plot_curve(curve, out / "curve.png", metric)
    for k in [k for k in report if k.startswith("dev_")]:
        log(f"{k}: {report[k]:.4f}")
    atomic_write_text(out / "pruning.json", json.dumps(report, indent=2) + "\n")
    return report


def _with_model(clf: Classifier, model: nn.Module) -> Classifier:
    other = copy.copy(clf)
    other.model = model
    return other


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main("python -m minibert.prune", run, argv, PruneConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
