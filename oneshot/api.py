"""``prune(...)``: the one entry point the CLI and users call."""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from . import __version__
from .calibration import Calibration, describe_source, generate_calibration, load_calibration
from .config import OneshotError, PruneConfig
from .engine import prune_layers
from .model_io import (
    atomic_output_dir,
    context_length,
    inspect_structure,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    save_model,
    write_json,
)

SIDECAR = "oneshot_sparsity.json"
REPORT = "report.json"
PERMUTATIONS = "oneshot_permutations.safetensors"  # RIA's input-channel orders, where --ria-permute chose one


@dataclass
class PruneResult:
    model: object  # the pruned transformers model, on CPU
    tokenizer: object
    report: dict
    out: str | None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _versions() -> dict:
    import transformers

    return {
        "oneshot": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def sparsity_metadata(report: dict) -> dict:
    """The sidecar that says how the checkpoint was pruned (loaders ignore unknown files)."""
    return {
        "format": "dense",
        "method": report["method"],
        "pattern": report["pattern"],
        "target_sparsity": report["target_sparsity"],
        "oneshot_version": report["versions"]["oneshot"],
        "layers": {
            entry["name"]: {"sparsity": entry["sparsity"], "pattern": report["pattern"],
                            **({"input_permutation": PERMUTATIONS} if entry.get("permuted") else {})}
            for entry in report["linears"]
        },
    }


def solver_options(cfg: PruneConfig) -> dict:
    """What the solvers and the per-linear update read from the config."""
    names = ("blocksize", "dampening", "magnitude_scope", "sparsegpt_scope", "dsnot_init", "dsnot_cycles",
             "dsnot_threshold", "dsnot_power", "ria_alpha", "ria_permute", "update")
    return {name: getattr(cfg, name) for name in names}


def prune(model: str | None = None, out: str | None = None, *, config: PruneConfig | None = None,
          progress: bool = True, **options) -> PruneResult:
    """Prune a causal LM once and optionally write it to ``out``.

    ``prune("HuggingFaceTB/SmolLM2-135M", "out/", method="wanda", sparsity=0.5, calib="data.txt")``;
    every keyword is a :class:`PruneConfig` field. Raises :class:`OneshotError` on bad input, before
    the model is loaded wherever that is possible.
    """
    if config is None:
        if model is None:
            raise OneshotError("prune() needs a model (hub id, directory or .gguf file) or a config")
        config = PruneConfig.from_options(model, out, **options)
    cfg = config.validate()
    started = time.perf_counter()
    phases = {}

    # --- everything that can fail fast, before the weights are read
    t = time.perf_counter()
    source = resolve_source(cfg.model)
    calib_kind = describe_source(cfg.calib)
    hf_config = load_config(source, cfg.trust_remote_code)
    limit = context_length(hf_config)
    if limit is not None and cfg.seqlen > limit:
        raise OneshotError(f"--seqlen {cfg.seqlen} is beyond the model's context of {limit} tokens")
    structure = inspect_structure(hf_config, cfg.nm, cfg.ignore, cfg.trust_remote_code)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    calibration: Calibration | None = None
    if calib_kind != "self":
        calibration = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.text_field)
    phases["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    hf_model = load_model(source, cfg.dtype, cfg.trust_remote_code)
    phases["load"] = time.perf_counter() - t
    device = resolve_device(cfg.device)
    if calibration is None:
        t = time.perf_counter()
        calibration = generate_calibration(hf_model.to(device), tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, device)
        hf_model.to("cpu")
        phases["generate_calibration"] = time.perf_counter() - t

    torch.manual_seed(cfg.seed)
    constraint = cfg.constraint
    body = prune_layers(
        hf_model,
        calibration.input_ids,
        cfg.method,
        constraint,
        solver_options(cfg),
        device=device,
        ignore=cfg.ignore,
        batch_size=cfg.batch_size,
        sequential=cfg.sequential_mode,
        progress=progress,
        allocation={"kind": "owl", "m": cfg.owl_m, "lambda": cfg.owl_lambda} if cfg.allocation == "owl" else None,
        heldout=cfg.heldout_windows,
        block={"epochs": cfg.block_epochs, "lr": cfg.block_lr, "batch_windows": cfg.block_batch,
               "target": cfg.block_target, "seed": cfg.seed} if cfg.update == "block" else None,
    )
    permutations = body.pop("permutations")
    phases.update(body.pop("phases_seconds"))

    total = sum(e["shape"][0] * e["shape"][1] for e in body["linears"])
    zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in body["linears"])
    report = {
        "model": cfg.model,
        "source": source.kind,
        "architecture": structure["architecture"],
        "dtype": str(hf_model.dtype).replace("torch.", ""),
        "method": cfg.method,
        "pattern": constraint.describe(),
        "target_sparsity": constraint.sparsity,
        "sparsity": zeros / total if total else 0.0,
        "pruned_parameters": total,
        "mean_relative_error": sum(e["relative_error"] for e in body["linears"]) / max(len(body["linears"]), 1),
        "calibration": calibration.info,
        "device": str(device),
        "config": cfg.to_dict(),
        **body,
        "phases_seconds": {k: round(v, 3) for k, v in phases.items()},
        "versions": _versions(),
        "argv": list(sys.argv),  # the command line of the process that pruned (the CLI's, or the caller's script)
    }

    if cfg.out is not None:
        t = time.perf_counter()
        with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
            save_model(hf_model, tokenizer, tmp)
            write_json(os.path.join(tmp, SIDECAR), sparsity_metadata(report))
            if permutations:
                from safetensors.torch import save_file

                save_file(permutations, os.path.join(tmp, PERMUTATIONS))
            report["phases_seconds"]["save"] = round(time.perf_counter() - t, 3)
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["out"] = os.path.abspath(cfg.out)
            write_json(os.path.join(tmp, REPORT), report)
    else:
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["out"] = None
    return PruneResult(hf_model, tokenizer, report, report["out"])
