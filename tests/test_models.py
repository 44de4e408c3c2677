"""Loading: name resolution, user factories, weights files (safely), pretrained errors."""

import os
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file

from attnsurgeon import AttnSurgeonError, load_model
from attnsurgeon.loading.models import list_models, parse_model_spec, resolve_source

# where a test is about the weights file, not the architecture: a torchvision model with norm buffers that builds in
# 0.07 s (resnet18: 0.27 s, most of it the random init)
SMALL_NET = "mobilenet_v3_small"


@pytest.mark.slow
def test_bare_name_in_both_libraries_resolves_to_torchvision():
    assert resolve_source("resnet50") == ("torchvision", "resnet50")
    assert resolve_source("timm:resnet50") == ("timm", "resnet50")
    assert resolve_source("tv:resnet50") == ("torchvision", "resnet50")
    assert resolve_source("resnet50d") == ("timm", "resnet50d")  # timm only


def test_unknown_name_suggests_closest():
    with pytest.raises(AttnSurgeonError, match=r"unknown model 'resnet5O'.*Did you mean: resnet50"):
        resolve_source("resnet5O")
    with pytest.raises(AttnSurgeonError, match=r"unknown timm model 'resnt18'.*resnet18"):
        resolve_source("timm:resnt18")


def test_spec_parsing_without_imports():
    assert parse_model_spec("models/net.py:build") == ("file", "models/net.py:build")
    assert parse_model_spec("pkg.mod:make") == ("module", "pkg.mod:make")
    with pytest.raises(AttnSurgeonError):
        parse_model_spec("tv:")


@pytest.mark.slow
def test_list_models_pattern_names_the_source():
    rows = list_models("resnet50")
    assert ("resnet50", "torchvision") in rows and ("resnet50", "timm") in rows
    assert all("resnet50" in name for name, _ in rows)
    assert list_models("seresnet5?") and all(n.startswith("seresnet5") for n, _ in list_models("seresnet5?"))


def test_report_names_source_and_default_input_size():
    loaded = load_model("timm:resnet18")
    assert loaded.source == "timm" and loaded.spec == "timm:resnet18" and loaded.input_size == (3, 224, 224)
    tv = load_model("inception_v3", init_weights=False)
    assert tv.source == "torchvision" and tv.input_size == (3, 299, 299)  # from its weights' transforms


def test_user_file_factory(tmp_path):
    path = tmp_path / "mynet.py"
    path.write_text(
        textwrap.dedent("""
        import torch.nn as nn
        def build(width=8):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        NOT_A_MODEL = 3
        def not_a_module():
            return 42
    """)
    )
    loaded = load_model(f"{path}:build")
    assert loaded.source == "file" and isinstance(loaded.model, torch.nn.Sequential)
    with pytest.raises(AttnSurgeonError, match="has no callable 'buld'.*Did you mean: build"):
        load_model(f"{path}:buld")
    with pytest.raises(AttnSurgeonError, match="returned int, not a torch.nn.Module"):
        load_model(f"{path}:not_a_module")
    with pytest.raises(AttnSurgeonError, match="does not exist"):
        load_model(f"{tmp_path}/missing.py:build")


def test_module_factory():
    loaded = load_model("torchvision.models:resnet18")
    assert loaded.source == "module" and type(loaded.model).__name__ == "ResNet"
    with pytest.raises(AttnSurgeonError, match="cannot import module"):
        load_model("no_such_pkg.sub:build")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_file_round_trip(tmp_path, suffix):
    torch.manual_seed(1)
    source = load_model(SMALL_NET).model
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    loaded = load_model(SMALL_NET, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.weights == str(path)


def test_checkpoint_nesting_and_ddp_prefix_are_unwrapped(tmp_path):
    source = load_model(SMALL_NET).model
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    loaded = load_model(SMALL_NET, weights=path)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_mismatched_weights_list_the_keys(tmp_path):
    state = load_model("resnet18").model.state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["conv1.weight"] = torch.zeros(1, 1, 1, 1)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(AttnSurgeonError) as err:
        load_model("resnet18", weights=path)
    text = str(err.value)
    assert "missing keys (1): fc.bias" in text
    assert "unexpected keys (1): extra.weight" in text
    assert "conv1.weight (file (1, 1, 1, 1), model (64, 3, 7, 7))" in text


def test_corrupt_weights_are_a_clear_error(tmp_path):
    for name, message in (
        ("junk.pt", "is not a PyTorch weights file"),
        ("junk.safetensors", "not a readable safetensors"),
    ):
        path = tmp_path / name
        path.write_bytes(b"\x00not a weights file at all")
        with pytest.raises(AttnSurgeonError, match=message):
            load_model(SMALL_NET, weights=path)
    with pytest.raises(AttnSurgeonError) as err:
        (tmp_path / "text.pt").write_text("not a pickle at all")
        load_model(SMALL_NET, weights=tmp_path / "text.pt")
    assert "is not a PyTorch weights file" in str(err.value)
    assert "weights_only" not in str(err.value) and "arbitrary code" not in str(err.value)  # torch's unsafe advice
    with pytest.raises(AttnSurgeonError, match="unknown extension"):
        (tmp_path / "w.npz").write_bytes(b"x")
        load_model(SMALL_NET, weights=tmp_path / "w.npz")


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": _Payload(str(marker))}, path)
    with pytest.raises(AttnSurgeonError, match="refused to load .*Python objects other than tensors"):
        load_model("resnet18", weights=path)
    assert not marker.exists()


def test_pretrained_from_the_local_cache(tmp_path, monkeypatch):
    """--pretrained reads torchvision's cache without the network; the weights are the cached ones."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        import torchvision

        url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
        torch.manual_seed(3)
        state = torchvision.models.resnet18().state_dict()
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(state, tmp_path / "hub" / "checkpoints" / os.path.basename(url))
        loaded = load_model("resnet18", pretrained=True)
        assert torch.equal(loaded.model.conv1.weight, state["conv1.weight"]) and loaded.weights == "pretrained"
    finally:
        torch.hub.set_dir(os.path.join(os.environ["TORCH_HOME"], "hub"))


def test_pretrained_unavailable_is_a_clear_error(offline_hub):
    """The real check: one refused connection to the (local, closed) host, then the error, at once."""
    import timm

    timm.models.get_pretrained_cfg("resnet18")  # imports done: the clock below times the check
    port = offline_hub.rsplit(":", 1)[1]
    for name, url in (("resnet18", f"{offline_hub}/resnet18-"), ("timm:resnet18", "huggingface.co/timm/resnet18")):
        start = time.monotonic()
        with pytest.raises(AttnSurgeonError) as err:
            load_model(name, pretrained=True)
        assert time.monotonic() - start < 2, name
        text = str(err.value)
        assert text.startswith("pretrained weights are not in the local cache and 127.0.0.1 cannot be reached (")
        assert f"tried the local {'cache (' if name == 'resnet18' else 'Hugging Face cache'}" in text and url in text
        assert "--weights FILE" in text and (port in text or name == "timm:resnet18")


def test_a_host_that_never_answers_fails_within_the_timeout(tmp_path, monkeypatch):
    """A host that drops the connection request (a local listener whose one-place queue is full: the kernel drops
    further SYNs, as a firewall does) ends the attempt after ATTNSURGEON_NETWORK_TIMEOUT seconds. (An "unroutable"
    address is no use for this where a sandbox's proxy accepts every connection.)"""
    import socket

    import huggingface_hub.constants
    import timm

    with socket.socket() as server, socket.socket() as queued:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        queued.connect(("127.0.0.1", port))  # fills the queue; nobody accepts
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("ATTNSURGEON_NETWORK_TIMEOUT", "0.3")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
        timm.models.get_pretrained_cfg("resnet18")  # imports done: the clock times the check
        start = time.monotonic()
        with pytest.raises(AttnSurgeonError, match=r"and 127\.0\.0\.1 cannot be reached \(timed out\).*--weights FILE"):
            load_model("timm:resnet18", pretrained=True)
        assert 0.25 < time.monotonic() - start < 2


def test_pretrained_and_weights_are_exclusive(tmp_path):
    with pytest.raises(AttnSurgeonError, match="either --pretrained or --weights"):
        load_model("resnet18", pretrained=True, weights=tmp_path / "w.pt")
