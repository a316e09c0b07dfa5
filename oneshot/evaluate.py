"""Perplexity the way the SparseGPT / Wanda papers measure it, and lm-eval zero-shot accuracy.

The text (WikiText-2 raw test, documents joined with "\\n\\n") is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped); the
perplexity is exp of the mean next-token negative log-likelihood over every predicted token.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from . import data
from .config import PPL_PRESETS, EvalConfig
from .errors import OneshotError
from .hub import offline_reason
from .runtime import compute_dtype_for, resolve_device, reuse_host_heap


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one token stream, the way the SparseGPT and Wanda code calls the tokenizer
    (its default special tokens: a Llama tokenizer's one BOS at the start; none for SmolLM2's)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Perplexity of ``model`` on a 1-D token stream in non-overlapping ``seqlen`` windows."""
    from tqdm.auto import tqdm

    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    ids = tokens[: windows * seqlen].reshape(windows, seqlen)
    total_nll, count = 0.0, 0
    with reuse_host_heap(torch.device(device).type == "cpu"):
        for batch in tqdm(ids.split(batch_size), desc="perplexity", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total_nll += float(nll)
            count += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / count), "windows": windows, "seqlen": seqlen, "tokens": count}


# ---------------------------------------------------------------- `oneshot eval`


def ppl_text(source: str) -> tuple[str, dict]:
    """The evaluation text of a --ppl source and how it was made.

    ``wikitext2``: the test split of wikitext-2-raw-v1, rows joined with "\\n\\n" (the papers' protocol),
    read from the copy shipped with oneshot (:mod:`oneshot.data`): no network needed.
    ``c4``: the first 1100 documents of the en validation shard 0, joined with " " (as Wanda/SparseGPT).
    A path: the file's text as is (e.g. WikiText-2's ``wiki.test.raw``).
    """
    import os

    if source == "wikitext2":
        return data.read(data.TEST), {"source": "wikitext:wikitext-2-raw-v1:test (bundled copy)",
                                      "joined_with": "\\n\\n"}
    if source not in PPL_PRESETS:
        with open(os.path.expanduser(source), encoding="utf-8") as fh:
            return fh.read(), {"source": os.path.abspath(os.path.expanduser(source))}
    offline_reason()  # probe once: offline, datasets reads its cache only and fails at once
    try:
        from datasets import load_dataset

        rows = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")["text"][:1100]
        return " ".join(rows), {"source": "allenai/c4:en:validation[:1100]", "joined_with": " "}
    except Exception as exc:  # noqa: BLE001 - offline, missing dataset: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OneshotError(f"--ppl {source}: could not load it from the Hugging Face hub ({first}); "
                           "pass --ppl PATH to a local text file (e.g. WikiText-2's wiki.test.raw)") from None


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's task index, with ``include_path``'s YAML tasks; unknown task names fail here."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise OneshotError("zero-shot tasks need lm-eval: pip install 'oneshot[eval]' (or --tasks none)") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise OneshotError(f"unknown lm-eval task(s): {', '.join(unknown)} "
                           "(local tasks: --include-path DIR of YAML files)")
    return manager


def check_task_data(tasks: list[str], manager) -> None:
    """With the hub out of reach, every task's data must be in the local cache (or local files): build the
    tasks now, before any perplexity is computed or any model loaded, and fail with one line if one
    cannot be. Online, lm-eval downloads what it needs when it runs."""
    reason = offline_reason()
    if reason is None:
        return
    try:
        with _quiet_lm_eval():
            manager.load(list(tasks))
    except Exception as exc:  # noqa: BLE001 - a dataset that is neither cached nor local
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OneshotError(f"zero-shot tasks {','.join(tasks)}: their data are not all in the local cache and the "
                           f"hub cannot be reached ({reason}; {type(exc).__name__}: {first[:200]}); run once "
                           "online to cache them, use local tasks (--include-path DIR) or pass --tasks none"
                           ) from None


@contextlib.contextmanager
def _quiet_lm_eval():
    import logging

    loggers = [logging.getLogger(n) for n in ("lm-eval", "lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def zero_shot(model, tokenizer, tasks: list[str], manager, limit: float | None = None, batch_size: int = 1,
              num_fewshot: int | None = None, device: str = "cpu") -> dict:
    """lm-eval on the in-memory model: {task: {metric: value}} (acc, acc_norm and their stderr)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False, bootstrap_iters=1000,
                              )
    except Exception as exc:  # noqa: BLE001 - a task's data could not be fetched, most often
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OneshotError(f"lm-eval failed ({type(exc).__name__}: {first}); offline, use local tasks "
                           "(--include-path, README) or --tasks none") from None
    results = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and name not in ("alias", "sample_len"):
                row[name] = float(value)
        results[task] = row
    return results


def load_for_eval(spec: str, dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer, description) for a oneshot output in any format, or any model source."""
    import os

    from .formats.store import SIDECAR
    from .model.source import load_model, load_tokenizer, resolve_source

    source = resolve_source(spec)
    if source.kind == "local" and os.path.isfile(os.path.join(source.path, SIDECAR)):
        from .formats import load, read_sidecar

        kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        model = load(source.path, **kwargs)
        kind = f"oneshot output ({read_sidecar(source.path).get('format', 'dense')})"
    else:
        model = load_model(source, dtype, trust_remote_code)
        kind = source.kind
    model.config.use_cache = False
    return model.eval(), load_tokenizer(source, trust_remote_code), kind


class Evaluator:
    """One evaluation protocol (text, windows, tasks) applied to any number of models: the text is
    read and tokenized, and lm-eval's task index built, once, before any model is touched."""

    def __init__(self, cfg: EvalConfig, progress: bool = False):
        self.cfg = cfg.validate()
        self.progress = progress
        self.text = ppl_text(cfg.ppl) if cfg.ppl else None
        self.manager = task_manager(list(cfg.tasks), cfg.include_path) if cfg.tasks else None
        if self.manager is not None:
            check_task_data(list(cfg.tasks), self.manager)

    def __call__(self, model, tokenizer, device: str | torch.device = "cpu", on_perplexity=None) -> dict:
        """The measurements of ``model``. ``on_perplexity(result)``: called as soon as the perplexity is
        known, before the zero-shot tasks run (so that it is printed and saved whatever happens next)."""
        with computing_in(model, torch.device(device)) as note:
            result = self._measure(model, tokenizer, device, note, on_perplexity)
        result.update(note)
        return result

    def _measure(self, model, tokenizer, device, note: dict, on_perplexity) -> dict:
        cfg, result = self.cfg, {}
        if self.text is not None:
            body, info = self.text
            max_windows = cfg.max_windows
            if cfg.ppl == "c4" and max_windows is None:
                max_windows = 256  # as the papers: the first 256 windows of the joined validation text
            tokens = tokenize_text(tokenizer, body)
            result["perplexity"] = {**perplexity(model, tokens, cfg.seqlen, max_windows, cfg.batch_size, device,
                                                 self.progress), **info}
            if on_perplexity is not None and self.manager is not None:  # the tasks may still fail
                on_perplexity({**result, **note})
        if self.manager is not None:
            try:
                result["tasks"] = zero_shot(model, tokenizer, list(cfg.tasks), self.manager, cfg.limit,
                                            cfg.batch_size, cfg.num_fewshot, str(device))
            except OneshotError as exc:
                if "perplexity" in result:
                    raise OneshotError(f"{exc} (the perplexity, computed before: "
                                       f"{result['perplexity']['perplexity']:.4f})") from None
                raise
            accs = [row["acc"] for row in result["tasks"].values() if "acc" in row]
            if accs:
                result["mean_acc"] = sum(accs) / len(accs)
        return result


@contextlib.contextmanager
def computing_in(model, device: torch.device):
    """``model`` on ``device`` in the dtype it computes in there (float32 for 16-bit weights on the CPU,
    as ``prune`` runs its layers: bfloat16 matmuls run at a fraction of a GFLOP/s on CPUs without
    AVX512-BF16/AMX); yields what the result should say about it. Afterwards every tensor is back on
    the device it was on (the CPU for a loaded checkpoint) in its own dtype (16 → 32 → 16 bits is exact)."""
    storage = model.dtype
    home = next(model.parameters()).device
    compute = compute_dtype_for(storage, device)
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    note = {"dtype": str(storage).replace("torch.", ""), "compute_dtype": str(compute).replace("torch.", "")}
    if compute != storage:
        note["note"] = f"{note['dtype']} weights computed in float32 on the CPU"
        model.to(device=device, dtype=compute)
    else:
        model.to(device)
    try:
        yield note
    finally:
        model.to(home)
        if compute != storage:
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if t.dtype != dtypes[name]:
                    t.data = t.data.to(dtypes[name])


def evaluate(model: str, cfg: EvalConfig, baseline: str | None = None, dtype: str = "auto",
             device: str = "auto", trust_remote_code: bool = False, progress: bool = False) -> dict:
    """``oneshot eval``: {"models": {spec: result}, "delta": model - baseline (with a baseline)}."""
    from .model.source import resolve_source

    resolve_source(model)
    if baseline is not None:
        resolve_source(baseline)
    run = Evaluator(cfg, progress)
    dev = resolve_device(device)
    out: dict = {"config": cfg.to_dict(), "models": {}}
    for spec in [model] + ([baseline] if baseline else []):
        loaded, tokenizer, kind = load_for_eval(spec, dtype, trust_remote_code)
        out["models"][spec] = {"kind": kind, **run(loaded, tokenizer, dev, on_perplexity(spec, progress))}
        del loaded
    if baseline is not None:
        out["delta"] = compare(out["models"][model], out["models"][baseline])
    return out


def on_perplexity(spec: str, show: bool):
    """Print a model's perplexity the moment it is known (zero-shot tasks may still fail after it)."""
    import sys

    def report(result: dict) -> None:
        if show:
            p = result["perplexity"]
            print(f"{spec}: perplexity {p['perplexity']:.4f} ({p['windows']} x {p['seqlen']} tokens); "
                  "zero-shot tasks next", file=sys.stderr, flush=True)

    return report


def compare(model: dict, baseline: dict) -> dict:
    """Deltas model - baseline for every number both have (perplexity, each task's acc/acc_norm)."""
    delta: dict = {}
    if "perplexity" in model and "perplexity" in baseline:
        delta["perplexity"] = model["perplexity"]["perplexity"] - baseline["perplexity"]["perplexity"]
    for task, row in model.get("tasks", {}).items():
        base = baseline.get("tasks", {}).get(task, {})
        delta.setdefault("tasks", {})[task] = {k: v - base[k] for k, v in row.items()
                                               if k in base and not k.endswith("_stderr")}
    if "mean_acc" in model and "mean_acc" in baseline:
        delta["mean_acc"] = model["mean_acc"] - baseline["mean_acc"]
    return delta


def format_table(results: dict, names: list[str]) -> str:
    """A plain-text table: one column per evaluated model (and a delta column for two)."""
    rows = []
    first = results[names[0]]
    if "perplexity" in first:
        rows.append(["perplexity"] + [f"{results[n]['perplexity']['perplexity']:.4f}" for n in names])
    for task in first.get("tasks", {}):
        for metric in ("acc", "acc_norm"):
            if metric in first["tasks"][task]:
                rows.append([f"{task} {metric}"] + [f"{results[n]['tasks'][task][metric]:.4f}" for n in names])
    if "mean_acc" in first:
        rows.append(["mean acc"] + [f"{results[n]['mean_acc']:.4f}" for n in names])
    header = ["metric"] + names
    if len(names) == 2:
        header.append("delta")
        for row in rows:
            row.append(f"{float(row[1]) - float(row[2]):+.4f}")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    if "perplexity" in first:
        p = first["perplexity"]
        lines.append(f"perplexity: {p['windows']} windows of {p['seqlen']} tokens of {p['source']}")
    for n in names:
        if results[n].get("note"):
            lines.append(f"{n}: {results[n]['note']}")
    return "\n".join(lines)
