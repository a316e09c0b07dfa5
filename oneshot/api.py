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
from .config import EvalConfig, OneshotError, PruneConfig
from .evaluate import Evaluator
from .memory import check as check_memory
from .memory import estimate as estimate_memory
from .report import check_plotting
from .report import plot as plot_report
from .engine import prune_layers
from .model_io import (
    atomic_output_dir,
    context_length,
    inspect_structure,
    is_linear,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    save_model,
    stores_transposed,
    write_json,
)

from .formats.store import PERMUTATIONS, REPORT, SIDECAR, describe_storage, rewrite  # noqa: E402


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


def sparsity_metadata(report: dict, transposed: set[str] = frozenset()) -> dict:
    """The sidecar that says how the checkpoint was pruned and how its weights are stored (loaders
    ignore unknown files). ``transposed``: layers whose weight is stored [in, out] (Conv1D)."""
    return {
        "format": "dense",
        "method": report["method"],
        "pattern": report["pattern"],
        "target_sparsity": report["target_sparsity"],
        "oneshot_version": report["versions"]["oneshot"],
        "layers": {
            entry["name"]: {"sparsity": entry["sparsity"], "zeros": entry["zeros"], "pattern": report["pattern"],
                            **({"transposed": True} if entry["name"] in transposed else {}),
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
          progress: bool = True, evaluation: EvalConfig | None = None, eval_baseline: bool = False,
          plot: bool = False, **options) -> PruneResult:
    """Prune a causal LM once and optionally write it to ``out``.

    ``prune("HuggingFaceTB/SmolLM2-135M", "out/", method="wanda", sparsity=0.5, calib="data.txt")``;
    every keyword is a :class:`PruneConfig` field. Raises :class:`OneshotError` on bad input, before
    the model is loaded wherever that is possible.

    ``evaluation``: measure the pruned model (and with ``eval_baseline`` the dense one) after it is
    written; the results go to ``report["eval"]``. ``plot``: also write ``report.png`` (needs ``out``).
    """
    if config is None:
        if model is None:
            raise OneshotError("prune() needs a model (hub id, directory or .gguf file) or a config")
        config = PruneConfig.from_options(model, out, **options)
    cfg = config.validate()
    started = time.perf_counter()
    phases = {}
    if plot:
        if cfg.out is None:
            raise OneshotError("--plot writes report.png into the output: it needs --out")
        check_plotting()
    evaluator = Evaluator(evaluation, progress) if evaluation is not None else None  # text and tasks, up front

    # --- everything that can fail fast, before the weights are read
    t = time.perf_counter()
    source = resolve_source(cfg.model)
    calib_kind = describe_source(cfg.calib)
    hf_config = load_config(source, cfg.trust_remote_code)
    limit = context_length(hf_config)
    if limit is not None and cfg.seqlen > limit:
        raise OneshotError(f"--seqlen {cfg.seqlen} is beyond the model's context of {limit} tokens")
    structure = inspect_structure(hf_config, cfg.nm, cfg.ignore, cfg.trust_remote_code)
    device = resolve_device(cfg.device)
    memory = estimate_memory(cfg, hf_config, structure, gguf=source.kind == "gguf")
    if cfg.memory_check:
        check_memory(cfg, memory, device)
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    calibration: Calibration | None = None
    if calib_kind != "self":
        calibration = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.text_field)
    phases["prepare"] = time.perf_counter() - t

    t = time.perf_counter()
    hf_model = load_model(source, cfg.dtype, cfg.trust_remote_code)
    phases["load"] = time.perf_counter() - t
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
    zeros = sum(e["zeros"] for e in body["linears"])
    params = list(hf_model.parameters())  # tied weights counted once
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
        "total_parameters": sum(p.numel() for p in params),
        "nonzero_parameters": int(sum(int(torch.count_nonzero(p)) for p in params)),
        "mean_relative_error": sum(e["relative_error"] for e in body["linears"]) / max(len(body["linears"]), 1),
        "calibration": calibration.info,
        "memory_estimate": {"host_bytes": memory["host_bytes"], "device_bytes": memory["device_bytes"],
                            **{f"{k}_bytes": v for k, v in memory["parts"].items()}},
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
            transposed = {name for name, module in hf_model.named_modules() if is_linear(module)
                          and stores_transposed(module)}
            write_json(os.path.join(tmp, SIDECAR), sparsity_metadata(report, transposed))
            if permutations:
                from safetensors.torch import save_file

                save_file(permutations, os.path.join(tmp, PERMUTATIONS))
            if cfg.format == "dense":
                report["storage"] = describe_storage(tmp)
            else:
                report["storage"] = rewrite(tmp, cfg.format)
            report["phases_seconds"]["save"] = round(time.perf_counter() - t, 3)
            report["seconds"] = round(time.perf_counter() - started, 3)
            report["out"] = os.path.abspath(cfg.out)
            write_json(os.path.join(tmp, REPORT), report)
            if plot:
                plot_report(report, os.path.join(tmp, "report.png"))
    else:
        report["seconds"] = round(time.perf_counter() - started, 3)
        report["out"] = None
    if evaluator is not None:
        t = time.perf_counter()
        report["eval"] = {"config": evaluation.to_dict(), "pruned": evaluator(hf_model, tokenizer, device)}
        if eval_baseline:
            from .evaluate import compare

            dense_model = load_model(source, cfg.dtype, cfg.trust_remote_code)
            report["eval"]["dense"] = evaluator(dense_model, tokenizer, device)
            report["eval"]["delta"] = compare(report["eval"]["pruned"], report["eval"]["dense"])
            del dense_model
        report["phases_seconds"]["eval"] = round(time.perf_counter() - t, 3)
        if cfg.out is not None:  # the output is complete already; the report gains the results atomically
            path = os.path.join(cfg.out, REPORT)
            write_json(path + ".tmp", report)
            os.replace(path + ".tmp", path)
    return PruneResult(hf_model, tokenizer, report, report["out"])
