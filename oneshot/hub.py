"""Whether the Hugging Face hub can be reached, and offline mode when it cannot.

Offline, huggingface_hub retries every request for half a minute before it gives up. Instead, the
first time a run needs the hub (a hub model id, a hub dataset) one probe decides for the whole
process: a DNS lookup and a TCP connection to the hub's endpoint, or to the HTTPS proxy when one is
set, three seconds at most. When the hub cannot be reached, or ``HF_HUB_OFFLINE`` is set, the hub
libraries are switched to offline mode: the local cache still serves what it holds, and anything
else fails at once.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.parse

PROBE_SECONDS = 3.0
_state: dict = {}


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _target() -> tuple[str, int]:
    """(host, port) a request to the hub would connect to first: the proxy if one is set."""
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        proxy = os.environ.get(name)
        if proxy:
            url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            return url.hostname or "", url.port or 8080
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def _probe() -> str | None:
    host, port = _target()
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            return None
    except OSError as exc:
        what = exc.strerror or str(exc) or type(exc).__name__
        return f"{host}:{port} cannot be reached ({what})"


def offline_reason() -> str | None:
    """``None`` when the hub can be reached; else why not. Probes once per process; offline, the hub
    libraries are switched to offline mode (see the module docstring)."""
    if "reason" not in _state:
        if _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE")):
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = _probe()
        _state["reason"] = reason
        if reason is not None:
            go_offline()
    return _state["reason"]


def go_offline() -> None:
    """huggingface_hub, transformers and datasets in offline mode for the rest of this process."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True


def forget() -> None:
    """Probe again next time (tests)."""
    _state.clear()
