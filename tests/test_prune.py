"""minibert.prune on a tiny random classifier (H=32, 2 layers of 4 heads).

Oracles: removing a head or neuron is pinned to the unpruned model with that unit's slice of
the output projection set to zero (what the unit contributes, gone); importance scores to a
central finite difference of the loss in float64 (scaling a unit's slice of W_o / W_2 by
1 +- eps is scaling its gate); parameter counts to the sizes each unit owns; magnitude pruning
to a count of zeros; the saved folder to the model in memory.
"""

import copy
import json
import random
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from minibert import BertConfig, BertForSequenceClassification, CheckpointError, Tokenizer
from minibert import finetune, prune
from minibert.checkpoint import PRETRAINED_HERE, config_to_hf, pretrained_here
from minibert.predict import Classifier, to_device

H, NH, HS, I = 32, 4, 8, 64  # noqa: E741


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WORDS = "the a film movie plot acting story was is it very quite and but great good bad awful".split()


def rows(n: int, seed: int) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rnd.sample(WORDS[:14], 4) + [rnd.choice(["great", "good"] if label else ["bad", "awful"])]
        rnd.shuffle(words)
        out.append((" ".join(words), "pos" if label else "neg"))
    return out


def write_tsv(path, data) -> str:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in data), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("prune")
    (d / "corpus.txt").write_text(" ".join(WORDS) + "\n", encoding="utf-8")
    tok = Tokenizer.train([d / "corpus.txt"], vocab_size=80, min_frequency=1)
    tok.model_max_length = 32
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=H, num_layers=2, num_heads=NH, intermediate_size=I,
                     max_position=64, id2label={0: "neg", 1: "pos"})
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():  # a classifier with some opinion, so the loss has gradients worth comparing
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(d / "clf", tokenizer=tok)
    return {"dir": d, "clf": d / "clf", "tok": tok, "train": write_tsv(d / "train.tsv", rows(24, 0)),
            "dev": write_tsv(d / "dev.tsv", rows(12, 1))}


def batch_of(env, texts=("the film was great", "awful plot and bad acting", "it is quite good")):
    tok = env["tok"]
    return tok.pad([tok.build_inputs(ids, None, 32) for ids in tok.encode_ids(list(texts))])


def logits(model, b):
    model.eval()
    return model(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits


def test_removing_heads_computes_what_zeroing_their_slice_of_w_o_computes(env):
    model = BertForSequenceClassification.from_pretrained(env["clf"]).double()
    remove = {0: [0, 1, 2, 3], 1: [1, 3]}  # layer 0 loses every head: its attention outputs b_o alone
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i, heads in remove.items():
            for h in heads:
                reference.bert.encoder.layers[i].attn.o.weight[:, h * HS : (h + 1) * HS] = 0
    prune.prune_heads(model.bert, remove)
    b = batch_of(env)
    torch.testing.assert_close(logits(model, b), logits(reference, b), rtol=1e-12, atol=1e-12)
    assert model.config.heads_per_layer == [0, 2]
    assert tuple(model.bert.encoder.layers[1].attn.q.weight.shape) == (2 * HS, H)
    assert tuple(model.bert.encoder.layers[1].attn.o.weight.shape) == (H, 2 * HS)


def test_removing_neurons_computes_what_zeroing_their_column_of_w_2_computes(env):
    model = BertForSequenceClassification.from_pretrained(env["clf"]).double()
    remove = {0: list(range(0, I, 3)), 1: list(range(I))}  # layer 1 keeps no neuron
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for i, neurons in remove.items():
            reference.bert.encoder.layers[i].ffn.down.weight[:, neurons] = 0
    prune.prune_neurons(model.bert, remove)
    b = batch_of(env)
    torch.testing.assert_close(logits(model, b), logits(reference, b), rtol=1e-12, atol=1e-12)
    assert model.config.intermediate_per_layer == [I - len(remove[0]), 0]


def test_importance_is_the_summed_absolute_gradient_of_each_batchs_loss_by_finite_differences(env):
    clf = Classifier(env["clf"], max_len=32)
    clf.model.double()
    texts = [t for t, _ in rows(6, 3)]
    y = torch.tensor([i % 2 for i in range(6)])
    items = clf.inputs.encode(texts)
    heads, neurons = prune.importance(clf, items, y, batch_size=3, device=torch.device("cpu"))

    def loss(model, s):  # the batch's mean cross-entropy, all in float64
        b = to_device(clf.inputs.collate(items[s : s + 3]), torch.device("cpu"))
        return F.cross_entropy(logits(model, b), y[s : s + 3]).item()

    def finite_difference(w_slice, s, eps=1e-5):  # scaling a unit's W_o / W_2 slice = scaling its gate
        m = copy.deepcopy(clf.model)
        w = w_slice(m)
        with torch.no_grad():
            w *= 1 + eps
        up = loss(m, s)
        with torch.no_grad():
            w *= (1 - eps) / (1 + eps)
        return (up - loss(m, s)) / (2 * eps)

    for layer, h in [(0, 0), (0, 3), (1, 2)]:
        fd = sum(abs(finite_difference(lambda m: m.bert.encoder.layers[layer].attn.o.weight[:, h * HS : (h + 1) * HS],
                                       s)) for s in (0, 3))
        assert heads[layer][h].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    for layer, j in [(0, 5), (1, 17)]:
        fd = sum(abs(finite_difference(lambda m: m.bert.encoder.layers[layer].ffn.down.weight[:, j : j + 1], s))
                 for s in (0, 3))
        assert neurons[layer][j].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    assert [tuple(s.shape) for s in heads] == [(NH,), (NH,)]
    assert heads[0].abs().sum() > 0


def test_units_are_ranked_after_dividing_each_layers_scores_by_their_l2_norm():
    scores = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([100.0, 300.0, 200.0])]
    # raw scores would take all of layer 0; normalised, each layer loses its weakest unit
    assert prune.choose(scores, 2 / 6) == {0: [0], 1: [0]}
    assert prune.choose(scores, 0.0) == {}
    assert sum(len(v) for v in prune.choose(scores, 1.0).values()) == 6


def test_parameters_drop_by_what_the_removed_heads_and_neurons_owned(env):
    model = BertForSequenceClassification.from_pretrained(env["clf"])
    before = prune.count_parameters(model)
    prune.prune_heads(model.bert, {0: [1], 1: [0, 2, 3]})
    prune.prune_neurons(model.bert, {1: list(range(10))})
    per_head = 3 * (H * HS + HS) + H * HS  # rows of W_q, W_k, W_v with their biases; columns of W_o
    per_neuron = (H + 1) + H  # a row of W_1 with its bias; a column of W_2
    assert before - prune.count_parameters(model) == 4 * per_head + 10 * per_neuron


def test_a_pruned_folder_reloads_with_the_same_outputs_and_plain_configs_are_unchanged(env, tmp_path):
    model = BertForSequenceClassification.from_pretrained(env["clf"])
    prune.prune_heads(model.bert, {0: [0, 2], 1: [3]})
    prune.prune_neurons(model.bert, {0: [1, 4, 9]})
    model.save_pretrained(tmp_path / "p", tokenizer=env["tok"])
    own = json.loads((tmp_path / "p" / "config.json").read_text())["minibert"]
    assert own["heads_per_layer"] == [2, 3] and own["intermediate_per_layer"] == [I - 3, I]
    again = BertForSequenceClassification.from_pretrained(tmp_path / "p")
    assert again.config == model.config
    b = batch_of(env)
    assert torch.equal(logits(again, b), logits(model, b))
    plain = config_to_hf(BertConfig())
    assert set(plain["minibert"]) == {"position_embedding", "norm_position"}


def test_a_layer_pruned_to_nothing_reloads_without_warnings_and_to_the_same_outputs(env, tmp_path):
    # global pruning may take every head or neuron of a layer; torch's default init used to warn
    # "Initializing zero-element tensors is a no-op" at every later load of such a folder
    model = BertForSequenceClassification.from_pretrained(env["clf"])
    prune.prune_heads(model.bert, {0: [0, 1, 2, 3]})
    prune.prune_neurons(model.bert, {1: list(range(I))})
    model.save_pretrained(tmp_path / "p", tokenizer=env["tok"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = BertForSequenceClassification.from_pretrained(tmp_path / "p")
    assert again.config.heads_per_layer == [0, NH] and again.config.intermediate_per_layer == [I, 0]
    assert torch.equal(again.bert.encoder.layers[0].attn.o.bias, model.bert.encoder.layers[0].attn.o.bias)
    b = batch_of(env)
    assert torch.equal(logits(again, b), logits(model, b))


def test_a_bad_per_layer_count_in_config_json_is_one_error_naming_the_field(env, tmp_path):
    model = BertForSequenceClassification.from_pretrained(env["clf"])
    prune.prune_heads(model.bert, {0: [0]})
    model.save_pretrained(tmp_path / "p", tokenizer=env["tok"])
    path = tmp_path / "p" / "config.json"
    cfg = json.loads(path.read_text())
    for bad, words in (([3, "4"], "minibert.heads_per_layer"), ([3, 4, 4], "heads_per_layer must list 2"),
                       ([3, 9], "more than num_heads")):
        cfg["minibert"]["heads_per_layer"] = bad
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=words):
            BertForSequenceClassification.from_pretrained(tmp_path / "p")


def test_magnitude_pruning_zeroes_that_fraction_of_encoder_matrices_and_keeps_their_shapes(env):
    model = BertForSequenceClassification.from_pretrained(env["clf"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    sparsity = prune.magnitude_prune(model.bert, 0.3)
    mats = [p for n, p in model.bert.encoder.named_parameters() if n.endswith("weight") and p.dim() == 2]
    zeros = sum(int((p == 0).sum()) for p in mats) / sum(p.numel() for p in mats)
    assert sparsity == pytest.approx(0.3, abs=1e-3) and zeros == pytest.approx(sparsity)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes  # no weight_orig / weight_mask left
    assert model.bert.pooler.weight.ne(0).all() and model.bert.embeddings.seg.weight.ne(0).all()  # encoder only


def cli(env, out, *extra):
    argv = ["--model", str(env["clf"]), "--data", env["train"], "--out", str(env["dir"] / out), "--batch-size", "8",
            "--threads", "1", *extra]
    return prune.main(argv)


def test_the_command_removes_the_least_important_half_of_the_heads_and_the_folder_predicts(env):
    assert cli(env, "half", "--heads", "0.5", "--ffn", "0.25", "--dev", env["dev"]) == 0
    out = env["dir"] / "half"
    report = json.loads((out / "pruning.json").read_text())
    assert sum(report["heads_per_layer"]) == NH  # of 8
    assert sum(report["intermediate_per_layer"]) == 2 * I - round(0.25 * 2 * I)
    expected = prune.choose([torch.tensor(s) for s in report["head_importance"]], 0.5)
    assert report["removed_heads"] == {str(k): v for k, v in expected.items()}
    assert report["parameters_after"] < report["parameters_before"]
    clf = Classifier(out)
    assert clf.model.config.heads_per_layer == report["heads_per_layer"]
    assert len(clf(["the film was great"])) == 1
    # a recovery fine-tune starts from the pruned folder like from any other
    argv = ["--init", str(out), "--train", env["train"], "--out", str(env["dir"] / "recovered"), "--epochs", "1",
            "--batch-size", "8", "--max-len", "32", "--no-progress", "--threads", "1"]
    assert finetune.main(argv) == 0
    assert Classifier(env["dir"] / "recovered").model.config.heads_per_layer == report["heads_per_layer"]


def test_a_pruned_short_pretraining_keeps_its_mark_and_a_pruned_published_model_gets_none(env):
    # the mark (checkpoint.pretrained_here) picks finetune's schedule for a recovery fine-tune
    marked = env["dir"] / "marked"
    shutil.copytree(env["clf"], marked)
    (marked / PRETRAINED_HERE).write_text(json.dumps({"short_pretraining": True}), encoding="utf-8")
    for src, out in ((marked, "pruned-marked"), (env["clf"], "pruned-plain")):
        assert prune.main(["--model", str(src), "--data", env["train"], "--out", str(env["dir"] / out),
                           "--batch-size", "8", "--threads", "1", "--heads", "0.25"]) == 0
    assert pretrained_here(env["dir"] / "pruned-marked") and not pretrained_here(env["dir"] / "pruned-plain")
    mark = json.loads((env["dir"] / "pruned-marked" / PRETRAINED_HERE).read_text())
    assert mark["pruned_by"] == "minibert.prune" and mark["init"] == str(marked)


def test_the_curve_scores_each_kind_of_pruning_and_agrees_with_the_saved_model(env):
    assert cli(env, "curve", "--dev", env["dev"], "--curve", "0,0.5,1", "--magnitude", "0.5") == 0
    out = env["dir"] / "curve"
    curve = json.loads((out / "curve.json").read_text())
    report = json.loads((out / "pruning.json").read_text())
    assert set(curve) == {"heads", "ffn", "magnitude"}
    for kind, pts in curve.items():
        assert [p["fraction"] for p in pts] == [0, 0.5, 1]
        assert pts[0]["accuracy"] == report["dev_accuracy_before"]
    per_head = 3 * (H * HS + HS) + H * HS
    heads = [p["parameters"] for p in curve["heads"]]
    assert heads[0] - heads[1] == 4 * per_head and heads[0] - heads[2] == 8 * per_head
    assert curve["magnitude"][1]["parameters"] == curve["magnitude"][0]["parameters"]
    # the curve's in-memory magnitude-0.5 model and the saved --magnitude 0.5 folder, read back
    assert curve["magnitude"][1]["accuracy"] == report["dev_accuracy_after"]
    assert report["encoder_weight_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (out / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("extra, words", [
    (["--heads", "1.5"], "--heads is a fraction in [0, 1]"),
    ([], "nothing to do"),
    (["--curve", "0,0.5"], "--curve evaluates on --dev"),
    (["--heads", "0.5", "--resume"], "--resume"),
    (["--heads", "0.5", "--max-len", "2"], "--max-len 2: a row needs [CLS], [SEP]"),
])
def test_bad_options_are_one_line_errors(env, capsys, extra, words):
    assert cli(env, "bad", *extra) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1


def test_a_data_file_that_is_not_utf8_stops_with_the_flag_that_reads_it(env, capsys):
    latin = env["dir"] / "latin1.tsv"
    rows_ = "".join(f"{t}\t{y}\n" for t, y in rows(24, 0))
    latin.write_bytes(("sentence\tlabel\n" + rows_).encode("utf-8") + "un film tr\xe8s bad\tneg\n".encode("latin-1"))
    argv = ["--model", str(env["clf"]), "--data", str(latin), "--out", str(env["dir"] / "latin"), "--batch-size", "8",
            "--threads", "1", "--heads", "0.25"]
    assert prune.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{latin}:26: bytes that are not UTF-8 at byte offset" in err and "(0xe8)" in err
    assert "--errors replace" in err and len(err.strip().splitlines()) == 1
    assert prune.main(argv + ["--errors", "replace"]) == 0


def test_a_bad_data_file_or_a_folder_is_one_error_without_a_flag_prune_lacks(env, capsys):
    # prune reads --data through finetune's reader: a row with a tab inside its text names the
    # file and line; the hint is to fix the row, since prune has no --skip-bad-rows to suggest
    shifted = env["dir"] / "shifted.tsv"
    shifted.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows(8, 0))
                       + "a tab\tinside\t1\n", encoding="utf-8")
    argv = ["--model", str(env["clf"]), "--out", str(env["dir"] / "shifted"), "--threads", "1", "--heads", "0.25"]
    assert prune.main(argv + ["--data", str(shifted)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{shifted}:10:" in err and "3 fields but the header has 2" in err and "(fix the row)" in err
    assert "--skip-bad-rows" not in err and len(err.splitlines()) == 1
    assert prune.main(argv + ["--data", str(env["dir"])]) == 1
    err = capsys.readouterr().err.strip()
    assert f"--data {env['dir']}: a folder" in err and len(err.splitlines()) == 1
