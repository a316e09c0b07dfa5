"""A run's state after each finished layer: what the report holds so far, and what a resumed run
needs to go on from the next layer (the journal stores it, :mod:`oneshot.journal`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RunState:
    finished: int = 0  # layers done
    hidden: list[torch.Tensor] = field(default_factory=list)  # activations entering layer `finished`, per batch
    dense_stream: list[torch.Tensor] | None = None  # --block-target model: the dense model's, per batch
    reports: list[dict] = field(default_factory=list)  # one entry per pruned linear
    notes: list[str] = field(default_factory=list)
    passes: list[int] = field(default_factory=list)  # forward passes each layer took
    blocks: list[dict] = field(default_factory=list)  # --update block, per layer
    permutations: dict[str, torch.Tensor] = field(default_factory=dict)  # --ria-permute
    allocation: dict | None = None  # --allocation owl: densities and per-layer sparsities
    followers: dict[str, list[str]] = field(default_factory=dict)  # joint-solve hint for the next layer
    experts_removed: list[dict] = field(default_factory=list)  # --remove-experts, per experts module
    structured: dict | None = None  # --structure: what went so far (Remover.state())
    solver_stream: list[torch.Tensor] | None = None  # --update block: held-out windows through the solver's weights

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, state: dict) -> RunState:
        known = {k: state[k] for k in cls.__dataclass_fields__ if k in state}
        known["followers"] = known.get("followers") or {}
        return cls(**known)



