"""core.module_state: what a forward leaves on its modules, taken away and put back."""

import torch
from torch import nn

from attnsurgeon.core.module_state import snapshot
from attnsurgeon.profiling import profile


class Head(nn.Module):
    """Keeps what it computed from its input on itself, as YOLO's Detect head keeps its anchors (there
    torch.export then guards on the cached shape and fails: 'Could not guard on data-dependent expression')."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.shape = None

    def forward(self, x):
        if self.shape != x.shape:
            self.anchors = torch.arange(x.shape[-1], dtype=x.dtype)
            self.shape = x.shape
        return self.conv(x) + self.anchors


def test_changes_restore_and_as_taken():
    model = nn.Sequential(nn.Identity(), Head())
    head = model[1]
    as_built = snapshot(model)
    assert as_built.changes() == []
    model(torch.randn(1, 3, 4, 4))
    assert sorted(key for _, key, _ in as_built.changes()) == ["anchors", "shape"]
    assert {name for name, _, _ in as_built.changes()} == {"1"}
    run = (head.shape, head.anchors)
    with as_built.as_taken():
        assert head.shape is None and not hasattr(head, "anchors")
        head.extra = 1  # what the code within writes is gone afterwards too
        model(torch.randn(2, 3, 8, 8))
    assert (head.shape, head.anchors) == run and not hasattr(head, "extra")
    assert len(as_built.restore()) == 2
    assert head.shape is None and not hasattr(head, "anchors") and as_built.changes() == []


def test_the_mode_is_the_callers_and_a_deleted_attribute_comes_back():
    model = Head()
    as_built = snapshot(model)
    model.eval()
    del model.shape
    as_built.restore()
    assert model.training is False  # eval() after the snapshot stays: a setting, not a forward's trace
    assert model.shape is None


def test_a_module_shared_by_two_models_is_recorded_once():
    head = Head()
    a, b = nn.Sequential(head), nn.Sequential(nn.Identity(), head)
    assert sum(m is head for _, m, _ in snapshot(a, b, None).modules) == 1


def _record_exported_state(monkeypatch):
    import attnsurgeon.saving.export as saving

    seen, export = [], saving.export

    def recording(model, path, **kw):
        seen.append({name: "anchors" in vars(m) for name, m in model.named_modules() if isinstance(m, Head)})
        return export(model, path, **kw)

    monkeypatch.setattr(saving, "export", recording)
    return seen


def test_a_runtime_exports_the_model_as_built_not_what_eager_runs_cached_on_it(monkeypatch):
    seen = _record_exported_state(monkeypatch)
    model = nn.Sequential(Head())
    result = profile(
        model, input_size=(3, 8, 8), runtimes=["eager", "torchscript"], threads=1, min_run_time=0.02, max_run_time=0.05
    )  # eager runs it first
    assert [(r.runtime, r.error) for r in result.runtimes] == [("eager", None), ("torchscript", None)]
    assert seen == [{"0": False}]
    assert "anchors" in vars(model[0])  # and what the runs cached is put back afterwards


def test_each_sweep_row_starts_from_the_model_as_built(tmp_path):
    from attnsurgeon.sweeps import rows

    (tmp_path / "caching.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Caching(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.shape = None\n\n"
        "    def forward(self, x):\n"
        "        self.shape = x.shape\n        return x\n"
    )
    spec = f"{tmp_path / 'caching.py'}:Caching"
    try:
        loaded = rows._load(spec, {})
        loaded.model(torch.randn(1, 3, 4, 4))  # an earlier row ran it
        again = rows._load(spec, {})
        assert again is loaded and again.model.shape is None  # the same model, built once, as it was built
    finally:
        rows.forget_loaded()
