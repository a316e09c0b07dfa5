"""Structured pruning: remove MLP channels and attention heads with the OBS rule applied to whole groups
of columns, and whole decoder blocks.

A channel of a gated MLP is a row of ``gate_proj`` and ``up_proj`` and the matching column of
``down_proj``; a head is ``head_dim`` rows of ``q_proj`` and the matching columns of ``o_proj`` (with
its key/value rows when the attention has one key/value head per query head). Which groups go is
decided on the consuming linear (``down_proj``, ``o_proj``) from its input Hessian ``H = X Xᵀ``: removing
the set ``S`` of columns and updating the rest optimally (least squares on the calibration inputs)
costs ``tr(W_S [H⁻¹]_SS⁻¹ W_Sᵀ)`` and changes the kept columns by ``−W_S [H⁻¹]_SS⁻¹ [H⁻¹]_S:`` — the
group form of the optimal brain surgeon that SparseGPT applies to single weights (ZipLM, SlimGPT).
Groups are removed greedily, the cheapest first, a few at a time, with ``H⁻¹`` and ``W`` updated
after each step, so every choice sees the compensation of the ones before it.
"""

from .obs import GroupRemoval, group_errors, inverse_hessian, remove_groups
from .plan import STRUCTURES, channel_alignment, check_request, parse_structures
from .run import Remover, block_influence

__all__ = ["STRUCTURES", "GroupRemoval", "Remover", "block_influence", "channel_alignment", "check_request",
           "group_errors", "inverse_hessian", "parse_structures", "remove_groups"]
