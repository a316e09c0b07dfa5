"""``oneshot`` command line: a thin argparse layer over :mod:`oneshot.api`; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .config import PAPER_TASKS, EvalConfig, OneshotError, PruneConfig

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
    p.add_argument("--sparsegpt-order", default="auto", choices=("auto", "natural", "hessian"),
                   help="sparsegpt: columns left to right (natural, the reference) or by decreasing H_jj "
                        "(hessian, GPTQ's act-order; N:M groups move whole); auto (default): hessian for N:M, "
                        "natural for unstructured")
    p.add_argument("--nm-select", default="exact", choices=("exact", "saliency"),
                   help="N:M sparsegpt: each group's pattern by its exact cost under the solver's updates (exact, "
                        "default) or by independent saliency ranks (saliency, as the reference code)")
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
    g = p.add_argument_group("output")
    g.add_argument("--format", default=None, help="weights on disk: dense (default; plain transformers loads it), "
                   "packed24 (2:4 only, 56%% of 16-bit dense), bitmask (any pattern)")
    g.add_argument("--plot", action="store_true", help="also write report.png: per-layer sparsity and error (matplotlib)")
    g.add_argument("--eval", action="store_true", help="evaluate the pruned model after writing it (see 'oneshot eval')")
    g.add_argument("--eval-baseline", action="store_true", help="with --eval: evaluate the dense model too, side by side")
    _eval_options(p, prefix="eval-")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false", default=None,
                   help="run even when the estimated peak memory exceeds what is available")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    p.add_argument("--load", default=None, choices=("auto", "stream", "full"),
                   help="stream: read each decoder layer from the safetensors shards only while it is pruned and "
                        "write it out at once (memory: one layer); full: load the whole model; auto (default): "
                        "stream when the checkpoint is safetensors")
    p.add_argument("--journal-interval", type=float, default=None, metavar="SECONDS",
                   help="journal finished layers for --resume at most this often (default 30; 0: every layer)")
    p.add_argument("--offload-activations", action="store_true", default=None,
                   help="keep calibration activations in host memory, one batch at a time on the GPU")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue a killed or failed run from its journal (same command); starts fresh if none")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _eval_options(p, prefix: str = "") -> None:
    """Evaluation flags, shared by `eval` and by `prune --eval` (there with an eval- prefix where they clash)."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--ppl", default="wikitext2", help="perplexity text: wikitext2 (default), c4, PATH to a text file, none")
    g.add_argument(f"--{prefix}seqlen", dest="eval_seqlen", type=int, default=2048, help="perplexity window (default 2048)")
    g.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    g.add_argument("--tasks", default=",".join(PAPER_TASKS),
                   help="lm-eval tasks, comma-separated, or none (default: the papers' zero-shot set)")
    g.add_argument("--include-path", default=None, help="a directory of lm-eval task YAML files (local tasks)")
    g.add_argument("--limit", type=float, default=None, help="lm-eval: at most N examples per task (or a fraction)")
    g.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default 0)")
    g.add_argument(f"--{prefix}batch-size", dest="eval_batch_size", type=int, default=1, help="evaluation batch size")


def _convert_parser(sub) -> None:
    p = sub.add_parser("convert", help="rewrite a oneshot output's weights in another format",
                       description="Rewrite the weights of a oneshot output in another on-disk format. In place "
                                   "(atomically) unless --out is given.")
    p.add_argument("dir", help="a oneshot output directory")
    p.add_argument("--format", required=True, help="dense, packed24 (2:4 outputs only) or bitmask")
    p.add_argument("--out", default=None, help="write here instead of replacing DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    _quiet_json(p, "print nothing on success", "the storage summary")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and lm-eval zero-shot accuracy of a model or a oneshot output",
                       description="Evaluate a oneshot output (any format) or any model (hub id, directory, .gguf).")
    p.add_argument("model", help="oneshot output directory, hub id, local checkpoint directory, or .gguf file")
    p.add_argument("--baseline", default=None, help="also evaluate this model (e.g. the dense one) and show deltas")
    _eval_options(p)
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true", help="allow models with custom code")
    _quiet_json(p, "no progress bars or table", "the results")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="2:4 GEMM and end-to-end speed, dense against each kernels backend",
                       description="Per-layer GEMMs and end-to-end prefill/decode of a 2:4 model (GPU figures need CUDA).")
    p.add_argument("model", help="a 2:4 oneshot output (any format), or any model whose linears are 2:4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    p.add_argument("--m", default=None, help="token counts, comma-separated (default 1,8,16,64,256,1024,4096,16384)")
    p.add_argument("--backends", default=None, help="comma list of kernels backends (default: every available one)")
    p.add_argument("--shapes", default="model", help="model (its own linear shapes), llama3-8b or llama3-70b")
    p.add_argument("--no-e2e", action="store_true", help="GEMMs only")
    p.add_argument("--prompt-len", type=int, default=512, help="end to end: prefill length (default 512)")
    p.add_argument("--batches", default="1,8,32", help="end to end: decode batch sizes")
    p.add_argument("--decode-steps", type=int, default=32, help="end to end: tokens decoded per measurement")
    p.add_argument("--iters", type=int, default=50, help="timed runs per case (median reported)")
    _quiet_json(p, "print nothing but errors", "the results")


def _verify_parser(sub) -> None:
    p = sub.add_parser("verify", help="check that a oneshot output meets its recorded patterns and runs",
                       description="Check patterns, NaN/Inf, -0.0 in pruned slots, tied weights, and a forward pass.")
    p.add_argument("dir", help="a oneshot output directory (any format)")
    _quiet_json(p, "print only failures", "the result")


def _quiet_json(p, quiet: str, what: str) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help=quiet)
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="oneshot", description="One-shot post-training pruning for causal LMs.")
    parser.add_argument("--version", action="version", version=f"oneshot {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _convert_parser(sub)
    _eval_parser(sub)
    _verify_parser(sub)
    _bench_parser(sub)
    return parser


def _summary(report: dict) -> str:
    from .report import summary_table

    lines = [summary_table(report), "",
        f"pruned {report['architecture']} with {report['method']} ({report['pattern']}, "
        f"target {report['target_sparsity']:.4g}) -> {report['out']}",
        f"  {len(report['linears'])} linears, {report['pruned_parameters']:,} weights, "
        f"sparsity {report['sparsity']:.4f}, mean relative output error {report['mean_relative_error']:.4g}",
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
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


EVAL_FLAGS = ("ppl", "eval_seqlen", "max_windows", "tasks", "include_path", "limit", "eval_batch_size", "num_fewshot")


def _eval_config(args) -> EvalConfig:
    return EvalConfig.from_cli(args.ppl, args.eval_seqlen, args.max_windows, args.tasks, args.include_path,
                               args.limit, args.eval_batch_size, args.num_fewshot)


def _print_json(data: dict) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _run_prune(args) -> int:
    from .api import prune

    skip = ("command", "model", "out", "preset", "quiet", "json", "plot", "eval", "eval_baseline") + EVAL_FLAGS
    options = {k: v for k, v in vars(args).items() if k not in skip}
    config = PruneConfig.from_options(args.model, args.out, args.preset, **options)
    if args.eval_baseline and not args.eval:
        raise OneshotError("--eval-baseline goes with --eval")
    evaluation = _eval_config(args) if args.eval else None
    from .distributed import launched

    rank = int(os.environ.get("RANK", "0")) if launched() else 0
    quiet = args.quiet or args.json or rank != 0  # under torchrun only rank 0 reports
    result = prune(config=config, progress=not quiet, evaluation=evaluation,
                   eval_baseline=args.eval_baseline, plot=args.plot)
    if rank != 0:
        return 0
    if args.json:
        _print_json(result.report)
    elif not args.quiet:
        print(_summary(result.report), file=sys.stderr)
        if "eval" in result.report:
            from .evaluate import format_table

            ev = result.report["eval"]
            names = ["pruned"] + (["dense"] if "dense" in ev else [])
            print(format_table(ev, names), file=sys.stderr)
    return 0


def _run_convert(args) -> int:
    from .formats import convert

    summary = convert(args.dir, args.format, args.out, args.overwrite)
    if args.json:
        _print_json(summary)
    elif not args.quiet:
        target = args.out or args.dir
        sizes = ", ".join(f"{k} {v['of_dense']:.1%}" for k, v in summary["formats"].items())
        print(f"{target}: weights as {summary['format']}, {summary['weight_file_bytes']:,} bytes "
              f"(pruned layers against dense: {sizes})", file=sys.stderr)
    return 0


def _run_eval(args) -> int:
    from .evaluate import evaluate, format_table

    result = evaluate(args.model, _eval_config(args), args.baseline, args.dtype, args.device,
                      args.trust_remote_code, progress=not (args.quiet or args.json))
    if args.json:
        _print_json(result)
    elif not args.quiet:
        print(format_table(result["models"], list(result["models"])))
    return 0


def _ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise OneshotError(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise OneshotError(f"{flag} takes positive integers, got {text!r}")
    return values


def _run_bench(args) -> int:
    from .bench import format_bench, run_bench

    result = run_bench(args.model, args.device, args.dtype, _ints(args.m, "--m"),
                       tuple(b for b in args.backends.split(",") if b) if args.backends else None,
                       args.shapes, not args.no_e2e, args.prompt_len, _ints(args.batches, "--batches"),
                       args.decode_steps, warmup=max(1, args.iters // 5), iters=args.iters)
    if args.json:
        _print_json(result)
    elif not args.quiet:
        print(format_bench(result))
    return 0


def _run_verify(args) -> int:
    from .verify import verify

    result = verify(args.dir)
    if args.json:
        _print_json(result)
    else:
        for line in result["failures"]:
            print(f"FAIL {line}")
        if not args.quiet and result["ok"]:
            c = result["checked"]
            print(f"ok: {c['pruned_layers']} pruned layers meet their patterns ({c['format']}), "
                  f"{c['tensors']} tensors finite, forward pass finite")
    return 0 if result["ok"] else 1


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
        run = {"prune": _run_prune, "convert": _run_convert, "eval": _run_eval, "verify": _run_verify,
               "bench": _run_bench}
        return run[args.command](args)
    except OneshotError as exc:
        print(f"oneshot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("oneshot: interrupted; nothing was written", file=sys.stderr)
        return 130
    return EXIT_USAGE
