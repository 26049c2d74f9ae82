# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 6 · Compressing and deploying (模型压缩与部署)
#
# The runnable half of [chapter 6](../chapters/06_compressing_and_deploying.md): the three
# formulas of compression checked against minibert's code (the distillation loss, int8
# scales and zero points, head importance), then the whole road on a tiny model trained
# here on the embedded sentiment set: a teacher, half its attention heads pruned and a
# short recovery fine-tune, a student four times smaller distilled from it, an exported
# ONNX graph that runs without minibert, int8 quantization, and the deployment table of
# `python -m minibert.bench --deploy`. Needs the deploy extra (`pip install -e ".[deploy]"`:
# onnx, onnxscript, onnxruntime, torchao). Numbers the chapter quotes are printed as
# `RESULT name = value`; timings depend on your machine and are printed as plain text.

# %%
import contextlib
import importlib.util
import io
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
if importlib.util.find_spec("minibert") is None:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from minibert import BertConfig, BertForSequenceClassification, Tokenizer
from minibert.bench import BenchConfig
from minibert.bench import run as bench_run
from minibert.distill import DistillConfig, distillation_loss
from minibert.distill import run as distill_run
from minibert.export import main as export_main
from minibert.finetune import FinetuneConfig
from minibert.finetune import run as finetune_run
from minibert.prune import PruneConfig
from minibert.prune import run as prune_run
from minibert.toolkit import parse_config

missing = [m for m in ("onnx", "onnxscript", "onnxruntime", "torchao") if importlib.util.find_spec(m) is None]
assert not missing, f"this notebook needs {missing}: pip install -e '.[deploy]'"


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


def quietly(fn, cfg):
    """Run one of minibert's jobs without its log lines (each prints a few per epoch)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(cfg, log=lambda s: None)


# pruning 3 of 4 heads leaves a layer with none: its empty projections are built without initialising
warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
T0 = time.perf_counter()
WORK = Path(tempfile.mkdtemp(prefix="minibert-ch6-"))  # model folders and graphs; deleted at the end
SENTIMENT = ROOT / "data" / "sentiment"
files = {split: str(SENTIMENT / f"{split}.tsv") for split in ("train", "dev", "test")}
print("data:", SENTIMENT)

# %% [markdown]
# ## 1. The distillation loss, by hand
#
# $L = \alpha T^2\,\mathrm{KL}(p_t^T \,\|\, p_s^T) + (1-\alpha)\,\mathrm{CE}(z_s, y)$ with
# $p^T = \mathrm{softmax}(z / T)$. Written out for one row of three classes, against
# `minibert.distill.distillation_loss`; then the gradient of the soft term with respect to
# the student's logits, with and without the $T^2$.

# %%
z_s = torch.tensor([[2.0, -1.0, 0.5]])  # the student's logits (one row, three classes)
z_t = torch.tensor([[3.0, 0.0, -1.0]])  # the teacher's
y = torch.tensor([0])
alpha = 0.5
rows = []
for T in (1.0, 2.0, 4.0, 8.0):
    p_t = (z_t / T).softmax(-1)
    log_p_s = (z_s / T).log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    by_hand = alpha * T**2 * kl + (1 - alpha) * F.cross_entropy(z_s, y)
    code, _ = distillation_loss(z_s, z_t, y, temperature=T, alpha=alpha)
    assert torch.allclose(by_hand, code, atol=1e-6)
    z = z_s.clone().requires_grad_()
    soft = F.kl_div((z / T).log_softmax(-1), (z_t / T).log_softmax(-1), reduction="batchmean", log_target=True)
    (g,) = torch.autograd.grad(soft, z)
    # d KL / d z_s = (p_s - p_t) / T: checked, then measured with and without the T^2 factor
    assert torch.allclose(g, ((z / T).softmax(-1) - p_t).detach() / T, atol=1e-6)
    rows.append((T, code.item(), g.norm().item(), (T**2 * g).norm().item()))
    print(f"T = {T:3.0f}   loss {code.item():.4f}   |grad of KL| {g.norm().item():.4f}   "
          f"with T^2: {(T ** 2 * g).norm().item():.4f}")
result("distill_loss_matches_by_hand", True)
result("kl_grad_T1", f"{rows[0][2]:.3f}")
result("kl_grad_T8", f"{rows[-1][2]:.4f}")
result("kl_grad_T8_times_T2", f"{rows[-1][3]:.3f}")

# %% [markdown]
# ## 2. A teacher
#
# A tiny BERT (preset `tiny`: 2 layers, H = 128, 2 heads of 64 per layer, I = 512) with a
# WordPiece vocabulary of 1,000 learnt from the training file, trained from random weights
# on the 2,000 training rows: 5 epochs in batches of 32, learning rate 1e-3. It is the
# model every later section compresses.

# %%
t = time.perf_counter()
teacher_metrics = quietly(finetune_run, FinetuneConfig(
    **files, from_scratch=True, preset="tiny", vocab_size=1000, epochs=5, batch_size=32, lr=1e-3, warmup=0.1,
    out=str(WORK / "teacher"), progress=False, seed=0))
print(f"teacher: dev accuracy {teacher_metrics['dev']['accuracy']:.3f}, test accuracy "
      f"{teacher_metrics['test']['accuracy']:.3f} ({time.perf_counter() - t:.0f} s)")
result("teacher_test_accuracy", f"{teacher_metrics['test']['accuracy']:.1%}")

# %% [markdown]
# ## 3. Quantization: scales and zero points
#
# Symmetric int8 maps $[-\max|x|, \max|x|]$ onto $[-127, 127]$ with one scale and no zero
# point; asymmetric (uint8) maps $[\min x, \max x]$ onto $[0, 255]$ with a scale and a zero
# point. Below: the round-trip error $\|\hat x - x\| / \|x\|$ on the teacher's first
# feed-forward weight matrix (one scale for the matrix vs one per output row), and on
# the GELU outputs of that layer for a batch of training sentences (symmetric vs
# asymmetric, one scale for the tensor).

# %%
teacher = BertForSequenceClassification.from_pretrained(WORK / "teacher" / "model").eval()
tok = Tokenizer.from_pretrained(WORK / "teacher" / "model")


def symmetric(x, dim=None):
    """int8 in [-127, 127]: s = max|x| / 127 (over `dim`, or the whole tensor), q = round(x / s)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    s = amax / 127
    q = torch.clamp(torch.round(x / s), -127, 127)
    return q * s


def asymmetric(x):
    """uint8 in [0, 255]: s = (max - min) / 255, z = round(-min / s), q = round(x / s) + z."""
    s = (x.max() - x.min()) / 255
    z = torch.round(-x.min() / s)
    q = torch.clamp(torch.round(x / s) + z, 0, 255)
    return (q - z) * s


def rel_error(x_hat, x):
    return ((x_hat - x).norm() / x.norm()).item()


W = teacher.bert.encoder.layers[0].ffn.up.weight.detach()  # (I, H) = (512, 128)
err_tensor, err_channel = rel_error(symmetric(W), W), rel_error(symmetric(W, dim=1), W)
acts = []
hook = teacher.bert.encoder.layers[0].ffn.down.register_forward_pre_hook(lambda m, a: acts.append(a[0].detach()))
train_texts = [line.split("\t")[0] for line in Path(files["train"]).read_text(encoding="utf-8").splitlines()[1:65]]
with torch.no_grad():
    batch = tok(train_texts)
    teacher(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
hook.remove()
a = acts[0][batch["attention_mask"].bool()]  # (real tokens, I): GELU outputs, never below about -0.17
err_sym, err_asym = rel_error(symmetric(a), a), rel_error(asymmetric(a), a)
print(f"weights W_1 {tuple(W.shape)}: one scale {err_tensor:.4f}, one scale per row {err_channel:.4f}")
print(f"GELU outputs, range [{a.min():.3f}, {a.max():.3f}]: symmetric {err_sym:.4f}, asymmetric {err_asym:.4f}")
result("q_weight_per_tensor_error", f"{err_tensor:.4f}")
result("q_weight_per_channel_error", f"{err_channel:.4f}")
result("q_gelu_symmetric_error", f"{err_sym:.4f}")
result("q_gelu_asymmetric_error", f"{err_asym:.4f}")

# %% [markdown]
# ## 4. Pruning heads (and why it needs a score)
#
# `python -m minibert.prune` scores every head by $I_h = \sum |\partial L / \partial \xi_h|$
# over the training rows (a gate $\xi_h = 1$ on each head's output), normalises the scores
# per layer, and removes the lowest half of the heads for real: their rows of $W_q, W_k,
# W_v$ and columns of $W_o$ go. `--curve` also measures dev accuracy against the fraction
# pruned, for heads, feed-forward neurons and single weights by magnitude (no recovery).
# Then one epoch of fine-tuning lets the pruned model recover.

# %%
t = time.perf_counter()
pruning = quietly(prune_run, PruneConfig(model=str(WORK / "teacher"), data=files["train"], dev=files["dev"],
                                         heads=0.5, curve="0,0.25,0.5,0.75", out=str(WORK / "pruned"),
                                         progress=False))
for layer, scores in enumerate(pruning["head_importance"]):
    print(f"layer {layer}: I_h = " + ", ".join(f"{s:.2f}" for s in scores))
removed = {int(k): v for k, v in pruning["removed_heads"].items()}
print("removed heads (layer: heads):", removed, f"-> heads per layer {pruning['heads_per_layer']}")
print(f"parameters {pruning['parameters_before']:,} -> {pruning['parameters_after']:,}; dev accuracy "
      f"{pruning['dev_accuracy_before']:.3f} -> {pruning['dev_accuracy_after']:.3f} ({time.perf_counter() - t:.0f} s)")

fig, ax = plt.subplots(figsize=(5.5, 3.4))
labels = {"heads": "attention heads (structured)", "ffn": "FFN neurons (structured)",
          "magnitude": "single weights by |w| (unstructured)"}
for kind, pts in pruning["curve"].items():
    ax.plot([p["fraction"] for p in pts], [p["accuracy"] for p in pts], "o-", ms=4, label=labels[kind])
ax.set(xlabel="fraction pruned (no recovery fine-tune)", ylabel="dev accuracy", title="pruning the teacher")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

recovered = quietly(finetune_run, FinetuneConfig(**files, init=str(WORK / "pruned"), epochs=1, batch_size=32, lr=1e-3,
                                                 out=str(WORK / "pruned-recovered"), progress=False, seed=0))
print(f"after one epoch of recovery: test accuracy {recovered['test']['accuracy']:.3f}")
curve = {kind: {p["fraction"]: p["accuracy"] for p in pts} for kind, pts in pruning["curve"].items()}
result("removed_heads", removed)
result("pruned_parameters", f"{pruning['parameters_before']:,} -> {pruning['parameters_after']:,}")
result("pruned_dev_before_after", f"{pruning['dev_accuracy_before']:.1%} -> {pruning['dev_accuracy_after']:.1%}")
result("curve_heads_075", f"{curve['heads'][0.75]:.1%}")
result("curve_ffn_075", f"{curve['ffn'][0.75]:.1%}")
result("curve_magnitude_075", f"{curve['magnitude'][0.75]:.1%}")
result("recovered_test_accuracy", f"{recovered['test']['accuracy']:.1%}")

# %% [markdown]
# ## 5. A student, distilled
#
# One layer, H = 64, one head, I = 128, with the teacher's tokenizer, from random weights;
# 5 epochs over the training rows at temperature T = 2. Twice, from the same initial
# weights and in the same batch order: with α = 0.9 (mostly the teacher's soft targets),
# and with α = 0 (the labels alone: the same student trained without a teacher).

# %%
torch.manual_seed(0)
student_cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128,
                         id2label=teacher.config.id2label)
BertForSequenceClassification(student_cfg).save_pretrained(WORK / "student-init", tokenizer=tok)
students = {}
for name, a in (("distilled", 0.9), ("labels-only", 0.0)):
    t = time.perf_counter()
    students[name] = quietly(distill_run, DistillConfig(
        teacher=str(WORK / "teacher"), student=str(WORK / "student-init"), train=files["train"], dev=files["dev"],
        temperature=2.0, alpha=a, epochs=5, batch_size=32, lr=1e-3, out=str(WORK / name), progress=False, seed=0))
    d = students[name]["dev"]
    print(f"{name:12s} dev accuracy {d['accuracy']:.3f}, agrees with the teacher on {d['agreement']:.1%} "
          f"({time.perf_counter() - t:.0f} s)")
n_s, n_t = students["distilled"]["student_parameters"], students["distilled"]["teacher_parameters"]
print(f"student {n_s:,} parameters, teacher {n_t:,} ({n_t / n_s:.1f}x)")
result("student_parameters", f"{n_s:,}")
result("teacher_parameters", f"{n_t:,}")
result("distilled_dev_accuracy", f"{students['distilled']['dev']['accuracy']:.1%}")
result("labels_only_dev_accuracy", f"{students['labels-only']['dev']['accuracy']:.1%}")
result("distilled_agreement", f"{students['distilled']['dev']['agreement']:.1%}")
result("labels_only_agreement", f"{students['labels-only']['dev']['agreement']:.1%}")

# %% [markdown]
# ## 6. A static graph that runs without minibert
#
# `python -m minibert.export` writes the classifier as one ONNX file (batch and length
# free). ONNX Runtime runs it here with the `tokenizers` library preparing the inputs from
# the folder's `tokenizer.json` — no minibert, no torch in that path — and the logits are
# compared with eager minibert's on a padded batch of test sentences.

# %%
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer as RustTokenizer

onnx_file = WORK / "teacher.onnx"
with contextlib.redirect_stdout(io.StringIO()):
    assert export_main(["--model", str(WORK / "teacher"), "--format", "onnx", "--out", str(onnx_file)]) == 0
test_texts = [line.split("\t")[0] for line in Path(files["test"]).read_text(encoding="utf-8").splitlines()[1:9]]
rust = RustTokenizer.from_file(str(WORK / "teacher" / "model" / "tokenizer.json"))
rust.enable_padding(pad_id=0)
enc = rust.encode_batch(test_texts)  # adds [CLS] and [SEP] itself
feed = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}
session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
onnx_logits = session.run(None, feed)[0]  # (B, C)
with torch.no_grad():
    eager = teacher(*(torch.from_numpy(feed[k]) for k in ("input_ids", "token_type_ids", "attention_mask"))).logits
diff = np.abs(onnx_logits - eager.numpy()).max()
print(f"{len(test_texts)} sentences padded to {feed['input_ids'].shape[1]} tokens; max |ONNX - eager| = {diff:.1e}")
print("graph inputs:", [i.name for i in session.get_inputs()], "output:", [o.name for o in session.get_outputs()])
result("onnx_matches_eager_1e-4", bool(diff < 1e-4))

# %% [markdown]
# ## 7. The deployment table
#
# `python -m minibert.bench --deploy` serves the teacher five ways (transformers when it is
# installed, eager minibert fp32, minibert int8 through torchao, ONNX Runtime fp32 and int8)
# plus the pruned-and-recovered model and both students, on the same batches, in turns; it
# reports size on disk, latency at batch 1, throughput at batch 32, and accuracy on the
# test file from each row's own predictions. One thread; a few rounds, since this is a
# tiny model and only the ratios mean anything. torchao runs eager here
# (`--no-compile-int8`): compiling costs more than this whole notebook.

# %%
argv = ["--deploy", "--model", str(WORK / "teacher"), "--pruned", str(WORK / "pruned-recovered"),
        "--student", str(WORK / "distilled"), str(WORK / "labels-only"), "--test", files["test"],
        "--threads", "1", "--steps", "3", "--latency-steps", "5", "--warmup", "1", "--no-compile-int8"]
with contextlib.redirect_stderr(io.StringIO()):  # torchao's notes about GPU kernels it cannot load
    table = bench_run(parse_config(BenchConfig, argv, "bench", ""))
rows = {r["name"]: r for r in table["rows"]}
keys = {"minibert fp32": "fp32", "minibert int8 (torchao)": "torchao_int8", "ONNX Runtime fp32": "onnx_fp32",
        "ONNX Runtime int8": "onnx_int8", "pruned: pruned-recovered": "pruned", "student: distilled": "distilled",
        "student: labels-only": "labels_only"}
for name, key in keys.items():
    result(f"table_{key}_accuracy", f"{rows[name]['accuracy']:.1%}")
    result(f"table_{key}_kib", f"{rows[name]['size_bytes'] / 2**10:,.0f}")
result("table_onnx_int8_agreement", f"{rows['ONNX Runtime int8']['agreement']:.1%}")
result("table_torchao_int8_agreement", f"{rows['minibert int8 (torchao)']['agreement']:.1%}")

# %%
shutil.rmtree(WORK, ignore_errors=True)
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
