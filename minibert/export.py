"""Export a model folder to a static graph that runs without minibert.

    python -m minibert.export --model runs/sst2 --format onnx --out sst2.onnx
    python -m minibert.export --model runs/sst2 --format onnx --out sst2-int8.onnx --quantize int8
    python -m minibert.export --model runs/sst2 --format pt2 --out encoder.pt2 --task encoder
    python -m minibert.export --model runs/sst2 --format pt2 --out int8.pt2 --quantize int8 --calibrate train.tsv

What is exported: the forward pass in eval mode, as one graph with three int64 (B, T) inputs
-- input_ids, attention_mask (1 = token, 0 = padding), token_type_ids -- where the batch size B
and the length T (up to max_position) are free, and one output:
    encoder     last_hidden_state (B, T, H), BertModel's output
    classifier  logits (B, C), BertForSequenceClassification's output
--task auto picks classifier for a folder saved by a sequence classifier, encoder otherwise
(a folder fine-tuned with --strategy prompt exports as an encoder).

Two formats of the same program:
    pt2   torch.export's ExportedProgram: `torch.export.load(FILE).module()(ids, mask, types)`.
          Needs torch, not minibert.
    onnx  torch.export's program translated to ONNX by torch.onnx's dynamo exporter, one file
          (weights inside). Runs in ONNX Runtime or any ONNX runtime: no torch, no minibert.
The tokenizer is not in the graph: the model folder's tokenizer.json adds [CLS]/[SEP] itself,
so the `tokenizers` library alone prepares the inputs (tests/test_export.py does exactly that).

--quantize int8 with --format onnx: ONNX Runtime's dynamic quantization. Each weight matrix of the
encoder layers is stored as int8 with one scale per output channel; at run time each
activation gets a uint8 scale from its own range, the matmul runs in integers, and the
result is scaled back to fp32. Per-channel, because a per-tensor scale is set by the
largest weight of the whole matrix and leaves the other rows few levels. The pooler and the
classifier stay fp32: they run once per sequence, not per token, so they cost nothing, and
the logits read them directly. Attention's activation-by-activation products (scores, mixing)
stay fp32 as ONNX Runtime's dynamic mode leaves them. For int8 in PyTorch see minibert/quantize.py.

--quantize int8 with --format pt2 (and --calibrate FILE): static int8, minibert.quantize's
quantize_int8_static: every linear layer's weights int8 per output channel, its input's uint8
range fixed from 256 calibration texts. The program holds the int8 weights and torch's
quantize/dequantize ops around fp32 matmuls; compiled with frozen weights it runs oneDNN's int8
kernels instead, the fast path on CPUs with VNNI or AMX:
    import torch, torch._inductor.config
    import torch.ao.quantization.fx._decomposed  # registers the quantize / dequantize ops it calls
    torch._inductor.config.freezing = True
    fast = torch.compile(torch.export.load("int8.pt2").module())
    with torch.inference_mode():
        logits = fast(input_ids, attention_mask, token_type_ids)
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write, resolve_model_dir
from .model import BertForSequenceClassification, BertModel
from .tabular import ERRORS_HELP
from .toolkit import UserError, cli_main, field, probe_write

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# what each task exports: the model class, and the name of the graph's one output
TASKS = {
    "encoder": (BertModel, "last_hidden_state"),
    "classifier": (BertForSequenceClassification, "logits"),
}


@dataclass
class ExportConfig:
    model: Optional[str] = field(None, "model folder, or a run folder of pretrain / finetune (its model/ is used)")
    format: str = field("onnx", "onnx: an ONNX graph (ONNX Runtime, no torch needed); pt2: a torch.export program",
                        choices=("onnx", "pt2"))
    out: Optional[str] = field(None, "file to write (.onnx or .pt2)")
    quantize: str = field("none", "int8: with onnx, ONNX Runtime's dynamic int8 of the encoder layers' weight "
                          "matmuls; with pt2, static int8 of every linear layer (torchao's x86 quantizer, ranges "
                          "from --calibrate)", choices=("none", "int8"))
    calibrate: Optional[str] = field(None, "--format pt2 --quantize int8: texts (TSV, CSV or JSONL; labels unused) "
                                     "whose activation ranges fix the int8 scales, 256 rows drawn at random; use "
                                     "training text")
    errors: str = field("strict", ERRORS_HELP + " (in --calibrate's file)", choices=("strict", "replace"))
    task: str = field("auto", "what the graph outputs: encoder (hidden states), classifier (logits), or auto "
                      "(classifier when the folder holds a sequence classifier)", choices=("auto", *TASKS))
    overwrite: bool = field(False, "replace an existing --out file (without it, export refuses to touch one)")

    def __post_init__(self):
        if not self.model or not self.out:
            raise UserError("give both --model (a model folder) and --out (the file to write)")
        if self.quantize == "int8" and self.format == "pt2" and not self.calibrate:
            raise UserError("--format pt2 --quantize int8 is static int8: give --calibrate FILE, training texts to "
                            "take the activation ranges from")
        if self.calibrate and (self.quantize, self.format) != ("int8", "pt2"):
            raise UserError("--calibrate is for --format pt2 --quantize int8 (ONNX's int8 takes its ranges at run "
                            "time)")
        if not Path(self.out).parent.resolve().is_dir():
            raise UserError(f"--out {self.out}: folder {Path(self.out).parent} does not exist; create it first")
        if Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: is a folder; give a file name such as {Path(self.out) / 'model.onnx'}")
        # the name must say what the file holds, so that a slip of the pen (the model's own
        # model.safetensors, a data file) cannot be written over with a graph
        if Path(self.out).suffix != f".{self.format}":
            raise UserError(f"--out {self.out}: --format {self.format} writes a .{self.format} file; give a name "
                            f"ending in .{self.format}")
        if Path(self.out).exists() and not self.overwrite:
            raise UserError(f"--out {self.out}: the file exists; pass --overwrite to replace it")
        try:  # a read-only folder fails here, in one line, not after the export's minutes of work
            probe_write(Path(self.out).parent)
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write in {Path(self.out).parent} ({e.strerror or e})") from None


class GraphForward(nn.Module):
    """The model behind the signature a graph runtime calls: (input_ids, attention_mask,
    token_type_ids) -> one tensor. minibert's own forward takes token_type_ids second and a
    classifier returns an output record; a graph wants fixed names and a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        out = self.model(input_ids, token_type_ids, attention_mask)
        return out if isinstance(out, Tensor) else out.logits


def load_for_export(model_dir: str, task: str = "auto") -> tuple[GraphForward, str]:
    """The folder's model in eval mode, wrapped for export, and the task it was loaded as."""
    folder = resolve_model_dir(model_dir)
    if task == "auto":
        try:
            archs = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        except (OSError, ValueError):  # from_pretrained below says what is wrong with the file
            archs = []
        task = "classifier" if BertForSequenceClassification.__name__ in archs else "encoder"
    model_class, _ = TASKS[task]
    # sdpa traces to plain matmul + softmax ops; the Triton kernels have no ONNX form
    model = model_class.from_pretrained(folder, attn_impl="sdpa", fused_kernels=False)
    if task == "classifier" and any(n.startswith("classifier.") for n in model.load_report["initialised"]):
        raise UserError(f"--model {model_dir}: the checkpoint has no trained classifier head; "
                        "use --task encoder, or fine-tune it first")
    model.eval().requires_grad_(False)
    return GraphForward(model).eval(), task


def example_inputs(model: GraphForward) -> tuple[Tensor, Tensor, Tensor]:
    """A batch to trace with: 2 rows of 8 tokens, the second one padded. Sizes 0 and 1 would be
    specialised by the tracer (baked in as constants), so neither appears here."""
    V = model.model.config.vocab_size
    ids = torch.arange(16).view(2, 8) % V  # (B, T) = (2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask, torch.zeros(2, 8, dtype=torch.long)


def dynamic_shapes(model: GraphForward) -> dict:
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=model.model.config.max_position)
    return {name: {0: batch, 1: seq} for name in INPUT_NAMES}


CALIBRATION_ROWS = 256  # what static int8's ranges are taken from: enough for a stable histogram


def read_calibration(path: str, folder: Path, batch_size: int = 32, errors: str = "strict"
                     ) -> list[tuple[Tensor, Tensor, Tensor]]:
    """CALIBRATION_ROWS texts drawn at random (seed 0) from a TSV, CSV or JSONL file (labels, if
    any, unused), tokenized for the model in folder, as (input_ids, attention_mask,
    token_type_ids) batches."""
    from .strategies import PlainInputs
    from .tabular import NotUtf8Error, read_labeled
    from .tokenizer import Tokenizer

    try:
        data = read_labeled(path, errors=errors)
    except NotUtf8Error as e:
        raise UserError(f"--calibrate: {e.on_command_line()}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"--calibrate {path}: cannot read it ({e})") from None
    tok = Tokenizer.from_pretrained(folder)
    inputs = PlainInputs(tok, tok.model_max_length)
    items = inputs.encode(data.texts, data.pairs)
    pick = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:CALIBRATION_ROWS].tolist()
    batches = [inputs.collate([items[i] for i in pick[s : s + batch_size]]) for s in range(0, len(pick), batch_size)]
    return [(b["input_ids"], b["attention_mask"], b["token_type_ids"]) for b in batches]


def export_pt2(model: GraphForward, out: Path, run_as: Optional[nn.Module] = None) -> None:
    """Export model (or run_as, a module with model's signature, e.g. its static int8 version)."""
    program = torch.export.export(run_as if run_as is not None else model, example_inputs(model),
                                  dynamic_shapes=dynamic_shapes(model), strict=False)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: given a path, torch.export.save wants it to end in .pt2
            torch.export.save(program, f)

    atomic_write(out, write)


def export_onnx(model: GraphForward, out: Path, output_name: str) -> None:
    # the exporter logs a line per torchvision op it cannot register when torchvision is absent
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        # the exporter warns once per input that the shared batch/seq axes keep one name: as meant
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            model, example_inputs(model), dynamo=True, dynamic_shapes=dynamic_shapes(model),
            input_names=list(INPUT_NAMES), output_names=[output_name], verbose=False,
        )
    registration_log.setLevel(level)
    # Each node carries the Python stack trace that created it: file paths of the machine that
    # exported, which make the file's bytes depend on where minibert is installed and say nothing
    # to a runtime. The module path (name_scopes) stays: quantize_int8 reads it.
    atomic_write(out, lambda tmp: _save_without_stack_traces(program, tmp))


def _save_without_stack_traces(program, path: str) -> None:
    import onnx

    program.save(path, external_data=False)
    graph = onnx.load(path)
    for node in [*graph.graph.node, *(n for f in graph.functions for n in f.node)]:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    onnx.save(graph, path)


def matmuls_outside_encoder_layers(onnx_file: Path) -> list[str]:
    """The matmul nodes of the pooler and the heads, found by the module path the dynamo exporter
    records on each node. A node without that record counts as an encoder layer's."""
    import onnx

    outside = []
    for node in onnx.load(str(onnx_file)).graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if node.op_type in ("MatMul", "Gemm") and scopes is not None and ".encoder.layers." not in scopes:
            outside.append(node.name)
            if node.op_type == "Gemm":  # (B, H) inputs export as Gemm, which the quantizer turns into
                outside.append(f"{node.name}_MatMul")  # MatMul + Add under this name
    return outside


def quantize_int8(src: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    keep_fp32 = matmuls_outside_encoder_layers(src)

    def write(tmp: str) -> None:
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=keep_fp32)

    # quantize_dynamic logs a suggestion to run its pre-processing (shape inference, graph
    # fusions) first; the exporter's graph is already optimised and its shapes known
    logging.getLogger().addFilter(_no_preprocess_hint)
    try:
        atomic_write(out, write)
    finally:
        logging.getLogger().removeFilter(_no_preprocess_hint)


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs the {module} package: pip install -e \".[deploy]\"")


def run(cfg: ExportConfig) -> None:
    if cfg.format == "onnx":
        require("onnxscript", "--format onnx")  # torch.onnx's dynamo exporter is built on it
        require("onnx", "--format onnx")
    if cfg.quantize == "int8":
        require("onnxruntime" if cfg.format == "onnx" else "torchao", "--quantize int8")
    model, task = load_for_export(cfg.model, cfg.task)
    out, output_name = Path(cfg.out), TASKS[task][1]
    if cfg.format == "pt2" and cfg.quantize == "int8":
        from .quantize import quantize_int8_static

        calibration = read_calibration(cfg.calibrate, resolve_model_dir(cfg.model), errors=cfg.errors)
        export_pt2(model, out, quantize_int8_static(model, calibration))
    elif cfg.format == "pt2":
        export_pt2(model, out)
    elif cfg.quantize == "none":
        export_onnx(model, out, output_name)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            export_onnx(model, fp32, output_name)
            quantize_int8(fp32, out)
    int8 = " (int8)" if cfg.quantize == "int8" else ""
    print(f"wrote {out}: {task} -> {output_name}{int8}, {cfg.format}, {out.stat().st_size / 2**20:.1f} MiB")


def main(argv: Optional[list[str]] = None) -> int:
    return cli_main("python -m minibert.export", run, argv, ExportConfig, __doc__.split("\n\n")[0])


if __name__ == "__main__":
    raise SystemExit(main())
