"""Each pruned linear's relative output error ‖x(W−Ŵ)ᵀ‖²/‖xWᵀ‖², on the inputs that reach it after it
was pruned: measured by a forward hook on the first ``error_tokens`` calibration tokens, or, when the
solve's own Hessian holds exactly those inputs (``--sequential linear``), over every token as
tr(ΔHΔᵀ) wherever that is cheaper."""

from __future__ import annotations

import time

import torch

from ..model.structure import get_weight


def trace(w: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Σ‖x wᵀ‖² over the tokens summed in ``hessian`` = tr(w H wᵀ)."""
    w = w.to(torch.float32)
    return ((w @ hessian) * w).sum(dtype=torch.float64)


class ErrorMeter:
    """Σ‖xΔᵀ‖², Σ‖xWᵀ‖² and tokens per linear (fp64 on the compute device: no host round trip per batch)."""

    def __init__(self, names, device, error_tokens: int):
        self.error_tokens = error_tokens
        self.acc = {name: [torch.zeros((), dtype=torch.float64, device=device),
                           torch.zeros((), dtype=torch.float64, device=device), 0] for name in names}
        self.deltas: dict[str, torch.Tensor] = {}  # the change of each linear still to measure
        self.seconds = 0.0  # host time in the hooks (the profile's "error_measure")

    def record(self, name: str, delta: torch.Tensor, module, hessian: torch.Tensor | None, tokens: int,
               store_dtype: torch.dtype) -> None:
        """``delta`` = dense − written (fp32) of a just-pruned linear: its error from ``hessian`` (the
        exact inputs it will see, over ``tokens`` tokens) when that is cheaper than measuring it on
        ``error_tokens`` tokens (input width below that), else kept in ``store_dtype`` to measure."""
        if hessian is not None and delta.shape[1] < min(self.error_tokens, tokens):
            self.acc[name] = [trace(delta, hessian), trace(get_weight(module) + delta, hessian), tokens]
        else:
            self.deltas[name] = delta.to(store_dtype)

    def expect(self, name: str, delta: torch.Tensor) -> None:
        """Measure ``name`` with this change (after the weights changed again: block update, broadcast)."""
        self.deltas[name] = delta

    def measure(self, name: str, module, x: torch.Tensor, output: torch.Tensor) -> None:
        acc = self.acc[name]
        if name not in self.deltas:  # not solved, or measured
            return
        t = time.perf_counter()
        x = x.reshape(-1, x.shape[-1])[: self.error_tokens - acc[2]].to(torch.float32)
        y = output.reshape(-1, output.shape[-1])[: x.shape[0]].to(torch.float32)
        bias = getattr(module, "bias", None)
        if bias is not None:
            y = y - bias.to(torch.float32)
        e = x @ self.deltas[name].t().to(torch.float32)
        acc[0] += (e * e).sum(dtype=torch.float64)
        acc[1] += ((y + e) ** 2).sum(dtype=torch.float64)
        acc[2] += x.shape[0]
        if acc[2] >= self.error_tokens:
            del self.deltas[name]
        self.seconds += time.perf_counter() - t

    def results(self, group=None) -> dict[str, tuple[float, int]]:
        """name -> (relative error, tokens); with a torch.distributed group, each rank measured its
        share of the same first tokens and the sums are reduced first."""
        if group is not None:
            for name, (err, ref, tokens) in self.acc.items():
                acc = torch.stack([err, ref, torch.tensor(float(tokens), dtype=torch.float64, device=err.device)])
                group.all_reduce(acc)
                self.acc[name] = [acc[0], acc[1], int(acc[2])]
        out = {}
        for name, (err, ref, tokens) in self.acc.items():
            err, ref = float(err), float(ref)
            out[name] = (err / ref if ref > 0 else 0.0, tokens)
        return out
