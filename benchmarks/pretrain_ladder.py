"""The compute ladder: SST-2 accuracy against minutes of pretraining on the shared corpus.

    python benchmarks/pretrain_ladder.py --run          # run what is missing, then tabulate
    python benchmarks/pretrain_ladder.py                # tabulate and plot the runs already there
    python benchmarks/pretrain_ladder.py --probe        # and a linear probe of each frozen encoder
    python benchmarks/pretrain_ladder.py --run --device cuda --minutes 5 15 60 --out runs/ladder_gpu

Each rung is one `python -m minibert.pretrain --corpus ../shared/data/corpus --time-budget M`
(every other setting the default recipe), then the same SST-2 fine-tuning from it with
fine-tuning seeds 0, 1 and 2: a fixed 4,000-row sample of train.tsv (--train-limit 4000,
--data-seed 0), a fixed 1,000-row dev sample for choosing the epoch, all 872 rows of
test.tsv, finetune's defaults otherwise. "scratch" is `--from-scratch`: the rungs share
one architecture and one vocabulary (the tokenizer is trained on the same corpus with
the same settings), so one set of scratch runs is the baseline for all of them.
"dapt-pM" continues rung M (each of --dapt-from) for --dapt-minutes on SST-2's training
sentences used as unlabelled text: domain-adaptive pretraining (the label column is never
read; the sentence file is written into --out, 20 sentences per document, never into the
project), at pretrain's rate for --init (5e-4; the third round's tiny runs, which predate that
default, continued at 2e-3: --dapt-args=--lr=2e-3 repeats them). Every command is printed before it
runs; a step whose output exists is skipped, so the script resumes. The table
(ladder.md) and the plot (ladder.png) go to --out (full-ladder.* for the full training set:
`--train-limit 0 --finetune-args "--epochs 1 --eval-every 400"`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SEEDS = (0, 1, 2)


def sh(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), ">", log, flush=True)
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def common(args) -> list[str]:
    return ["--device", args.device, "--threads", str(args.threads), "--no-progress"]


def pretrain(args, name: str, extra: list[str]) -> Path:
    out = args.out / name
    if not (out / "model" / "config.json").is_file():
        sh([sys.executable, "-m", "minibert.pretrain", "--out", str(out), "--overwrite", "--log-every", "500",
            *common(args), *extra], args.out / f"{name}.log")
    return out


def finetune(args, init: Path, name: str, seed: int, scratch: bool) -> dict:
    name = args.prefix + name
    out = args.out / "ft" / f"{name}-s{seed}"
    if not (out / "metrics.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        sst2 = args.sst2
        sh([sys.executable, "-m", "minibert.finetune", "--init", str(init), *(["--from-scratch"] if scratch else []),
            "--train", str(sst2 / "train.tsv"), "--dev", str(sst2 / "dev.tsv"), "--test", str(sst2 / "test.tsv"),
            "--train-limit", str(args.train_limit), "--dev-limit", "1000", "--seed", str(seed), "--out", str(out),
            # 10 epochs, the schedule the recorded rungs ran (finetune's default for a tiny model is 20);
            # an --epochs in --finetune-args comes later and wins
            "--overwrite", "--log-every", "1000", "--epochs", "10", *common(args), *shlex.split(args.finetune_args)],
           out.parent / f"{name}-s{seed}.log")
    return json.loads((out / "metrics.json").read_text())


def held_out(run: Path) -> dict:
    """The last held-out evaluation of a pretraining run, and its step and minutes."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = [r for r in records if r.get("kind") == "eval"][-1]
    return {"step": last["step"], "minutes": last["time_s"] / 60, "mlm_acc": last["mlm_acc"],
            "baseline": last["baseline_acc"]}


def linear_probe(run: Path, sst2: Path, random_weights: bool = False) -> dict:
    """What the frozen encoder already knows about the task: logistic regression on its mean-pooled
    and on its [CLS] final hidden states, trained on a fixed 4,000-row sample of SST-2's train.tsv
    (the same rows for every encoder), scored on test.tsv."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from minibert import BertModel, Tokenizer
    from minibert.strategies import sentence_repr
    from minibert.tabular import read_labeled

    def read(name, n=None):
        data = read_labeled(sst2 / name)
        idx = sorted(np.random.default_rng(0).permutation(len(data))[:n]) if n else range(len(data))
        return [data.texts[i] for i in idx], np.array([int(data.labels[i]) for i in idx])

    tok = Tokenizer.from_file(run / "model")
    model = BertModel.from_pretrained(run)
    if random_weights:  # the same architecture, freshly initialised
        torch.manual_seed(0)
        model = BertModel(model.config)
    model.eval()

    @torch.no_grad()
    def features(texts):
        out = []
        for i in range(0, len(texts), 256):
            b = tok(texts[i : i + 256], max_length=64)
            h = model(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
            pooled = [sentence_repr(h, b["attention_mask"], p) for p in ("mean", "cls")]
            out.append(torch.cat(pooled, dim=-1))  # (B, 2H): mean, [CLS]
        return torch.cat(out).numpy()

    (train, y_train), (test, y_test) = read("train.tsv", 4000), read("test.tsv")
    f_train, f_test = features(train), features(test)
    H = f_train.shape[1] // 2
    acc = {}
    for name, cols in (("mean", slice(0, H)), ("cls", slice(H, 2 * H))):
        mu, sd = f_train[:, cols].mean(0), f_train[:, cols].std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000).fit((f_train[:, cols] - mu) / sd, y_train)
        acc[name] = clf.score((f_test[:, cols] - mu) / sd, y_test)
    return acc


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run the pretraining and fine-tuning that is missing")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ladder")
    ap.add_argument("--minutes", type=float, nargs="+", default=[5, 15, 60])
    ap.add_argument("--dapt-minutes", type=float, default=15, help="0: no domain-adaptive runs")
    ap.add_argument("--dapt-from", type=float, nargs="*", default=[15, 60], help="rungs continued on SST-2 text")
    ap.add_argument("--corpus", type=Path, default=SHARED / "corpus")
    ap.add_argument("--sst2", type=Path, default=SHARED / "sst2")
    ap.add_argument("--train-limit", type=int, default=4000, help="SST-2 training rows (0: all; its runs are "
                    "named full-*)")
    ap.add_argument("--finetune-args", default="", help="more finetune flags, e.g. '--epochs 1 --eval-every 400' "
                    "for the full training set")
    ap.add_argument("--tag", default="", help="name this fine-tuning setting's runs and table TAG-* (default: "
                    "none for 4,000 rows, full- for all), so runs with other --finetune-args sit beside them")
    ap.add_argument("--probe", action="store_true", help="also a linear probe of each frozen encoder (and of "
                    "random weights) on the 4,000 rows: what pretraining put in the features (needs scikit-learn)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--pretrain-args", default="", help="more pretrain flags for the rungs, e.g. "
                    "'--preset mini --lr 1e-3'")
    ap.add_argument("--dapt-args", default="", help="more pretrain flags for the domain-adaptive runs, e.g. "
                    "'--eval-every 500' (the rungs' --pretrain-args do not carry over: --init fixes the architecture)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="fine-tuning seeds")
    args = ap.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.prefix = f"{args.tag}-" if args.tag else "" if args.train_limit else "full-"
    name = lambda m: f"p{m:g}"  # noqa: E731
    rungs = {name(m): args.out / name(m) for m in args.minutes}
    if args.run:
        for m in args.minutes:
            # every rung the same preset (the third round's tiny unless --pretrain-args names one),
            # although pretrain's default grows to mini at an hour
            pretrain(args, name(m), ["--corpus", str(args.corpus), "--time-budget", f"{m:g}", "--preset", "tiny",
                                     *shlex.split(args.pretrain_args)])
        if args.dapt_minutes:
            text = args.out / "sst2_train_sentences.txt"
            if not text.is_file():  # the sentence column only: labels are never read
                from minibert.tabular import read_labeled

                sentences = read_labeled(args.sst2 / "train.tsv").texts
                docs = ["\n".join(sentences[i : i + 20]) for i in range(0, len(sentences), 20)]
                text.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
            for m in args.dapt_from:
                pretrain(args, "dapt-" + name(m), ["--init", str(rungs[name(m)]), "--corpus", str(text),
                                                   "--time-budget", f"{args.dapt_minutes:g}",
                                                   *shlex.split(args.dapt_args)])
    dapt = {"dapt-" + name(m): m for m in args.dapt_from if (args.out / ("dapt-" + name(m)) / "model").is_dir()}
    rungs.update({k: args.out / k for k in dapt})
    first = next(iter(rungs.values()))
    rows, points, dapt_points = [], [], []
    pre = args.prefix  # how finetune() names the runs
    have_scratch = all((args.out / "ft" / f"{pre}scratch-s{s}" / "metrics.json").is_file() for s in args.seeds)
    scratch = [finetune(args, first, "scratch", s, True)["test"]["accuracy"] for s in args.seeds] \
        if args.run or have_scratch else []
    if scratch:
        m, se = mean_se(scratch)
        rows.append(f"| from scratch (no pretraining) | 0 | | | {' / '.join(f'{100 * a:.1f}' for a in scratch)} | "
                    f"**{100 * m:.1f}** ± {100 * se:.1f} | |")
    for key, run in rungs.items():
        if not (run / "model").is_dir():
            continue
        done = [s for s in args.seeds if (args.out / "ft" / f"{pre}{key}-s{s}" / "metrics.json").is_file()]
        accs = [finetune(args, run, key, s, False)["test"]["accuracy"] for s in (args.seeds if args.run else done)]
        h = held_out(run)
        label = f"{dapt[key]:g} min on the corpus + {h['minutes']:.0f} on SST-2 sentences" if key in dapt \
            else f"{h['minutes']:.0f} min on the corpus"
        if not accs:
            continue
        m, se = mean_se(accs)
        gain = f"{100 * (m - mean_se(scratch)[0]):+.1f}" if scratch else ""
        minutes = f"{dapt[key]:g} + {h['minutes']:.1f}" if key in dapt else f"{h['minutes']:.1f}"
        on_sst2 = " on SST-2 text" if key in dapt else ""  # its held-out split is SST-2 sentences, not the corpus
        rows.append(f"| {label} | {h['step']:,} | {h['mlm_acc']:.3f} ({h['mlm_acc'] / h['baseline']:.1f}x){on_sst2} | "
                    f"{minutes} | {' / '.join(f'{100 * a:.1f}' for a in accs)} | **{100 * m:.1f}** ± {100 * se:.1f} | "
                    f"{gain} |")
        if key in dapt:
            dapt_points.append((dapt[key] + h["minutes"], m, se))
        else:
            points.append((h["minutes"], m, se))
    table = "\n".join([
        f"SST-2 test accuracy (872 rows), {args.train_limit or 'all'} training rows, fine-tuning seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± standard error",
        "",
        f"| pretraining | steps | held-out MLM acc (x baseline) | minutes | "
        f"test, seeds {' / '.join(map(str, args.seeds))} | mean | vs scratch |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
        *rows])
    (args.out / f"{pre}ladder.md").write_text(table + "\n")
    print(table)
    if args.probe:
        probes = [("random weights", first, True)] + [(key, run, False) for key, run in rungs.items()
                                                       if (run / "model").is_dir()]
        lines = ["| encoder (frozen) | mean-pooled probe | [CLS] probe |", "| --- | ---: | ---: |"]
        for key, run, rand in probes:
            acc = linear_probe(run, args.sst2, rand)
            lines.append(f"| {key} | {100 * acc['mean']:.1f} | {100 * acc['cls']:.1f} |")
            print(lines[-1], flush=True)
        (args.out / "probe.md").write_text("\n".join(lines) + "\n")
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs, ys, es = zip(*sorted(points))
        ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], marker="o", capsize=3, label="pretrained")
        if scratch:
            m, se = mean_se(scratch)
            ax.axhspan(100 * (m - se), 100 * (m + se), color="gray", alpha=0.25)
            ax.axhline(100 * m, color="gray", ls=":", label="from scratch")
        if dapt_points:
            dx, dy, de = zip(*sorted(dapt_points))
            ax.errorbar(dx, [100 * y for y in dy], yerr=[100 * e for e in de], marker="s", ls="", capsize=3,
                        color="tab:green", label=f"+ {args.dapt_minutes:g} min on SST-2 sentences (DAPT)")
        ax.set_xscale("log")
        ax.set_xticks(sorted(set(round(x) for x in xs + tuple(d[0] for d in dapt_points))))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.0f"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(f"minutes of pretraining ({args.device})")
        ax.set_ylabel(f"SST-2 test accuracy (%), {args.train_limit or 'all'} rows")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / f"{pre}ladder.png", dpi=120)
        print("plot:", args.out / f"{pre}ladder.png")


if __name__ == "__main__":
    main()
