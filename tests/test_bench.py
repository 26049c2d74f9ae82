"""The benchmark's FLOP formula (by hand and against torch's count of every matmul), its
batch (BERT's masking), and that `python -m minibert.bench` runs and prints its table.
The deployment table (--deploy) is checked on a tiny random classifier: its rows and columns,
and its accuracies against minibert.predict's own predictions on the same file."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minibert import BertConfig, BertForPreTraining, BertModel
from minibert.bench import (CLS_ID, MASK_ID, SEP_ID, BenchConfig, encoder_matmul_params, infer_flops_per_token, main,
                            make_batch, run, train_flops_per_token)
from minibert.toolkit import parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_flop_formula_by_hand_for_tiny():
    cfg = BertConfig.from_preset("tiny")  # L = 2, H = 128, I = 512, V = 30522
    # per layer: Q, K, V, O = 4 * 128 * 128 = 65,536; up + down = 2 * 128 * 512 = 131,072
    assert encoder_matmul_params(cfg) == 2 * (65_536 + 131_072) == 393_216
    # 6 P = 2,359,296;  12 L H T = 12 * 2 * 128 * 32 = 98,304;  6 H V f = 6 * 128 * 30522 * 0.15 = 3,516,134.4
    assert train_flops_per_token(cfg, 32, 0.15) == pytest.approx(2_359_296 + 98_304 + 3_516_134.4)
    # forward only, no decoder: 2 P + 4 L H T = 786,432 + 32,768
    assert infer_flops_per_token(cfg, 32) == 786_432 + 32_768


def counted_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_formula_matches_the_counted_matmuls():
    """One forward + backward of a small pretraining model: FlopCounterMode counts every mm/bmm
    (the "math" attention, so the scores and values are bmm's it sees); the formula leaves out
    only the MLM transform, pooler and NSP, a few percent here."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=3000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position=64,
                     attn_impl="math")
    B, T = 4, 48
    batch = make_batch(cfg, B, T, torch.Generator().manual_seed(0))
    f = (batch["labels"] != -100).float().mean().item()
    model = BertForPreTraining(cfg)
    total = counted_flops(lambda: model(**batch).loss.backward())
    formula = train_flops_per_token(cfg, T, f) * B * T
    assert abs(formula - total) / total < 0.03, (formula, total)
    assert formula < total  # what it leaves out is never negative

    encoder = BertModel(cfg).eval()
    with torch.no_grad():
        total = counted_flops(lambda: encoder(batch["input_ids"], batch["token_type_ids"]))
    assert infer_flops_per_token(cfg, T) * B * T == total  # the encoder's forward is exactly 2 P + 4 L H T


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_transformers_step_costs_the_formula_with_every_token_decoded():
    """The FLOP ratio the bench prints takes transformers' step as the formula with f = 1 (the
    decoder on every token); FlopCounterMode on transformers' own model must agree. It leaves
    out the MLM transform (now on every token), pooler and NSP: a few percent."""
    from minibert.bench import load_hf_models

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=3000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, max_position=64)
    B, T = 4, 48
    batch = make_batch(cfg, B, T, torch.Generator().manual_seed(0))
    hf_pretrain, _ = load_hf_models()(cfg)
    total = counted_flops(lambda: hf_pretrain(**batch).loss.backward())
    formula = train_flops_per_token(cfg, T, 1.0) * B * T
    assert formula < total and (total - formula) / total < 0.03, (formula, total)
    f = (batch["labels"] != -100).float().mean().item()
    assert 2 < formula / (train_flops_per_token(cfg, T, f) * B * T) < 4  # what minibert skips, at this size


def test_batch_follows_bert_layout_and_masking():
    cfg = BertConfig.from_preset("tiny")
    b = make_batch(cfg, 64, 128, torch.Generator().manual_seed(0))
    ids, labels, tt = b["input_ids"], b["labels"], b["token_type_ids"]
    assert (ids[:, 0] == CLS_ID).all() and (ids[:, 64] == SEP_ID).all() and (ids[:, -1] == SEP_ID).all()
    assert tt[:, :65].eq(0).all() and tt[:, 65:].eq(1).all()
    picked = labels != -100
    assert (picked.sum(1) == round(0.15 * 125)).all()  # BERT's exact count per row, 19 of 125
    assert not picked[:, [0, 64, 127]].any()  # never [CLS] / [SEP]
    assert (labels[picked] >= 999).all()  # targets are real words
    shown = ids[picked]
    masked = (shown == MASK_ID).float().mean()
    kept = (shown == labels[picked]).float().mean()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.13  # 80% [MASK], ~10% kept (+ rare random hits)
    assert set(b["next_sentence_label"].tolist()) == {0, 1}


def run_bench(*extra: str) -> str:
    cmd = [sys.executable, "-m", "minibert.bench", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2",
           "--steps", "3", "--warmup", "1", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_bench_cli_prints_the_table():
    out = run_bench()
    assert "| model | task |" in out
    assert "| minibert | train | tiny | 2 | 32 |" in out
    assert "| minibert | infer | tiny | 2 | 32 |" in out
    assert "transformers" not in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
def test_bench_cli_compares_with_transformers():
    out = run_bench("--compare-hf")
    assert "| transformers | train | tiny | 2 | 32 |" in out
    assert "| transformers | infer | tiny | 2 | 32 |" in out
    assert "speed-up minibert / transformers" in out
    assert "FLOPs of transformers / minibert" in out and "infer 1.00x" in out


def test_bench_does_not_import_transformers_without_compare_hf():
    code = "import sys, minibert.bench, minibert.packing; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def bench_result(argv: list[str]) -> dict:
    """The command's result, parsed from argv as `python -m minibert.bench` parses it."""
    return run(parse_config(BenchConfig, argv, "bench", ""))


def test_bench_json_is_machine_readable(capsys):
    result = bench_result(["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1",
                           "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert [(r["model"], r["task"]) for r in printed["rows"]] == [("minibert", "train"), ("minibert", "infer")]
    train = printed["rows"][0]
    assert len(train["times_ms"]) == 2 and train["ms_p10"] <= train["ms_p50"] <= train["ms_p90"]
    assert train["tokens_per_s"] == pytest.approx(2 * 32 / (train["ms_p50"] / 1e3))
    assert 0 < train["mfu_vs_matmul"] and train["mfu_vs_datasheet"] is None  # no datasheet figure for a CPU
    assert printed["speedup"] == {} and printed["flop_ratio"] == {}


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")
@pytest.mark.parametrize("which, compiled",
                         [(None, []), ("both", ["minibert", "transformers"]), ("minibert", ["minibert"])])
def test_bench_compile_picks_the_models(monkeypatch, capsys, which, compiled):
    # torch.compile swapped for a recorder that returns the model unchanged: this checks which
    # models the flag reaches (compiling for real costs a minute on the CPU and tests torch)
    import minibert.bench as bench

    seen = []

    def record(model):
        seen.append("transformers" if type(model).__module__.startswith("transformers") else "minibert")
        return model

    monkeypatch.setattr(bench.torch, "compile", record)
    flag = {None: [], "both": ["--compile", "--compile-hf"], "minibert": ["--compile"]}[which]
    result = bench_result(["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                           "--compare-hf", *flag])
    assert seen == [name for name in compiled for _ in ("pretrain", "encoder")]
    assert result["compile"] == which
    header = capsys.readouterr().out.splitlines()[0]
    assert ("compiled" in header) == (which is not None)
    assert ("transformers eager" in header) == (which == "minibert")


def test_bench_records_the_allocator_settings(monkeypatch, capsys):
    """The allocator changes the ratios (RESULTS.md, run E), so a run says which it had."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1073741824")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    result = bench_result(["--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "1", "--warmup", "0"])
    assert result["malloc_env"] == {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1073741824"}
    assert capsys.readouterr().out.splitlines()[0].endswith("; GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824")


def test_bench_command_errors_are_one_line_and_exit_1(capsys):
    assert main(["--compile-hf"]) == 1
    assert capsys.readouterr().err == ("python -m minibert.bench: error: --compile-hf compiles transformers beside "
                                       "minibert: it needs --compile and --compare-hf\n")
    assert main(["--device", "cpu", "--precision", "fp16"]) == 1
    assert "fp16 is for GPUs" in capsys.readouterr().err
    assert main(["--preset", "tiny", "--seq-len", "513"]) == 1  # was an error from inside the model
    assert "--seq-len 513: a preset's position table has 512 rows" in capsys.readouterr().err


# -- the deployment table (--deploy) -----------------------------------------------------------------

SENTIMENT = ROOT / "data" / "sentiment"
STATIC = "minibert int8 static (torchao PT2E)"  # needs --calibrate too
BF16 = "minibert bf16 (autocast)"
NO_BF16 = "this CPU has no bf16 instructions (avx512_bf16 or amx_bf16)"
DEPLOY_RUNTIMES = ["transformers fp32", "minibert fp32", BF16, STATIC,
                   "minibert int8 (torchao)", "ONNX Runtime fp32", "ONNX Runtime int8"]
NEEDS = {"transformers fp32": ["transformers"], "minibert int8 (torchao)": ["torchao"], STATIC: ["torchao"],
         "ONNX Runtime fp32": ["onnx", "onnxscript", "onnxruntime"], "ONNX Runtime int8": ["onnx", "onnxscript",
                                                                                           "onnxruntime"]}


@pytest.fixture
def deploy_folders(tmp_path, tiny_config) -> dict[str, Path]:
    """A tiny random classifier on data/sentiment's vocabulary, a copy with two heads pruned, and a
    one-layer student, saved as minibert's jobs save them."""
    from minibert import BertForSequenceClassification, Tokenizer
    from minibert.prune import prune_heads

    tok = Tokenizer.train([SENTIMENT / "train.tsv"], vocab_size=200, min_frequency=1)
    tok.model_max_length = 64
    labels = {0: "0", 1: "1"}
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, id2label=labels))
    with torch.no_grad():  # BERT's init predicts one class for every row; these weights predict both
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1.0) if p.dim() > 1 else p.zero_()
    student = BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, num_layers=1, id2label=labels))
    folders = {"model": tmp_path / "clf", "pruned": tmp_path / "pruned", "student": tmp_path / "student"}
    model.save_pretrained(folders["model"], tokenizer=tok)
    student.save_pretrained(folders["student"], tokenizer=tok)
    prune_heads(model.bert, {0: [0, 1]})
    model.save_pretrained(folders["pruned"], tokenizer=tok)
    return folders


def deploy(folders: dict[str, Path], *extra: str) -> dict:
    return bench_result(["--deploy", "--model", str(folders["model"]), "--pruned", str(folders["pruned"]),
                         "--student", str(folders["student"]), "--seq-len", "16", "--infer-batch-size", "4",
                         "--steps", "1", "--latency-steps", "2", "--warmup", "0", "--threads", "1", *extra])


def oracle_accuracy(folder: Path) -> tuple[float, torch.Tensor]:
    """minibert.predict's accuracy on data/sentiment/test.tsv, and its predictions."""
    from minibert.predict import Classifier
    from minibert.tabular import read_labeled

    data = read_labeled(SENTIMENT / "test.tsv")
    preds = Classifier(folder).scores(data.texts).argmax(-1)
    y = torch.tensor([int(x) for x in data.labels])
    return (preds == y).float().mean().item(), preds


def test_deploy_table_has_every_row_and_accuracies_from_each_rows_predictions(deploy_folders, capsys):
    # compiling the int8 model would cost a minute on the CPU and test torch: it runs eager here
    result = deploy(deploy_folders, "--test", str(SENTIMENT / "test.tsv"), "--no-compile-int8")
    out = capsys.readouterr().out
    assert "| | size MiB | batch 1 x 16 ms |" in out and "| batch 4 x 16 seq/s |" in out and "| test accuracy |" in out
    rows = {r["name"]: r for r in result["rows"]}
    import minibert.bench as bench

    present = [n for n in DEPLOY_RUNTIMES if all(importlib.util.find_spec(m) for m in NEEDS.get(n, []))
               and ("bf16" not in n or bench.bf16_supported()) and n != STATIC]  # no --calibrate here
    assert list(rows) == present + ["pruned: pruned", "student: student"]
    assert sorted(result["skipped"]) == sorted(set(DEPLOY_RUNTIMES) - set(present))
    assert result["test_rows"] == 300 and result["cpu"] in out.splitlines()[0]
    for name, r in rows.items():
        assert f"| {name} |" in out
        assert r["size_bytes"] > 0 and len(r["times_ms"]["batch_1"]) == 2 and len(r["times_ms"]["batch_4"]) == 1
        assert r["throughput_seq_per_s"] == pytest.approx(4 / (r["times_ms"]["batch_4"][0] / 1e3))
        # two accuracies differ by at most the share of rows where the predictions differ
        assert abs(r["accuracy"] - rows["minibert fp32"]["accuracy"]) <= 1 - r["agreement"] + 1e-9

    acc, preds = oracle_accuracy(deploy_folders["model"])
    assert 0 < preds.float().mean() < 1  # both classes predicted: a constant guess would not pass below
    assert rows["minibert fp32"]["accuracy"] == pytest.approx(acc) and rows["minibert fp32"]["agreement"] == 1.0
    for name in ("transformers fp32", "ONNX Runtime fp32"):  # the same function in fp32: the same predictions
        if name in rows:
            assert rows[name]["accuracy"] == pytest.approx(acc) and rows[name]["agreement"] == 1.0
    for kind in ("pruned", "student"):
        assert rows[f"{kind}: {kind}"]["accuracy"] == pytest.approx(oracle_accuracy(deploy_folders[kind])[0])
    assert rows["student: student"]["size_bytes"] < rows["pruned: pruned"]["size_bytes"] < rows["minibert fp32"][
        "size_bytes"]
    if "ONNX Runtime int8" in rows:
        assert rows["ONNX Runtime int8"]["size_bytes"] < rows["ONNX Runtime fp32"]["size_bytes"]


def test_deploy_leaves_out_rows_whose_package_is_missing(deploy_folders, monkeypatch, capsys):
    import minibert.bench as bench

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("onnxruntime", "torchao") else find_spec(name, *a))
    monkeypatch.setattr(bench, "bf16_supported", lambda: False)  # the same skips on every CPU
    result = deploy(deploy_folders)
    assert result["skipped"] == {BF16: NO_BF16} | {
        name: 'needs onnxruntime: pip install -e ".[deploy]"' if "ONNX" in name else
        'needs torchao: pip install -e ".[deploy]"'
        for name in (STATIC, "minibert int8 (torchao)", "ONNX Runtime fp32", "ONNX Runtime int8")}
    assert "left out: ONNX Runtime int8 (needs onnxruntime" in capsys.readouterr().out
    assert all(r["accuracy"] is None for r in result["rows"])  # no --test


def test_deploy_leave_out_drops_the_rows_it_names(deploy_folders, monkeypatch):
    import minibert.bench as bench

    monkeypatch.setattr(bench, "bf16_supported", lambda: False)  # the same skips on every CPU
    result = deploy(deploy_folders, "--leave-out", "torchao", "ONNX Runtime int8")
    assert result["skipped"] == {BF16: NO_BF16, STATIC: "left out (--leave-out)",
                                 "minibert int8 (torchao)": "left out (--leave-out)",
                                 "ONNX Runtime int8": "left out (--leave-out)"}
    names = [r["name"] for r in result["rows"]]
    assert "minibert fp32" in names and not any("torchao" in n or "int8" in n for n in names)


def test_deploy_calibrate_adds_the_static_int8_row(deploy_folders, capsys):
    pytest.importorskip("torchao")
    result = deploy(deploy_folders, "--calibrate", str(SENTIMENT / "train.tsv"), "--test", str(SENTIMENT / "test.tsv"),
                    "--leave-out", "(torchao)", "ONNX", "transformers", "bf16")
    rows = {r["name"]: r for r in result["rows"]}
    assert STATIC in rows and STATIC not in result["skipped"] and f"| {STATIC} |" in capsys.readouterr().out
    # int8 weights: the encoder layers' matrices shrink 4x, the embeddings stay fp32
    assert rows[STATIC]["size_bytes"] < rows["minibert fp32"]["size_bytes"]
    assert 0 < rows[STATIC]["accuracy"] < 1


def two_padded_batches(vocab_size: int, seed: int):
    """(rows, batch) at two shapes, each with its first row half padding: the second shape makes a
    compiled model recompile with dynamic sizes, as the table's batch-1 and --test calls do."""
    import minibert.bench as bench

    gen = torch.Generator().manual_seed(seed)
    for rows, T in ((4, 16), (3, 11)):
        b = bench.random_inputs(vocab_size, rows, T, gen)
        b["attention_mask"][0, T // 2:] = 0
        yield rows, b


def test_the_compiled_deploy_row_computes_what_eager_minibert_computes(deploy_folders):
    # --deploy --compile's row: inductor with frozen weights, at two batch shapes (the second one
    # recompiles with dynamic sizes, as the table's batch-1 and --test calls do)
    import minibert.bench as bench

    src = bench.Source(deploy_folders["model"], "classifier", deploy_folders["model"], threads=1)
    eager, compiled = bench.serve_minibert(src), bench.serve_minibert(src, compiled=True)
    with torch.inference_mode():
        for rows, b in two_padded_batches(eager.vocab_size, seed=1):
            want, got = eager.forward(b), compiled.forward(b)
            assert got.shape == want.shape == (rows, 2)
            # the fixture's N(0, 1) weights give logits of several units; fused kernels sum in another
            # order, so fp32 rounding differs at about 1e-5 of the logits' size (1e-4 allowed)
            torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0)


def test_deploy_compile_adds_the_compiled_row_after_eager_minibert(deploy_folders, monkeypatch):
    import minibert.bench as bench

    seen = []
    monkeypatch.setattr(bench.torch, "compile", lambda model, **kw: seen.append(kw) or model)  # no real compile
    monkeypatch.setattr(bench, "bf16_supported", lambda: True)  # the bf16 rows whatever this CPU has
    result = deploy(deploy_folders, "--compile", "--leave-out", "torchao", "ONNX", "transformers")
    names = [r["name"] for r in result["rows"]]
    assert names[:4] == ["minibert fp32", "minibert fp32 (compiled)", "minibert bf16 (autocast)",
                         "minibert bf16 (autocast, compiled)"]
    assert seen == [{"options": {"freezing": True}}] * 2


def test_the_bf16_deploy_row_is_left_out_without_bf16_instructions(deploy_folders, monkeypatch):
    import minibert.bench as bench

    monkeypatch.setattr(bench, "bf16_supported", lambda: False)
    result = deploy(deploy_folders, "--leave-out", "torchao", "ONNX", "transformers")
    assert result["skipped"][BF16] == NO_BF16
    assert "minibert fp32" in [r["name"] for r in result["rows"]]


@pytest.mark.parametrize("compiled", [False, True])
def test_the_bf16_deploy_row_is_minibert_in_bf16(deploy_folders, tiny_config, tmp_path, monkeypatch, compiled):
    # autocast on the CPU runs the matmuls in bf16 (8 significant bits) and keeps LayerNorm and
    # softmax in fp32: the logits differ from fp32's by bf16 rounding (nonzero), and by no more than
    # a few percent of their size. Without bf16 instructions oneDNN emulates the same arithmetic,
    # slowly, so the check runs on any CPU. The model has BERT's initialisation: the fixture's
    # N(0, 1) weights saturate every softmax and would magnify any rounding without bound.
    import minibert.bench as bench
    from minibert import BertForSequenceClassification, Tokenizer

    tok = Tokenizer.from_pretrained(deploy_folders["model"])
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config(vocab_size=tok.vocab_size, id2label={0: "0", 1: "1"}))
    model.save_pretrained(tmp_path / "init", tokenizer=tok)
    monkeypatch.setattr(bench, "bf16_supported", lambda: True)
    src = bench.Source(tmp_path / "init", "classifier", tmp_path, threads=1)
    fp32, bf16 = bench.serve_minibert(src), bench.serve_minibert_bf16(src, compiled=compiled)
    with torch.inference_mode():
        for rows, b in two_padded_batches(fp32.vocab_size, seed=2):
            want, got = fp32.forward(b), bf16.forward(b)
            assert got.dtype == torch.float32 and got.shape == want.shape == (rows, 2)
            err = (got - want).abs().max().item()
            assert 0 < err < 0.05 * want.abs().max().item()


def test_deploy_options_are_checked(capsys):
    assert main(["--model", "x"]) == 1
    assert "add --deploy" in capsys.readouterr().err
    assert main(["--deploy"]) == 1
    assert "--deploy needs --model" in capsys.readouterr().err
    assert main(["--deploy", "--model", "x", "--compare-hf"]) == 1
    assert "leave out --compare-hf" in capsys.readouterr().err


def test_the_gemm_ceiling_times_the_products_it_names(benchmark_script):
    """benchmarks/gemm_ceiling.py bounds the deployment table with one-node ONNX graphs: they must
    compute the product they are named after (u8 x s8 -> int32 exactly, fp32 to rounding), or the
    rates it prints would be of some other work. The activations use 7 bits: on CPUs without VNNI
    the u8 x s8 instruction (vpmaddubsw) saturates the 16-bit sum of two neighbouring products, so
    with full-range u8 some int32 results are off there (measured on an AVX2-only EPYC); the
    speed does not depend on the values."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import numpy as np
    gemm = benchmark_script("gemm_ceiling")
    rng = np.random.default_rng(1)
    a8, b8 = rng.integers(0, 128, (64, 48), dtype=np.uint8), rng.integers(-128, 128, (48, 40), dtype=np.int8)
    (y8,) = gemm.one_node_session("MatMulInteger", a8, b8, threads=1)()
    assert y8.dtype == np.int32
    np.testing.assert_array_equal(y8, a8.astype(np.int64) @ b8.astype(np.int64))
    a32, b32 = rng.standard_normal((64, 48), dtype=np.float32), rng.standard_normal((48, 40), dtype=np.float32)
    (y32,) = gemm.one_node_session("MatMul", a32, b32, threads=1)()
    np.testing.assert_allclose(y32, a32.astype(np.float64) @ b32.astype(np.float64), rtol=1e-4, atol=1e-4)
    (y32_fed,) = gemm.one_node_session("MatMul", a32, b32, threads=1, b_constant=False)()  # B as an input
    np.testing.assert_allclose(y32_fed, y32, rtol=1e-5, atol=1e-5)
    assert gemm.rate(lambda: None, ops=1e9, calls=3) > 0


def test_the_step_profile_sorts_a_training_steps_ops_into_the_kinds_it_names(benchmark_script, monkeypatch):
    """benchmarks/pretrain_step.py --profile sums op times by the first pattern that matches: the
    loss's log_softmax must not count as attention, nor LayerNorm as clipping."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    step = benchmark_script("pretrain_step")
    want = {"aten::bernoulli_": "dropout", "aten::native_dropout": "dropout",
            "aten::_fused_adamw_": "optimizer and clipping", "aten::linalg_vector_norm": "optimizer and clipping",
            "aten::_foreach_norm": "optimizer and clipping",
            "aten::_log_softmax": "loss and embeddings", "aten::_log_softmax_backward_data": "loss and embeddings",
            "aten::embedding_dense_backward": "loss and embeddings", "aten::mm": "matmul", "aten::addmm": "matmul",
            "aten::bmm": "attention", "aten::_softmax": "attention", "aten::native_layer_norm": "normalisation",
            "aten::native_layer_norm_backward": "normalisation", "aten::gelu_backward": "activation",
            "aten::copy_": "layout", "aten::fill_": "the rest"}
    for op, kind in want.items():
        assert step.kind(op, step.TRAIN_KINDS) == kind, op


def test_deploy_test_file_that_is_not_utf8_names_the_flag_and_errors_replace_reads_it(deploy_folders, tmp_path):
    import minibert.bench as bench
    from minibert.tabular import DataError

    latin = tmp_path / "latin1.tsv"
    latin.write_bytes("sentence\tlabel\na good film\t1\n".encode("utf-8") + "un caf\xe9 froid\t0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r":3: bytes that are not UTF-8 .*--errors replace"):
        bench.read_test(str(latin), deploy_folders["model"], 4)
    assert bench.read_test(str(latin), deploy_folders["model"], 4, errors="replace").y.tolist() == [1, 0]
    assert bench.BenchConfig(deploy=True, model=str(deploy_folders["model"]), errors="replace").errors == "replace"
