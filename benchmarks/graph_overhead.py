#!/usr/bin/env python
"""Does the rewritten graph add overhead of its own?

Latency of `insert timm:resnet50 --attn se` against timm's hand-written `seresnet50`, with the
same weights, measured side by side in alternating rounds (target: median ratio <= 1.02).

    python benchmarks/graph_overhead.py --rounds 10 --batch-size 1 --threads 2
"""

from __future__ import annotations

import argparse
import sys

from _common import alternate, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed seconds per model per round")
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

    times = alternate({"timm seresnet50": run(ref), "attnsurgeon resnet50+se": run(ours)}, args.rounds, args.seconds, args.threads)
    med = summary(times)
    for name, value in med.items():
        print(f"{name:26s} median {value:8.2f} ms  (n={len(times[name])})")
    ratio = med["attnsurgeon resnet50+se"] / med["timm seresnet50"]
    print(f"ratio attnsurgeon/timm: {ratio:.3f}  (target <= 1.02; batch {args.batch_size}, {args.threads} threads, "
          f"torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
