"""Hyper-parameter search for fine-tuning: learning rate x batch size x epochs, chosen by the dev metric.

    python -m minibert.finetune --init minilm --train train.tsv --dev dev.tsv --test test.tsv \\
        --out runs/search --search grid --search-lr 2e-5,5e-5,1e-4 --search-batch-size 16,32
    python -m minibert.search ...            # the same command

Each trial is an ordinary fine-tuning run in OUT/trials/NN, without the test file. The best
trial by dev metric becomes the run's result: its model/ and curves are copied to OUT, and the
test file is labelled once, by that model only (the test set never chooses anything).
OUT/search.md and search.json hold the table of trials.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time
from dataclasses import asdict, replace
from typing import Optional

from .checkpoint import atomic_copy, atomic_write_text, replace_folder
from .finetune import LOWER_IS_BETTER, FinetuneConfig, check_config, read_data, resolve_init, run, test_model
from .toolkit import UserError, cli_main, pick_device, prepare_output


def _values(flag: str, spec: str, kind: type) -> list:
    try:
        values = [kind(x) for x in spec.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be a comma list of numbers, got {spec!r}") from None
    if not all(v > 0 for v in values):  # else the trial's own check would name --lr, not this flag
        raise UserError(f"{flag} must be a comma list of positive numbers, got {spec!r}")
    return values


def search(cfg: FinetuneConfig, log=print) -> dict:
    """Grid or random search; returns the best trial's metrics with the test result and the table."""
    check_config(cfg)
    if cfg.resume:
        raise UserError("--search cannot --resume; resume a single trial with its folder OUT/trials/NN")
    grid = list(itertools.product(_values("--search-lr", cfg.search_lr, float),
                                  _values("--search-batch-size", cfg.search_batch_size, int),
                                  _values("--search-epochs", cfg.search_epochs, float)))
    if cfg.search == "random":
        grid = random.Random(cfg.seed).sample(grid, min(cfg.search_trials, len(grid)))
    init = resolve_init(cfg.init) if cfg.init else None
    out = prepare_output(cfg.out, overwrite=cfg.overwrite, resume=False, inputs={"--init": init})
    data = read_data(cfg, log)  # every file checked once, before the first trial (the test file too)
    rows = []
    for i, (lr, bs, ep) in enumerate(grid):
        tcfg = replace(cfg, search="none", lr=lr, batch_size=bs, epochs=ep, test=None,
                       out=str(out / "trials" / f"{i:02d}"))
        log(f"--- trial {i + 1}/{len(grid)}: lr {lr:g}, batch {bs}, epochs {ep:g}")
        t = time.perf_counter()
        r = run(tcfg, log)
        rows.append({"trial": i, "lr": lr, "batch_size": bs, "epochs": ep, "dev": r["dev"][r["metric"]],
                     "seconds": round(time.perf_counter() - t, 1), "metric": r["metric"]})
    sign = -1.0 if rows[0]["metric"] in LOWER_IS_BETTER else 1.0
    best = max(rows, key=lambda r: sign * r["dev"])
    table = [f"| trial | lr | batch | epochs | dev {rows[0]['metric']} | seconds |", "|---|---|---|---|---|---|"]
    table += [f"| {r['trial']}{' *' if r is best else ''} | {r['lr']:g} | {r['batch_size']} | {r['epochs']:g} | "
              f"{r['dev']:.4f} | {r['seconds']} |" for r in rows]
    log("\n".join(table))
    atomic_write_text(out / "search.md", "\n".join(table) + "\n")
    atomic_write_text(out / "search.json", json.dumps({"trials": rows, "best": best}, indent=2) + "\n")
    # the chosen trial becomes the run's result
    src = out / "trials" / f"{best['trial']:02d}"
    # the whole folder in one swap, as save_pretrained writes it: an interrupted copy leaves the old
    # model or the new one, never a mix of the two
    replace_folder(out / "model", lambda tmp: shutil.copytree(src / "model", tmp, dirs_exist_ok=True))
    for name in ("metrics.jsonl", "training_curve.png", "confusion_matrix.png"):
        if (src / name).exists():
            atomic_copy(src / name, out / name)
    results = json.loads((src / "metrics.json").read_text())
    results["search"] = {"trials": rows, "best": best}
    results["test"] = test_model(out, data.test, cfg, pick_device(cfg.device)) if data.test is not None else {}
    chosen = replace(cfg, lr=best["lr"], batch_size=best["batch_size"], epochs=best["epochs"])
    atomic_write_text(out / "run_config.json", json.dumps(asdict(chosen), indent=2) + "\n")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
    log(f"best trial {best['trial']}: dev {best['dev']:.4f}"
        + (f", test accuracy {results['test'].get('accuracy', float('nan')):.4f}" if results["test"] else ""))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    def job(cfg: FinetuneConfig) -> None:
        search(cfg if cfg.search != "none" else replace(cfg, search="grid"))

    return cli_main("python -m minibert.search", job, argv, FinetuneConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
