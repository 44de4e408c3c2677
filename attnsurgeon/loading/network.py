"""Reaching the network for published weights, or failing in seconds when it cannot be reached.

Every source (torchvision, timm, YOLO, Hugging Face, smp) first looks in its local cache; only a
miss comes here, and one connection attempt decides, instead of a library's minutes of retries.
"""

from __future__ import annotations

import os

from ..core.errors import AttnSurgeonError


def require_network(
    url: str,
    tried: str,
    missing: str = "pretrained weights are",
    remedy: str = "Download them where the network is reachable and pass --weights FILE.",
) -> None:
    """Fail at once, not after minutes of retries, when the weights' host cannot be reached: one
    connection attempt, for at most ``ATTNSURGEON_NETWORK_TIMEOUT`` seconds (3 by default). ``missing``
    and ``remedy`` say what is not cached and what to do (a model's config is no weights file)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=float(os.environ.get("ATTNSURGEON_NETWORK_TIMEOUT", 3))).close()
    except OSError as exc:
        raise AttnSurgeonError(
            f"{missing} not in the local cache and {host} cannot be reached ({exc}); tried {tried}. {remedy}"
        ) from exc


def hf_cached_file(repo_id: str, filename: str | None) -> str | None:
    """The path of a Hugging Face hub file in the local cache (a model's weights by default), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for fn in [filename] if filename else ["model.safetensors", "pytorch_model.bin"]:
        path = try_to_load_from_cache(repo_id, fn)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None
