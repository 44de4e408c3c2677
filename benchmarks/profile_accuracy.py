#!/usr/bin/env python
"""Does `attnsurgeon profile` report the latency a direct torch.utils.benchmark measurement sees?

Alternates `attnsurgeon.profile(MODEL)` (the model alone) with a direct Timer("model(x)") under
inference_mode, same model object, same threads, and compares the medians (target: within 5%). The
reference is torch.utils.benchmark's own Timer, not `profile`'s protocol (benchmarks/_common.paired):
a check of that protocol against an independent one.
Also times the whole command `attnsurgeon profile resnet50 --attn eca --batch-size 1` (target: < 30 s).

    python benchmarks/profile_accuracy.py --model resnet50 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

from _common import machine


def direct_timer(step, threads: int) -> float:
    """Median ms of torch.utils.benchmark's blocked_autorange over 2 s, after three warm-up calls."""
    import torch.utils.benchmark as benchmark

    for _ in range(3):
        step()
    m = benchmark.Timer("step()", globals={"step": step}, num_threads=threads).blocked_autorange(min_run_time=2.0)
    return 1000 * m.median


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-wall", action="store_true", help="skip timing the whole CLI command")
    args = parser.parse_args()

    import torch

    import attnsurgeon.profiling as profiling

    torch.set_num_threads(args.threads)
    from attnsurgeon import load_model

    model = load_model(args.model).model.eval()
    x = torch.randn(1, 3, 224, 224)

    def direct():
        with torch.inference_mode():
            model(x)

    ours, theirs = [], []
    for _ in range(args.repeats):
        r = profiling.profile(model, threads=args.threads, input_size=224)
        ours.append(r.base.latency[1].median_ms)
        theirs.append(direct_timer(direct, args.threads))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"attnsurgeon profile     median {a:8.2f} ms  (runs: {', '.join(f'{v:.2f}' for v in ours)})")
    print(f"direct Timer(model(x))  median {b:8.2f} ms  (runs: {', '.join(f'{v:.2f}' for v in theirs)})")
    print(
        f"difference: {100 * (a - b) / b:+.1f}%  (target within ±5%; {args.model}, batch 1, {args.threads} threads; "
        f"{machine()})"
    )

    if not args.skip_wall:
        exe = shutil.which("attnsurgeon") or os.path.join(os.path.dirname(sys.executable), "attnsurgeon")
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(
                [exe, "profile", "resnet50", "--attn", "eca", "--batch-size", "1"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            walls.append(time.perf_counter() - start)
        print(
            f"`attnsurgeon profile resnet50 --attn eca --batch-size 1`: median {statistics.median(walls):.1f} s "
            f"(runs: {', '.join(f'{w:.1f}' for w in walls)}; target < 30 s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
