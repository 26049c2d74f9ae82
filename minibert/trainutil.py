"""Helpers every training script needs and none should have to re-read: a CLI built from a
config dataclass, seeding and RNG state, the training-state file, metrics.jsonl, curve plots,
Ctrl-C handling and torch.distributed set-up. Used by minibert.pretrain (and fine-tuning).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .checkpoint import atomic_torch_save, atomic_write, atomic_write_text

# ----------------------------------------------------------------------------- CLI from a dataclass


def _unwrap_optional(tp: Any) -> Any:
    """Optional[int] -> int; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass `cls`.

    A field's metadata gives its help text ("help", required: --help documents every field),
    "choices", and "hidden" (for test-only switches). bool fields (default False) become
    switches; list fields take one or more values.
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = f.metadata["help"]
        if tp is not bool and "default" not in help_:
            help_ += " (default: %(default)s)"
        if f.metadata.get("hidden"):
            help_ = argparse.SUPPRESS
        if tp is bool:
            p.add_argument(flag, action="store_true", default=default, help=help_)
        elif typing.get_origin(tp) is list:
            p.add_argument(flag, nargs="+", type=typing.get_args(tp)[0], default=default, help=help_, metavar="X")
        else:
            p.add_argument(flag, type=tp, default=default, choices=f.metadata.get("choices"), help=help_)
    return p


def parse_config(cls: type, argv: Optional[Sequence[str]], prog: str, description: str):
    args = build_parser(cls, prog, description).parse_args(argv)
    return cls(**vars(args))


# ----------------------------------------------------------------------------- seeds and RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict:
    """Every global RNG this process uses, in a form torch.load(weights_only=True) reads back."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(x: Any) -> Any:
    # random.setstate wants the nested tuples getstate gave; a save/load round trip may give lists
    return tuple(_as_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- the training-state file


def save_train_state(path: Path, state: dict) -> None:
    """One dict (model, optimizer, scheduler, RNG states, data position, step...), written atomically:
    a kill at any moment leaves either the previous file or the new one."""
    atomic_torch_save(state, path)


def load_train_state(path: Path) -> dict:
    # weights_only: a training state is tensors and plain containers; nothing is ever unpickled
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per line. On resume the lines past the resumed
    step (written after the checkpoint by the run that died) are dropped, so the file reads as
    one uninterrupted run."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = Path(path)
        self.records: list[dict] = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if rec.get("step", 0) <= resume_step:
                    self.records.append(rec)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def write(self, record: dict) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- plots


def plot_pretrain_curves(records: Sequence[dict], path: Path, title: str = "") -> None:
    """Two panels: train and held-out loss; held-out MLM / NSP accuracy against the baseline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r.get("kind") == "train"]
    ev = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    FigureCanvasAgg(fig)  # own canvas: no pyplot, no window, no global backend change
    ax1, ax2 = fig.subplots(1, 2)
    if train:
        ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train loss")
    if ev:
        ax1.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", ms=3, label="held-out loss")
        ax2.plot([r["step"] for r in ev], [r["mlm_acc"] for r in ev], "o-", ms=3, label="held-out MLM acc")
        if ev[-1].get("nsp_acc") is not None:
            ax2.plot([r["step"] for r in ev], [r["nsp_acc"] for r in ev], "s-", ms=3, label="held-out NSP acc")
        ax2.axhline(ev[-1]["baseline_acc"], color="gray", ls="--", lw=1, label="most-frequent-token baseline")
    ax1.set(xlabel="step", ylabel="loss (MLM + NSP)")
    ax2.set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))


# ----------------------------------------------------------------------------- Ctrl-C


class StopRequest:
    """Turns Ctrl-C (SIGINT) and SIGTERM into a flag the training loop checks after each step, so
    it can save a checkpoint and exit cleanly instead of dying mid-update. A second Ctrl-C
    exits at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if self.requested:
            sys.exit(130)
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- distributed


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """Join the process group when started by torchrun (which sets RANK / WORLD_SIZE), else a
    single process. NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ:
        return Dist()
    import torch.distributed as dist

    # On GPUs the gradients go over NCCL, but the step's counts and losses are summed as CPU
    # tensors (they are read on the host anyway), which NCCL cannot carry: gloo takes those.
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device == "cpu":
        # CPU processes on one machine share its cores; without this each would start one
        # thread per core and they would fight over them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    return d
