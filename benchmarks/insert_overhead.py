#!/usr/bin/env python
"""What does surgery add to a command that must import torch and build the model anyway?

Times, alternating and side by side (so machine noise hits both alike):

  baseline: python -c "import torch, torchvision, timm; torchvision.models.resnet50()"
  insert:   attnsurgeon insert resnet50 --attn eca --stages 3,4

and prints each median and the ratio insert/baseline (target: <= 1.3).

    python benchmarks/insert_overhead.py --runs 7
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

BASELINE = [sys.executable, "-c", "import torch, torchvision, timm; torchvision.models.resnet50()"]


def insert_cmd() -> list[str]:
    exe = shutil.which("attnsurgeon") or os.path.join(os.path.dirname(sys.executable), "attnsurgeon")
    return [exe, "insert", "resnet50", "--attn", "eca", "--stages", "3,4"]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    cmds = {"baseline": BASELINE, "insert": insert_cmd()}
    for cmd in cmds.values():  # warm the page cache for both
        wall(cmd)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for i in range(args.runs):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for key in order:
            times[key].append(wall(cmds[key]))
    med = {k: statistics.median(v) for k, v in times.items()}
    for key, values in times.items():
        print(f"{key:9s} median {med[key]:.2f} s  (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})")
    print(f"ratio insert/baseline: {med['insert'] / med['baseline']:.2f}  (target <= 1.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
