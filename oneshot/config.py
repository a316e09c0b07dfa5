"""PruneConfig and EvalConfig: every knob of a run, its default (the one source of it: the CLI reads
its defaults from here), and the checks of each field.

Anything a user can get wrong is checked by :meth:`PruneConfig.validate` before any model is
loaded; errors are :class:`OneshotError` with one line that says what is wrong and what to do.
Names of methods, formats, updates and allocations are checked by their own registries.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field

from .constraint import Constraint, parse_pattern
from .errors import OneshotError

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")



@dataclass
class PruneConfig:
    """One pruning run. Build it, call :meth:`validate`, hand it to :func:`oneshot.prune`."""

    model: str
    out: str | None = None
    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str | None = None
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    text_field: str = "text"
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 0  # windows per forward; 0: all if one forward fits a quarter of free memory, else as many as fit
    ignore: list[str] = field(default_factory=list)
    overwrite: bool = False
    # solver options
    blocksize: int = 128
    dampening: float = 0.01
    magnitude_scope: str = "layer"  # "layer" (the papers) or "row"
    sparsegpt_scope: str = "row"  # unstructured sparsegpt: equal count per row in each block, or "block" (reference)
    sparsegpt_order: str = "auto"  # "hessian": columns by decreasing H_jj (act-order); auto: hessian for N:M
    nm_select: str = "exact"  # N:M sparsegpt: each group's pattern by exact cost, or "saliency" (reference)
    # "layer": statistics from the dense layer; "linear": from inputs after the linears before were pruned;
    # "auto": linear for sparsegpt without --update block, else layer
    sequential: str = "auto"
    trust_remote_code: bool = False
    # DSnoT and RIA
    dsnot_init: str = "wanda"
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_power: float = 1.0
    ria_alpha: float = 0.5
    ria_permute: bool = False
    # per-layer sparsity
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    # reconstruction after the mask is fixed
    update: str = "none"
    heldout: int = 0  # windows held out to judge updates; 0 = automatic (1/8 of them) when --update is set
    block_epochs: int = 2
    block_lr: float = 1e-3
    block_batch: int = 2
    block_target: str = "model"
    learn_masks: bool = False  # --update block moves the N:M masks too (oneshot/updates/learned.py)
    block_loss: str = "relative"  # per-token relative squared error, or plain MSE (dominated by attention sinks)
    preset: str | None = None
    # mixture-of-experts models
    moe_calibrate: str = "all"  # expert statistics from every token (llm-compressor's default) or "routed" ones
    remove_experts: float | None = None  # fraction of each MoE layer's experts to remove
    expert_score: str = "reap"  # which experts to remove: REAP saliency or routed-token frequency
    # structured pruning: whole heads, MLP channels, decoder blocks
    structure: str | None = None  # comma list of heads, channels, blocks
    remove: float | None = None  # fraction of the decoder blocks' parameters to remove with --structure
    # output
    format: str = "dense"  # on-disk weight format: dense, packed24, bitmask (oneshot.formats)
    memory_check: bool = True  # refuse runs whose estimated peak memory exceeds what is available
    # scale and resilience
    # "stream": one layer at a time from safetensors shards; "full": the whole model; auto: stream when it can
    load: str = "auto"
    resume: bool = False  # continue a killed run from the journal in the output's partial directory
    journal_interval: float = 30.0  # seconds between journal commits (0: after every layer)
    offload_activations: bool = False  # calibration activations in host memory, one batch at a time on the GPU

    @classmethod
    def from_options(cls, model: str, out: str | None = None, preset: str | None = None, **options) -> PruneConfig:
        """A config from a preset's settings, overridden by every option given explicitly."""
        if preset is not None and preset not in PRESETS:
            raise OneshotError(f"unknown --preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        merged = dict(PRESETS.get(preset, {}))
        merged.update({k: v for k, v in options.items() if v is not None})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise OneshotError(f"unknown option(s): {', '.join(unknown)}")
        return cls(model=model, out=out, preset=preset, **merged)

    def validate(self) -> PruneConfig:
        from .solvers import get_solver

        if not self.model or not str(self.model).strip():
            raise OneshotError("no model given: pass a hub id, a local directory or a .gguf file")
        get_solver(self.method)
        nm = parse_pattern(self.pattern)
        if self.sparsity is not None:
            if not isinstance(self.sparsity, (int, float)) or math.isnan(self.sparsity) or not 0 < self.sparsity < 1:
                raise OneshotError(f"--sparsity must be a fraction strictly between 0 and 1, got {self.sparsity}")
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise OneshotError(
                    f"--pattern {nm[0]}:{nm[1]} means sparsity {implied:g}, but --sparsity {self.sparsity:g} "
                    "was given; "
                    "drop --sparsity or make them agree"
                )
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise OneshotError(f"--{name} must be a positive integer, got {value}")
        if self.batch_size < 0:
            raise OneshotError(f"--batch-size must be >= 0 (0 = automatic), got {self.batch_size}")
        if self.blocksize <= 0:
            raise OneshotError(f"--blocksize must be positive, got {self.blocksize}")
        if not 0 <= self.dampening < 10:
            raise OneshotError(f"--dampening must be in [0, 10), got {self.dampening}")
        if self.dtype not in DTYPES:
            raise OneshotError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise OneshotError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.device != "cpu" and self.device != "auto":
            import torch

            if not torch.cuda.is_available():
                raise OneshotError(f"--device {self.device} asked for, but no CUDA GPU is available")
        if self.magnitude_scope not in ("layer", "row"):
            raise OneshotError(f"--magnitude-scope must be 'layer' or 'row', got {self.magnitude_scope!r}")
        if self.sparsegpt_scope not in ("row", "block"):
            raise OneshotError(f"--sparsegpt-scope must be 'row' or 'block', got {self.sparsegpt_scope!r}")
        if self.sparsegpt_order not in ("auto", "natural", "hessian"):
            raise OneshotError(
                f"--sparsegpt-order must be 'auto', 'natural' or 'hessian', got {self.sparsegpt_order!r}")
        if self.nm_select not in ("exact", "saliency"):
            raise OneshotError(f"--nm-select must be 'exact' or 'saliency', got {self.nm_select!r}")
        if self.sequential not in ("auto", "linear", "layer"):
            raise OneshotError(f"--sequential must be 'auto', 'linear' or 'layer', got {self.sequential!r}")
        from .allocation import ALLOCATIONS
        from .solvers.dsnot import INITS
        from .updates import check_update

        if self.dsnot_init not in INITS:
            raise OneshotError(f"--init must be one of {', '.join(INITS)}, got {self.dsnot_init!r}")
        if self.dsnot_cycles < 0 or self.dsnot_threshold < 0:
            raise OneshotError("--dsnot-cycles and --dsnot-threshold must be >= 0")
        if self.ria_permute and (nm is None or self.method != "ria"):
            raise OneshotError("--ria-permute needs --method ria and an N:M --pattern")
        if self.allocation not in ALLOCATIONS:
            raise OneshotError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "owl":
            if nm is not None:
                raise OneshotError("--allocation owl sets a sparsity per layer; it needs an unstructured --pattern")
            if self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5:
                raise OneshotError("--owl-m must be > 0 and --owl-lambda in [0, 0.5)")
        check_update(self.update)
        if self.update == "block" and self.sequential == "linear":
            raise OneshotError("--update block needs --sequential layer")
        if self.heldout < 0 or (self.heldout and self.heldout >= self.nsamples):
            raise OneshotError(f"--heldout must be between 0 and --nsamples - 1, got {self.heldout}")
        if self.update != "none" and self.nsamples < 2:
            raise OneshotError(
                f"--update {self.update} holds out calibration windows to judge it: needs --nsamples >= 2")
        if self.block_epochs < 0 or self.block_lr <= 0 or self.block_batch <= 0:
            raise OneshotError("--block-epochs must be >= 0, --block-lr and --block-batch > 0")
        if self.moe_calibrate not in ("all", "routed"):
            raise OneshotError(f"--moe-calibrate must be 'all' or 'routed', got {self.moe_calibrate!r}")
        if self.expert_score not in ("reap", "frequency"):
            raise OneshotError(f"--expert-score must be 'reap' or 'frequency', got {self.expert_score!r}")
        if self.remove_experts is not None and (not isinstance(self.remove_experts, (int, float))
                                                or math.isnan(self.remove_experts) or not 0 < self.remove_experts < 1):
            raise OneshotError(f"--remove-experts must be a fraction strictly between 0 and 1, "
                               f"got {self.remove_experts}")
        if self.remove is not None and self.structure is None:
            raise OneshotError("--remove needs --structure (heads, channels, blocks: what to remove)")
        if self.structure is not None:
            from .structured import parse_structures

            parse_structures(self.structure)
            if self.remove is None:
                raise OneshotError("--structure needs --remove FRACTION (of the decoder blocks' parameters)")
            if not isinstance(self.remove, (int, float)) or math.isnan(self.remove) or not 0 < self.remove < 1:
                raise OneshotError(f"--remove must be a fraction strictly between 0 and 1, got {self.remove}")
            if self.remove_experts is not None:
                raise OneshotError("--structure and --remove-experts cannot be combined yet")
        if self.learn_masks and self.update != "block":
            raise OneshotError("--learn-masks moves the masks during the block refit: it needs --update block")
        if self.learn_masks and self.nm is None:
            raise OneshotError("--learn-masks learns N:M masks (--pattern 2:4, 4:8); unstructured masks are not "
                               "learned yet")
        if self.block_loss not in ("relative", "mse"):
            raise OneshotError(f"--block-loss must be 'relative' or 'mse', got {self.block_loss!r}")
        if self.block_target not in ("layer", "model"):
            raise OneshotError(f"--block-target must be 'layer' or 'model', got {self.block_target!r}")
        if self.load not in ("auto", "stream", "full"):
            raise OneshotError(f"--load must be auto, stream or full, got {self.load!r}")
        if not isinstance(self.journal_interval, (int, float)) or not self.journal_interval >= 0:
            raise OneshotError(f"--journal-interval must be >= 0 seconds, got {self.journal_interval}")
        if self.resume and self.out is None:
            raise OneshotError("--resume continues a run that writes an output: it needs --out")
        from .formats import FORMATS

        if self.format not in FORMATS:
            raise OneshotError(f"unknown --format {self.format!r}; choose one of: {', '.join(FORMATS)}")
        reason = FORMATS[self.format].accepts(self.constraint.describe())
        if reason:
            raise OneshotError(reason)
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise OneshotError(f"--ignore {pattern!r} is not a valid regular expression: {exc}") from None
        if self.out is not None:
            from .checks import check_not_source

            out = os.path.abspath(self.out)
            if os.path.isfile(out):
                raise OneshotError(f"--out {self.out} is an existing file; give a directory")
            check_not_source(self.out, str(self.model))
            complete = self.resume and os.path.isfile(os.path.join(out, "report.json"))  # --resume decides later
            if os.path.isdir(out) and os.listdir(out) and not self.overwrite and not complete:
                raise OneshotError(f"--out {self.out} exists and is not empty; pass --overwrite to replace it")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def structures(self) -> set[str]:
        from .structured import parse_structures

        return parse_structures(self.structure) if self.structure else set()

    @property
    def unstructured(self) -> bool:
        """Whether the layers are pruned weight by weight (always, unless --structure alone was asked)."""
        return self.structure is None or self.sparsity is not None or self.pattern is not None

    @property
    def constraint(self) -> Constraint:
        nm = self.nm
        if nm is not None:
            return Constraint(sparsity=1 - nm[0] / nm[1], n=nm[0], m=nm[1])
        return Constraint(sparsity=0.5 if self.sparsity is None else float(self.sparsity))

    @property
    def sequential_mode(self) -> str:
        """``auto``: one pass a layer (``linear``) for SparseGPT, which measured the same perplexity on
        SmolLM2-135M in about two thirds of the time (2:4 with act-order and exact group selection:
        62.84 with ``linear``, 63.29 with ``layer``, RESULTS.md 2:4 ablation); ``layer`` for the other methods
        (Wanda 2:4 measured worse with ``linear``) and whenever the block update needs the dense
        layer's outputs. Mixture-of-experts models always take ``layer`` (:meth:`mode_for`)."""
        if self.sequential != "auto":
            return self.sequential
        return "linear" if self.method == "sparsegpt" and self.update != "block" else "layer"

    def mode_for(self, moe: bool) -> str:
        """:attr:`sequential_mode` for a model with (``moe``) or without experts: an expert's
        statistics come from a pass of the dense layer (every expert's first, then each matrix's in turn
        would take a forward pass per expert), so ``auto`` is ``layer`` there and ``linear`` is refused."""
        if not moe:
            return self.sequential_mode
        if self.sequential == "linear":
            raise OneshotError("--sequential linear is not supported on mixture-of-experts models (each expert would "
                               "take its own forward pass); use --sequential layer (the default there)")
        return "layer"

    @property
    def heldout_windows(self) -> int:
        """Windows held out to judge updates: none without an update, else --heldout or 1/8 of them."""
        if self.update == "none":
            return 0
        return self.heldout or max(1, self.nsamples // 8)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Tested combinations (docs/methods.md, "Presets"); every explicit option overrides its preset's value.
PRESETS: dict[str, dict] = {
    "fast": {"method": "wanda"},
    "balanced": {"method": "sparsegpt"},
    "best": {"method": "sparsegpt", "update": "block", "block_epochs": 4, "block_lr": 1e-3, "block_batch": 2,
             "block_target": "model"},
    # a smaller dense model: MLP channels removed by group OBS, 20% of the decoder blocks' parameters
    # (the best structured recipe measured: benchmarks/RESULTS.md, issue 16)
    "smaller": {"structure": "channels", "remove": 0.2},
}


# The zero-shot set sparse-LLM papers report (Wanda, SparseGPT, DSnoT, OWL, RIA).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
PPL_PRESETS = ("wikitext2", "c4")


@dataclass
class EvalConfig:
    """What `oneshot eval` and `prune --eval` measure: perplexity text and window, lm-eval tasks.

    Zero-shot tasks are asked for by name (``paper``: :data:`PAPER_TASKS`): their data comes from the
    hub, and on a CPU they take hours, so by default only the perplexity is measured."""

    ppl: str | None = "wikitext2"  # wikitext2 (the test split, bundled), c4, a text file, or None
    seqlen: int = 2048
    max_windows: int | None = None
    tasks: tuple[str, ...] = ()
    include_path: str | None = None
    limit: float | None = None
    batch_size: int = 1
    num_fewshot: int | None = None

    @classmethod
    def from_options(cls, **options) -> EvalConfig:
        """From the CLI's values (None: not given, the default here): ``ppl="none"`` measures no
        perplexity; ``tasks`` is a comma list, ``paper`` the papers' set, ``none`` nothing."""
        given = {k: v for k, v in options.items() if v is not None}
        if isinstance(given.get("ppl"), str) and given["ppl"].strip().lower() == "none":
            given["ppl"] = None
        if isinstance(given.get("tasks"), str):
            names: list[str] = []
            for name in (t.strip() for t in given["tasks"].split(",")):
                if name == "paper":
                    names.extend(PAPER_TASKS)
                elif name and name != "none":
                    names.append(name)
            given["tasks"] = tuple(dict.fromkeys(names))
        return cls(**given)

    def validate(self) -> EvalConfig:
        if self.ppl is None and not self.tasks:
            raise OneshotError("nothing to evaluate: --ppl none and --tasks none")
        if self.ppl is not None and self.ppl not in PPL_PRESETS and not os.path.isfile(os.path.expanduser(self.ppl)):
            raise OneshotError(f"--ppl {self.ppl!r}: not wikitext2, c4, none, or an existing text file")
        if self.seqlen <= 1:
            raise OneshotError(f"the perplexity window must be more than 1 token, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise OneshotError(f"--max-windows must be positive, got {self.max_windows}")
        if self.batch_size <= 0:
            raise OneshotError(f"the evaluation batch size must be positive, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise OneshotError(f"--limit must be positive, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise OneshotError(f"--num-fewshot must be >= 0, got {self.num_fewshot}")
        if self.include_path is not None and not os.path.isdir(os.path.expanduser(self.include_path)):
            raise OneshotError(f"--include-path {self.include_path!r}: no such directory")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
