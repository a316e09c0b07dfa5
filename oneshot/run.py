"""One pruning run after its inputs were checked: load, prune layer by layer (journaling each layer
when there is an output), write the checkpoint and the report."""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from .calibration import Calibration, generate_calibration
from .config import PruneConfig
from .coverage import coverage, experts_summary
from .engine import LayerIO, prune_layers
from .engine.layerio import HeldIO
from .engine.moe import replay_removals
from .errors import OneshotError
from .formats.ondisk import on_disk
from .formats.store import PERMUTATIONS, REPORT, SIDECAR, describe_storage, read_raw, rewrite, seal
from .journal import Journal
from .model.source import load_model
from .model.structure import find_decoder_layers, is_linear, stores_transposed
from .output import save_model, write_json
from .runtime import compute_dtype_for
from .stream import ShardWriter, StreamIO, layer_tensors, save_metadata, transposed_names
from .version import __version__


def versions() -> dict:
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
                            **({"tensor": entry["tensor"], "expert": entry["expert"], "in_features": entry["shape"][1]}
                               if "expert" in entry else {}),
                            **({"transposed": True} if entry["name"] in transposed or entry.get("transposed") else {}),
                            **({"input_permutation": PERMUTATIONS} if entry.get("permuted") else {})}
            for entry in report["linears"]
        },
    }


def source_bytes(source) -> int | None:
    """Bytes of the source checkpoint's weight files (safetensors, or the GGUF file), None if not local."""
    path = getattr(source, "path", None)
    if path and getattr(source, "gguf_file", None):
        path = os.path.join(path, source.gguf_file)
    if path and os.path.isfile(path):
        return os.path.getsize(path)
    if path and os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin", ".gguf"))]
        return sum(os.path.getsize(os.path.join(path, f)) for f in files) or None
    return None


def solver_options(cfg: PruneConfig) -> dict:
    """What the solvers and the per-linear update read from the config."""
    names = ("blocksize", "dampening", "magnitude_scope", "sparsegpt_scope", "nm_select", "sparsegpt_order",
             "dsnot_init", "dsnot_cycles",
             "dsnot_threshold", "dsnot_power", "ria_alpha", "ria_permute", "update")
    return {name: getattr(cfg, name) for name in names}


class Run:
    """One pruning run after its inputs were checked: load, prune layer by layer (journaling each
    layer when there is an output), write, report."""

    def __init__(self, cfg, source, structure, device, tokenizer, calibration, streamed, phases, started, progress):
        """``source``: the model's :class:`~oneshot.model.source.ModelSource`; ``structure``: what
        :func:`~oneshot.model.structure.inspect_structure` found; ``calibration`` (None for ``--calib
        self``, generated once the model is loaded); ``streamed``: a :class:`~oneshot.stream.StreamedModel`
        to stream from, or None to load the whole model; ``phases``: seconds so far, by phase."""
        self.progress = progress
        self.cfg, self.source, self.structure, self.device = cfg, source, structure, device
        self.tokenizer, self.calibration, self.streamed = tokenizer, calibration, streamed
        self.phases, self.started = phases, started
        self.journal: Journal | None = None
        self.group = None
        self.fp: dict | None = None
        self.resume: dict | None = None
        self.report_extra: dict = {}
        self.notes: list[str] = []  # the run's own notes, before the engine's
        self.model = None
        self.writer = None
        self.shards: dict[int, dict] = {}
        self.layer_zeros: dict[int, int] = {}
        self.committed_at = time.monotonic()
        self.body: dict = {}
        self.structured: dict | None = None
        self.remover = None  # --structure: the engine removes a layer's units as it goes
        self.held, self.home = None, None  # prune(model): the caller's model object and its device

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
        elif self.held is not None:
            self.model, self.io = self.held, HeldIO(self.home)
        else:
            self.model, self.io = load_model(self.source, cfg.dtype, cfg.trust_remote_code), LayerIO()
        if self.resume is not None:  # experts the partial run removed: the finished layers' shapes
            replay_removals(self.model, self.resume.get("experts_removed") or [])
        if not cfg.structure:  # with --structure, once the journaled removal has given them their shapes
            self._load_finished()
        self.phases["load"] = time.perf_counter() - t
        if self.calibration is None:
            t = time.perf_counter()
            self.calibration = generate_calibration(self.model.to(self.device), self.tokenizer, cfg.nsamples,
                                                    cfg.seqlen, cfg.seed, self.device)
            self.model.to(self.home or "cpu")
            self.phases["generate_calibration"] = time.perf_counter() - t

    def _load_finished(self) -> None:
        """Layers the partial run finished, as it wrote them (in-memory runs; streamed ones read shards).
        With ``--structure``, each is first cut to the shapes the journal says it was cut to; the blocks
        it removed have no tensors."""
        if self.streamed is None and self.resume is not None:
            path, layers = find_decoder_layers(self.model)
            for i in range(self.resume["finished"]):
                if self.remover is not None and not self.remover.replay(i, layers[i]):
                    continue
                prefix = f"{path}.{i}."
                layers[i].load_state_dict({k[len(prefix):]: v for k, v in self.journal.layer(i).items()})

    def prune(self, tmp: str | None = None) -> None:
        cfg = self.cfg
        self._load()
        if cfg.structure:
            self._remover()
            self._load_finished()
        self.layers_path, self.layers = find_decoder_layers(self.model)
        if self.journal is not None and self.resume is None:
            self.journal.start(self.fp, self.calibration.input_ids, self.calibration.info)
        if tmp is not None and self.streamed is not None:
            kept = self.structure["num_layers"] - (len(self.remover.drop) if self.remover is not None else 0)
            self.writer = ShardWriter(tmp, cfg.format, kept, self.model)
        torch.manual_seed(cfg.seed)
        sequential = cfg.mode_for(self.structure.get("moe") is not None)
        input_ids, first = self.calibration.input_ids, 0
        if self.group is not None:  # this rank's windows; statistics of the dense layer, summed over ranks
            first, stop = self.group.windows(input_ids.shape[0])
            input_ids, sequential = input_ids[first:stop], "layer"
        self.meta = {"method": cfg.method, "pattern": cfg.constraint.describe(),
                     "target_sparsity": cfg.constraint.sparsity, "versions": versions()}
        self.body = prune_layers(
            self.model,
            input_ids,
            cfg.method if cfg.unstructured or not cfg.structure else None,
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
                   "target": cfg.block_target, "seed": cfg.seed, "loss": cfg.block_loss,
                   "learn_masks": cfg.learn_masks}
            if cfg.update == "block" else None,
            io=self.io,
            compute_dtype=compute_dtype_for(self.model.dtype, self.device),
            resume=self.resume,
            on_layer=self._layer_done,
            group=self.group,
            first_window=first,
            offload_activations=cfg.offload_activations,
            moe={"calibrate": cfg.moe_calibrate, "remove": cfg.remove_experts, "score": cfg.expert_score},
            structure=self.remover,
            scratch=self.journal.dir if self.journal is not None else None,
            on_restore=self._layer_restored,
        )
        if self.remover is not None:
            self._removed()

    def _remover(self) -> None:
        """``--structure``: the blocks to drop chosen now (Block Influence on the dense model, a pass that
        reads every layer once when streaming; a resumed run takes them, and what went from each finished
        layer, from the journal); the engine's layer loop then cuts each layer's heads and channels before
        it prunes (``--pattern``/``--sparsity``) and writes it."""
        from .structured import Remover, channel_alignment
        from .structured.run import batches_of

        cfg = self.cfg
        t = time.perf_counter()
        self.remover = Remover(self.model, cfg.structures, cfg.remove, channel_alignment(cfg), cfg.dampening,
                               cfg.trust_remote_code, self.group)
        if self.resume is not None and self.resume.get("structured"):
            self.remover.restore(self.resume["structured"])
        else:
            input_ids = self.calibration.input_ids
            if self.group is not None:
                input_ids = input_ids[slice(*self.group.windows(input_ids.shape[0]))]
            _, layers = find_decoder_layers(self.model)
            self.remover.choose_blocks(self.model, layers, batches_of(input_ids, cfg.batch_size), self.device,
                                       compute_dtype_for(self.model.dtype, self.device), self.io)
        self.phases["block_influence"] = time.perf_counter() - t

    def _removed(self) -> None:
        """After a ``--structure`` run: the dropped blocks out of the model (or skeleton) and its config's
        sizes as the written layers are."""
        from .model.structure import inspect_structure

        cfg = self.cfg
        before = int(self.structure.get("parameters", 0))
        self.structured = self.remover.finish(self.model)
        self.structure = inspect_structure(self.model.config, cfg.nm, cfg.ignore, cfg.trust_remote_code)
        self.structured["parameters_before"] = before
        self.structured["parameters_after"] = int(self.structure["parameters"])
        self.layers_path, self.layers = find_decoder_layers(self.model)
        self.body["num_layers"] = len(self.layers)

    def _sidecar(self, reports: list[dict], transposed: set[str]) -> dict:
        return sparsity_metadata({**self.meta, "linears": reports}, transposed)

    def _layer_done(self, i: int, layer, state: dict) -> None:
        """Layer ``i`` is pruned: count its zeros, write its shard (streaming), journal it. ``layer``
        None: a block ``--structure`` removed (nothing to write; numbers after it move down)."""
        j = self.remover.new_index(i) if layer is not None and self.remover is not None else i  # its output number
        if layer is not None:
            self.layer_zeros[j] = sum(int(p.numel() - torch.count_nonzero(p)) for p in layer.parameters())
        if self.journal is None:
            return
        if self.writer is not None and layer is not None:
            self._write_shard(j, layer, state)
        # commit at most every --journal-interval seconds (and after the last layer): a resumed run
        # redoes the layers after the last commit, so it still writes the same bytes
        last = i == self.structure["num_layers"] - 1
        if not last and time.monotonic() - self.committed_at < self.cfg.journal_interval:
            return
        layers = None
        if self.writer is None:  # in memory: every layer finished since the last commit
            done = self.journal.state.get("finished", 0)
            dropped = self.remover.drop if self.remover is not None else ()
            layers = {k: layer_tensors(self.layers[k], f"{self.layers_path}.{k}") for k in range(done, i + 1)
                      if k not in dropped}  # numbered as the model in memory is until the end
        self.journal.commit(i, state, {"shards": self.shards, "layer_zeros": self.layer_zeros}, layers=layers)
        self.committed_at = time.monotonic()

    def _write_shard(self, j: int, layer, state: dict) -> None:
        prefix = f"{self.layers_path}.{j}"
        transposed = transposed_names(layer, prefix, self.cfg.ignore)
        self.shards[j] = self.writer.write(j, layer_tensors(layer, prefix), self._sidecar(state["reports"], transposed),
                                           state["permutations"])

    def _layer_restored(self, i: int, layer, state: dict) -> None:
        """The block refit made the model worse: layer ``i`` has its solver weights back (a streamed
        run writes its shard again; in memory, the model is written at the end)."""
        j = self.remover.new_index(i) if self.remover is not None else i
        self.layer_zeros[j] = sum(int(p.numel() - torch.count_nonzero(p)) for p in layer.parameters())
        if self.writer is not None:
            self._write_shard(j, layer, state)

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
        removed = body.get("experts_removed", [])
        before = int(self.structure.get("parameters", 0))
        parameters = before - sum(r["removed_parameters"] for r in removed)
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
            "coverage": coverage(self.structure, body["linears"], removed),
            "calibration": self.calibration.info,
            **self.report_extra,
            "device": str(self.device),
            "config": cfg.to_dict(),
            **body,
            "phases_seconds": {k: round(v, 3) for k, v in self.phases.items()},
            "versions": versions(),
            "argv": list(sys.argv),  # the command line of the process that pruned (the CLI's, or the caller's script)
        }
        report["notes"] = self.notes + report["notes"]
        if self.calibration.info.get("note"):  # another calibration source stood in for the one asked for
            report["notes"] = [self.calibration.info["note"]] + report["notes"]
        if self.structured is not None:
            report["structured"] = self.structured
            self.structured["weight_bytes_before"] = source_bytes(self.source)
            if not cfg.unstructured:  # heads, channels, blocks removed and nothing else
                report.update(method="structured", pattern="none", target_sparsity=0.0)
        if tmp is None:
            if removed:
                report["experts"] = experts_summary(removed, before, parameters, source_bytes(self.source), None)
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
            sidecar["layers"] = {k: v for shard in self.shards.values() for k, v in shard.get("layers", {}).items()}
            save_metadata(self.streamed, self.streamed.directory, self.tokenizer, tmp)
        else:
            save_model(self.model, self.tokenizer, tmp)
            sidecar["layers"] = on_disk(sidecar["layers"], read_raw(tmp, "dense"), self.model)  # as written
        if self.journal is not None:
            self.journal.remove()
        write_json(os.path.join(tmp, SIDECAR), sidecar)
        if permutations:
            from safetensors.torch import save_file

            save_file(permutations, os.path.join(tmp, PERMUTATIONS))
        if self.writer is None:
            report["storage"] = describe_storage(tmp) if cfg.format == "dense" else rewrite(tmp, cfg.format)
        if self.structured is not None:
            self.structured["weight_bytes_after"] = report["storage"]["weight_file_bytes"]
        report["run_id"] = seal(tmp, {s["file"]: s["sha256"] for s in self.shards.values() if "sha256" in s})
        if removed:
            report["experts"] = experts_summary(removed, before, parameters, source_bytes(self.source),
                                                report["storage"]["weight_file_bytes"])
        report["phases_seconds"]["save"] = round(time.perf_counter() - t, 3)
        report["seconds"] = round(time.perf_counter() - self.started, 3)
        report["out"] = os.path.abspath(cfg.out)
        if self.fp is not None:
            report["fingerprint"] = self.fp  # what a later --resume on the complete output compares
        write_json(os.path.join(tmp, REPORT), report)
        return report

    def _rest_parameters(self) -> dict[str, torch.Tensor]:
        """The model's parameters outside its decoder layers (tied ones once)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if not n.startswith(f"{self.layers_path}.")}

    def result_model(self):
        return None if self.streamed is not None else self.model
