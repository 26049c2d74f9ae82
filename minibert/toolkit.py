"""The training toolkit: what every minibert job (pretrain, finetune, predict, bench...) shares,
defined once so that a flag means the same thing in every command.

    field(default, help, *, fixed, choices, hidden)   a config field whose help text is its --help
    RunOptions                                        the options every job inherits (see the class)
    build_parser(cls, prog, description)              argparse from a config dataclass
    parse_config(cls, argv, prog, description)        ... and the parsed config
    UserError, USER_ERRORS                            errors shown as one line, exit code 1
    cli_main(prog, run_fn, argv, config_cls, description) -> int
    pick_device(name) -> torch.device                 auto | cpu | cuda | cuda:N | mps
    resolve_precision(name, device) -> str            auto | fp32 | bf16 | fp16 -> fp32 | bf16 | fp16
    autocast(precision, device)                       the context a forward pass runs in
    grad_scaler(precision, device)                    a GradScaler, enabled for fp16 only
    set_threads(n)                                    CPU threads (0: torch's default)
    seed_everything(seed), rng_state(), set_rng_state(state)
    optimizer_step(opt, sched, scaler, params, clip) -> float   unscale, clip, step, zero_grad
    KeepBest                                          evaluate-and-keep-best bookkeeping
    MetricsLog(path, resume_step)                     metrics.jsonl, one JSON object per line
    plot_curves(records, path, panels, title)         curves.png from the metrics records
    open_tensorboard(out, wanted), log_scalars(tb, record)
    prepare_output(out, *, overwrite, resume, inputs) -> Path   the output-folder policy
    save_train_state(path, state), load_train_state(path), check_resume(saved, now, keys)
    StopRequest                                       Ctrl-C / SIGTERM -> save, then exit
    Dist, init_distributed(device)                    torch.distributed set-up under torchrun

The optimizer itself (AdamW groups, fused kernel, warmup schedule) is in minibert/optim.py.
This module imports checkpoint, text, tabular and tokenizer (for their error classes); none of them may
import it back.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .checkpoint import CheckpointError, atomic_torch_save, atomic_write, atomic_write_text, resolve_model_dir
from .tabular import DataError
from .text import CorpusError
from .tokenizer import TokenizerFileError

PathLike = Union[str, os.PathLike]

# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a file, a folder): shown as one line
    `prog: error: ...`, exit code 1, no traceback. The message says what, where and how to fix."""


# Errors of other modules that are also the user's, not bugs. They may not import this module
# (it imports them), so they are listed here instead of deriving from UserError.
USER_ERRORS = (UserError, CheckpointError, CorpusError, DataError, TokenizerFileError)


# ----------------------------------------------------------------------------- config -> CLI


def check_max_len(max_len: Optional[int]) -> None:
    """--max-len of a command that reads a model's own limit when it is None."""
    if max_len is not None and max_len < 3:
        raise UserError(f"--max-len {max_len}: a row needs [CLS], [SEP] and at least one token (>= 3)")


def field(default: Any, help: str, *, fixed: bool = False, choices: Optional[Sequence] = None,
          hidden: bool = False) -> Any:
    """A config dataclass field. `help` becomes its --help text; `fixed`: it shapes the model, the
    data or the optimisation, so --resume refuses when it differs; `hidden`: test hooks, not in --help."""
    meta = {"help": help, "fixed": fixed, "choices": list(choices) if choices is not None else None, "hidden": hidden}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunOptions:
    """The options every job shares; a job's config dataclass inherits them (and may redeclare one
    to change its default or help). One meaning in every command."""

    out: Optional[str] = field(None, "output folder")
    overwrite: bool = field(False, "replace the model or run already in --out (without it, a job refuses to touch one)")
    resume: bool = field(False, "continue the run saved in --out where it stopped")
    device: str = field("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    precision: str = field("auto", "arithmetic of the forward and backward passes: fp32; bf16 (bfloat16 autocast, "
                           "weights and optimizer state stay fp32); fp16 (float16 autocast with a loss scaler, GPUs "
                           "only). auto: bf16 on CUDA, fp32 on the CPU and MPS (bf16 pays only on CPUs with bfloat16 "
                           "instructions)",
                           fixed=True, choices=("auto", "fp32", "bf16", "fp16"))
    threads: int = field(0, "CPU threads per process (0: torch's default, one per core; on a shared machine fewer "
                            "can be faster)")
    seed: int = field(0, "seed for initialisation, data order, masks and dropout", fixed=True)
    compile: bool = field(False, "torch.compile the model (pays on GPUs; see benchmarks/ for the CPU)")
    tensorboard: bool = field(False, "also log to <out>/tensorboard (needs the tensorboard package)")
    log_every: int = field(10, "print a log line every this many steps")
    progress: bool = field(True, "show a progress bar (--no-progress: log lines only)")


def _unwrap_optional(tp: Any) -> Any:
    """Optional[int] -> int; anything else unchanged."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 1 like every other user error."""

    def error(self, message: str) -> typing.NoReturn:
        # argparse prints the usage block and exits 2; a user error here is one line and exit 1
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of the dataclass `cls`: the job's own fields
    first, then RunOptions' under their own heading. bool fields become switches (--x, or
    --x/--no-x when the default is True); list fields take one or more values."""
    p = OneLineParser(prog=prog, description=description)
    shared = p.add_argument_group("run options (the same in every minibert job)")
    run_names = {f.name for f in dataclasses.fields(RunOptions)}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        group = shared if f.name in run_names and issubclass(cls, RunOptions) else p
        flag = "--" + f.name.replace("_", "-")
        tp = _unwrap_optional(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_ = f.metadata["help"]
        if tp is not bool and default is not None and "default" not in help_:
            help_ += " (default: %(default)s)"
        if f.metadata.get("hidden"):
            help_ = argparse.SUPPRESS
        if tp is bool:
            action = argparse.BooleanOptionalAction if default else "store_true"
            group.add_argument(flag, action=action, default=default, help=help_)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag, nargs="+", type=typing.get_args(tp)[0], default=default, help=help_, metavar="X")
        else:
            group.add_argument(flag, type=tp, default=default, choices=f.metadata.get("choices"), help=help_)
    return p


def parse_config(cls: type, argv: Optional[Sequence[str]], prog: str, description: str):
    """Parse argv into a `cls`; its __post_init__ checks raise UserError for bad values."""
    return cls(**vars(build_parser(cls, prog, description).parse_args(argv)))


def cli_main(prog: str, run_fn: Callable[[Any], Any], argv: Optional[Sequence[str]], config_cls: type,
             description: str) -> int:
    """A job's main(): parse argv into config_cls, call run_fn(config). A user error becomes one
    line `prog: error: ...` and exit code 1, Ctrl-C exit code 130; a bug keeps its traceback.
    run_fn may return an int exit code; anything else means 0."""
    try:
        cfg = parse_config(config_cls, argv, prog, description)
        code = run_fn(cfg)
    except USER_ERRORS as e:
        print(f"{prog}: error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code if isinstance(code, int) else 0


# ----------------------------------------------------------------------------- device, precision, threads


def pick_device(name: str) -> torch.device:
    """auto: CUDA when present, else Apple's MPS, else the CPU. An explicit device that this
    machine lacks is a UserError, not a crash inside the first .to()."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"--device {name}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine (use --device cpu or auto)")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision for this device: auto -> bf16 on CUDA (fp32 on GPUs without bfloat16), fp32 elsewhere.
    An explicit choice the device cannot run is a UserError."""
    device = torch.device(device)
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in ("fp32", "bf16", "fp16"):
        raise UserError(f"--precision {name}: use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is for GPUs (float16 with a loss scaler); on the CPU use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32")
    return name


def resolve_attention(name: str, device: torch.device, precision: str, seq_len: int) -> str:
    """--attn-impl for this run: auto -> 'math' on the CPU under bf16 for sequences up to 128 tokens,
    'sdpa' everywhere else; an explicit name is kept. All backends compute the same function (tested).
    Why: on the CPU torch's fused attention in bf16, its backward above all, is slower than the plain
    product and softmax at these lengths, while in fp32 the two are level; past 128 tokens the plain
    path's stored (T, T) scores grow with the square of the length, which the fused kernel never stores."""
    if name != "auto":
        return name
    cpu_bf16 = torch.device(device).type == "cpu" and resolve_precision(precision, device) == "bf16"
    return "math" if cpu_bf16 and seq_len <= 128 else "sdpa"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in: autocast to bf16/fp16 (matmuls in 16 bits, weights and
    optimizer state stay fp32), or nothing for fp32."""
    device = torch.device(device)
    p = resolve_precision(precision, device)
    return contextlib.nullcontext() if p == "fp32" else torch.autocast(device.type, dtype=_DTYPES[p])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 only (fp16 gradients underflow without it; bf16 has fp32's range).
    Disabled, it passes everything through, so the training step is written once."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=resolve_precision(precision, device) == "fp16")


def cpu_info() -> tuple[str, Optional[list[str]]]:
    """The CPU's model name and its feature flags, from /proc/cpuinfo ("", None where it cannot be
    read: not Linux). The flags say which int8 and bf16 instructions (VNNI, AMX) a CPU has."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", None
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    return name, flags


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without them oneDNN
    emulates bf16 matmuls in fp32, slower than fp32 itself. False where the flags cannot be read."""
    _, flags = cpu_info()
    return bool(flags) and any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def set_threads(n: int) -> None:
    """CPU threads torch uses in this process; 0 keeps torch's default (one per core)."""
    if n < 0:
        raise UserError(f"--threads must be 0 (torch's default) or positive, got {n}")
    if n:
        torch.set_num_threads(n)


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
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "gauss": gauss},
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


# ----------------------------------------------------------------------------- the optimizer step


def optimizer_step(opt: torch.optim.Optimizer, sched: Optional[Any], scaler: torch.amp.GradScaler,
                   params: Iterable[torch.Tensor], clip: float) -> float:
    """One update from the accumulated gradients: unscale (fp16), clip the global norm to `clip`
    (0: no clipping), step (skipped by the scaler if a gradient is inf/nan), zero the gradients,
    advance the schedule. Returns the gradient norm before clipping."""
    scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if sched is not None:
        sched.step()
    return norm.item()  # a CPU-GPU sync point: once per step, for the log line


# ----------------------------------------------------------------------------- keep the best


class KeepBest:
    """Evaluate-and-keep-best bookkeeping: `update(score, step)` says whether the score beats every
    earlier one (then the caller saves its best/ model). mode 'min' for losses, 'max' for accuracies.
    `since` counts evaluations without improvement (for early stopping)."""

    def __init__(self, mode: str = "min"):
        if mode not in ("min", "max"):
            raise ValueError(f"KeepBest mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.since = 0

    def update(self, score: float, step: int) -> bool:
        better = self.best is None or (score < self.best if self.mode == "min" else score > self.best)
        if better:
            self.best, self.best_step, self.since = float(score), int(step), 0
        else:
            self.since += 1
        return better

    def state_dict(self) -> dict:
        return {"mode": self.mode, "best": self.best, "best_step": self.best_step, "since": self.since}

    def load_state_dict(self, state: dict) -> None:
        self.mode, self.best, self.best_step = state["mode"], state["best"], state["best_step"]
        self.since = state["since"]


# ----------------------------------------------------------------------------- metrics.jsonl, plots, TensorBoard


class MetricsLog:
    """Append-only metrics.jsonl, one JSON object per line. On resume the lines past the resumed
    step (written after the checkpoint by the run that died) are dropped, so the file reads as
    one uninterrupted run."""

    def __init__(self, path: PathLike, resume_step: Optional[int] = None):
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
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise CheckpointError(f"cannot write {self.path}: {e.strerror or e}") from None


Series = Union[str, tuple]


def plot_curves(records: Sequence[Mapping[str, Any]], path: PathLike, panels: Mapping[str, Sequence[Series]],
                title: str = "") -> None:
    """Draw curves.png from metrics records, x = record["step"]: one panel per entry of `panels`,
    {y-axis label: [series, ...]}. A series is a selector, (selector, legend label) or (selector,
    label, matplotlib format); the selector is a record key ("loss") or kind:key ("eval:loss", only
    records whose "kind" is "eval"). Records without the key (or with None) are skipped."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 3.4), layout="constrained")
    FigureCanvasAgg(fig)  # own canvas: no pyplot, no window, no global backend change
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (ylabel, series) in zip(axes, panels.items()):
        for s in series:
            selector, label, fmt = (s, s, None) if isinstance(s, str) else (tuple(s) + (None,))[:3]
            kind, _, key = selector.rpartition(":")
            pts = [(r["step"], r[key]) for r in records
                   if r.get(key) is not None and (not kind or r.get("kind") == kind)]
            if pts:
                xs, ys = zip(*pts)
                style = fmt or ("o-" if len(pts) < 50 else "-")
                ax.plot(xs, ys, style, ms=3, lw=1, label=label, **({"color": "gray"} if fmt == "--" else {}))
        ax.set(xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=72))


def open_tensorboard(out: PathLike, wanted: bool):
    """A SummaryWriter in <out>/tensorboard, or None (not wanted, or the package is missing)."""
    if not wanted:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: --tensorboard needs the tensorboard package (pip install tensorboard); "
              "logging to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(Path(out) / "tensorboard"))


def log_scalars(tb, record: Mapping[str, Any]) -> None:
    """Every number of a metrics record, as <kind>/<key> at its step."""
    if tb is None:
        return
    for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])
    tb.flush()


# ----------------------------------------------------------------------------- the output folder

# What marks a folder as holding a model (a model folder) or a run (a run folder's top level)
_MODEL_OR_RUN = ("config.json", "model.safetensors", "pytorch_model.bin", "train_state.pt", "run_config.json",
                 "metrics.jsonl", "model", "best")
# what a run writes at its start, before any model or training state; a new run replaces them
_RUN_MARKS = ("run_config.json", "metrics.jsonl")


def _is_within(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def probe_write(folder: Path) -> None:
    """Create and remove a file in folder: an OSError (read-only, no permission) before any work."""
    fd, probe = tempfile.mkstemp(prefix=".minibert-write-check-", dir=folder)  # not a .*.tmp-* leftover name
    os.close(fd)
    os.unlink(probe)


def prepare_output(out: PathLike, *, overwrite: bool, resume: bool,
                   inputs: Union[Iterable[Optional[PathLike]], Mapping[str, Any]] = ()) -> Path:
    """The output-folder policy, applied before any data preparation; returns the folder.

    - a folder holding a model or a run is reused only with --overwrite or --resume, and --resume
      needs the training state (train_state.pt) a run saves; a run that failed before its first
      save (only run_config.json and metrics.jsonl) holds nothing, and a new run may start there;
    - `out` may not be, contain or lie inside any of `inputs` (a job never writes into what it
      reads, e.g. its --init); `inputs` is a list of paths, or {flag: path or list of paths} so that
      the message names the flag;
    - the folder must be writable (`cannot write PATH: reason`);
    - `.*.tmp-*` leftovers of a killed run (atomic writes that never finished) are removed, after a
      model folder a kill left set aside (`.model.tmp-old-*`, see checkpoint.replace_folder) is put back.
    """
    out = Path(out)
    if overwrite and resume:
        raise UserError("--overwrite and --resume exclude each other: --resume continues the run in --out, "
                        "--overwrite replaces it")
    if isinstance(inputs, Mapping):
        named = [(flag, p) for flag, v in inputs.items() for p in (v if isinstance(v, (list, tuple)) else [v])]
    else:
        named = [("the input", p) for p in inputs]
    for flag, p in named:
        if p is None:
            continue
        a, b = out.resolve(), Path(p).resolve()
        if _is_within(a, b) or _is_within(b, a):
            where = "is" if a == b else ("is inside" if _is_within(a, b) else "contains")
            raise UserError(f"--out {out} {where} {flag} {p}: a job never writes into what it reads; "
                            f"choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    held = [n for n in _MODEL_OR_RUN if (out / n).exists()]
    if not set(held) - set(_RUN_MARKS):
        held = []  # a run that stopped before its first save left only its marks: nothing to keep or resume
    if resume and not (out / "train_state.pt").is_file():  # before any data preparation, not after it
        what = "a model or run but no training state (train_state.pt)" if held else "no run (no train_state.pt)"
        raise UserError(f"--resume: {out} holds {what} to continue; start without --resume")
    if held and not (overwrite or resume):
        raise UserError(f"--out {out} already holds a model or run ({', '.join(held)}); "
                        f"use --resume to continue it, --overwrite to replace it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe_write(out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e} (choose a writable --out)") from None
    # A kill between save_pretrained's two renames leaves model/ (or best/) absent and the previous folder
    # set aside as .model.tmp-old-*: put it back, or the cleanup below would delete the last checkpoint.
    for aside in sorted(out.glob(".*.tmp-old-*")):
        target = out / aside.name[1:].split(".tmp-old-")[0]
        if aside.is_dir() and not target.exists():
            with contextlib.suppress(FileNotFoundError):  # another process of a distributed run was first
                os.rename(aside, target)
    # temp files live beside their target: the run folder and its model folders (model/, best/). Every
    # process of a distributed run gets here, so a file another one removed first is no error.
    for folder in [out, *(d for d in out.iterdir() if d.is_dir() and not d.name.startswith("."))]:
        for leftover in folder.glob(".*.tmp-*"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- the training-state file, resume


def save_train_state(path: PathLike, state: dict) -> None:
    """One dict (model, optimizer, scheduler, RNG states, data position, step...), written atomically:
    a kill at any moment leaves either the previous file or the new one."""
    atomic_torch_save(state, path)


def load_train_state(path: PathLike) -> dict:
    """Read a training state; a missing or unreadable file is a CheckpointError naming it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--resume: {path} not found (nothing to resume; start without --resume)")
    try:
        # weights_only: a training state is tensors and plain containers; nothing is ever unpickled
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, disallowed pickle content...
        raise CheckpointError(f"--resume: cannot read {path} ({type(e).__name__}: {e})") from None


def _same_setting(a: Any, b: Any) -> bool:
    """Equal, or two spellings of one existing path (pt, ./pt, /abs/pt; a run folder and its model/),
    element by element for lists."""
    if a == b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if not (isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists()):
        return False

    def where(p: str) -> Path:
        try:
            return resolve_model_dir(p).resolve()
        except CheckpointError:  # a data file, or a folder that holds no model
            return Path(p).resolve()

    return where(a) == where(b)


def check_resume(saved: Mapping[str, Any], now: Mapping[str, Any],
                 keys: Union[Iterable[str], Mapping[str, str]]) -> None:
    """Raise a UserError listing every key whose saved value differs from now's: resuming with other
    data, model or optimisation settings would silently train something else. `keys` names config
    fields (shown as --flags) or {key: how to show it}."""
    labels = keys if isinstance(keys, Mapping) else {k: "--" + k.replace("_", "-") for k in keys}
    diff = [f"{label}: saved {saved.get(k)!r}, now {now.get(k)!r}"
            for k, label in labels.items() if not _same_setting(saved.get(k), now.get(k))]
    if diff:
        raise UserError(f"--resume: the run was started with other settings ({'; '.join(diff)}); "
                        f"resume with the saved settings, or start a new run with --overwrite")


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
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving a checkpoint, then exiting",
              file=sys.stderr, flush=True)

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


def init_distributed(device: Union[str, torch.device]) -> Dist:
    """Join the process group when started by torchrun (which sets RANK / WORLD_SIZE), else a
    single process. NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ:
        return Dist()
    import torch.distributed as dist

    kind = torch.device(device).type
    # On GPUs the gradients go over NCCL, but the step's counts and losses are summed as CPU
    # tensors (they are read on the host anyway), which NCCL cannot carry: gloo takes those.
    backend = "cpu:gloo,cuda:nccl" if kind == "cuda" else "gloo"
    dist.init_process_group(backend)
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if kind == "cpu":
        # CPU processes on one machine share its cores; without this each would start one
        # thread per core and they would fight over them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", d.world))))
    return d
