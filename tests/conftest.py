import copy
import os
import sys

import pytest

# Nothing in the suite may reach a network: make any accidental hub access fail fast and locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")  # ultralytics: no downloads, no update checks
os.environ.setdefault("TORCH_HOME", os.path.join(os.path.dirname(__file__), ".torch_home_unused"))

import torch  # noqa: E402

# One intra-op thread: the suite's inputs are small, where a second thread buys little on a quiet machine and, on a
# busy one, makes every op wait for a descheduled worker (a test of the memory-efficient pass took 13 s on two
# threads, 7 s on one, with other work on the machine).
torch.set_num_threads(1)

SMALL = (3, 64, 64)  # input size for tests where the resolution does not matter


@pytest.fixture
def x_small():
    torch.manual_seed(0)
    return torch.randn(2, *SMALL)


@pytest.fixture(scope="session")
def _resnet18_once():
    import torchvision

    return torchvision.models.resnet18(weights=None)


@pytest.fixture
def resnet18(_resnet18_once):
    """Returns a function giving a fresh copy of one randomly initialised torchvision resnet18 per call: 0.06 s
    instead of a 0.27 s build (mostly the random init), for tests where resnet18 stands in for any model and
    neither its weights nor the random state after building matter."""
    return lambda: copy.deepcopy(_resnet18_once)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def closed_port_url() -> str:
    """``http://127.0.0.1:PORT`` with nothing listening on PORT: a connection there is refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """Empty weight caches, and the weights' hosts unreachable: torchvision's weight URLs and timm's Hugging Face
    endpoint point at a local port nothing listens on. Nothing of attnsurgeon is replaced: --pretrained goes through
    network.require_network's real connection attempt, which is refused. Yields that host's URL."""
    import huggingface_hub.constants
    import torchvision

    host = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", host)
    for name in torchvision.models.list_models():
        for weights in torchvision.models.get_model_weights(name):
            monkeypatch.setattr(weights.value, "url", f"{host}/{os.path.basename(weights.value.url)}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # read at import
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield host
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
