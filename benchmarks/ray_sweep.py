#!/usr/bin/env python
"""How much faster is a sweep on a local Ray instance with 2 workers than the local sweep?

One 24-row zoo sweep (3 models x (base + 7 configurations), 64 px, --threads 1), run as a user
runs it, side by side in one run (alternating when --rounds > 1, so machine noise hits both alike):

  local: attnsurgeon sweep RECIPE --threads 1 --out DIR
  ray:   attnsurgeon sweep RECIPE --threads 1 --out DIR --ray --ray-cpus 2

Wall times include everything a user waits for (imports, Ray's start, workers building the
models). Prints each wall time, the speed-up local/ray, the load average around each run (other
work on the machine takes cores from both), and checks that both gave the same rows.

    python benchmarks/ray_sweep.py --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["resnet18", "timm:resnet10t", "timm:resnet14t"]
CONFIGURATIONS = [
    ("se", "standard"),
    ("se", "pre"),
    ("se", "post"),
    ("se", "identity"),
    ("eca", "standard"),
    ("eca", "pre"),
    ("cbam", "standard"),
]
RECIPE = "models: MODELS\nconfigurations:\n" + "".join(
    f"  - {{name: {a}/{p}, insertions: [{{attn: {a}, position: {p}}}]}}\n" for a, p in CONFIGURATIONS
)


def run(recipe: Path, out: Path, ray: bool, seconds: tuple[float, float]) -> tuple[float, tuple[float, float]]:
    cmd = [
        sys.executable,
        "-c",
        "from attnsurgeon.cli import main; main()",
        "sweep",
        str(recipe),
        "--threads",
        "1",
        "--input-size",
        "64",
        "--min-time",
        str(seconds[0]),
        "--max-time",
        str(seconds[1]),
        "--out",
        str(out),
        "--force",
    ]
    if ray:
        cmd += ["--ray", "--ray-cpus", "2"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(
        cmd,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return time.perf_counter() - start, (load, os.getloadavg()[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--min-time", type=float, default=0.25, help="each row's --min-time")
    parser.add_argument("--max-time", type=float, default=0.5, help="each row's --max-time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "zoo.yaml"
        recipe.write_text(RECIPE.replace("MODELS", json.dumps(MODELS)))
        times: dict[str, list[float]] = {"local": [], "ray": []}
        for r in range(args.rounds):
            for kind in ["local", "ray"] if r % 2 == 0 else ["ray", "local"]:
                wall, (before, after) = run(recipe, Path(tmp) / kind, kind == "ray", (args.min_time, args.max_time))
                times[kind].append(wall)
                print(
                    f"round {r + 1} {kind:5s}: {wall:6.1f} s   "
                    f"(1-min load average {before:.1f} before, {after:.1f} after)"
                )
        rows = {k: json.loads((Path(tmp) / k / "results.json").read_text()) for k in times}
        same = [(r["model"], r["name"], r["params"], r["macs"]) for r in rows["local"]] == [
            (r["model"], r["name"], r["params"], r["macs"]) for r in rows["ray"]
        ]
        ok = sum(r["status"] == "ok" for r in rows["ray"])
        local, ray = min(times["local"]), min(times["ray"])
        print(f"{len(rows['ray'])} rows ({ok} ok), same rows on both: {same}; cores: {len(os.sched_getaffinity(0))}")
        print(f"best wall time: local {local:.1f} s, ray (2 workers) {ray:.1f} s; speed-up {local / ray:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
