"""The resume journal: what a run killed at any point needs to go on from its last finished layer.

It lives in the output's temporary directory (``.NAME.oneshot-partial`` beside ``--out``), under
``.oneshot-journal/``, and goes away when the output is renamed into place:

- ``state.json``: the run's fingerprint (every option that changes the result, the model's weight
  files), the calibration's description, layers finished, the report so far. Written last, by
  rename, for every layer: it is the commit point.
- ``calibration.safetensors``: the calibration token ids (a resumed run checks it tokenized the same).
- ``hidden-NNNNN.safetensors``: the activations entering layer NNNNN (and the dense stream of
  ``--update block``), bit for bit; the one before is deleted once the state names the new one.
- ``solver-NNNNN.safetensors``: with ``--update block``, layer NNNNN as the solver left it, before its
  refit (:mod:`oneshot.engine.guard`: restored when the refit made the whole model worse); the
  held-out windows through those weights are in the ``hidden`` file as ``solver.K``.
- ``layer-NNNNN.safetensors``: a pruned layer's tensors when the model is in memory (streaming runs
  write the output shard itself) and ``permutations.safetensors`` for ``--ria-permute``.

A layer that was being pruned when the run died is simply done again, so ``--resume`` produces the
same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os

import torch

from .config import PruneConfig
from .errors import OneshotError
from .version import __version__

JOURNAL = ".oneshot-journal"
STATE = "state.json"
# options that change where or whether the result is written, not what it is
_NOT_FINGERPRINTED = ("out", "overwrite", "memory_check", "resume", "load", "offload_activations",
                      "journal_interval")


def fingerprint(cfg: PruneConfig, model_files: dict[str, int], device: str, streaming: bool) -> dict:
    """What a resumed run must share with the partial (or complete) one: every option that changes
    the output, by its effective value (``--sparsity 0.5`` whether given or the default)."""
    options = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_FINGERPRINTED}
    options["sparsity"] = cfg.constraint.sparsity
    return {"options": options, "model_files": model_files, "device": device, "streaming": streaming,
            "oneshot": __version__}


def model_files(path: str, kind: str, gguf_file: str | None = None) -> dict[str, int]:
    """Name -> size of the weight files a run reads (what identifies the checkpoint on disk)."""
    if kind == "gguf":
        return {gguf_file: os.path.getsize(os.path.join(path, gguf_file))}
    if not os.path.isdir(path):
        return {}
    return {n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))
            if n.endswith((".safetensors", ".bin", ".gguf"))}


def differences(old: dict, new: dict) -> list[str]:
    new = json.loads(json.dumps(new))  # compare as stored (tuples become lists)
    out = []
    before, now = old.get("options", {}), new.get("options", {})
    for key in sorted(set(before) | set(now)):
        if before.get(key) != now.get(key):
            out.append(f"--{key.replace('_', '-')} ({before.get(key)!r} then, {now.get(key)!r} now)")
    for key in sorted((set(old) | set(new)) - {"options"}):
        if old.get(key) != new.get(key):
            out.append(f"{key.replace('_', ' ')} ({old.get(key)!r} then, {new.get(key)!r} now)")
    return out


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def _load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


class Journal:
    def __init__(self, directory: str):
        self.dir = os.path.join(directory, JOURNAL)
        self.state: dict | None = None

    @staticmethod
    def finished_in(directory: str) -> int:
        """Layers a partial run in ``directory`` finished (0 when none or no journal)."""
        try:
            with open(os.path.join(directory, JOURNAL, STATE), encoding="utf-8") as fh:
                return int(json.load(fh).get("finished", 0))
        except (OSError, ValueError):
            return 0

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def start(self, fp: dict, input_ids: torch.Tensor, calibration_info: dict) -> None:
        os.makedirs(self.dir, exist_ok=True)
        _save({"input_ids": input_ids}, self.path("calibration.safetensors"))
        self.state = {"version": 1, "fingerprint": fp, "calibration": calibration_info, "finished": 0}
        self._write_state()

    def open(self, fp: dict) -> dict:
        """The saved state of an earlier run with this fingerprint; refuses one that differs."""
        with open(self.path(STATE), encoding="utf-8") as fh:
            state = json.load(fh)
        diff = differences(state["fingerprint"], fp)
        if diff:
            raise OneshotError(f"--resume: the partial run in {os.path.dirname(self.dir)} was made with a different "
                               f"configuration: {'; '.join(diff)}; rerun without --resume to start over")
        self.state = state
        return state

    def input_ids(self) -> torch.Tensor:
        return _load(self.path("calibration.safetensors"))["input_ids"]

    def resume_state(self) -> dict:
        """The engine's ``resume`` argument: activations and report so far."""
        st = self.state
        tensors = _load(self.path(st["hidden"]))
        nb = sum(1 for k in tensors if k.startswith("hidden."))
        dense = [tensors[f"dense.{b}"] for b in range(nb)] if "dense.0" in tensors else None
        solver = [tensors[f"solver.{k}"] for k in range(sum(1 for t in tensors if t.startswith("solver.")))] or None
        perms_path = self.path("permutations.safetensors")
        perms = _load(perms_path) if os.path.isfile(perms_path) else {}
        return {"finished": st["finished"], "hidden": [tensors[f"hidden.{b}"] for b in range(nb)],
                "dense_stream": dense, "solver_stream": solver,
                "reports": st["reports"], "notes": st["notes"], "passes": st["passes"],
                "blocks": st["blocks"], "permutations": perms, "allocation": st.get("allocation"),
                "followers": st.get("followers", {}), "experts_removed": st.get("experts_removed", []),
                "structured": st.get("structured")}

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        return _load(self.path(f"layer-{i:05d}.safetensors"))

    def commit(self, i: int, state: dict, extra: dict, layers: dict[int, dict[str,
                                                                              torch.Tensor]] | None = None) -> None:
        """Layers up to ``i`` are done: the tensors of those since the last commit (in-memory runs),
        the activations after layer ``i``, then the state."""
        for j, tensors in (layers or {}).items():
            _save(tensors, self.path(f"layer-{j:05d}.safetensors"))
        hidden = {f"hidden.{b}": h for b, h in enumerate(state["hidden"])}
        if state.get("dense_stream") is not None:
            hidden.update({f"dense.{b}": h for b, h in enumerate(state["dense_stream"])})
        if state.get("solver_stream") is not None:
            hidden.update({f"solver.{k}": h for k, h in enumerate(state["solver_stream"])})
        name = f"hidden-{i + 1:05d}.safetensors"
        _save(hidden, self.path(name))
        if state["permutations"]:
            _save(state["permutations"], self.path("permutations.safetensors"))
        previous = self.state.get("hidden")
        self.state.update({"finished": state["finished"], "hidden": name, "reports": state["reports"],
                           "notes": state["notes"], "passes": state["passes"], "blocks": state["blocks"],
                           "allocation": state["allocation"], "followers": state.get("followers", {}),
                           "experts_removed": state.get("experts_removed", []),
                           "structured": state.get("structured"), **extra})
        self._write_state()
        if previous and previous != name and os.path.exists(self.path(previous)):
            os.remove(self.path(previous))

    def _write_state(self) -> None:
        tmp = self.path(STATE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.state, fh)
        os.replace(tmp, self.path(STATE))

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)
