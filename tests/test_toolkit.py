"""minibert.toolkit: the output-folder policy, the CLI contract (one-line errors, exit codes),
device and precision resolution, resume checks and the optimizer step.

Oracles: the file system itself (what exists after the call), argparse/stderr as a user sees
them, torch's own autocast dtypes, and a hand-written clip-then-step on a copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from minibert import toolkit as T
from minibert.checkpoint import CheckpointError

# ----------------------------------------------------------------------------- prepare_output


def make_model_folder(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    (p / "config.json").write_text("{}")
    (p / "model.safetensors").write_bytes(b"weights")
    return p


def test_prepare_output_creates_a_missing_folder_and_accepts_an_empty_one(tmp_path):
    assert T.prepare_output(tmp_path / "a" / "b", overwrite=False, resume=False).is_dir()
    (tmp_path / "empty").mkdir()
    assert T.prepare_output(tmp_path / "empty", overwrite=False, resume=False) == tmp_path / "empty"


def test_a_run_that_failed_before_its_first_save_does_not_block_the_next(tmp_path):
    # a run writes run_config.json (and metrics.jsonl) at its start; one that stopped on bad input
    # before saving anything holds nothing to keep or resume, so the corrected command may start there
    out = tmp_path / "out"
    out.mkdir()
    (out / "run_config.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    assert T.prepare_output(out, overwrite=False, resume=False) == out
    with pytest.raises(T.UserError, match=r"--resume: .* holds no run"):
        T.prepare_output(out, overwrite=False, resume=True)
    (out / "best").mkdir()  # but a saved model beside them is kept
    with pytest.raises(T.UserError, match=r"already holds a model or run \(run_config.json, metrics.jsonl, best\)"):
        T.prepare_output(out, overwrite=False, resume=False)


@pytest.mark.parametrize("content", ["model folder", "run folder", "run with model/"])
def test_prepare_output_refuses_a_folder_holding_a_model_or_run_without_overwrite(tmp_path, content):
    out = tmp_path / "out"
    if content == "model folder":
        make_model_folder(out)
    elif content == "run folder":
        out.mkdir()
        (out / "train_state.pt").write_bytes(b"state")
    else:
        make_model_folder(out / "model")
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(T.UserError, match=r"already holds a model or run .*--resume.*--overwrite"):
        T.prepare_output(out, overwrite=False, resume=False)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing touched
    assert T.prepare_output(out, overwrite=True, resume=False) == out
    if content == "run folder":
        assert T.prepare_output(out, overwrite=False, resume=True) == out
    else:  # nothing to resume: refused before any data preparation, not after it
        with pytest.raises(T.UserError, match=r"--resume: .* no training state \(train_state.pt\)"):
            T.prepare_output(out, overwrite=False, resume=True)


def test_prepare_output_refuses_overwrite_together_with_resume(tmp_path):
    with pytest.raises(T.UserError, match="exclude each other"):
        T.prepare_output(tmp_path, overwrite=True, resume=True)


@pytest.mark.parametrize("relation", ["is", "is inside", "contains"])
def test_prepare_output_refuses_an_out_that_is_inside_or_contains_the_init_folder(tmp_path, relation):
    init = make_model_folder(tmp_path / "init")
    out = {"is": init, "is inside": init / "sub", "contains": tmp_path}[relation]
    for overwrite in (False, True):
        with pytest.raises(T.UserError, match=f"--out {out} {relation} --init {init}"):
            T.prepare_output(out, overwrite=overwrite, resume=False, inputs={"--init": init})
    assert not (init / "sub").exists()


def test_prepare_output_accepts_an_input_beside_the_output_and_skips_absent_inputs(tmp_path):
    init = make_model_folder(tmp_path / "init")
    out = T.prepare_output(tmp_path / "init2", overwrite=False, resume=False, inputs=[init, None])
    assert out.is_dir()


@contextlib.contextmanager
def as_unprivileged_user():
    """Root writes into read-only folders; drop to 'nobody' for the duration (and back)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_prepare_output_says_cannot_write_in_one_line_for_a_read_only_folder():
    base = Path(tempfile.mkdtemp())  # world-traversable, unlike pytest's tmp_path, for the 'nobody' user
    try:
        base.chmod(0o755)
        ro = base / "ro"
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)
        with as_unprivileged_user(), pytest.raises(T.UserError) as e:
            T.prepare_output(ro / "run", overwrite=False, resume=False)
        msg = str(e.value)
        assert msg.startswith(f"cannot write {ro / 'run'}: ") and "ermission denied" in msg and "\n" not in msg
    finally:
        ro.chmod(0o755)
        import shutil

        shutil.rmtree(base)


def test_prepare_output_says_cannot_write_when_a_parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(T.UserError, match=r"cannot write .*f/run: "):
        T.prepare_output(tmp_path / "f" / "run", overwrite=False, resume=False)
    with pytest.raises(T.UserError, match="is a file, not a folder"):
        T.prepare_output(tmp_path / "f", overwrite=False, resume=False)


def test_prepare_output_removes_temp_leftovers_of_a_killed_run_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    make_model_folder(out / "model")
    (out / "train_state.pt").write_bytes(b"state")
    leftovers = [out / ".train_state.pt.tmp-123", out / "model" / ".model.safetensors.tmp-ab", out / ".model.tmp-9"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].write_bytes(b"half")
    make_model_folder(leftovers[2])  # a half-written sibling model folder
    keep = [out / "notes.txt", out / ".hidden", out / "model.tmp-1"]  # not the .<name>.tmp-* pattern
    for k in keep:
        k.write_text("mine")
    T.prepare_output(out, overwrite=False, resume=True)
    assert not any(p.exists() for p in leftovers)
    assert all(k.exists() for k in keep)
    assert (out / "model" / "config.json").exists() and (out / "train_state.pt").exists()


# ----------------------------------------------------------------------------- cli_main


@dataclasses.dataclass
class TinyConfig(T.RunOptions):
    lr: float = T.field(1e-3, "peak learning rate", fixed=True)
    files: list[str] = T.field([], "input files")
    mode: str = T.field("a", "a mode", choices=("a", "b"))
    hook: int = T.field(0, "test hook", hidden=True)

    def __post_init__(self):
        if self.lr <= 0:
            raise T.UserError(f"--lr must be positive, got {self.lr}")


def run_cli(capsys, run_fn, argv=()):
    code = T.cli_main("prog", run_fn, list(argv), TinyConfig, "a test job")
    return code, capsys.readouterr().err


def test_cli_main_returns_0_on_success_and_passes_the_parsed_config(capsys):
    seen = []
    code, err = run_cli(capsys, seen.append, ["--lr", "0.5", "--files", "x", "y", "--no-progress", "--mode", "b"])
    assert code == 0 and err == ""
    assert (seen[0].lr, seen[0].files, seen[0].progress, seen[0].mode) == (0.5, ["x", "y"], False, "b")
    assert run_cli(capsys, lambda c: 3)[0] == 3


@pytest.mark.parametrize("error", [T.UserError("bad --x: fix it"), CheckpointError("runs/a/config.json: broken"),
                                   T.UserError("two\nlines")])
def test_cli_main_turns_a_user_error_into_one_line_and_exit_code_1(capsys, error):
    def fail(cfg):
        raise error

    code, err = run_cli(capsys, fail)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("prog: error: ") and "Traceback" not in err


def test_cli_main_reports_a_bad_config_value_as_one_line_exit_1(capsys):
    code, err = run_cli(capsys, lambda c: 0, ["--lr", "-1"])
    assert code == 1 and err == "prog: error: --lr must be positive, got -1.0\n"


def test_an_unknown_flag_is_one_line_and_exit_code_1(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, lambda c: 0, ["--nope"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "unrecognized arguments: --nope" in err


def test_cli_main_returns_130_on_ctrl_c_and_lets_a_bug_keep_its_traceback(capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    def bug(cfg):
        raise ZeroDivisionError("a bug")

    assert run_cli(capsys, interrupted)[0] == 130
    with pytest.raises(ZeroDivisionError):
        run_cli(capsys, bug)
    with pytest.raises(ValueError):  # a plain ValueError is a bug, not a user error
        run_cli(capsys, lambda c: int("x"))


def test_help_documents_every_visible_field_with_its_default_and_hides_test_hooks():
    text = T.build_parser(TinyConfig, "prog", "d").format_help()
    assert "peak learning rate (default: 0.001)" in text and "--no-progress" in text
    assert "run options" in text and "--precision" in text and "bf16 on CUDA, fp32 on the CPU" in " ".join(text.split())
    assert "--hook" not in text


# ----------------------------------------------------------------------------- device and precision


def test_pick_device_resolves_cpu_and_refuses_devices_this_machine_lacks():
    assert T.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(T.UserError, match="--device gpu: not a device"):
        T.pick_device("gpu")
    if not torch.cuda.is_available():
        assert T.pick_device("auto") == torch.device("mps" if torch.backends.mps.is_available() else "cpu")
        with pytest.raises(T.UserError, match="--device cuda:1: CUDA is not available"):
            T.pick_device("cuda:1")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(T.UserError, match=f"has {n} CUDA device"):
            T.pick_device(f"cuda:{n}")
    if not torch.backends.mps.is_available():
        with pytest.raises(T.UserError, match="MPS is not available"):
            T.pick_device("mps")


def test_precision_auto_is_fp32_on_the_cpu_and_explicit_choices_are_checked():
    cpu = torch.device("cpu")
    assert T.resolve_precision("auto", cpu) == "fp32"
    assert T.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(T.UserError, match="fp16 is for GPUs"):
        T.resolve_precision("fp16", cpu)
    with pytest.raises(T.UserError, match="--precision fp64"):
        T.resolve_precision("fp64", cpu)


def test_attention_auto_is_math_only_for_short_bf16_rows_on_the_cpu():
    """--attn-impl auto picks the plain product and softmax where torch's fused CPU kernel is the
    slower (bf16, up to 128 tokens: benchmarks/pretrain_results.md, thirteenth round) and the fused
    kernel everywhere else; a named backend is never replaced."""
    cpu = torch.device("cpu")
    assert T.resolve_attention("auto", cpu, "bf16", 64) == "math"
    assert T.resolve_attention("auto", cpu, "bf16", 128) == "math"
    assert T.resolve_attention("auto", cpu, "bf16", 129) == "sdpa"  # the (T, T) scores grow as T squared
    assert T.resolve_attention("auto", cpu, "fp32", 64) == "sdpa"
    assert T.resolve_attention("auto", cpu, "auto", 64) == "sdpa"  # auto precision is fp32 on the CPU
    assert T.resolve_attention("sdpa", cpu, "bf16", 64) == "sdpa"
    assert T.resolve_attention("math", cpu, "fp32", 512) == "math"


@pytest.mark.parametrize("precision,dtype", [("auto", torch.float32), ("fp32", torch.float32),
                                             ("bf16", torch.bfloat16)])
def test_autocast_runs_a_linear_layer_in_the_chosen_precision_on_the_cpu(precision, dtype):
    lin = torch.nn.Linear(4, 4)
    with T.autocast(precision, torch.device("cpu")):
        y = lin(torch.randn(2, 4))
    assert y.dtype == dtype
    assert lin.weight.dtype == torch.float32  # weights stay fp32


def test_the_grad_scaler_is_enabled_for_fp16_only():
    assert not T.grad_scaler("bf16", torch.device("cpu")).is_enabled()
    assert not T.grad_scaler("fp32", torch.device("cpu")).is_enabled()
    if torch.cuda.is_available():
        assert T.grad_scaler("fp16", torch.device("cuda")).is_enabled()


def test_set_threads_keeps_the_default_for_0_and_refuses_negatives():
    before = torch.get_num_threads()
    T.set_threads(0)
    assert torch.get_num_threads() == before
    with pytest.raises(T.UserError, match="--threads"):
        T.set_threads(-1)


# ----------------------------------------------------------------------------- resume


def test_check_resume_passes_when_nothing_changed_and_lists_every_change_in_one_line():
    saved = {"lr": 0.1, "seed": 0, "corpus_sha256": "aaa", "batch": 32}
    T.check_resume(saved, dict(saved), ["lr", "seed"])
    now = {"lr": 0.2, "seed": 0, "corpus_sha256": "bbb", "batch": 32}
    with pytest.raises(T.UserError) as e:
        T.check_resume(saved, now, {"lr": "--lr", "seed": "--seed", "corpus_sha256": "corpus content"})
    msg = str(e.value)
    assert "--lr: saved 0.1, now 0.2" in msg and "corpus content: saved 'aaa', now 'bbb'" in msg
    assert "--seed" not in msg and "\n" not in msg


def test_check_resume_takes_two_spellings_of_one_path_as_the_same_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_model_folder(tmp_path / "run" / "model")
    (tmp_path / "train.tsv").write_text("x\t1\n")
    (tmp_path / "other.tsv").write_text("x\t1\n")
    saved = {"init": "run", "train": "train.tsv", "corpus": ["train.tsv"]}
    for init, train in [(str(tmp_path / "run"), "./train.tsv"), ("run/", str(tmp_path / "train.tsv")),
                        ("run/model", "train.tsv")]:
        T.check_resume(saved, {"init": init, "train": train, "corpus": [train]}, ["init", "train", "corpus"])
    # another file, or a path that does not exist, is still another setting
    for now in [{"train": "other.tsv"}, {"train": "gone.tsv"}, {"corpus": ["train.tsv", "other.tsv"]}]:
        with pytest.raises(T.UserError, match="the run was started with other settings"):
            T.check_resume(saved, {**saved, **now}, ["init", "train", "corpus"])


def test_load_train_state_names_a_missing_or_corrupt_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        T.load_train_state(tmp_path / "train_state.pt")
    (tmp_path / "train_state.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read"):
        T.load_train_state(tmp_path / "train_state.pt")
    T.save_train_state(tmp_path / "train_state.pt", {"step": 3, "w": torch.ones(2)})
    assert T.load_train_state(tmp_path / "train_state.pt")["step"] == 3


def test_rng_state_round_trips_through_a_train_state_file(tmp_path):
    T.seed_everything(1)
    T.save_train_state(tmp_path / "s.pt", {"rng": T.rng_state()})
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    T.set_rng_state(T.load_train_state(tmp_path / "s.pt")["rng"])
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ----------------------------------------------------------------------------- the optimizer step, keep-best, metrics


def test_optimizer_step_clips_steps_zeroes_and_advances_like_the_hand_written_sequence():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ref = torch.nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(4, 3) * 10
    opts, scheds = [], []
    for m in (model, ref):
        (m(x) ** 2).sum().backward()
        opts.append(torch.optim.SGD(m.parameters(), lr=0.1))
        scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[-1], lambda s: 0.5 ** s))
    grads = torch.cat([p.grad.flatten() for p in ref.parameters()])
    scaler = T.grad_scaler("fp32", torch.device("cpu"))
    norm = T.optimizer_step(opts[0], scheds[0], scaler, model.parameters(), clip=1.0)
    assert norm == pytest.approx(grads.norm().item(), rel=1e-6)
    with torch.no_grad():  # reference: scale every gradient by clip / norm, then p -= lr * g
        for p in ref.parameters():
            p -= 0.1 * p.grad * (1.0 / (grads.norm() + 1e-6))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
        assert p.grad is None
    assert scheds[0].get_last_lr() == [0.05]


def test_keep_best_tracks_minimum_or_maximum_and_survives_a_state_round_trip():
    kb = T.KeepBest("min")
    assert [kb.update(s, i) for i, s in enumerate([3.0, 2.0, 2.5, 1.0])] == [True, True, False, True]
    assert (kb.best, kb.best_step, kb.since) == (1.0, 3, 0)
    kb2 = T.KeepBest("max")
    kb2.load_state_dict(json.loads(json.dumps(kb.state_dict())))
    assert (kb2.mode, kb2.best) == ("min", 1.0) and not kb2.update(1.5, 4) and kb2.since == 1
    hi = T.KeepBest("max")
    assert [hi.update(s, i) for i, s in enumerate([0.5, 0.4, 0.6])] == [True, False, True]


def test_metrics_log_drops_lines_past_the_resumed_step_and_plot_curves_draws_a_png(tmp_path):
    log = T.MetricsLog(tmp_path / "metrics.jsonl")
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0 / step})
    log.write({"kind": "eval", "step": 3, "loss": 0.5, "acc": 0.4, "base": 0.1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # cut short by a kill
    resumed = T.MetricsLog(tmp_path / "metrics.jsonl", resume_step=2)
    assert [r["step"] for r in resumed.records] == [1, 2]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    T.plot_curves(log.records, tmp_path / "curves.png",
                  {"loss": ["train:loss", ("eval:loss", "held-out")], "accuracy": ["acc", ("base", "baseline", "--")]},
                  "title")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
