"""Writing an output: the partial directory renamed into place, the checkpoint, JSON files, and the
default output name."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from .errors import OneshotError


def partial_dir(out: str) -> str:
    """The fixed temporary directory of a journaled run into ``out`` (hidden, beside it)."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.oneshot-partial")


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool, partial: str | None = None, keep_if=None, fresh: bool = False):
    """Yield a temporary directory beside ``out``; on success rename it into place.

    On any failure (or Ctrl-C) the temporary directory is removed and ``out`` is left as it was.
    An existing non-empty ``out`` is replaced only with ``overwrite``. ``partial``: use this fixed
    directory (a journaled run: it may hold an earlier run's progress) and, on failure, keep it when
    ``keep_if(partial)`` is true, so ``--resume`` can continue; ``fresh``: discard what an earlier
    run left there first (after the checks on ``out``).
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OneshotError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    if partial is not None:
        if fresh and os.path.isdir(partial):
            shutil.rmtree(partial)  # an earlier run's leftovers: this run starts over
        os.makedirs(partial, exist_ok=True)
        tmp = partial
    else:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.oneshot-tmp-", dir=parent)
    try:
        yield tmp
        _normal_permissions(tmp)
        old = None
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.oneshot-old-", dir=parent)
            os.rmdir(old)
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old:
                os.rename(old, out)  # the earlier output goes back where it was
            raise
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if keep_if is not None and keep_if(tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _normal_permissions(directory: str) -> None:
    """mkdtemp makes 0700 directories (and some writers 0600 files): give the output the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def save_model(model, tokenizer, directory: str) -> None:
    """Weights (safetensors, the model's dtype, ties kept), config, generation config and tokenizer."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None and "gguf" in str(config.quantization_config):
        del config.quantization_config  # weights were dequantized from GGUF: the output is a plain checkpoint
    if getattr(model, "hf_quantizer", None) is not None and getattr(model.hf_quantizer, "quantization_config", None):
        if "gguf" in str(model.hf_quantizer.quantization_config):
            model.hf_quantizer = None
    config.use_cache = True
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=False)
        fh.write("\n")


def default_out(name: str, method: str, pattern: str, sparsity: float, resume: bool = False,
                overwrite: bool = False, parent: str = ".") -> str:
    """``--out`` when none is given: ``NAME-METHOD-50`` (``-2of4`` for N:M) in ``parent``, never an existing
    output: ``-2``, ``-3`` … are appended. With ``overwrite``, ``NAME-METHOD-50`` itself (to be
    replaced); with ``resume``, the first candidate whose partial directory is there (the run being
    resumed), if any."""
    tag = pattern.replace(":", "of") if ":" in pattern else f"{round(sparsity * 100):g}"
    stem = os.path.join(parent, f"{name}-{method}-{tag}")
    candidates = [stem] + [f"{stem}-{k}" for k in range(2, 1000)]
    if overwrite and not resume:
        return stem
    if resume:
        for candidate in candidates:
            if os.path.isdir(partial_dir(candidate)):
                return candidate
    return next(c for c in candidates if not os.path.lexists(c))


def lock_path(out: str) -> str:
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.oneshot-lock")


@contextlib.contextmanager
def output_lock(out: str):
    """One writer per output: an exclusive ``flock`` on a lock file beside ``out`` for the whole run.
    A second run on the same ``out`` fails at once, naming the first (PID, host, start). The kernel
    drops the lock when its process dies, so a run killed with ``kill -9`` never blocks the next."""
    import fcntl
    import socket
    import time

    path = lock_path(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.read(fd, 512).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OneshotError(f"--out {os.path.abspath(out)} is being written by another oneshot run "
                               f"({holder or 'unknown'}); wait for it to finish or choose another --out") from None
        try:  # the file may have been removed by the run that held it just before we locked it
            same = os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
             .encode())
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still locked: a run waiting on this file retries on a new one
        os.close(fd)
