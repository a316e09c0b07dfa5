"""The human side of report.json: a summary table for the terminal and a per-layer plot."""

from __future__ import annotations

import re
from collections import OrderedDict


def _block(name: str) -> str:
    found = re.search(r"\.(\d+)\.", name)
    return found.group(1) if found else "-"


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def summary_table(report: dict) -> str:
    """Per decoder block: weights, sparsity, mean and worst relative output error; then the totals."""
    blocks: OrderedDict = OrderedDict()
    for entry in report["linears"]:
        blocks.setdefault(_block(entry["name"]), []).append(entry)
    lines = [f"{'block':>5}  {'linears':>7}  {'weights':>11}  {'sparsity':>8}  {'mean err':>8}  {'max err':>8}  "
             "worst linear"]
    for block, entries in blocks.items():
        weights = sum(e["shape"][0] * e["shape"][1] for e in entries)
        zeros = sum(e["zeros"] for e in entries)
        errors = [e["relative_error"] for e in entries]
        worst = max(entries, key=lambda e: e["relative_error"])
        lines.append(f"{block:>5}  {len(entries):>7}  {weights:>11,}  {zeros / weights:>8.4f}  "
                     f"{sum(errors) / len(errors):>8.4f}  {max(errors):>8.4f}  "
                     f"{'.'.join(worst['name'].split('.')[-3 if 'expert' in worst else -1:])}")
    storage = report.get("storage", {})
    if not report["linears"]:  # --structure alone: no weight-by-weight pruning to tabulate
        lines = []
    lines += [
        "",
        f"parameters {report['total_parameters']:,}, non-zero {report['nonzero_parameters']:,}; "
        f"pruned {report['pruned_parameters']:,} at sparsity {report['sparsity']:.4f}",
    ]
    if storage:
        sizes = ", ".join(f"{name} {_gib(v['pruned_layer_bytes'])} ({v['of_dense']:.1%})"
                          for name, v in storage["formats"].items() if v.get("of_dense") is not None)
        lines.append(f"weights on disk: {_gib(storage['weight_file_bytes'])} as {storage['format']}"
                     + (f"; pruned layers in each format: {sizes}" if sizes else ""))
    lines.append(f"time {report['seconds']:.1f} s, peak RSS {_gib(report['peak_memory']['host_rss_bytes'])}"
                 + (f", peak GPU {_gib(report['peak_memory']['device_bytes'])}"
                    if report["peak_memory"].get("device_bytes") else ""))
    return "\n".join(lines)


def check_plotting() -> None:
    from .errors import OneshotError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise OneshotError("--plot needs matplotlib: pip install 'oneshot[plot]'") from None


def plot(report: dict, path: str) -> None:
    """report.png: each linear's sparsity (top) and relative output error (bottom, log), in model order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["linears"]
    kinds = sorted({e["name"].split(".")[-1] for e in entries})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    for kind in kinds:
        xs = [i for i, e in enumerate(entries) if e["name"].endswith(kind)]
        top.scatter(xs, [entries[i]["sparsity"] for i in xs], s=10, label=kind)
        bottom.scatter(xs, [max(entries[i]["relative_error"], 1e-12) for i in xs], s=10, label=kind)
    top.set_ylabel("sparsity")
    top.set_title(f"{report['architecture']}: {report['method']}, {report['pattern']}, "
                  f"target {report['target_sparsity']:.3g}")
    bottom.set_ylabel("relative output error")
    bottom.set_yscale("log")
    bottom.set_xlabel("linear layer (model order)")
    top.legend(fontsize=7, ncol=min(len(kinds), 7), loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def structured_line(st: dict) -> str:
    """One line for --structure: what went and what the model weighs now."""
    what = []
    if st.get("blocks", {}).get("removed"):
        what.append(f"{len(st['blocks']['removed'])} of {st['layers_before']} blocks")
    first = (st.get("layers") or [{}])[0]
    if "attention" in first:
        what.append(f"heads {first['attention']['heads_before']} -> {first['attention']['heads_after']} a layer")
    if "mlp" in first:
        what.append(f"MLP channels {first['mlp']['channels_before']} -> {first['mlp']['channels_after']} a layer")
    removed = 1 - st["decoder_parameters_after"] / max(st["decoder_parameters_before"], 1)
    line = (f"  structured: removed {', '.join(what) or 'nothing'} ({removed:.1%} of the decoder blocks' "
            f"parameters); parameters {st['parameters_before']:,} -> {st['parameters_after']:,}")
    if st.get("weight_bytes_before") and st.get("weight_bytes_after"):
        line += f"; weights {st['weight_bytes_before'] / 1e6:.1f} MB -> {st['weight_bytes_after'] / 1e6:.1f} MB"
    return line


def summary_text(report: dict) -> str:
    """What `oneshot prune` prints at the end (unless --quiet/--json): the table, then one line a topic."""
    from .coverage import summary_lines

    structured_only = report["method"] == "structured"
    lines = [summary_table(report), ""]
    if structured_only:
        lines.append(f"pruned {report['architecture']} structurally -> {report['out']}")
    else:
        lines += [f"pruned {report['architecture']} with {report['method']} ({report['pattern']}, "
                  f"target {report['target_sparsity']:.4g}) -> {report['out']}",
                  f"  {len(report['linears'])} linears, {report['pruned_parameters']:,} weights, "
                  f"sparsity {report['sparsity']:.4f}, mean relative output error {report['mean_relative_error']:.4g}"]
    lines += [
        f"  calibration {report['calibration']['source']}: {report['calibration']['nsamples']} x "
        f"{report['calibration']['seqlen']} tokens; {report['seconds']:.1f} s, "
        f"peak RSS {report['peak_memory']['host_rss_bytes'] / 2**30:.2f} GiB",
    ]
    load = report.get("load")
    if load:
        lines.append(f"  weights: {'streamed one layer at a time' if load['streaming'] else 'loaded whole'} "
                     f"({load['why']})" + (f"; resumed at layer {report['resumed_at_layer']}"
                                          if report.get("resumed_at_layer") else ""))
    if report.get("distributed"):
        lines.append(f"  distributed: {report['distributed']['world_size']} ranks "
                     f"({report['distributed']['backend']})")
    if not structured_only:
        lines += summary_lines(report)
    st = report.get("structured")
    if st:
        lines.append(structured_line(st))
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
