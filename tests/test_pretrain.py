"""The pretraining script end to end, on a tiny synthetic corpus and the tiny preset:
kill -9 / Ctrl-C and --resume give the same weights as an uninterrupted run, 2-process DDP
follows the 1-process curve, gradient accumulation equals a bigger batch, NaN stops the run,
the run folder's model/ loads and scores like at the end of training, a finished run is never
replaced unasked, --resume refuses another corpus content, global batch or schedule,
--time-budget ends at the budget with the learning rate at 0 (and resumes into the same
budget), --init continues a pretrained model (ours or Hugging Face's), and bad input fails
clearly. A few minutes on 2 cores (most of it starting Python processes).

The real-data acceptance run is in benchmarks/pretrain_results.md; the no-argument default
run is `pytest -m slow tests/test_pretrain.py`.
"""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from minibert import BertForPreTraining, pretrain
from minibert import pretraining_data as pd
from minibert.checkpoint import pretrained_here
from minibert.toolkit import build_parser, init_distributed, parse_config

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """Documents of 2-9 sentences of made-up words."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "tu", "ra", "si", "po"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)})
    docs = [" ".join(" ".join(rng.choices(words, k=rng.randint(3, 12))).capitalize() + "."
                     for _ in range(rng.randint(2, 9)))
            for _ in range(n_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def cli(opts: dict, **changes) -> list[str]:
    """{"batch_size": 8, "no_nsp": True} -> ["--batch-size", "8", "--no-nsp"]"""
    out = []
    for k, v in {**opts, **changes}.items():
        if v is False or v is None:
            continue
        out += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("pretrain")
    corpus = make_corpus(tmp / "corpus.txt", n_docs=300)
    opts = dict(recipe="bert", corpus=corpus, cache_dir=tmp / "cache", vocab_size=300, seq_len=32, batch_size=8,
                lr=2e-3, warmup=10, max_steps=STEPS, save_every=5, eval_every=20, eval_size=48, log_every=1, threads=1)
    return {"tmp": tmp, "opts": opts, "args": cli(opts)}


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minibert.pretrain", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = setup["tmp"] / "ref"
    r = run_cli(setup["args"] + ["--out", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def start_and_wait(args: list[str], out: Path, min_step: int, min_seconds: float = 0.0) -> subprocess.Popen:
    """Start a run and return once it has logged `min_step` (so it has saved a checkpoint) after
    `min_seconds` of training, and is still going. Its output goes to files, not pipes: a run that logs
    every step would fill a pipe nobody reads within a few hundred steps and block on its next print."""
    logs = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "minibert.pretrain", *args, "--out", str(out)],
                                cwd=ROOT, stdout=stdout, stderr=stderr, text=True)
    proc.logs = logs
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted: {proc.returncode}\n{finish(proc)[1][-2000:]}")
        metrics = out / "metrics.jsonl"
        if metrics.exists():
            lines = metrics.read_text(encoding="utf-8").splitlines()
            if len(lines) >= 2:  # [-2]: the last line may be half written
                last = json.loads(lines[-2])
                if last["step"] >= min_step and last["time_s"] >= min_seconds:
                    return proc
        time.sleep(0.02)
    proc.kill()
    pytest.fail("the run did not reach the step to interrupt in time")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Wait for a run from start_and_wait; its (stdout, stderr)."""
    proc.wait(timeout=timeout)
    return tuple(path.read_text(encoding="utf-8") for path in proc.logs)


def test_sigkill_then_resume_matches_uninterrupted_run(setup, reference):
    out = setup["tmp"] / "killed"
    proc = start_and_wait(setup["args"], out, min_step=12)
    proc.send_signal(signal.SIGKILL)  # no chance to save anything: resume from the last periodic checkpoint
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 10 <= saved < STEPS
    r = run_cli(setup["args"] + ["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'train_state.pt'} at step {saved}" in r.stdout
    assert_same_weights(reference, out)
    # metrics.jsonl reads as one run: the lines logged after the checkpoint by the killed run are gone
    assert [x["loss"] for x in train_records(out)] == [x["loss"] for x in train_records(reference)]


def test_ctrl_c_saves_then_resume_matches_uninterrupted_run(setup, reference):
    out = setup["tmp"] / "interrupted"
    proc = start_and_wait(setup["args"], out, min_step=7)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = finish(proc)
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped at step" in stdout
    saved = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert 7 <= saved < STEPS  # saved on the way out, not only at a multiple of --save-every
    r = run_cli(setup["args"] + ["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_weights(reference, out)


def rescore(setup, out: Path) -> dict:
    """Load the output folder with from_pretrained and score it on the run's held-out split, in float32."""
    model = BertForPreTraining.from_pretrained(out)  # a run folder: its model/
    cfg = parse_config(pretrain.PretrainConfig, setup["args"] + ["--out", str(out)], "test", "")
    data = pretrain.prepare_data(cfg, pretrain.Tokenizer.from_file(out / "model"), log=lambda *a: None)
    return pretrain.evaluate(model, data.eval_batches, data.baseline_id, "cpu")


def test_output_folder_loads_and_scores_as_at_the_end_of_training(setup, reference):
    final = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["kind"] == "eval" and final["step"] == STEPS
    assert BertForPreTraining.from_pretrained(reference).load_report["initialised"] == []
    res = rescore(setup, reference)
    for k in ("mlm_acc", "mlm_loss", "nsp_acc", "baseline_acc"):
        assert res[k] == pytest.approx(final[k], abs=1e-6), k
    # it learned (random words: no more than their frequencies)
    assert final["loss"] < train_records(reference)[0]["loss"] - 0.3
    # best/ holds the checkpoint with the lowest held-out loss, with its scores
    best = json.loads((reference / "best" / "eval.json").read_text())
    assert best["loss"] == min(r["loss"] for r in map(json.loads,
                                                      (reference / "metrics.jsonl").read_text().splitlines())
                               if r["kind"] == "eval")
    assert (reference / "curves.png").stat().st_size > 1000


def test_eval_only_scores_the_saved_run_and_refuses_a_folder_without_a_masked_lm_head(setup, reference, capsys,
                                                                                    tmp_path):
    final = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()][-1]
    capsys.readouterr()
    assert inprocess(setup, reference, "--eval-only") == 0
    out = capsys.readouterr().out
    assert f"MLM acc {final['mlm_acc']:.3f}" in out and f"held-out MLM loss {final['mlm_loss']:.4f}" in out
    # a classifier fine-tuned from it has no MLM head: scoring one drawn at random would mean nothing
    from minibert import BertForSequenceClassification
    clf = BertForSequenceClassification.from_pretrained(reference, num_labels=2)
    clf.save_pretrained(tmp_path / "clf", tokenizer=pretrain.Tokenizer.from_file(reference / "model"))
    capsys.readouterr()
    assert inprocess(setup, tmp_path / "clf", "--eval-only") == 1
    assert "the checkpoint has no masked-LM head" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_follow_the_one_process_curve(setup):
    """torchrun, 2 x batch 4 (gloo) vs 1 x batch 8: the same global batches, so the same losses."""
    common = dict(setup["opts"], max_steps=8, dropout=0, save_every=100, eval_every=100)
    single_out, ddp_out = setup["tmp"] / "single", setup["tmp"] / "ddp"
    r = run_cli(cli(common, batch_size=8, out=single_out))
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "minibert.pretrain", *cli(common, batch_size=4, out=ddp_out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es), global batch 8" in r.stdout
    one, two = train_records(single_out), train_records(ddp_out)
    assert [x["step"] for x in one] == [x["step"] for x in two] == list(range(1, 9))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        assert b["mlm_acc"] == pytest.approx(a["mlm_acc"], abs=1e-9)
    wa, wb = weights(single_out), weights(ddp_out)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device, backend",
                         [("cpu", "gloo"), ("cuda", "cpu:gloo,cuda:nccl"), ("cuda:1", "cpu:gloo,cuda:nccl")])
def test_gpu_processes_also_get_gloo_for_the_cpu_sums(monkeypatch, device, backend):
    """The step's counts and losses are all-reduced as CPU tensors, which NCCL cannot carry
    (this CPU-only CI cannot start NCCL, so the choice itself is what is checked here; the
    CPU run above carries those sums through gloo)."""
    import torch.distributed

    asked = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "init_process_group", asked.append)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    threads = torch.get_num_threads()
    try:
        d = init_distributed(device)
    finally:
        torch.set_num_threads(threads)
    assert asked == [backend] and d.enabled


def inprocess(setup, out: Path, *extra: str) -> int:
    threads = torch.get_num_threads()  # --threads 1 sets it for the whole pytest process; put it back
    try:
        return pretrain.main(setup["args"] + ["--out", str(out), *extra])
    finally:
        torch.set_num_threads(threads)


def test_gradient_accumulation_equals_the_bigger_batch(setup, capsys):
    base = ["--max-steps", "6", "--dropout", "0", "--eval-every", "100", "--save-every", "100"]
    assert inprocess(setup, setup["tmp"] / "acc1", *base) == 0
    assert inprocess(setup, setup["tmp"] / "acc2", *base, "--batch-size", "4", "--grad-accum", "2") == 0
    one, two = train_records(setup["tmp"] / "acc1"), train_records(setup["tmp"] / "acc2")
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


# six logged steps without dropout, scored at the end: two such runs differ only by their options
SIX_STEPS = ["--max-steps", "6", "--dropout", "0", "--eval-every", "6", "--save-every", "100", "--log-every", "1"]


def plain_and_flagged(setup, base: list[str], flag: str, names: tuple[str, str]) -> tuple[list[dict], list[dict]]:
    """Run `base` into tmp/names[0] and `base + flag` into tmp/names[1]; their training records."""
    plain, flagged = (setup["tmp"] / n for n in names)
    assert inprocess(setup, plain, *base) == 0
    assert inprocess(setup, flagged, *base, *flag.split()) == 0
    return train_records(plain), train_records(flagged)


def test_packed_rows_follow_the_padded_curve(setup, capsys):
    """--pack lays the same instances end to end behind a block-diagonal mask: with the same
    masks and no dropout every loss, accuracy and weight must match the padded run, on fewer rows."""
    base = [*SIX_STEPS, "--seq-len", "96"]  # longer than most of the corpus's documents: short instances to share rows
    a, b = plain_and_flagged(setup, base, "--pack", ("padded", "packed"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert (y["mlm_acc"], y["nsp_acc"]) == (x["mlm_acc"], x["nsp_acc"])
    assert all(x["rows"] == 8 for x in a)  # one instance per row
    assert sum(y["rows"] for y in b) < 0.8 * sum(x["rows"] for x in a)  # short instances share rows
    wa, wb = weights(setup["tmp"] / "padded"), weights(setup["tmp"] / "packed")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_cpu_bf16_follows_the_float32_curve_and_scores_in_float32(setup, capsys):
    """--precision bf16 on the CPU: bf16 autocast in the training step only. Same data, same init: the
    losses stay within 2% of float32 (bf16 keeps 8 bits of mantissa: ~0.4% per rounding), and
    the held-out scores are computed in float32, so the saved folder rescores exactly."""
    a, b = plain_and_flagged(setup, SIX_STEPS, "--precision bf16", ("fp32", "bf16"))
    said = capsys.readouterr().out
    assert "fp32, attention sdpa" in said and "bf16, attention math" in said  # --attn-impl auto's two choices
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-2)
    assert any(y["loss"] != x["loss"] for x, y in zip(a, b))  # bf16 really ran
    final = [json.loads(x) for x in (setup["tmp"] / "bf16" / "metrics.jsonl").read_text().splitlines()][-1]
    res = rescore(setup, setup["tmp"] / "bf16")
    assert res["mlm_loss"] == pytest.approx(final["mlm_loss"], abs=1e-6)


def test_fused_kernels_follow_the_plain_curve(setup, capsys):
    """--fused-kernels (add+LayerNorm and bias+GELU as custom ops -- Triton under the suite's
    TRITON_INTERPRET=1 -- and the chunked MLM decoder + loss, which keeps no logits) is the same
    function: with no dropout every loss, accuracy and weight matches the plain run."""
    a, b = plain_and_flagged(setup, SIX_STEPS, "--fused-kernels", ("plain", "fused"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert (y["mlm_acc"], y["nsp_acc"]) == (x["mlm_acc"], x["nsp_acc"])
    wa, wb = weights(setup["tmp"] / "plain"), weights(setup["tmp"] / "fused")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(setup, capsys):
    out = setup["tmp"] / "nan"
    assert inprocess(setup, out, "--debug-nan-at-step", "8") == 1
    err = capsys.readouterr().err
    assert "step 8: the loss is nan (not finite)" in err
    assert "the last good checkpoint, step 5, is in" in err
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_seed_reproducible_and_variants_run(setup, capsys):
    base = ["--max-steps", "3", "--eval-every", "3", "--save-every", "100"]
    for name, extra in [("nonsp", ["--no-nsp"]), ("wwm", ["--whole-word-mask", "--static-masking"]),
                        ("wwm2", ["--whole-word-mask", "--static-masking"])]:
        assert inprocess(setup, setup["tmp"] / name, *base, *extra) == 0, capsys.readouterr().err
    assert train_records(setup["tmp"] / "nonsp")[0]["nsp_acc"] is None
    assert_same_weights(setup["tmp"] / "wwm", setup["tmp"] / "wwm2")  # same --seed, same weights


# ----------------------------------------------------------------------------- CLI errors


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, r"file .*nothere\.txt not found"),
        (b"", r"nothere\.txt is empty"),
        (b"Fine text.\n\nBroken \xc3\x28 text.\n", r"nothere\.txt: not valid UTF-8 at byte 19 \(line 3\)"),
    ],
)
def test_bad_corpus_exits_nonzero_naming_the_file(setup, capsys, content, expected):
    path = setup["tmp"] / "nothere.txt"
    if content is not None:
        path.write_bytes(content)
    elif path.exists():
        path.unlink()
    # a saved tokenizer, so that the error comes from reading the corpus, not from training a vocabulary on it
    tok_dir = setup["tmp"] / "tok"
    pretrain.Tokenizer.train([setup["opts"]["corpus"]], vocab_size=300).save(tok_dir)
    assert pretrain.main(cli(setup["opts"], corpus=path, tokenizer=tok_dir, out=setup["tmp"] / "bad")) == 1
    err = capsys.readouterr().err
    assert re.search(expected, err), err


def test_unreadable_tokenizer_is_named(setup, capsys, tmp_path):
    (tmp_path / "vocab.txt").write_text("", encoding="utf-8")
    assert pretrain.main(cli(setup["opts"], tokenizer=tmp_path / "vocab.txt", out=tmp_path / "out")) == 1
    assert f"--tokenizer {tmp_path / 'vocab.txt'}: cannot load it" in capsys.readouterr().err


def test_resume_refuses_other_settings_and_missing_state(setup, reference, capsys, tmp_path):
    assert pretrain.main(setup["args"] + ["--out", str(tmp_path), "--resume"]) == 1
    assert "holds no run (no train_state.pt) to continue; start without --resume" in capsys.readouterr().err
    args = setup["args"] + ["--out", str(reference), "--resume", "--lr", "1e-4"]
    assert pretrain.main(args) == 1
    assert "--lr: saved 0.002, now 0.0001" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_it_is_done_and_changes_nothing(setup, reference, capsys):
    before = weights(reference)
    assert pretrain.main(setup["args"] + ["--out", str(reference), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"done already: the run in {reference} had finished at step {STEPS}" in out and "--init" in out
    after = weights(reference)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_second_run_into_a_finished_run_fails_before_any_work(setup, reference, capsys):
    before = weights(reference)
    assert inprocess(setup, reference) == 1
    out, err = capsys.readouterr()
    assert out == ""  # no data preparation, no model
    assert err.count("\n") == 1
    assert f"--out {reference} already holds a model or run" in err and "--resume" in err and "--overwrite" in err
    after = weights(reference)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_corpus_without_any_instance_is_one_error_not_an_endless_search(setup, capsys):
    # one-sentence documents (a file of tweets or reviews, one per paragraph) give next-sentence
    # prediction no pair at all: the stream used to look for instances epoch after epoch, forever
    tweets = setup["tmp"] / "tweets.txt"
    tweets.write_text("".join(f"short review number {i} was fine.\n\n" for i in range(40)), encoding="utf-8")
    capsys.readouterr()
    assert inprocess(setup, setup["tmp"] / "tweets", "--corpus", str(tweets), "--nsp") == 1
    err = capsys.readouterr().err
    assert "no training instances: none of the" in err and "has two sentences" in err and "--no-nsp" in err
    assert inprocess(setup, setup["tmp"] / "tweets", "--corpus", str(tweets), "--no-nsp", "--max-steps", "1") == 0


def test_the_instance_stream_never_loops_on_an_empty_epoch():
    stream = pd.InstanceStream.__new__(pd.InstanceStream)  # only the loop is under test
    stream.epoch, stream.index, stream.static = 0, 0, False
    stream._table = lambda epoch: (np.zeros((0, 4), dtype=np.int32), np.zeros(0, dtype=np.int64))
    with pytest.raises(pd.CorpusError, match="no training instances in epoch 0"):
        stream.take(8)


def test_overwrite_starts_a_new_run_that_keeps_nothing_of_the_old_one(setup, capsys):
    out = setup["tmp"] / "overwritten"
    assert inprocess(setup, out, "--max-steps", "2", "--eval-every", "2", "--save-every", "2") == 0
    assert (out / "best").is_dir() and (out / "train_state.pt").exists()
    # a new run whose input fails (here a corpus that is not UTF-8) clears nothing: the old run is
    # only removed once the new one has its data and its model
    latin = setup["tmp"] / "latin1.txt"
    latin.write_bytes("un caf\xe9 noir.\n".encode("latin-1"))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert inprocess(setup, out, "--overwrite", "--corpus", str(latin)) == 1
    assert f"{latin}" in (err := capsys.readouterr().err) and "UTF-8 at byte 6" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    # the new run dies at its first step: had it kept the old run's files, --resume would pick them up
    capsys.readouterr()
    assert inprocess(setup, out, "--overwrite", "--debug-nan-at-step", "1") == 1
    assert "no checkpoint was saved before it" in capsys.readouterr().err  # and none claimed: the old one is gone
    assert not any((out / n).exists() for n in ("train_state.pt", "model", "best", "curves.png"))
    assert (out / "metrics.jsonl").read_text() == ""
    assert json.loads((out / "run_config.json").read_text())["overwrite"] is True


def test_resume_refuses_other_corpus_content_global_batch_or_schedule_but_not_a_renamed_corpus(setup, reference,
                                                                                                capsys, tmp_path):
    text = Path(setup["opts"]["corpus"]).read_text(encoding="utf-8")
    edited = tmp_path / "corpus.txt"  # the same file name, one letter changed
    edited.write_text(text.replace("a", "o", 1), encoding="utf-8")
    refusals = [(["--corpus", str(edited)], "corpus content (sha256 of the files' bytes"),
                (["--batch-size", "4"], "global batch (processes x --batch-size x --grad-accum): saved 8, now 4"),
                (["--max-steps", str(2 * STEPS)], f"--max-steps: saved {STEPS}, now {2 * STEPS}"),
                (["--time-budget", "5"], "--time-budget: saved None, now 5.0")]
    for change, expected in refusals:
        assert inprocess(setup, reference, "--resume", *change) == 1
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    renamed = tmp_path / "renamed.txt"  # the same bytes under another name, the same global batch made otherwise
    renamed.write_text(text, encoding="utf-8")
    again = ["--resume", "--corpus", str(renamed), "--batch-size", "4", "--grad-accum", "2"]
    assert inprocess(setup, reference, *again) == 0
    assert f"resumed from {reference / 'train_state.pt'} at step {STEPS}" in capsys.readouterr().out


def test_time_budget_ends_at_the_budget_with_lr_0_and_resume_keeps_the_same_budget(setup, tmp_path):
    """--time-budget 0.15 (9 s) with --max-steps 3, which it ignores: stopped by Ctrl-C after 4 s,
    then resumed; the run ends once 9 s of training are spent in all, not 9 s after the resume."""
    budget = 9.0
    args = cli(setup["opts"], time_budget=budget / 60, warmup_fraction=0.2, max_steps=3, eval_every=10_000,
               save_every=10_000)
    out = tmp_path / "budget"
    proc = start_and_wait(args, out, min_step=2, min_seconds=4.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = finish(proc)
    assert proc.returncode == 130, stderr[-2000:]
    first = torch.load(out / "train_state.pt", weights_only=True)
    first_clock = first["clock"][0]
    r = run_cli(args + ["--out", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = train_records(out)
    assert [x["step"] for x in recs] == list(range(1, len(recs) + 1)) and len(recs) > 3  # one run, past --max-steps
    assert budget <= recs[-1]["time_s"] < first_clock + budget - 1  # the budget was not restarted
    peak = setup["opts"]["lr"]
    lrs = [x["lr"] for x in recs]
    top = lrs.index(max(lrs))
    assert 0 < top < len(lrs) - 1 and max(lrs) > 0.5 * peak  # warms up, then decays...
    assert lrs[-1] == 0.0  # ...to zero once the budget is spent
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["kind"] == "eval" and (out / "best" / "eval.json").exists()


def test_init_continues_from_a_pretraining_run_with_its_weights_and_tokenizer(setup, reference, tmp_path, capsys):
    other = make_corpus(tmp_path / "other.txt", n_docs=120, seed=1)
    out = tmp_path / "continued"
    # one step at a vanishing learning rate: the weights are still --init's, every one of them
    assert inprocess(setup, out, "--init", str(reference), "--corpus", str(other), "--max-steps", "1", "--lr", "1e-12",
                     "--warmup", "1", "--vocab-size", "50") == 0
    assert f"model: --init {reference}" in capsys.readouterr().out
    a, b = weights(reference), weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert (out / "model" / "vocab.txt").read_text() == (reference / "model" / "vocab.txt").read_text()
    # model/ and best/ say they were pretrained here, and continuing such a model keeps saying so
    assert all(pretrained_here(folder) for folder in (reference / "model", reference / "best", out / "model"))


def hf_folder(tmp_path: Path, reference: Path, cls_name: str) -> Path:
    """A Hugging Face BERT folder (tiny, random) of class cls_name with the reference run's tokenizer."""
    transformers = pytest.importorskip("transformers")
    vocab = (reference / "model" / "vocab.txt").read_text(encoding="utf-8").splitlines()
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path / cls_name
    getattr(transformers, cls_name)(cfg).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((reference / "model" / name).read_bytes())
    return folder


def test_init_takes_a_hugging_face_folder_with_an_mlm_head_and_refuses_one_without(setup, reference, tmp_path, capsys):
    mlm = hf_folder(tmp_path, reference, "BertForMaskedLM")
    assert inprocess(setup, tmp_path / "from_hf", "--init", str(mlm), "--max-steps", "2", "--seq-len", "32") == 0
    assert BertForPreTraining.from_pretrained(tmp_path / "from_hf").config.hidden_size == 32
    # minutes of continued pretraining leave a published checkpoint mostly what it was
    assert not pretrained_here(mlm) and not pretrained_here(tmp_path / "from_hf" / "model")
    encoder = hf_folder(tmp_path, reference, "BertModel")
    assert inprocess(setup, tmp_path / "from_encoder", "--init", str(encoder), "--max-steps", "2") == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' own progress output
    assert err.startswith(f"python -m minibert.pretrain: error: --init {encoder}: the checkpoint has no masked-LM head")
    assert not (tmp_path / "from_encoder" / "model").exists()


def test_bad_option_values_exit_with_a_one_line_message(capsys):
    assert pretrain.main(["--mlm-prob", "1.5"]) == 1
    assert capsys.readouterr().err == "python -m minibert.pretrain: error: --mlm-prob must be in (0, 1), got 1.5\n"
    assert pretrain.main(["--init", "x", "--tokenizer", "y"]) == 1
    assert "--init brings its own tokenizer" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert pretrain.main(["--device", "cuda"]) == 1
        assert "CUDA is not available" in capsys.readouterr().err


def test_help_documents_every_option():
    text = build_parser(pretrain.PretrainConfig, "x", "").format_help()
    for flag in ["--corpus", "--tokenizer", "--vocab-size", "--preset", "--seq-len", "--batch-size", "--grad-accum",
                 "--max-steps", "--lr", "--warmup", "--mlm-prob", "--no-nsp", "--out", "--resume", "--seed", "--device",
                 "--compile", "--eval-every", "--save-every", "--whole-word-mask", "--static-masking", "--errors",
                 "--precision", "--overwrite", "--time-budget", "--init", "--threads"]:
        assert flag in text, flag
    assert "--debug-nan-at-step" not in text  # a test hook, not an option
    assert "--bf16 / --fp16 / --fp32" in " ".join(text.split())  # where the former switches went
    assert "../shared" not in text and " ms" not in text  # no development paths or measurements


@pytest.mark.slow
def test_default_command_beats_the_baseline(tmp_path):
    """`python -m minibert.pretrain` with no arguments (run: pytest -m slow tests/test_pretrain.py)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "minibert.pretrain", "--out", str(tmp_path / "out"), "--cache-dir",
                        str(tmp_path / "cache")],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    final = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["mlm_acc"] > 3 * final["baseline_acc"]  # past the frequent-token plateau (8.9x measured)
    assert "most-frequent-token baseline" in r.stdout
    print(f"default run: {time.time() - t0:.0f}s wall, held-out MLM acc {final['mlm_acc']:.3f} "
          f"vs baseline {final['baseline_acc']:.3f}")


# ----------------------------------------------------------------------------- recipes


def test_recipe_fills_only_the_flags_left_unset():
    from dataclasses import asdict

    from minibert.pretrain import DEFAULT_CORPUS, RECIPES, PretrainConfig

    cfg = PretrainConfig()  # what `python -m minibert.pretrain` runs
    assert (cfg.recipe, cfg.nsp, cfg.no_nsp, cfg.mlm_prob, cfg.seq_len, cfg.dropout, cfg.position_init,
            cfg.max_steps, cfg.warmup) == ("budget", False, True, 0.4, 64, 0.0, "sinusoidal", 2400, 240)
    bert = PretrainConfig(recipe="bert")
    assert (bert.nsp, bert.mlm_prob, bert.seq_len, bert.dropout, bert.position_init, bert.max_steps) == (
        True, 0.15, 128, None, "random", 600)  # dropout None: the preset's (BERT's 0.1)
    # an explicit flag wins over the recipe, either way
    assert PretrainConfig(nsp=True, mlm_prob=0.15).nsp and PretrainConfig(nsp=True, mlm_prob=0.15).mlm_prob == 0.15
    assert PretrainConfig(recipe="bert", no_nsp=True).nsp is False
    assert PretrainConfig(recipe="bert", dropout=0.0, seq_len=32).seq_len == 32
    # a saved run_config.json reads back as the same config (what --resume compares)
    assert PretrainConfig(**asdict(cfg)) == cfg and PretrainConfig(**asdict(bert)) == bert
    assert set(RECIPES["budget"]) == set(RECIPES["bert"])
    # --max-steps alone keeps the recipe's 10% warmup, so a short run still decays to 0
    assert (PretrainConfig(max_steps=100).warmup, PretrainConfig(recipe="bert", max_steps=50).warmup) == (10, 5)
    assert PretrainConfig(max_steps=100, warmup=30).warmup == 30
    # continued pretraining starts from trained weights: a quarter of the from-scratch peak rate,
    # unless --lr says otherwise; the resolved rate is what run_config.json keeps
    dapt = PretrainConfig(init="runs/p")
    assert (cfg.lr, dapt.lr, PretrainConfig(init="runs/p", lr=1e-3).lr) == (2e-3, 5e-4, 1e-3)
    assert PretrainConfig(**asdict(dapt)) == dapt
    # the preset follows the budget: tiny for the default run and budgets under an hour, mini (at
    # the rate post-LN mini trains stably at) from an hour on; a flag given explicitly still wins
    hour = PretrainConfig(time_budget=60)
    assert (cfg.preset, PretrainConfig(time_budget=59).preset, hour.preset, hour.lr) == ("tiny", "tiny", "mini", 1e-3)
    # width 512 stays on the frequent-token plateau at 1e-3 (benchmarks/pretrain_results.md, eleventh round)
    assert (PretrainConfig(time_budget=60, preset="tiny").lr, PretrainConfig(preset="small").lr) == (2e-3, 5e-4)
    assert PretrainConfig(time_budget=60, lr=5e-4).lr == 5e-4
    # the vocabulary follows the width: 4,096 pieces where the MLM decoder is most of the step,
    # 16,384 wider (sixth and thirteenth rounds); --vocab-size wins, and the resolved size is saved
    assert (cfg.vocab_size, hour.vocab_size, PretrainConfig(preset="small").vocab_size) == (4096, 16384, 16384)
    assert PretrainConfig(time_budget=60, vocab_size=8192).vocab_size == 8192
    # dropout follows the width too: 0 for tiny, 0.1 wider (fourteenth round); continued pretraining
    # keeps 0, recipe bert the preset's (None), and --dropout wins
    assert (cfg.dropout, hour.dropout, PretrainConfig(preset="small").dropout) == (0.0, 0.1, 0.1)
    assert (PretrainConfig(init="runs/p", time_budget=60).dropout, PretrainConfig(recipe="bert", preset="mini").dropout,
            PretrainConfig(time_budget=60, dropout=0.0).dropout) == (0.0, None, 0.0)
    assert (PretrainConfig(recipe="bert", time_budget=60).preset, PretrainConfig(init="runs/p", time_budget=60).lr) \
        == ("tiny", 5e-4)
    # weight decay: 0.1 for the budget recipe wider than tiny from random weights (twenty-seventh
    # round), else BERT's 0.01; --weight-decay wins, and the resolved value is what --resume compares
    assert (cfg.weight_decay, hour.weight_decay, PretrainConfig(preset="small").weight_decay) == (0.01, 0.1, 0.1)
    assert (PretrainConfig(init="runs/p", time_budget=60).weight_decay,
            PretrainConfig(recipe="bert", preset="mini").weight_decay,
            PretrainConfig(time_budget=60, weight_decay=0.01).weight_decay) == (0.01, 0.01, 0.01)
    assert PretrainConfig(**asdict(hour)) == hour
    assert all(p.exists() for p in DEFAULT_CORPUS)


def test_a_budget_trains_in_bf16_where_the_cpu_multiplies_bf16(monkeypatch):
    from dataclasses import asdict

    from minibert import pretrain, toolkit
    from minibert.pretrain import PretrainConfig

    # the flags /proc/cpuinfo gives: AMX or AVX512-BF16 count, AVX2 and AVX-512 without bf16 do not
    for flags, has in ((["avx2", "amx_bf16"], True), (["avx512f", "avx512_bf16"], True),
                       (["avx2", "avx512f", "avx512_vnni"], False), (None, False)):
        monkeypatch.setattr(toolkit, "cpu_info", lambda flags=flags: ("cpu", flags))
        assert toolkit.cpu_has_bf16() is has, flags
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: True)
    budget = PretrainConfig(time_budget=5, device="cpu")
    assert budget.precision == "bf16"
    # --max-steps runs stay fp32 so they reproduce on any CPU; an explicit choice always wins
    assert (PretrainConfig(device="cpu").precision, PretrainConfig(time_budget=5, precision="fp32").precision) == (
        "auto", "fp32")
    assert PretrainConfig(**asdict(budget)) == budget  # what --resume compares
    monkeypatch.setattr(pretrain, "cpu_has_bf16", lambda: False)
    assert PretrainConfig(time_budget=5, device="cpu").precision == "auto"


def test_recipe_flags_from_the_command_line(capsys):
    from minibert.pretrain import PretrainConfig
    from minibert.toolkit import parse_config

    cfg = parse_config(PretrainConfig, ["--recipe", "bert", "--mlm-prob", "0.3"], "pretrain", "")
    assert (cfg.nsp, cfg.mlm_prob, cfg.seq_len) == (True, 0.3, 128)
    assert pretrain.main(["--nsp", "--no-nsp"]) == 1
    assert "--nsp and --no-nsp contradict each other" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_walk_through_pretraining_pays(tmp_path):
    """The README's two commands, then the same fine-tuning from random weights, over three
    fine-tuning seeds: the pretrained model must reach 85% on data/sentiment/test.tsv and beat
    random weights by 3 points (issue 15). About 18 minutes on 2 idle cores (run: pytest -m slow
    tests/test_pretrain.py -k walk_through)."""
    run = subprocess.run([sys.executable, "-m", "minibert.pretrain", "--out", str(tmp_path / "pre"),
                          "--cache-dir", str(tmp_path / "cache"), "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = ["--train", "data/sentiment/train.tsv", "--dev", "data/sentiment/dev.tsv", "--test",
            "data/sentiment/test.tsv"]
    acc = {"pretrained": [], "scratch": []}
    for seed in (0, 1, 2):
        for kind, extra in (("pretrained", []), ("scratch", ["--from-scratch"])):
            out = tmp_path / f"{kind}{seed}"
            r = subprocess.run([sys.executable, "-m", "minibert.finetune", "--init", str(tmp_path / "pre"), *data,
                                "--seed", str(seed), "--out", str(out), "--no-progress", *extra],
                               cwd=ROOT, capture_output=True, text=True, timeout=1800)
            assert r.returncode == 0, r.stderr[-3000:]
            acc[kind].append(json.loads((out / "metrics.json").read_text())["test"]["accuracy"])
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    print(f"walk-through: {acc}")
    assert mean["pretrained"] >= 0.85 and mean["pretrained"] >= mean["scratch"] + 0.03, acc


def test_replaced_token_detection_corrupts_and_scores_as_electra(benchmark_script):
    """benchmarks/replaced_token_detection.py (issue 15, ninth round): the discriminator must see
    the original text with only the chosen positions swapped for generator samples, be told
    exactly which tokens differ (a sample equal to the original is 'original', padding is never
    scored), and its loss must be the generator's MLM loss + lambda x the mean binary
    cross-entropy over the real tokens, written out here independently."""
    import math

    rtd = benchmark_script("replaced_token_detection")
    from minibert.model import BertConfig

    V, MASK, FILL = 50, 3, 7
    small = dict(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, dropout=0.0,
                 attention_dropout=0.0, attn_impl="math")
    torch.manual_seed(0)
    model = rtd.ReplacedTokenDetection(BertConfig(**small), BertConfig(**small), disc_weight=50.0).eval()
    with torch.no_grad():  # the generator now always samples FILL: the corruption is known in advance
        model.gen.mlm.bias.fill_(-1e4)
        model.gen.mlm.bias[FILL] = 1e4
    original = torch.tensor([[1, 10, FILL, 12, 13, 2], [1, 20, 21, 2, 0, 0]])  # (B, T), 0 = padding
    attention_mask = (original != 0).long()
    chosen = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    labels = torch.where(chosen, original, torch.full_like(original, -100))
    input_ids = torch.where(chosen, torch.full_like(original, MASK), original)
    out = model(input_ids, torch.zeros_like(original), attention_mask, labels)

    expected = torch.where(chosen, torch.full_like(original, FILL), original)
    assert torch.equal(out["corrupted"], expected)
    # position (0, 2) was FILL already: chosen, but not replaced
    assert out["replaced"].tolist() == [[False, True, False, False, True, False],
                                        [False, False, True, False, False, False]]
    logits, target = out["logits"].tolist(), out["replaced"].tolist()
    bce = [-(math.log(1 / (1 + math.exp(-z))) if y else math.log(1 - 1 / (1 + math.exp(-z))))
           for row_z, row_y, row_m in zip(logits, target, attention_mask.tolist())
           for z, y, m in zip(row_z, row_y, row_m) if m]
    assert len(bce) == 10  # the 10 real tokens, padding left out
    gen = model.gen(input_ids, torch.zeros_like(original), attention_mask, labels=labels)
    assert out["loss"].item() == pytest.approx(gen.mlm_loss.item() + 50.0 * sum(bce) / len(bce), rel=1e-5)
