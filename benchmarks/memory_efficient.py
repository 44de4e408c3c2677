#!/usr/bin/env python
"""What --memory-efficient / `optimize` save in a training step, and what they cost in time.

For each group, side by side in one run (224², CPU float32 unless told otherwise), one training
step (forward + backward, as `profile --mode train` takes it):

  se:    ResNet-50 · + SE · + SE memory-efficient · timm seresnet50 · seresnet50 through optimize
  eca:   ResNet-50 · + ECA · + ECA memory-efficient
  cbam:  ResNet-50 · + CBAM · + CBAM memory-efficient
  effnet: efficientnet_b0 without its SE (--attn none --replace) · efficientnet_b0 · through optimize

Peak memory: attnsurgeon.profiling.measure.measure_memory (resident weights + the step's peak tensor
bytes from the profiler's allocation records; max_memory_allocated on CUDA), the same code path as
`attnsurgeon profile`, relative to the group's model without attention. Step time: `profile`'s timing
protocol (benchmarks/_common.py: the group's models in paired, alternating rounds, warm-up until
stable), its median; Δ step, relative to the same model without --memory-efficient, is the median of
the per-round ratios with its 95 % interval (attnsurgeon.profiling.intervals), which says whether
the difference is resolved. Every model runs through the fx graph (the plain ones traced too), as `profile`
compares them. After each group the memory-efficient models' segments are counted by method
(selective: the norm's output rebuilt in backward; checkpoint: the segment re-run). With --rebuilt,
each memory-efficient model is also timed as it ran before issue 32 (the gate's gradient from a
rebuilt map, rewriting.gate_product off), its Δ step relative to the same model as it is now.

    python benchmarks/memory_efficient.py --batch-sizes 8,32 --time-batch-sizes 8 --max-time 120
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interval_text, machine, paired  # noqa: E402

GROUPS = ("se", "eca", "cbam", "effnet")


def build(group: str, size: int) -> list[tuple[str, object, str | None, str | None]]:
    """(row name, model, memory reference row, time reference row) for one group."""
    import timm

    from attnsurgeon import insert, optimize
    from attnsurgeon.graph.tracing import trace

    if group == "effnet":
        base = timm.create_model("efficientnet_b0")
        without, _ = insert(copy.deepcopy(base), attn="none", replace=True, input_size=size)
        return [
            ("efficientnet_b0 without SE", without, None, None),
            ("efficientnet_b0", trace(copy.deepcopy(base)), "efficientnet_b0 without SE", None),
            (
                "efficientnet_b0 optimize",
                optimize(copy.deepcopy(base), input_size=size)[0],
                "efficientnet_b0 without SE",
                "efficientnet_b0",
            ),
        ]
    base = timm.create_model("resnet50")
    rows = [
        ("resnet50", trace(copy.deepcopy(base)), None, None),
        (f"resnet50 + {group}", insert(copy.deepcopy(base), attn=group, input_size=size)[0], "resnet50", None),
        (
            f"resnet50 + {group} --memory-efficient",
            insert(copy.deepcopy(base), attn=group, input_size=size, memory_efficient=True)[0],
            "resnet50",
            f"resnet50 + {group}",
        ),
    ]
    if group == "se":
        se = timm.create_model("seresnet50")
        rows += [
            ("seresnet50", trace(copy.deepcopy(se)), "resnet50", None),
            ("seresnet50 optimize", optimize(copy.deepcopy(se), input_size=size)[0], "resnet50", "seresnet50"),
        ]
    return rows


REBUILT = "(gate gradient from a rebuilt map)"


def _as_before(step, rebuilt: bool):
    """The step, or, for a REBUILT row, the step with no gate product taking the GateProduct path (the plan then
    rebuilds the map the product's backward reads, as before issue 32)."""
    if not rebuilt:
        return step
    from attnsurgeon.rewriting import recompute

    def before():
        applies, recompute.applies = recompute.applies, lambda *args: False
        try:
            step()
        finally:
            recompute.applies = applies

    return before


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", default=",".join(GROUPS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", default="8,32", help="batch sizes whose peak memory is measured")
    parser.add_argument("--time-batch-sizes", default="8", help="batch sizes whose step time is measured ('' for none)")
    parser.add_argument("--min-time", type=float, default=1.0, help="timed seconds per model, at least (and 10 rounds)")
    parser.add_argument("--max-time", type=float, default=120.0, help="timed seconds per model, at most")
    parser.add_argument(
        "--target-ci",
        type=float,
        default=None,
        help="time until every Δ step's 95 %% interval is within ±this %% (up to --max-time)",
    )
    parser.add_argument(
        "--rebuilt",
        action="store_true",
        help="also time each memory-efficient model with its gates' gradient taken from a rebuilt map, as before "
        "issue 32 (rewriting.gate_product off), paired with the same model as it is now",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()

    import torch

    from attnsurgeon.planning.settings import Settings
    from attnsurgeon.profiling.measure import make_step, measure_memory
    from attnsurgeon.rewriting.memory import Recompute

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    timed = [int(b) for b in args.time_batch_sizes.split(",") if b]
    settings = Settings(device=args.device, mode="train", batch_sizes=sizes)
    lines = [
        f"torch {torch.__version__} · {args.device} · float32 · train step · {args.size}² · {threads} threads · "
        f"at the start: {machine()}",
        f"`python benchmarks/memory_efficient.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    header = ["model"] + [f"peak MiB (bs={b})" for b in sizes] + [f"Δ peak vs no attention (bs={b})" for b in sizes]
    header += [f"step ms (bs={b})" for b in timed] + [
        f"Δ step vs not memory-efficient{' (rows ' + REBUILT + ': vs the same model now)' if args.rebuilt else ''}, "
        f"[95 % interval] (bs={b})"
        for b in timed
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    print(lines[0], flush=True)
    for group in args.groups.split(","):
        rows = build(group, args.size)
        if args.rebuilt:
            rows += [(f"{name} {REBUILT}", copy.deepcopy(m), ref, name) for name, m, ref, t in rows if t]
        models = {name: m.to(args.device).train() for name, m, _, _ in rows}
        peak: dict[tuple[str, int], float] = {}
        timing: dict[tuple[str, int], object] = {}  # attnsurgeon's Latency
        for b in sorted(set(sizes) | set(timed)):
            torch.manual_seed(0)
            x = (torch.randn(b, 3, args.size, args.size, device=args.device),)
            steps = {name: _as_before(make_step(m, x, settings), REBUILT in name) for name, m in models.items()}
            if b in sizes:
                for name, step in steps.items():
                    step()  # allocator and lazy init outside the measurement
                    peak[name, b] = measure_memory(models[name], x, step, settings).peak_bytes / 2**20
                    print(f"  {name} bs={b}: peak {peak[name, b]:.2f} MiB", flush=True)
            if b in timed:
                pairs = [(name, ref) for name, _, _, ref in rows if ref]
                for name, lat in paired(steps, args.min_time, args.max_time, threads, pairs, args.target_ci).items():
                    timing[name, b] = lat
                    print(
                        f"  {name} bs={b}: step {lat.median_ms:.1f} ms (IQR {lat.iqr_ms:.1f}, {lat.runs} rounds of "
                        f"{lat.calls}, warm-up {lat.warmup}) {interval_text(lat)}",
                        flush=True,
                    )
        for name, m in models.items():  # after the steps: a plan that met a map it cannot rebuild has fallen back
            methods = Counter(r.method for r in m.modules() if isinstance(r, Recompute))
            if methods:
                print(f"  {name}: segments {', '.join(f'{k} {v}' for k, v in sorted(methods.items()))}", flush=True)
        for name, _, mem_ref, time_ref in rows:
            cells = [name] + [f"{peak[name, b]:.2f}" for b in sizes]
            cells += [f"{100 * (peak[name, b] / peak[mem_ref, b] - 1):+.1f} %" if mem_ref else "—" for b in sizes]
            cells += [f"{timing[name, b].median_ms:.0f}" for b in timed]
            cells += [interval_text(timing[name, b]) if time_ref else "—" for b in timed]
            lines.append("| " + " | ".join(cells) + " |")
        del models, steps
    lines += [
        "",
        f"at the end: {machine()} · Δ step: median of the per-round ratios, [95 % interval] (order statistics; "
        "'no difference resolved' where it contains 0)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
