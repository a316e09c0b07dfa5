"""``prune(...)``: the one entry point the CLI and users call."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

from .calibration import Calibration, describe_source, read_calibration, tokenize_calibration
from .checks import check_moe, check_out, check_safetensors, check_text
from .config import EvalConfig, PruneConfig
from .distributed import Group
from .distributed import check as check_distributed
from .distributed import setup as setup_distributed
from .distributed import teardown as teardown_distributed
from .errors import OneshotError
from .estimate import announce, estimate_time
from .evaluate import Evaluator, compare
from .formats.store import REPORT
from .journal import Journal, differences, fingerprint, model_files
from .memory import check as check_memory
from .memory import estimate as estimate_memory
from .memory import needs_hessians, storage_dtype
from .model.source import context_length, load_config, load_model, load_tokenizer, resolve_source
from .model.structure import inspect_structure
from .output import atomic_output_dir, output_lock, partial_dir, write_json
from .report import check_plotting
from .report import plot as plot_report
from .run import Run
from .runtime import compute_dtype_for, resolve_device
from .stream import StreamedModel, local_checkpoint, streaming_plan


class PruneResult:
    """``model``: the pruned transformers model on the CPU. A streamed run never held it whole: it is
    loaded from ``out`` the first time it is asked for."""

    def __init__(self, model, tokenizer, report: dict, out: str | None):
        self._model, self.tokenizer, self.report, self.out = model, tokenizer, report, out

    @property
    def model(self):
        if self._model is None and self.out is not None:
            from .formats.store import load as load_output

            self._model = load_output(self.out)
        return self._model


def prune(model=None, out: str | None = None, *, config: PruneConfig | None = None, tokenizer=None,
          calibration=None, progress: bool = True, evaluation: EvalConfig | None = None,
          eval_baseline: bool = False, plot: bool = False, **options) -> PruneResult:
    """Prune a causal LM once and optionally write it to ``out``.

    ``prune("HuggingFaceTB/SmolLM2-135M", "out/", method="wanda", sparsity=0.5, calib="data.txt")``;
    every keyword is a :class:`PruneConfig` field. Raises :class:`OneshotError` on bad input, before
    the model is loaded wherever that is possible.

    ``model`` may also be a transformers model object: it is pruned in place on its own device (or
    ``device=``), layer by layer, and returned as ``result.model``. Give ``tokenizer`` for the
    calibration text, or ``calibration``: token ids shaped [windows, seqlen]. Streaming, ``resume``
    and torchrun do not apply to it (:mod:`oneshot.held`).

    ``evaluation``: measure the pruned model (and with ``eval_baseline`` the dense one) after it is
    written; the results go to ``report["eval"]``. ``plot``: also write ``report.png`` (needs ``out``).
    """
    held = model if isinstance(model, torch.nn.Module) else None
    if held is not None:
        from .held import held_name

        model = held_name(held)
    if config is None:
        if model is None:
            raise OneshotError("prune() needs a model (hub id, directory, .gguf file or model object) or a config")
        config = PruneConfig.from_options(model, out, **options)
    elif held is not None:
        config.model = model
    cfg = config.validate()
    started = time.perf_counter()
    if plot:
        if cfg.out is None:
            raise OneshotError("--plot writes report.png into the output: it needs --out")
        check_plotting()
    evaluator = Evaluator(evaluation, progress) if evaluation is not None else None  # text and tasks, up front
    dense = None
    if held is not None:
        from .held import prepare_held, prune_held_into

        if evaluator is not None and tokenizer is None:
            raise OneshotError("prune(model, evaluation=...): the evaluation needs tokenizer=")
        run = prepare_held(cfg, held, tokenizer, calibration, started, progress)
        if evaluator is not None and eval_baseline:  # the dense model is measured before it is pruned in place
            dense = evaluator(held, tokenizer, run.device)
    else:
        run = _prepare(cfg, started, progress)
    group = run.group
    if cfg.out is None or (group is not None and not group.is_writer):  # under torchrun rank 0 writes
        run.prune()
        report = run.finish(None)
    elif held is not None:
        report = prune_held_into(run, cfg, plot)
    else:
        report = _prune_into(run, cfg, plot)
    result = PruneResult(run.result_model(), run.tokenizer, report, report["out"])
    if group is not None:
        teardown_distributed(group)
        if not group.is_writer:
            return result
    if evaluator is not None:
        _evaluate(result, run, evaluator, evaluation, eval_baseline, dense)
    return result


def _prepare(cfg: PruneConfig, started: float, progress: bool) -> Run:
    """Everything that can fail fast, before any weight is read: the model's source, config and
    structure, the device and the process group, the load plan, the memory guard, the tokenizer and
    the calibration windows."""
    t = time.perf_counter()
    source = resolve_source(cfg.model)
    calib_kind = describe_source(cfg.calib)
    calib_text = None  # read first: a hub dataset that cannot be reached fails before anything else
    if calib_kind != "self":
        calib_text = read_calibration(cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.text_field)
        check_text("\n".join(calib_text.texts), cfg.calib)
    hf_config = load_config(source, cfg.trust_remote_code)
    limit = context_length(hf_config)
    if limit is not None and cfg.seqlen > limit:
        raise OneshotError(f"--seqlen {cfg.seqlen} is beyond the model's context of {limit} tokens")
    structure = inspect_structure(hf_config, cfg.nm, cfg.ignore, cfg.trust_remote_code)
    check_moe(cfg, structure, hf_config)
    if cfg.structure:
        from .structured import channel_alignment, check_request

        check_request(hf_config, cfg.structures, cfg.remove, cfg.trust_remote_code, channel_alignment(cfg))
    if source.kind == "local" and os.path.isdir(source.path):
        check_safetensors(source.path)
    group, device_name = setup_distributed(cfg.device)
    check_distributed(cfg, group)
    device = resolve_device(device_name)
    streaming, streaming_why = streaming_plan(cfg.load, source, cfg.out, calib_kind)
    streamed = None
    if streaming:
        checkpoint = local_checkpoint(source)
        try:
            streamed = StreamedModel(checkpoint, hf_config, cfg.dtype, cfg.trust_remote_code)
        except OneshotError as exc:  # a checkpoint that does not map onto the model tensor for tensor
            if cfg.load == "stream":
                raise
            streaming, streaming_why = False, str(exc).replace("; use --load full", "")
    memory = estimate_memory(cfg, hf_config, structure, gguf=source.kind == "gguf", streaming=streaming)
    if cfg.memory_check:
        check_memory(cfg, memory, device)
    if cfg.out is not None and (group is None or group.is_writer):  # the output, its journal (layers or activations)
        output = memory["parts"]["output"]
        check_out(cfg.out, output + (memory["parts"]["activations"] if streaming else output))
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    text = getattr(hf_config, "text_config", None) or hf_config
    hidden = int(getattr(text, "hidden_size", 0) or getattr(text, "n_embd", 0) or getattr(text, "d_model", 0) or 1)
    timing = estimate_time(structure, hidden, cfg.nsamples, cfg.seqlen, needs_hessians(cfg), device,
                           compute_dtype_for(storage_dtype(cfg, hf_config, source.kind == "gguf"), device),
                           group.world if group is not None else 1)
    if progress:  # before the first layer: how big the calibration is and how long this will take here
        print(announce(structure, cfg.method, cfg.constraint.describe(), device, cfg.nsamples, cfg.seqlen, timing),
              file=sys.stderr, flush=True)
    calibration: Calibration | None = None
    if calib_text is not None:
        calibration = tokenize_calibration(calib_text, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
    phases = {"prepare": time.perf_counter() - t}
    run = Run(cfg, source, structure, device, tokenizer, calibration, streamed, phases, started, progress)
    run.group = group
    if group is not None:
        run.report_extra["distributed"] = {"world_size": group.world, "rank_windows": [
            list(Group(r, group.world).windows(cfg.nsamples)) for r in range(group.world)],
            "backend": "nccl" if device.type == "cuda" else "gloo"}
    run.report_extra |= {
        "load": {"streaming": streaming, "why": streaming_why},
        "time_estimate": timing,
        "memory_estimate": {"host_bytes": memory["host_bytes"], "device_bytes": memory["device_bytes"],
                            **{f"{k}_bytes": v for k, v in memory["parts"].items()}},
    }
    return run


def _prune_into(run: Run, cfg: PruneConfig, plot: bool) -> dict:
    """Prune into the partial directory beside ``--out`` (journaled; resumed with ``--resume``) and
    rename it into place once complete; returns the report."""
    source = run.source
    fp = fingerprint(cfg, model_files(source.path, source.kind, source.gguf_file), str(run.device),
                     run.streamed is not None)
    partial = partial_dir(cfg.out)
    run.fp = fp
    with output_lock(cfg.out):
        done = _complete_output(cfg, fp, partial)
        if done is not None:
            return done
        return _journaled(run, cfg, plot, fp, partial)


def _complete_output(cfg: PruneConfig, fp: dict, partial: str) -> dict | None:
    """``--resume`` on an output a run with this configuration completed: its report, untouched (CI
    jobs can always pass ``--resume``); one made otherwise is refused, naming the difference."""
    report_path = os.path.join(cfg.out, REPORT)
    if not cfg.resume or cfg.overwrite or os.path.isdir(partial) or not os.path.isfile(report_path):
        return None
    try:
        with open(report_path, encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, ValueError):
        return None
    if "fingerprint" not in report:
        return None
    diff = differences(report["fingerprint"], fp)
    if diff:
        raise OneshotError(f"--resume: {os.path.abspath(cfg.out)} is complete and was made with a different "
                           f"configuration: {'; '.join(diff)}; pass --overwrite to replace it")
    report.setdefault("notes", []).append("--resume: the output was already complete; nothing was done")
    return report


def _journaled(run: Run, cfg: PruneConfig, plot: bool, fp: dict, partial: str) -> dict:
    """Prune into the partial directory (journaled; continued with ``--resume``), renamed into place."""
    with atomic_output_dir(cfg.out, cfg.overwrite, partial=partial, keep_if=Journal.finished_in,
                           fresh=not cfg.resume) as tmp:
        journal = Journal(tmp)
        if cfg.resume and Journal.finished_in(tmp):
            journal.open(fp)  # refuses a different configuration, before any weight is read
            run.resume_from(journal)
        else:
            if cfg.resume:  # say so: a CI job that passes --resume always must see that nothing was kept
                left = "held no finished layer" if os.listdir(tmp) else "was not found"
                run.notes.append(f"--resume: the partial run ({tmp}) {left}; started fresh")
                if run.progress:
                    print(f"oneshot: {run.notes[-1]}", file=sys.stderr, flush=True)
            for name in os.listdir(tmp):  # a journal with no finished layer: nothing worth keeping
                path = os.path.join(tmp, name)
                (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
            run.journal_new(journal, fp)
        run.prune(tmp)
        report = run.finish(tmp)
        if plot:
            plot_report(report, os.path.join(tmp, "report.png"))
    return report


def _evaluate(result: PruneResult, run: Run, evaluator: Evaluator, evaluation: EvalConfig, baseline: bool,
              dense: dict | None = None) -> None:
    """``report["eval"]``: the pruned model measured (and the dense one with ``baseline``); written into
    the output's report.json atomically (the output is complete already)."""
    cfg, report = run.cfg, result.report
    t = time.perf_counter()  # a streamed run's model is loaded from the output here (PruneResult.model)
    report["eval"] = {"config": evaluation.to_dict()}

    def keep(which: str):
        def save(partial: dict) -> None:  # the perplexity, saved before the zero-shot tasks can fail
            report["eval"][which] = partial
            if cfg.out is not None:
                _write_report(cfg.out, report)
        return save

    report["eval"]["pruned"] = evaluator(result.model, run.tokenizer, run.device, keep("pruned"))
    if dense is not None:  # a model object's, measured before it was pruned
        report["eval"]["dense"] = dense
        report["eval"]["delta"] = compare(report["eval"]["pruned"], dense)
    elif baseline:
        dense_model = load_model(run.source, cfg.dtype, cfg.trust_remote_code)
        report["eval"]["dense"] = evaluator(dense_model, run.tokenizer, run.device, keep("dense"))
        report["eval"]["delta"] = compare(report["eval"]["pruned"], report["eval"]["dense"])
        del dense_model
    report["phases_seconds"]["eval"] = round(time.perf_counter() - t, 3)
    if cfg.out is not None:
        _write_report(cfg.out, report)


def _write_report(out: str, report: dict) -> None:
    path = os.path.join(out, REPORT)
    write_json(path + ".tmp", report)
    os.replace(path + ".tmp", path)
