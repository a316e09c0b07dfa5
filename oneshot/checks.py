"""Checks of the run's surroundings before any weight is read: the output's directory (writable, room
for the output and its journal), the checkpoint's safetensors files (their headers parse and cover
their files), and the calibration text (text, not binary)."""

from __future__ import annotations

import os
import shutil

from .errors import OneshotError


def existing_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_out(out: str, need_bytes: int) -> None:
    """``--out``'s nearest existing parent is a writable directory with room for ``need_bytes``."""
    parent = existing_parent(out)
    if not os.path.isdir(parent):
        raise OneshotError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OneshotError(f"--out {out}: {parent} is not writable (read-only or no permission); choose another --out")
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OneshotError(f"--out {out}: {free / 1e9:.2f} GB free on {parent}, and the output with its resume "
                           f"journal needs about {need_bytes / 1e9:.2f} GB; free some space or choose another --out")


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_not_source(out: str, model: str) -> None:
    """``--out`` is not the model being pruned, does not contain it, and is not inside the Hugging Face
    hub cache: the output directory is replaced as a whole, so any of these would destroy the source.
    Refused whatever ``--overwrite`` says."""
    from .model.source import ALIASES, alias_path

    target = os.path.realpath(os.path.expanduser(out))
    spec = os.path.expanduser(model)
    if not os.path.exists(spec) and model in ALIASES:
        try:
            spec = alias_path(model)
        except OneshotError:
            spec = ""
    if spec and os.path.exists(spec):
        source = os.path.realpath(spec)
        if _inside(source, target):
            what = "is the model being pruned" if source == target else f"contains the model being pruned ({source})"
            raise OneshotError(f"--out {out} {what}: the output would replace it; choose another --out")
    from huggingface_hub import constants

    cache = os.path.realpath(os.path.expanduser(constants.HF_HUB_CACHE))
    if _inside(target, cache):
        raise OneshotError(f"--out {out} is inside the Hugging Face hub cache ({cache}), whose snapshots other "
                           "runs read; choose another --out")


def check_safetensors(directory: str) -> None:
    """Every ``*.safetensors`` file of a checkpoint directory opens and its header covers the file: a
    truncated or corrupt shard is named here, not in a traceback halfway through the run."""
    from safetensors import safe_open

    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        try:
            with safe_open(path, "pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: one line naming the file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OneshotError(f"{path}: not a readable safetensors file ({reason}); the checkpoint is truncated "
                               "or corrupt: download or copy it again") from None


def binary_share(text: str) -> float:
    """The share of characters that no text holds: control characters other than whitespace, and the
    replacement character that undecodable bytes became."""
    if not text:
        return 0.0
    sample = text[:1_000_000]
    bad = sum(1 for c in sample if c == "\ufffd" or (ord(c) < 32 and c not in "\n\r\t\f\v"))
    return bad / len(sample)


def check_text(text: str, source: str, limit: float = 0.01) -> None:
    share = binary_share(text)
    if share > limit:
        raise OneshotError(f"--calib {source}: {share:.0%} of it is binary or undecodable bytes, not text; give a "
                           "text file (UTF-8), jsonl/json/parquet with a text column, or a dataset")


def check_moe(cfg, structure: dict, hf_config) -> None:
    """Mixture-of-experts options against the model, before any weight is read."""
    from .engine.moe import check_removal

    moe = structure.get("moe")
    cfg.mode_for(moe is not None)
    if cfg.remove_experts is None:
        return
    if moe is None:
        raise OneshotError(f"--remove-experts: {structure['architecture']} has no mixture-of-experts layers")
    check_removal(cfg.remove_experts, moe["experts"], getattr(hf_config, "text_config", None) or hf_config)
