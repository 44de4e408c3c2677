import os
import sys

import pytest

# Nothing in the suite may reach a network: make any accidental hub access fail fast and locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no downloads, no update checks
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch_home_unused"))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

SMALL = (3, 64, 64)  # input size for tests where the resolution does not matter


@pytest.fixture
def x_small():
    torch.manual_seed(0)
    return torch.randn(2, *SMALL)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network and empty weight caches: --pretrained must fail fast with the offline error."""
    import attnsurgeon.models as models
    from attnsurgeon import AttnSurgeonError

    def unreachable(url, tried):
        raise AttnSurgeonError(f"pretrained weights are not in the local cache and the host cannot be reached; tried {tried}. "
                               "Download them where the network is reachable and pass --weights FILE.")

    monkeypatch.setattr(models, "_require_network", unreachable)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield
    torch.hub.set_dir(os.path.join(os.environ["TORCH_HOME"], "hub"))


@pytest.fixture
def cli():
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from attnsurgeon import cli as cli_mod

    def run(*args):
        runner = CliRunner()
        cli_mod._state["debug"] = False
        result = runner.invoke(cli_mod.app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return run


sys.dont_write_bytecode = True
