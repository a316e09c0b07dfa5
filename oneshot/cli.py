"""``oneshot`` command line: a thin argparse layer over :mod:`oneshot.api`; no logic of its own."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .config import OneshotError, PruneConfig

EXIT_USAGE = 2


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a causal LM once and write a sparse checkpoint",
                       description="Prune every linear layer of a causal LM's decoder blocks, one layer at a time.")
    p.add_argument("model", help="hub id (owner/name), local checkpoint directory, or .gguf file")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    p.add_argument("--method", default=None, help="solver: sparsegpt (default), wanda, magnitude, ria, dsnot")
    p.add_argument("--preset", default=None, choices=("fast", "balanced", "best"),
                   help="a tested combination of method and update (README, 'Presets'); explicit options override it")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, 0<s<1 (default 0.5)")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4, 4:8")
    p.add_argument("--calib", default="wikitext2",
                   help="calibration: PATH (.txt/.jsonl/.json/.parquet), hf:NAME[:CONFIG[:SPLIT]], wikitext2, c4, self")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="seed for window sampling (default 0)")
    p.add_argument("--text-field", default="text", help="text column of jsonl/json/parquet/hf sources")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=0, help="windows per forward (0 = about 8k tokens)")
    p.add_argument("--ignore", action="append", default=[], metavar="REGEX",
                   help="skip linears whose full name matches (repeatable), e.g. 'mlp\\.down_proj'")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt column block (default 128)")
    p.add_argument("--dampening", type=float, default=0.01, help="sparsegpt dampening, fraction of mean diag(H)")
    p.add_argument("--magnitude-scope", default="layer", choices=("layer", "row"),
                   help="magnitude: one threshold per layer (default) or per row")
    p.add_argument("--sparsegpt-scope", default="row", choices=("row", "block"),
                   help="unstructured sparsegpt: prune the same count in every row of each column block (row, "
                        "default) or one threshold over the whole block (block, as the reference code)")
    p.add_argument("--sequential", default="auto", choices=("auto", "layer", "linear"),
                   help="statistics of every linear from the dense layer (layer: two forward passes a layer) or "
                        "from inputs after the linears before it were pruned (linear: one pass); auto (default): "
                        "linear for sparsegpt, layer otherwise")
    g = p.add_argument_group("DSnoT and RIA")
    g.add_argument("--init", dest="dsnot_init", default=None, help="dsnot: initial mask from wanda (default), sparsegpt, magnitude, ria")
    g.add_argument("--dsnot-cycles", type=int, default=None, help="dsnot: at most this many swaps per row (default 50)")
    g.add_argument("--dsnot-threshold", type=float, default=None, help="dsnot: stop a row under this mean output error (default 0.1)")
    g.add_argument("--dsnot-power", type=float, default=None, help="dsnot: regrow by W·E[x]/Var(x)^p (default p=1)")
    g.add_argument("--ria-alpha", type=float, default=None, help="ria: exponent of ‖X_j‖ (default 0.5)")
    g.add_argument("--ria-permute", action="store_true", default=None, help="ria with N:M: permute input channels (recorded, weights stay in order)")
    g = p.add_argument_group("allocation and reconstruction")
    g.add_argument("--allocation", default=None, choices=("uniform", "owl"), help="per-layer sparsity (default uniform)")
    g.add_argument("--owl-m", type=float, default=None, help="owl: outlier = score above M x mean (default 5)")
    g.add_argument("--owl-lambda", type=float, default=None, help="owl: sparsities within target +- lambda (default 0.08)")
    g.add_argument("--update", default=None, choices=("none", "lstsq", "admm", "block"),
                   help="new values for the kept weights, judged on held-out windows (default none)")
    g.add_argument("--heldout", type=int, default=None, help="calibration windows held out to judge updates (default 1/8)")
    g.add_argument("--block-epochs", type=int, default=None, help="block: epochs of Adam per decoder block (default 2)")
    g.add_argument("--block-lr", type=float, default=None, help="block: Adam learning rate (default 1e-3)")
    g.add_argument("--block-batch", type=int, default=None, help="block: windows per step (default 2)")
    g.add_argument("--block-target", default=None, choices=("layer", "model"),
                   help="block: match the dense model's hidden state at this depth (model, default) or the dense block on the same inputs (layer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneshot", description="One-shot post-training pruning for causal LMs.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    return parser


def _summary(report: dict) -> str:
    lines = [
        f"pruned {report['architecture']} with {report['method']} ({report['pattern']}, "
        f"target {report['target_sparsity']:.4g}) -> {report['out']}",
        f"  {len(report['linears'])} linears, {report['pruned_parameters']:,} weights, "
        f"sparsity {report['sparsity']:.4f}, mean relative output error {report['mean_relative_error']:.4g}",
        f"  calibration {report['calibration']['source']}: {report['calibration']['nsamples']} x "
        f"{report['calibration']['seqlen']} tokens; {report['seconds']:.1f} s, "
        f"peak RSS {report['peak_memory']['host_rss_bytes'] / 2**30:.2f} GiB",
    ]
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def _run_prune(args) -> int:
    from .api import prune

    options = {k: v for k, v in vars(args).items() if k not in ("command", "model", "out", "preset", "quiet", "json")}
    config = PruneConfig.from_options(args.model, args.out, args.preset, **options)
    result = prune(config=config, progress=not (args.quiet or args.json))
    if args.json:
        json.dump(result.report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif not args.quiet:
        print(_summary(result.report), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet or getattr(args, "json", False):
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars transformers draws with tqdm directly (GGUF reading)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        if args.command == "prune":
            return _run_prune(args)
    except OneshotError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130
    return EXIT_USAGE
