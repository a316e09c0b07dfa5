"""``prune(...)``: the one entry point the CLI and users call."""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time

import torch

from . import __version__
from .calibration import Calibration, describe_source, generate_calibration, load_calibration
from .config import EvalConfig, OneshotError, PruneConfig
from .evaluate import Evaluator
from .memory import check as check_memory
from .memory import estimate as estimate_memory
from .report import check_plotting
from .report import plot as plot_report
from .distributed import Group
from .distributed import check as check_distributed
from .distributed import setup as setup_distributed
from .distributed import teardown as teardown_distributed
from .engine import LayerIO, compute_dtype_for, prune_layers
from .journal import Journal, fingerprint, model_files
from .stream import ShardWriter, StreamedModel, StreamIO, layer_tensors, local_checkpoint, save_metadata, \
    streaming_plan, transposed_names
from .model_io import (
    atomic_output_dir,
    find_decoder_layers,
    partial_dir,
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
    names = ("blocksize", "dampening", "magnitude_scope", "sparsegpt_scope", "nm_select", "sparsegpt_order", "dsnot_init", "dsnot_cycles",
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
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    calibration: Calibration | None = None
    if calib_kind != "self":
        calibration = load_calibration(cfg.calib, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, cfg.text_field)
    phases["prepare"] = time.perf_counter() - t
    run = _Run(cfg, source, structure, device, tokenizer, calibration, streamed, phases, started, progress)
    run.group = group
    if group is not None:
        run.report_extra["distributed"] = {"world_size": group.world, "rank_windows": [
            list(Group(r, group.world).windows(cfg.nsamples)) for r in range(group.world)],
            "backend": "nccl" if device.type == "cuda" else "gloo"}
    run.report_extra |= {
        "load": {"streaming": streaming, "why": streaming_why},
        "memory_estimate": {"host_bytes": memory["host_bytes"], "device_bytes": memory["device_bytes"],
                            **{f"{k}_bytes": v for k, v in memory["parts"].items()}},
    }

    if cfg.out is None or (group is not None and not group.is_writer):  # under torchrun rank 0 writes
        run.prune()
        report = run.finish(None)
    else:
        fp = fingerprint(cfg, model_files(source.path, source.kind, source.gguf_file), str(device), streaming)
        partial = partial_dir(cfg.out)
        if not cfg.resume and os.path.isdir(partial):
            shutil.rmtree(partial)  # an earlier run's leftovers: this run starts over
        with atomic_output_dir(cfg.out, cfg.overwrite, partial=partial, keep_if=Journal.finished_in) as tmp:
            journal = Journal(tmp)
            if cfg.resume and Journal.finished_in(tmp):
                journal.open(fp)  # refuses a different configuration, before any weight is read
                run.resume_from(journal)
            else:
                for name in os.listdir(tmp):  # a journal with no finished layer: nothing worth keeping
                    path = os.path.join(tmp, name)
                    (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
                run.journal_new(journal, fp)
            run.prune(tmp)
            report = run.finish(tmp)
            if plot:
                plot_report(report, os.path.join(tmp, "report.png"))
    result = PruneResult(run.result_model(), tokenizer, report, report["out"])
    if group is not None:
        teardown_distributed(group)
        if not group.is_writer:
            return result
    if evaluator is not None:
        t = time.perf_counter()  # a streamed run's model is loaded from the output here (PruneResult.model)
        report["eval"] = {"config": evaluation.to_dict(), "pruned": evaluator(result.model, tokenizer, device)}
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
    return result


class _Run:
    """One pruning run after its inputs were checked: load, prune layer by layer (journaling each
    layer when there is an output), write, report."""

    def __init__(self, cfg, source, structure, device, tokenizer, calibration, streamed, phases, started, progress):
        self.progress = progress
        self.cfg, self.source, self.structure, self.device = cfg, source, structure, device
        self.tokenizer, self.calibration, self.streamed = tokenizer, calibration, streamed
        self.phases, self.started = phases, started
        self.journal: Journal | None = None
        self.group = None
        self.fp: dict | None = None
        self.resume: dict | None = None
        self.report_extra: dict = {}
        self.model = None
        self.writer = None
        self.shards: dict[int, dict] = {}
        self.layer_zeros: dict[int, int] = {}
        self.committed_at = time.monotonic()
        self.body: dict = {}

    # -- journal
    def journal_new(self, journal: Journal, fp: dict) -> None:
        self.journal, self.fp = journal, fp

    def resume_from(self, journal: Journal) -> None:
        self.journal = journal
        ids = journal.input_ids()
        if self.calibration is not None and not torch.equal(self.calibration.input_ids, ids):
            raise OneshotError("--resume: the calibration text gives other tokens than the partial run's; "
                               "rerun without --resume to start over")
        self.calibration = Calibration(ids, journal.state["calibration"])
        self.resume = journal.resume_state()
        self.shards = {int(k): v for k, v in journal.state.get("shards", {}).items()}
        self.layer_zeros = {int(k): v for k, v in journal.state.get("layer_zeros", {}).items()}

    # -- the run
    def _load(self) -> None:
        cfg = self.cfg
        t = time.perf_counter()
        if self.streamed is not None:
            self.model, self.io = self.streamed.model, StreamIO(self.streamed)
        else:
            self.model, self.io = load_model(self.source, cfg.dtype, cfg.trust_remote_code), LayerIO()
            if self.resume is not None:  # layers the partial run finished, as it wrote them
                path, layers = find_decoder_layers(self.model)
                for i in range(self.resume["finished"]):
                    prefix = f"{path}.{i}."
                    layers[i].load_state_dict({k[len(prefix):]: v for k, v in self.journal.layer(i).items()})
        self.phases["load"] = time.perf_counter() - t
        if self.calibration is None:
            t = time.perf_counter()
            self.calibration = generate_calibration(self.model.to(self.device), self.tokenizer, cfg.nsamples,
                                                    cfg.seqlen, cfg.seed, self.device)
            self.model.to("cpu")
            self.phases["generate_calibration"] = time.perf_counter() - t

    def prune(self, tmp: str | None = None) -> None:
        cfg = self.cfg
        self._load()
        self.layers_path, self.layers = find_decoder_layers(self.model)
        if self.journal is not None and self.resume is None:
            self.journal.start(self.fp, self.calibration.input_ids, self.calibration.info)
        if tmp is not None and self.streamed is not None:
            self.writer = ShardWriter(tmp, cfg.format, self.structure["num_layers"], self.model)
        torch.manual_seed(cfg.seed)
        input_ids, first, sequential = self.calibration.input_ids, 0, cfg.sequential_mode
        if self.group is not None:  # this rank's windows; statistics of the dense layer, summed over ranks
            first, stop = self.group.windows(input_ids.shape[0])
            input_ids, sequential = input_ids[first:stop], "layer"
        self.meta = {"method": cfg.method, "pattern": cfg.constraint.describe(),
                     "target_sparsity": cfg.constraint.sparsity, "versions": _versions()}
        self.body = prune_layers(
            self.model,
            input_ids,
            cfg.method,
            cfg.constraint,
            solver_options(cfg),
            device=self.device,
            ignore=cfg.ignore,
            batch_size=cfg.batch_size,
            sequential=sequential,
            progress=self.progress,
            allocation={"kind": "owl", "m": cfg.owl_m, "lambda": cfg.owl_lambda} if cfg.allocation == "owl" else None,
            heldout=cfg.heldout_windows,
            block={"epochs": cfg.block_epochs, "lr": cfg.block_lr, "batch_windows": cfg.block_batch,
                   "target": cfg.block_target, "seed": cfg.seed} if cfg.update == "block" else None,
            io=self.io,
            compute_dtype=compute_dtype_for(self.model.dtype, self.device),
            resume=self.resume,
            on_layer=self._layer_done,
            group=self.group,
            first_window=first,
            offload_activations=cfg.offload_activations,
        )

    def _sidecar(self, reports: list[dict], transposed: set[str]) -> dict:
        return sparsity_metadata({**self.meta, "linears": reports}, transposed)

    def _layer_done(self, i: int, layer, state: dict) -> None:
        """Layer ``i`` is pruned: count its zeros, write its shard (streaming), journal it."""
        prefix = f"{self.layers_path}.{i}"
        self.layer_zeros[i] = sum(int(p.numel() - torch.count_nonzero(p)) for p in layer.parameters())
        if self.journal is None:
            return
        if self.writer is not None:
            transposed = transposed_names(layer, prefix, self.cfg.ignore)
            self.shards[i] = self.writer.write(i, layer_tensors(layer, prefix),
                                               self._sidecar(state["reports"], transposed), state["permutations"])
        # commit at most every --journal-interval seconds (and after the last layer): a resumed run
        # redoes the layers after the last commit, so it still writes the same bytes
        last = i == self.structure["num_layers"] - 1
        if not last and time.monotonic() - self.committed_at < self.cfg.journal_interval:
            return
        layers = None
        if self.writer is None:  # in memory: every layer finished since the last commit
            done = self.journal.state.get("finished", 0)
            layers = {j: layer_tensors(self.layers[j], f"{self.layers_path}.{j}") for j in range(done, i + 1)}
        self.journal.commit(i, state, {"shards": self.shards, "layer_zeros": self.layer_zeros}, layers=layers)
        self.committed_at = time.monotonic()

    def finish(self, tmp: str | None) -> dict:
        cfg, body = self.cfg, dict(self.body)
        permutations = body.pop("permutations")
        self.phases.update(body.pop("phases_seconds"))
        if getattr(self.io, "seconds", None):
            self.phases["read_checkpoint"] = round(self.io.seconds, 3)
        total = sum(e["shape"][0] * e["shape"][1] for e in body["linears"])
        zeros = sum(e["zeros"] for e in body["linears"])
        t = time.perf_counter()
        rest = self.streamed.output_rest() if self.streamed is not None else self._rest_parameters()
        rest_zeros = sum(int(v.numel() - torch.count_nonzero(v)) for v in rest.values() if v.is_floating_point())
        parameters = int(self.structure.get("parameters", 0))
        report = {
            "model": cfg.model,
            "source": self.source.kind,
            "architecture": self.structure["architecture"],
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "method": cfg.method,
            "pattern": cfg.constraint.describe(),
            "target_sparsity": cfg.constraint.sparsity,
            "sparsity": zeros / total if total else 0.0,
            "pruned_parameters": total,
            "total_parameters": parameters,
            "nonzero_parameters": parameters - sum(self.layer_zeros.values()) - rest_zeros,
            "mean_relative_error": sum(e["relative_error"] for e in body["linears"]) / max(len(body["linears"]), 1),
            "calibration": self.calibration.info,
            **self.report_extra,
            "device": str(self.device),
            "config": cfg.to_dict(),
            **body,
            "phases_seconds": {k: round(v, 3) for k, v in self.phases.items()},
            "versions": _versions(),
            "argv": list(sys.argv),  # the command line of the process that pruned (the CLI's, or the caller's script)
        }
        if tmp is None:
            report["seconds"] = round(time.perf_counter() - self.started, 3)
            report["out"] = None
            return report
        transposed = {name for name, module in self.model.named_modules() if is_linear(module)
                      and stores_transposed(module)}
        sidecar = sparsity_metadata(report, transposed)
        if self.writer is not None:
            self.shards[self.structure["num_layers"]] = self.writer.write(self.structure["num_layers"], rest, sidecar,
                                                                          permutations)
            report["storage"] = self.writer.finish(self.shards)
            sidecar["format"] = cfg.format
            save_metadata(self.streamed, self.streamed.directory, self.tokenizer, tmp)
        else:
            save_model(self.model, self.tokenizer, tmp)
        self.journal.remove()
        write_json(os.path.join(tmp, SIDECAR), sidecar)
        if permutations:
            from safetensors.torch import save_file

            save_file(permutations, os.path.join(tmp, PERMUTATIONS))
        if self.writer is None:
            report["storage"] = describe_storage(tmp) if cfg.format == "dense" else rewrite(tmp, cfg.format)
        report["phases_seconds"]["save"] = round(time.perf_counter() - t, 3)
        report["seconds"] = round(time.perf_counter() - self.started, 3)
        report["out"] = os.path.abspath(cfg.out)
        write_json(os.path.join(tmp, REPORT), report)
        return report

    def _rest_parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters outside its decoder layers (tied ones once)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if not n.startswith(f"{self.layers_path}.")}

    def result_model(self):
        return None if self.streamed is not None else self.model
