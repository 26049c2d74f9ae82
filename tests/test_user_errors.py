"""Issue 14 Part B, tried as a new user would: the commands (`pretrain`, `finetune`, `predict`,
`search`, through their main(argv), in-process) and the Python API, fed ordinary mistakes.

For each mistake the oracle is the contract itself: exit code 1, ONE line on stderr that names
what and where (file:line, flag, field) and how to fix it, no traceback, and the folders on
disk byte for byte as they were (nothing written that should not be, nothing lost). The
cases are grouped by the seven principles of Part B; tiny model (H=32, 1 layer), 16 rows.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

from minibert import BertConfig, BertForMaskedLM, Tokenizer, checkpoint, finetune, predict, pretrain, search, strategies
from minibert.predict import Classifier

FT = "python -m minibert.finetune: error: "


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


POS, NEG, FILLER = ["great", "good"], ["bad", "awful"], "the a film movie plot was is it".split()


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    r = random.Random(seed)
    return [(" ".join(r.sample(FILLER, 3) + [r.choice(POS if i % 2 else NEG)]), "pos" if i % 2 else "neg")
            for i in range(n)]


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8", newline="")
    return str(path)


def tsv(path: Path, rs, header: str = "sentence\tlabel\n", nl: str = "\n") -> str:
    return write(path, header + "".join(f"{t}\t{y}{nl}" for t, y in rs))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("user_errors")
    corpus = d / "words.txt"
    corpus.write_text(" ".join(FILLER + POS + NEG) + "\n", encoding="utf-8")
    tok = Tokenizer.train([corpus], vocab_size=80, min_frequency=1)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                     max_position=64)
    BertForMaskedLM(cfg).save_pretrained(d / "pre", tokenizer=tok)
    e = {"dir": d, "init": str(d / "pre"), "train": tsv(d / "train.tsv", rows(16, 0)),
         "dev": tsv(d / "dev.tsv", rows(8, 1))}
    assert finetune.main(ft_argv(e, d / "done")) == 0  # a finished run that mistakes must not touch
    return e


def ft_argv(env, out, *extra, train=None, init=None) -> list[str]:
    return ["--init", init or env["init"], "--train", train or env["train"], "--out", str(out), "--epochs", "1",
            "--batch-size", "8", "--max-len", "16", "--no-progress", "--threads", "1", *extra]


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line_error(capsys, main, argv, prog="python -m minibert.finetune") -> str:
    """Run a command that must refuse: exit 1, one line `prog: error: ...`, no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors leave through sys.exit
        code = e.code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert code == 1, (argv, err)
    assert "Traceback" not in err and last.startswith(f"{prog}: error: "), err
    # notes before the error (a new head's "newly initialised") are allowed only when the model is built
    assert err.count(": error: ") == 1
    return last


# ----------------------------------------------------------------------------- 1. nothing overwritten unasked


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
def test_neither_job_writes_into_its_own_init_run_folder(env, capsys, tmp_path, where):
    run = env["dir"] / "done"
    out = {"is": run, "inside": run / "model" / "more", "contains": run.parent}[where]
    before = folder_bytes(run)
    msg = one_line_error(capsys, finetune.main, ft_argv(env, out, init=str(run)))
    assert "never writes into what it reads" in msg and "--init" in msg
    corpus = write(tmp_path / "c.txt", "Ka lo mi. Ne tu ra.\n\nMi ne ka. Lo tu.\n")
    msg = one_line_error(capsys, pretrain.main, ["--corpus", corpus, "--init", str(run), "--out", str(out)],
                         "python -m minibert.pretrain")
    assert "never writes into what it reads" in msg
    assert folder_bytes(run) == before


def test_a_finished_run_is_replaced_only_with_overwrite_also_by_search(env, capsys):
    run = env["dir"] / "done"
    before = folder_bytes(run)
    for main, extra in ((finetune.main, ()), (search.main, ("--search", "grid", "--dev", env["dev"]))):
        msg = one_line_error(capsys, main, ft_argv(env, run, *extra),
                             "python -m minibert." + ("finetune" if main is finetune.main else "search"))
        assert "already holds a model or run" in msg and "--overwrite" in msg
    assert folder_bytes(run) == before


@pytest.mark.parametrize("kind", ["a data file", "the tokenizer's vocab.txt"])
def test_an_out_that_is_a_file_is_refused_and_the_file_kept(env, capsys, kind):
    target = Path(env["train"]) if kind == "a data file" else Path(env["init"]) / "vocab.txt"
    before = target.read_bytes()
    msg = one_line_error(capsys, finetune.main, ft_argv(env, target))
    assert str(target) in msg and ("is a file" in msg or "never writes into what it reads" in msg)
    assert target.read_bytes() == before


# ----------------------------------------------------------------------------- 2. checked before the first step


def messy_files(d: Path) -> dict:
    """name -> (file, what the one-line error must contain); each file is read by --train."""
    rs = rows(16, 0)
    jl = "".join(json.dumps({"text": t, "label": y} if i != 2 else {"text": t}) + "\n" for i, (t, y) in enumerate(rs))
    return {
        "empty file": (write(d / "empty.tsv", ""), "empty.tsv:1: empty file"),
        "only a header": (tsv(d / "header.tsv", []), "header.tsv:1: the file has a header but no data rows"),
        "a folder": (str(d), "a folder; give a TSV, CSV or JSONL file"),
        "a missing file": (str(d / "nope.tsv"), "cannot read it"),
        "a JSON line without the label key": (write(d / "m.jsonl", jl), "m.jsonl:3: no key 'label'"),
        "a word among number labels": (tsv(d / "num.tsv", [(t, str(i % 2)) for i, (t, _) in enumerate(rs[:-1])]
                                           + [(rs[-1][0], "pos")]), "num.tsv:17: label 'pos' is a word"),
        "a number among word labels": (tsv(d / "words.tsv", rs[:3] + [(rs[3][0], "3.5")] + rs[4:]),
                                       "words.tsv:5: label '3.5' is a number"),
        "'n/a' among regression scores": (tsv(d / "scores.tsv", [(t, f"{i / 7:.2f}") for i, (t, _) in enumerate(rs)]
                                              + [("it was", "n/a")]), "scores.tsv:18: label 'n/a' is a word"),
        "one label only": (tsv(d / "one.tsv", [(t, "pos") for t, _ in rs]), "every row has the label 'pos'"),
    }


def messy_case_names() -> list[str]:
    with tempfile.TemporaryDirectory() as d:  # the files are written to learn the names: never into the cwd
        return list(messy_files(Path(d)))


@pytest.mark.parametrize("case", messy_case_names())
def test_a_bad_training_file_stops_the_run_before_anything_is_written(env, capsys, tmp_path, case):
    path, expected = messy_files(tmp_path)[case]
    out = tmp_path / "run"
    msg = one_line_error(capsys, finetune.main, ft_argv(env, out, train=path))
    assert expected in msg, msg
    assert not out.exists() or not any(out.iterdir())  # nothing that would block the corrected command


def test_mixed_labels_train_as_classes_when_asked(env, capsys, tmp_path):
    path, _ = messy_files(tmp_path)["a number among word labels"]
    assert finetune.main(ft_argv(env, tmp_path / "run", "--task", "classification", train=path)) == 0
    assert json.loads((tmp_path / "run/model/config.json").read_text())["id2label"] == {"0": "3.5", "1": "neg",
                                                                                          "2": "pos"}


@pytest.mark.parametrize("variant", ["headerless", "windows line ends", "utf-8 BOM", "quoted newline csv"])
def test_ordinary_file_variants_train_on_the_same_rows(env, tmp_path, variant):
    rs = rows(16, 0)
    path = {
        "headerless": lambda: tsv(tmp_path / "t.tsv", rs, header=""),
        "windows line ends": lambda: tsv(tmp_path / "t.tsv", rs, header="sentence\tlabel\r\n", nl="\r\n"),
        "utf-8 BOM": lambda: tsv(tmp_path / "t.tsv", rs, header="\ufeffsentence\tlabel\n"),
        "quoted newline csv": lambda: write(tmp_path / "t.csv", 'text,label\n"the film\nwas good",pos\n'
                                            + "".join(f"{t},{y}\n" for t, y in rs[1:])),
    }[variant]()
    out = tmp_path / "run"
    assert finetune.main(ft_argv(env, out, train=path)) == 0
    assert json.loads((out / "model/config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2  # 16 rows, batch 8


# ----------------------------------------------------------------------------- 3. one line, exit 1, no traceback

BAD_FLAGS = [
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--lr", "nan"], "--lr must be >= 0"),
    (["--epochs", "nan"], "--epochs must be a finite number"),
    (["--warmup", "6"], "--warmup is a fraction of the steps"),
    (["--batch-size", "0"], "--batch-size >= 1"),
    (["--max-len", "1"], "--max-len >= 8"),
    (["--log-every", "0"], "--log-every must be positive; got 128, 0"),
    (["--patience", "-2"], "--eval-every and --patience must be >= 0; got 0, 0, 0, 0, 0, -2"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--adversarial", "pgd", "--adv-steps", "0"], "--adv-steps must be >= 1"),
    (["--precision", "fp16"], "fp16 is for GPUs"),
    (["--device", "cuda:3"], "--device cuda:3"),
    (["--threads", "-1"], "--threads must be 0"),
    (["--batch-size", "eight"], "--batch-size: invalid int value"),
    (["--resume"], "holds no run (no train_state.pt) to continue"),
    (["--overwrite", "--resume"], "exclude each other"),
    (["--from-scratch", "--preset", "huge"], "invalid choice: 'huge'"),
    (["--search", "grid", "--dev", __file__, "--search-lr", "1e-3,-1"],
     "--search-lr must be a comma list of positive numbers"),
]


@pytest.mark.parametrize("extra,expected", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_a_bad_finetune_flag_is_one_line_before_the_data_is_read(env, capsys, tmp_path, extra, expected):
    out = tmp_path / "run"
    msg = one_line_error(capsys, finetune.main, ft_argv(env, out, *extra))
    assert expected in msg, msg
    assert not out.exists() or not any(out.iterdir())


PT_BAD = [
    (["--cache-dir", __file__], f"--cache-dir {__file__}: a file, not a folder"),
    (["--lr", "-1"], "--lr must be >= 0"),
    (["--clip", "-1"], "--clip must be >= 0"),
    (["--batch-size", "0"], "must be positive; got --batch-size 0"),
    (["--max-steps", "0", "--eval-size", "-1"], "must be positive; got --max-steps 0, --eval-size -1"),
    (["--seq-len", "1"], "--seq-len must be in [8, 512]"),
    (["--precision", "fp16", "--device", "cpu"], "fp16 is for GPUs"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--threads", "-2"], "--threads must be 0"),
    (["--resume"], "holds no run (no train_state.pt) to continue"),
    (["--init", "no/such/folder"], "--init no/such/folder: not a folder (no such path)"),
]


@pytest.mark.parametrize("extra,expected", PT_BAD, ids=[" ".join(a) for a, _ in PT_BAD])
def test_a_bad_pretrain_flag_is_one_line_before_any_work(capsys, tmp_path, extra, expected):
    corpus = write(tmp_path / "c.txt", "Ka lo mi. Ne tu ra.\n\nMi ne ka. Lo tu.\n")
    out = tmp_path / "run"
    msg = one_line_error(capsys, pretrain.main, ["--corpus", corpus, "--out", str(out), "--no-progress", *extra],
                         "python -m minibert.pretrain")
    assert expected in msg, msg
    assert not out.exists() or not any(out.iterdir())


def test_predict_mistakes_are_one_line(env, capsys, tmp_path):
    done = str(env["dir"] / "done")
    cases = [
        (["--model", env["init"], "great"], "no id2label; this is not a fine-tuned classifier"),
        (["--model", done, ""], "text 1 of the command line is empty"),
        (["--model", done, "--batch-size", "0", "great"], "--batch-size must be positive"),
        (["--model", str(tmp_path / "nope"), "great"], "no such path"),
        (["--model", done, "--device", "cuda", "great"], "CUDA is not available"),
        (["great"], "required: --model"),
        (["--model", done, "--file", str(tmp_path)], str(tmp_path)),
        (["--model", done, "--file", write(tmp_path / "e.tsv", "")], "e.tsv:1: empty file"),
    ]
    for argv, expected in cases:
        assert expected in one_line_error(capsys, predict.main, argv, "python -m minibert.predict")
    assert predict.main(["--model", done, "a good film"]) == 0  # the README's call on a run folder
    assert capsys.readouterr().out.split("\t")[0] in ("neg", "pos")


def test_a_damaged_classifier_folder_is_one_line_naming_the_file(env, capsys, tmp_path):
    # predict, prune and distill's teacher all load through Classifier: each way a model folder can
    # be damaged by hand is one line that names the file, never a traceback or a wrong prediction
    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(env["dir"] / "done" / "model", folder)
        change(folder)
        return str(folder)

    def edit_config(folder, fn):
        cfg = json.loads((folder / "config.json").read_text())
        fn(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))

    def cut_id2label(c):
        c["id2label"] = {"0": c["id2label"]["0"]}
        c.pop("label2id", None)

    def no_tokenizer(f):
        for n in ("tokenizer.json", "vocab.txt"):
            (f / n).unlink(missing_ok=True)

    cases = [
        (damaged("badjson", lambda f: (f / "config.json").write_text('{"hidden_size": 32,')), "not valid JSON"),
        (damaged("list", lambda f: edit_config(f, lambda c: c.update(id2label=["neg", "pos"]))),
         "id2label is not a mapping of class ids to labels"),
        (damaged("cut", lambda f: edit_config(f, cut_id2label)),
         "id2label names 1 label(s), but the classifier head has 2 outputs"),
        (damaged("notok", no_tokenizer), "no tokenizer.json or vocab.txt"),
    ]
    for folder, expected in cases:
        msg = one_line_error(capsys, predict.main, ["--model", folder, "great"], "python -m minibert.predict")
        assert expected in msg and folder in msg, msg
    # and a model folder without its tokenizer is one line for finetune --init too
    msg = one_line_error(capsys, finetune.main, ft_argv(env, tmp_path / "ft", init=cases[-1][0]))
    assert "no tokenizer.json or vocab.txt" in msg, msg


# ----------------------------------------------------------------------------- 4. writes lose nothing


def test_a_nan_loss_in_finetune_stops_in_one_line_and_keeps_the_last_good_model(env, capsys, tmp_path, monkeypatch):
    real, calls, saved = strategies.Strategy.loss, [], {}

    def loss(self, batch, y):
        calls.append(1)
        value, parts = real(self, batch, y)
        if len(calls) == 3:  # step 3: the model of step 2 (end of epoch 1) is on disk
            saved.update(folder_bytes(tmp_path / "run" / "model"))
            value = value * float("nan")
        return value, parts

    monkeypatch.setattr(strategies.Strategy, "loss", loss)
    msg = one_line_error(capsys, finetune.main, ft_argv(env, tmp_path / "run", "--epochs", "2", "--dev", env["dev"]))
    assert "step 3: the loss is nan" in msg and "the model of step 2" in msg and "--lr" in msg
    assert saved and folder_bytes(tmp_path / "run" / "model") == saved


def test_ctrl_c_during_finetune_saves_exits_130_and_resume_finishes(env, tmp_path, monkeypatch):
    real, calls = strategies.Strategy.loss, []

    def loss(self, batch, y):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; StopRequest finishes the step
        return real(self, batch, y)

    monkeypatch.setattr(strategies.Strategy, "loss", loss)
    argv = ft_argv(env, tmp_path / "run", "--epochs", "2")
    assert finetune.main(argv) == 130
    assert (tmp_path / "run" / "train_state.pt").exists()
    assert finetune.main(argv + ["--resume"]) == 0
    assert (tmp_path / "run" / "metrics.json").exists()


def test_a_disk_full_save_in_finetune_says_cannot_write_and_keeps_the_previous_model(env, capsys, tmp_path,
                                                                                   monkeypatch):
    import safetensors.torch

    real, saves, before = safetensors.torch.save_file, [], {}

    def save_file(*a, **k):
        saves.append(1)
        if len(saves) == 2:
            before.update(folder_bytes(tmp_path / "run" / "model"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    msg = one_line_error(capsys, finetune.main, ft_argv(env, tmp_path / "run", "--epochs", "2"))
    assert "cannot write" in msg and "model.safetensors: No space left on device" in msg
    assert before and folder_bytes(tmp_path / "run" / "model") == before
    assert not [p for p in (tmp_path / "run").rglob(".*.tmp-*")]


class Killed(BaseException):
    """Stands for kill -9: nothing after it runs."""


def test_a_kill_between_the_renames_of_a_save_loses_no_checkpoint(env, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(env["dir"] / "done", run)
    before = folder_bytes(run / "model")
    real = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".model.tmp-") and ".tmp-old-" not in Path(src).name:
            raise Killed  # the old model/ is set aside, the new one not yet in place
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename)
    model = BertForMaskedLM.from_pretrained(run / "model")
    with pytest.raises(Killed):
        model.save_pretrained(run / "model")
    monkeypatch.setattr(checkpoint.os, "rename", real)
    assert not (run / "model").exists()
    (run / ".train_state.pt.tmp-0123").write_bytes(b"half")  # an atomic write the kill cut short
    # the next job into this folder puts the previous model back and clears the temp files
    assert finetune.main(ft_argv(env, run, "--resume")) == 0
    assert folder_bytes(run / "model") == before  # the finished run resumed to its end: nothing to train
    assert not [p for p in run.rglob(".*.tmp-*")]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_of_a_run_gets_the_users_umask(env, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert finetune.main(ft_argv(env, tmp_path / "run")) == 0
    finally:
        os.umask(old)
    wrong = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777)
             for p in tmp_path.joinpath("run").rglob("*")
             if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask}
    assert (tmp_path / "run/model/model.safetensors").exists() and not wrong, wrong


# ----------------------------------------------------------------------------- 5. a corrupt --init fails fast


def corrupt(src: Path, dst: Path, how: str) -> str:
    shutil.copytree(src, dst)
    if how == "truncated weights":
        w = dst / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif how == "a tokenizer bigger than the config":
        (dst / "tokenizer.json").unlink(missing_ok=True)  # vocab.txt is then the tokenizer
        (dst / "vocab.txt").write_text((dst / "vocab.txt").read_text() + "extra1\nextra2\n")
    else:
        c = json.loads((dst / "config.json").read_text())
        c.update({"a string size": {"hidden_size": "32"}, "absurd size": {"num_hidden_layers": 10**6}}[how])
        (dst / "config.json").write_text(json.dumps(c))
    return str(dst)


def test_a_classifier_init_with_another_number_of_classes_names_the_cause(env, capsys, tmp_path):
    # the 2-class run fine-tuned again on 3 classes: its head cannot take them; the message used to
    # ask whether config.json belonged to the weights
    three = tsv(tmp_path / "three.tsv", [(t, ["neg", "pos", "mixed"][i % 3]) for i, (t, _) in enumerate(rows(12, 4))])
    msg = one_line_error(capsys, finetune.main, ft_argv(env, tmp_path / "again", train=three,
                                                        init=str(env["dir"] / "done")))
    assert "a classifier fine-tuned for 2 output(s)" in msg and "has 3" in msg, msg
    assert finetune.main(ft_argv(env, tmp_path / "same", init=str(env["dir"] / "done"))) == 0  # 2 classes again: fine


@pytest.mark.parametrize("how,expected", [("truncated weights", "model.safetensors: tensor"),
                                          ("a string size", "config.json: hidden_size = '32'"),
                                          ("absurd size", "config.json: num_hidden_layers"),
                                          ("a tokenizer bigger than the config", "but config.json's vocab_size")])
def test_a_corrupt_init_folder_is_one_line_naming_file_and_field(env, capsys, tmp_path, how, expected):
    init = corrupt(Path(env["init"]), tmp_path / "bad", how)
    out = tmp_path / "run"
    msg = one_line_error(capsys, finetune.main, ft_argv(env, out, init=init))
    assert expected in msg, msg
    assert not (out / "model").exists() and not (out / "train_state.pt").exists()


@pytest.mark.parametrize("init,expected", [("no/such/dir", "--init no/such/dir: not a folder (no such path)"),
                                           ("{init}/config.json", "config.json: not a folder"),
                                           ("{dir}", "no config.json here")])
def test_an_init_that_is_no_model_names_the_flag(env, capsys, tmp_path, init, expected):
    init = init.format(init=env["init"], dir=tmp_path)
    msg = one_line_error(capsys, finetune.main, ft_argv(env, tmp_path / "run", init=init))
    assert msg.startswith(FT + "--init ") and expected in msg, msg


# ----------------------------------------------------------------------------- 6. --resume refuses what changed


def test_resume_refuses_a_model_folder_and_changed_data_before_reading_it_twice(env, capsys, tmp_path):
    msg = one_line_error(capsys, finetune.main, ft_argv(env, env["init"] + "_copy_does_not_exist", "--resume"))
    assert "holds no run (no train_state.pt) to continue" in msg
    model_only = tmp_path / "m"
    shutil.copytree(env["init"], model_only)
    msg = one_line_error(capsys, finetune.main, ft_argv(env, model_only, "--resume"))
    assert "no training state (train_state.pt)" in msg
    run = tmp_path / "run"
    shutil.copytree(env["dir"] / "done", run)
    changed = tsv(tmp_path / "train.tsv", rows(16, 5))
    msg = one_line_error(capsys, finetune.main, ft_argv(env, run, "--resume", train=changed))
    assert "content of --train" in msg and "--overwrite" in msg


# ----------------------------------------------------------------------------- 7. the API in the model's terms


def test_the_python_api_names_the_folder_and_what_is_expected(env, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no id2label; this is not a fine-tuned classifier"):
        Classifier(env["init"])
    with pytest.raises(checkpoint.CheckpointError, match="no such path"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(checkpoint.CheckpointError, match="it is a file, not a folder"):
        BertForMaskedLM.from_pretrained(env["init"]).save_pretrained(env["train"])
    clf = Classifier(env["dir"] / "done")  # a run folder, as the README shows
    assert [p.label for p in clf(["a good film", "a bad film"])] == [p.label for p in clf(["a good film"])
                                                                   + clf(["a bad film"])]
    with pytest.raises(ValueError, match="input_ids must be"):
        clf.model(torch.zeros(5, dtype=torch.long))
