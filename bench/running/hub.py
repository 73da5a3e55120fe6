"""Is the Hugging Face hub reachable? Asked once, before any point runs, when a command needs it
(a hub id for --weights, or task data without --data-dir), so that an offline machine gets one
line saying what to pass instead of half a minute of retries per point."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def offline_requested() -> bool:
    """HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE) set to a true value: use the local cache only."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable_reason(timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (HF_ENDPOINT, default huggingface.co:443) opens
    within `timeout_s`; otherwise why not."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.strerror or type(exc).__name__})"
    return None


def in_local_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the hub cache already holds the repository: a model's config.json, any snapshot
    of a dataset. False for an id the hub would reject."""
    try:
        from huggingface_hub import constants, try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    try:
        if repo_type == "dataset":
            folder = os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo_id.replace("/", "--"), "snapshots")
            return os.path.isdir(folder) and bool(os.listdir(folder))
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # HFValidationError: not a valid hub id
        return False


def hub_problem(repo_id: str | None = None, repo_type: str = "model") -> str | None:
    """Why a download from the hub would fail now (None if it should work): offline by request
    and not cached, or the hub out of reach. With `repo_id`, a cached copy is good enough."""
    cached = repo_id is not None and in_local_cache(repo_id, repo_type)
    if offline_requested():
        return None if cached or repo_id is None else "HF_HUB_OFFLINE is set and it is not in the local hub cache"
    reason = hub_unreachable_reason()
    if reason is None or cached:
        return None
    return f"the Hugging Face hub is out of reach: {reason}"
