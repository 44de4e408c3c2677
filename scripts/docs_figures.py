"""Draw the two figures of the README and the docs (docs/insertion-map.png, docs/explain-sheet.png).

    python scripts/docs_figures.py            # about 2 minutes on 2 CPU cores

The insertion map is resnet50 with five insertions, one per SENet position. The explain sheet needs a
model that has learnt something, and no weights are downloaded: a torchvision resnet18 is trained for
40 steps to tell a big red square from a big blue one (each image also holds a small square of the other
colour) on 64-pixel images, saved, and explained with CBAM freshly inserted (untrained, default init)
in stages 3 and 4, Grad-CAM at layer3. PNGs are quantised to 256 colours (dithered) to stay under 200 KB.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from attnsurgeon import (  # noqa: E402
    InsertionSpec,
    apply_plan,
    inspect_model,  # noqa: E402
)
from attnsurgeon.pictures.explain import explain  # noqa: E402
from attnsurgeon.pictures.plot import draw_insertion_map, map_title  # noqa: E402
from attnsurgeon.pictures.sheet import draw_sheet  # noqa: E402

RNG = np.random.default_rng(0)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def square_image(label: int, size: int = 64) -> np.ndarray:
    a = RNG.integers(40, 120, (size, size, 3)).astype(np.uint8)
    red, blue = [220, 30, 30], [30, 60, 220]
    s = RNG.integers(14, 24)
    y, x = RNG.integers(0, size - s, 2)
    a[y : y + s, x : x + s] = red if label == 0 else blue
    s2 = RNG.integers(5, 8)
    y2, x2 = RNG.integers(0, size - s2, 2)
    a[y2 : y2 + s2, x2 : x2 + s2] = blue if label == 0 else red
    return a


def train_squares(path: Path, steps: int = 40) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    for _ in range(steps):
        labels = RNG.integers(0, 2, 32)
        x = torch.stack(
            [(torch.from_numpy(square_image(int(k))).permute(2, 0, 1).float() / 255 - MEAN) / STD for k in labels]
        )
        loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), path)


def save_small(fig, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fig.savefig(Path(tmp) / "f.png", format="png")
        im = Image.open(Path(tmp) / "f.png").convert("RGB")
        palette = im.quantize(256)  # PIL dithers only towards a given palette
        im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(path, optimize=True)
    print(f"{path}: {path.stat().st_size // 1024} KiB")


def main() -> None:
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    loaded, anatomy = inspect_model("resnet50")
    plan = [
        InsertionSpec("se", "standard", stages=[1]),
        InsertionSpec("cbam", "pre", stages=[2]),
        InsertionSpec("eca", "identity", stages=[3]),
        InsertionSpec("se", "3x3", stages=[4]),
        InsertionSpec("eca", "post", stages=[4]),
    ]
    _, report = apply_plan(loaded, plan)
    values = {i.module: float(i.params) for i in report.insertions}
    save_small(
        draw_insertion_map(anatomy, report.insertions, title=map_title(report, "params", values)),
        docs / "insertion-map.png",
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "r18-squares.pt"
        train_squares(weights)
        image = Path(tmp) / "blue-square.png"
        square_image(0)  # the RNG's draws as when the figure in the docs was made
        Image.fromarray(square_image(1)).save(image)
        e = explain("resnet18", [image], attn="cbam", stages=[3, 4], input_size=64, layer="layer3", weights=weights)
        save_small(draw_sheet(e, 0), docs / "explain-sheet.png")


if __name__ == "__main__":
    main()
