"""``prune(model, ...)`` on a model object the caller already holds (a deployment build that fine-tuned
it in the same job): pruned in place, layer by layer, on the device it sits on, and written to ``out``
when one is given. What reads a checkpoint does not apply: streaming (``--load stream``), ``--resume``
(no journal is kept) and ``torchrun``."""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from .calibration import Calibration, describe_source, read_calibration, tokenize_calibration
from .checks import check_moe, check_out, check_text
from .config import PruneConfig
from .distributed import launched
from .errors import OneshotError
from .estimate import announce, estimate_time
from .memory import estimate as estimate_memory
from .memory import needs_hessians
from .model.source import ModelSource
from .model.structure import inspect_structure
from .runtime import compute_dtype_for, resolve_device

KIND = "memory"


def held_name(model: nn.Module) -> str:
    """What the report calls a model object: where it was loaded from, else its class."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def home_device(model: nn.Module) -> torch.device:
    """The one device a model object's parameters sit on; one line for what cannot be pruned in place."""
    if not hasattr(model, "config") or not hasattr(model, "save_pretrained"):
        raise OneshotError(f"prune(): a {type(model).__name__} is not a transformers model (PreTrainedModel); "
                           "give a transformers causal LM, a hub id, a directory or a .gguf file")
    devices = {p.device for p in model.parameters()} | {b.device for b in model.buffers()}
    if any(d.type == "meta" for d in devices):
        raise OneshotError("prune(): the model has weights on the meta device (not loaded); load it, or give its "
                           "directory to prune it streamed")
    if len(devices) > 1:
        raise OneshotError(f"prune(): the model is spread over {', '.join(sorted(map(str, devices)))} (a device_map); "
                           "a model object is pruned on one device: move it there, or give its directory")
    return devices.pop() if devices else torch.device("cpu")


def check_held(cfg: PruneConfig) -> None:
    """The options that read a checkpoint, refused in one line."""
    if cfg.resume:
        raise OneshotError("--resume does not apply to a model object: it is pruned in memory and keeps no "
                           "journal; give its saved directory to resume")
    if cfg.load == "stream":
        raise OneshotError("--load stream does not apply to a model object: it is already in memory; give its "
                           "saved directory to stream it")
    if launched():
        raise OneshotError("torchrun does not apply to a model object: each rank would prune its own copy; "
                           "give its saved directory")


def given_windows(calibration, cfg: PruneConfig) -> Calibration:
    """Pre-tokenised calibration windows ``[n, seqlen]`` (a tensor or nested lists of token ids)."""
    ids = torch.as_tensor(calibration)
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2 or ids.is_floating_point() or ids.is_complex():
        raise OneshotError(f"calibration= must be integer token ids shaped [windows, seqlen], got {tuple(ids.shape)} "
                           f"{str(ids.dtype).replace('torch.', '')}")
    ids = ids.to(torch.long).cpu()
    cfg.nsamples, cfg.seqlen = int(ids.shape[0]), int(ids.shape[1])
    return Calibration(ids, {"source": "token ids given to prune()", "nsamples": cfg.nsamples,
                             "seqlen": cfg.seqlen, "tokens": int(ids.numel())})


def prepare_held(cfg: PruneConfig, model: nn.Module, tokenizer, calibration, started: float, progress: bool):
    """:func:`oneshot.api._prepare` for a model object: every check before its first layer is touched."""
    from .run import Run

    t = time.perf_counter()
    home = home_device(model)
    check_held(cfg)
    if tokenizer is None and calibration is None:
        raise OneshotError("prune(model): pass tokenizer= (to tokenize the calibration text) or calibration= "
                           "(token ids shaped [windows, seqlen])")
    windows = given_windows(calibration, cfg) if calibration is not None else None
    calib_text = None
    if windows is None and describe_source(cfg.calib) != "self":
        calib_text = read_calibration(cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.text_field)
        check_text("\n".join(calib_text.texts), cfg.calib)
    hf_config = model.config
    structure = inspect_structure(hf_config, cfg.nm, cfg.ignore, cfg.trust_remote_code)
    check_moe(cfg, structure, hf_config)
    if cfg.structure:
        from .structured import channel_alignment, check_request

        check_request(hf_config, cfg.structures, cfg.remove, cfg.trust_remote_code, channel_alignment(cfg))
    device = home if cfg.device == "auto" else resolve_device(cfg.device)
    if cfg.out is not None:
        memory = estimate_memory(cfg, hf_config, structure)
        check_out(cfg.out, memory["parts"]["output"])
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0) or 1)
    timing = estimate_time(structure, hidden, cfg.nsamples, cfg.seqlen, needs_hessians(cfg), device,
                           compute_dtype_for(model.dtype, device), 1)
    if progress:
        print(announce(structure, cfg.method, cfg.constraint.describe(), device, cfg.nsamples, cfg.seqlen, timing),
              file=sys.stderr, flush=True)
    if calib_text is not None:
        windows = tokenize_calibration(calib_text, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    source = ModelSource(cfg.model, cfg.model, KIND)
    run = Run(cfg, source, structure, device, tokenizer, windows, None, {"prepare": time.perf_counter() - t},
              started, progress)
    run.held, run.home = model, home
    run.report_extra |= {"load": {"streaming": False, "why": "a model object, pruned in place"},
                         "time_estimate": timing}
    return run


def prune_held_into(run, cfg: PruneConfig, plot: bool) -> dict:
    """Write a model object's pruned copy to ``out`` (atomically; no journal: nothing to resume from)."""
    from .output import atomic_output_dir, output_lock
    from .report import plot as plot_report

    with output_lock(cfg.out), atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        run.prune(tmp)
        report = run.finish(tmp)
        if plot:
            plot_report(report, os.path.join(tmp, "report.png"))
    return report
