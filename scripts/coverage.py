#!/usr/bin/env python
"""How many models can attnsurgeon rewrite? Tries `insert --attn se` on every torchvision
classification model and a timm sample, runs a forward pass, and prints the success rate with
each failure's reason.

    python scripts/coverage.py                      # torchvision classification + the timm sample
    python scripts/coverage.py --only timm --json coverage.json
    python scripts/coverage.py --models resnet18,timm:vit_tiny_patch16_224

Each model runs at its own default input size (ViTs need theirs) with batch 1 and random
weights. A model counts as a success when the rewritten model runs and has at least one
inserted block.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

# a fixed, varied timm sample: CNN families, inverted residuals, hybrids and transformers
TIMM_SAMPLE = [
    "resnet18", "resnet50d", "resnext26ts", "seresnet50", "ecaresnet50d", "skresnet18", "resnest14d",
    "res2net50_14w_8s", "dpn68", "densenet121", "dla34", "vgg11", "repvgg_a0", "regnetx_002", "regnety_008",
    "efficientnet_b0", "efficientnetv2_rw_t", "mobilenetv3_large_100", "mobilenetv4_conv_small", "mnasnet_100",
    "ghostnet_100", "rexnet_100", "hrnet_w18_small", "cspresnet50", "darknet53", "convnext_atto", "convnextv2_atto",
    "edgenext_xx_small", "mobilevit_xxs", "levit_128s", "efficientformer_l1", "poolformer_s12", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "mixer_b16_224", "coat_lite_tiny", "inception_v3",
    "xception41", "nfnet_l0",
]


def torchvision_classification() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def try_model(spec: str) -> dict:
    import torch

    import attnsurgeon
    from attnsurgeon import AttnSurgeonError

    start = time.perf_counter()
    row = {"model": spec, "ok": False}
    try:
        loaded = attnsurgeon.load_model(spec)
        row["source"] = loaded.source
        model, report = attnsurgeon.insert(loaded, "se")
        if not report.insertions:
            raise AttnSurgeonError("no block was found")
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, *report.input_size))
        row.update(ok=True, blocks=len(report.insertions), params_delta=report.params["delta"],
                   input_size=list(report.input_size))
    except AttnSurgeonError as exc:
        row["reason"] = str(exc)
    except Exception as exc:  # a bug in attnsurgeon, or a model that does not run: report either
        row["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["torchvision", "timm"], help="one library only")
    parser.add_argument("--models", help="comma-separated model specs instead of the default lists")
    parser.add_argument("--json", dest="json_path", help="write every row to this JSON file")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.models:
        specs = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        specs = []
        if args.only in (None, "torchvision"):
            specs += [f"tv:{n}" for n in torchvision_classification()]
        if args.only in (None, "timm"):
            specs += [f"timm:{n}" for n in TIMM_SAMPLE]

    rows = []
    for i, spec in enumerate(specs, 1):
        row = try_model(spec)
        rows.append(row)
        mark = "ok  " if row["ok"] else "FAIL"
        detail = f"{row.get('blocks', 0)} blocks" if row["ok"] else row["reason"][:160]
        print(f"[{i:3d}/{len(specs)}] {mark} {spec:42s} {row['seconds']:6.1f}s  {detail}", flush=True)
        gc.collect()

    print()
    for lib in ("torchvision", "timm"):
        part = [r for r in rows if r["model"].startswith("tv:" if lib == "torchvision" else "timm:")]
        if part:
            ok = sum(r["ok"] for r in part)
            print(f"{lib:12s} {ok}/{len(part)} models ({100 * ok / len(part):.1f}%)")
    ok = sum(r["ok"] for r in rows)
    print(f"{'total':12s} {ok}/{len(rows)} models ({100 * ok / max(len(rows), 1):.1f}%)")
    failures = [r for r in rows if not r["ok"]]
    if failures:
        print("\nFailures:")
        for r in failures:
            print(f"  {r['model']}: {r['reason']}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
