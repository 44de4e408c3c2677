#!/usr/bin/env python
"""Does `attnsurgeon profile --runtime onnxruntime` report the latency a hand-timed InferenceSession.run loop sees?

Alternates `attnsurgeon.profile(MODEL, runtimes=["onnxruntime"])` (the model alone) with a direct loop: the model
written by `attnsurgeon.export` to a static-batch ONNX file, opened in a plain `onnxruntime.InferenceSession` with the
same intra-op threads, and `session.run` timed call by call with `time.perf_counter` for `--seconds`; compares the
medians (target: within 5%).

    python benchmarks/runtime_accuracy.py --model resnet50 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds of each direct loop")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    import attnsurgeon
    from attnsurgeon.profiling import profile

    torch.set_num_threads(args.threads)
    model = attnsurgeon.load_model(args.model).model.eval()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        attnsurgeon.export(model, path, input_size=args.input_size, batch_size=1, dynamic_batch=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {
            session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
                (1, 3, args.input_size, args.input_size), dtype=np.float32
            )
        }

        def direct() -> float:
            for _ in range(3):  # warm-up
                session.run(None, feed)
            times, end = [], time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                start = time.perf_counter()
                session.run(None, feed)
                times.append(1000 * (time.perf_counter() - start))
            return statistics.median(times)

        ours, theirs = [], []
        for _ in range(args.repeats):
            result = profile(
                model,
                input_size=args.input_size,
                runtimes=["onnxruntime"],
                threads=args.threads,
                min_run_time=args.seconds,
                max_run_time=2 * args.seconds,
            )
            row = result.runtimes[0]
            if row.error:
                print(f"profile could not measure {args.model} in onnxruntime: {row.error}")
                return 1
            ours.append(row.base.latency[1].median_ms)
            theirs.append(direct())
    a, b = statistics.median(ours), statistics.median(theirs)
    print(
        f"attnsurgeon profile --runtime onnxruntime  median {a:8.2f} ms  (runs: {', '.join(f'{v:.2f}' for v in ours)})"
    )
    print(
        f"direct InferenceSession.run loop          median {b:8.2f} ms  (runs: {', '.join(f'{v:.2f}' for v in theirs)})"
    )
    print(
        f"difference: {100 * (a - b) / b:+.1f}%  (target within ±5%; {args.model}, {args.input_size} px, batch 1, "
        f"{args.threads} threads, onnxruntime {ort.__version__})"
    )
    from attnsurgeon.profiling.intervals import format_interval, ratio_interval

    paired = ratio_interval(ours, theirs)  # each repeat's profile against the loop right after it
    if paired is not None:
        print(
            f"per-repeat ratio profile/loop: {format_interval(*paired.percent())} (95 % interval, {len(ours)} repeats)"
        )
    else:
        print(f"per-repeat ratio profile/loop: no interval from {len(ours)} repeats (6 at least)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
