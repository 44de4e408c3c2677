#!/usr/bin/env python
"""Does inserting a block of your own cost more than inserting the zoo's equivalent? (issue 26)

Times ``attnsurgeon.insert(resnet50, attn)`` in one process, in interleaved rounds (ABBA: machine
noise hits both alike), for

  se:    the zoo's SE (reduction 16), at the standard position of all 16 bottlenecks;
  gate:  gate.py:Gate of docs/your-own-block.md (the same SE-like gate, reduction 16), given by
         reference: built through its constructor and checked on a sample of each site.

Both start from the same torchvision resnet50 (built once; insert leaves it as it was). The file
is imported once, before the rounds, as a user's first insert would. Prints each median, the
median of the per-round ratios gate/se and a bootstrap 95 % interval of it (target: within 5 %).

    python benchmarks/own_block_insert.py --rounds 10
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

GATE = """import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self, channels, reduction=8):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.sigmoid(self.fc2(torch.relu(self.fc1(s))))
"""


def bootstrap(ratios: list[float], n: int = 10000, seed: int = 0) -> tuple[float, float]:
    """The 2.5 and 97.5 percentiles of the median of ``ratios`` resampled with replacement."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(n))
    return medians[int(0.025 * n)], medians[int(0.975 * n) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--input-size", default="224")
    args = parser.parse_args()

    import torch
    import torchvision

    import attnsurgeon

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    (folder / "gate.py").write_text(GATE)
    base = torchvision.models.resnet50(weights=None).eval()
    size = int(args.input_size)
    steps = {
        "se": lambda: attnsurgeon.insert(base, "se", input_size=size),
        "gate": lambda: attnsurgeon.insert(base, f"{folder / 'gate.py'}:Gate", input_size=size, reduction=16),
    }
    _, se_report = steps["se"]()
    _, gate_report = steps["gate"]()
    assert [i.params for i in se_report.insertions] == [i.params for i in gate_report.insertions]  # equivalent blocks
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(args.rounds):
        for name in ["se", "gate", "gate", "se"] if r % 2 == 0 else ["gate", "se", "se", "gate"]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    ratios = [g / s for g, s in zip(times["gate"], times["se"], strict=True)]  # both timed each round
    for name, values in times.items():
        print(
            f"{name:5s} median {statistics.median(values):.3f} s  (min {min(values):.3f}, max {max(values):.3f}, "
            f"n={len(values)})"
        )
    lo, hi = bootstrap(ratios)
    print(
        f"ratio gate/se: median {statistics.median(ratios):.3f}, 95% interval [{lo:.3f}, {hi:.3f}]  (target within 5 %)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
