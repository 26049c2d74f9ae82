"""Loaded by pytest before any test module.

Triton decides compiled-or-interpreted when a kernel module is first imported, so the
CPU interpreter must be switched on before anything imports minibert's Triton kernels.
On a machine with a GPU the real kernels run instead.

`tiny_config` is the one tiny model every test builds: a factory, `tiny_config(**overrides)`.
`benchmark_script(name)` imports benchmarks/<name>.py, which is a script, not a package module.
"""

import importlib.util
import os
from pathlib import Path

# The suite runs as two workers on two cores (pytest-xdist), each with torch's own thread
# pool: threads that spin while they wait would burn the other worker's core, so they sleep.
# Set before torch starts its OpenMP runtime; notebook kernels inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Small enough that a forward and backward take milliseconds on one CPU core; 4 heads of 16
# and an odd vocabulary so that a mixed-up dimension shows up as a shape error.
TINY = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position=64)


@pytest.fixture
def tiny_config():
    """tiny_config(**overrides) -> a BertConfig of TINY's sizes with those fields changed."""
    from minibert import BertConfig

    def make(**overrides) -> BertConfig:
        return BertConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def benchmark_script():
    """benchmark_script(name) -> the module benchmarks/<name>.py, loaded from its file."""

    def load(name: str):
        path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
