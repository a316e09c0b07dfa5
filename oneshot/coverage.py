"""What share of a model was pruned, what stayed dense and why, and what expert removal took away:
the report's ``coverage`` and ``experts`` sections and their lines in the summary."""

from __future__ import annotations

from collections import Counter


def coverage(structure: dict, entries: list[dict], removed: list[dict]) -> dict:
    """``structure``: what the meta skeleton showed (:func:`~oneshot.model.structure.inspect_structure`);
    ``entries``: the pruned matrices; ``removed``: ``--remove-experts`` entries (their parameters no
    longer count)."""
    info = structure.get("coverage") or {}
    pruned = sum(e["shape"][0] * e["shape"][1] for e in entries)
    gone = sum(r["removed_matrix_parameters"] for r in removed)
    block = max(int(info.get("block_matrix_parameters", 0)) - gone, 0)
    prunable = max(int(info.get("prunable_parameters", 0)) - sum(r["removed_expert_parameters"] for r in removed), 0)
    dense = info.get("dense", [])
    return {
        "pruned_parameters": pruned,
        "block_matrix_parameters": block,
        "share_of_block_matrices": pruned / block if block else 0.0,
        "share_of_prunable": pruned / prunable if prunable else 0.0,
        "kept_dense": dense,
        "kept_dense_by_reason": dict(Counter(d["reason"] for d in dense)),
    }


def experts_summary(removed: list[dict], before: int, after: int, bytes_before: int | None,
                    bytes_after: int | None) -> dict:
    return {
        "layers": len(removed),
        "experts_before": sorted({r["experts_before"] for r in removed}),
        "experts_after": sorted({r["experts_after"] for r in removed}),
        "score": removed[0]["score"] if removed else None,
        "parameters_before": before,
        "parameters_after": after,
        "weight_bytes_before": bytes_before,
        "weight_bytes_after": bytes_after,
    }


def summary_lines(report: dict) -> list[str]:
    lines = []
    cov = report.get("coverage")
    if cov:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(cov["kept_dense_by_reason"].items()))
        lines.append(f"  coverage: {cov['share_of_block_matrices']:.1%} of the decoder blocks' matrix weights pruned "
                     f"({cov['share_of_prunable']:.1%} of the prunable ones)"
                     + (f"; kept dense: {reasons}" if reasons else ""))
    ex = report.get("experts")
    if ex:
        size = ""
        if ex["weight_bytes_before"] and ex["weight_bytes_after"]:
            size = f", weights {ex['weight_bytes_before'] / 2**20:,.1f} -> {ex['weight_bytes_after'] / 2**20:,.1f} MiB"
        lines.append(f"  experts: {'/'.join(map(str, ex['experts_before']))} -> "
                     f"{'/'.join(map(str, ex['experts_after']))} in each of {ex['layers']} MoE blocks "
                     f"(lowest {ex['score']}); parameters {ex['parameters_before']:,} -> {ex['parameters_after']:,}"
                     + size)
    return lines
