#!/usr/bin/env python
"""Does the rewritten graph add overhead of its own?

Latency of `insert timm:resnet50 --attn se` against timm's hand-written `seresnet50`, with the
same weights, measured side by side with `profile`'s protocol (paired, alternating rounds; target: the
upper end of the ratio's 95 % interval <= 1.02).

    python benchmarks/graph_overhead.py --min-time 10 --max-time 40 --batch-size 1 --threads 2
"""

from __future__ import annotations

import argparse
import sys

from _common import interval_text, machine, paired


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--min-time", type=float, default=10.0, help="timed seconds per model, at least (and 10 rounds)"
    )
    parser.add_argument("--max-time", type=float, default=40.0, help="... and at most")
    parser.add_argument("--target-ci", type=float, default=None, help="time until the interval is within ±this %%")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=224)
    args = parser.parse_args()

    import timm
    import torch

    import attnsurgeon

    torch.set_num_threads(args.threads)
    ref = timm.create_model("seresnet50").eval()
    ours, _ = attnsurgeon.insert("timm:resnet50", "se")
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    with torch.inference_mode():
        assert torch.allclose(ours(x), ref(x), atol=1e-5)

    def run(model):
        def step():
            with torch.inference_mode():
                model(x)

        return step

    print(f"at the start: {machine()}")
    ref_name, our_name = "timm seresnet50", "attnsurgeon resnet50+se"
    lat = paired(
        {ref_name: run(ref), our_name: run(ours)},
        args.min_time,
        args.max_time,
        args.threads,
        [(our_name, ref_name)],
        args.target_ci,
    )
    for name, value in lat.items():
        print(
            f"{name:26s} median {value.median_ms:8.2f} ms  "
            f"(IQR {value.iqr_ms:.2f}, {value.runs} rounds of {value.calls})"
        )
    r = lat[our_name].vs_base
    verdict = (
        "met"
        if r.high is not None and r.high <= 1.02
        else "not resolved (too few rounds)"
        if r.high is None
        else "not shown: the interval reaches past 1.02"
    )
    print(
        f"ratio attnsurgeon/timm: {r.median:.3f} [{r.low or float('nan'):.3f}, {r.high or float('nan'):.3f}] "
        f"({interval_text(lat[our_name])}); target upper end <= 1.02: {verdict}; batch {args.batch_size}, "
        f"{args.threads} threads, torch {torch.__version__}"
    )
    print(f"at the end: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
