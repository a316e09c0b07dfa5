"""The GPU proof in one command: every GPU figure oneshot promises, from one run that fits a short lease.

    python benchmarks/gpu_check.py [--out gpu-check] [--budget 420] [--prune-layers 4] [--e2e-layers 32]
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu-check     # CPU, tiny shapes (the test suite)

Sections, in this order, each saved as it finishes (an interrupted run keeps what finished):

1. ``environment``: GPU, driver, CUDA, cuSPARSELt, torch, Triton, transformers versions, clocks;
2. ``correctness``: every backend (cutlass, cusparselt, triton, expand, auto; dense as a check) against
   the fp32 reference on random 2:4 and 50% bitmask weights, fp16 and bf16, seven shapes up to
   4096 x 14336 and M up to 4096, with and without bias, each case run twice for the same bits;
3. ``decode``: the decode-kernel sweep (benchmarks/kernels/sweep.py): 2:4, bitmask 50% and 70% at the
   Llama-3-8B shapes, M = 1, 4, 8, 16; every fixed Triton variant compiled first by ``--workers``
   parallel processes, then checked (error, same bits twice) and timed against cuBLAS (CUDA graphs,
   L2 flushed, median); the fastest passing variant per case goes into the tuning table;
4. ``gemm``: M = 64 ... 16384 at the same shapes: cuSPARSELt (searched algorithm), cutlass and expand
   for 2:4, expand for bitmask, against cuBLAS; the fastest per case goes into the tuning table,
   written to OUT/tuning.json (copy it to kernels/tuning.json) and used by ``auto`` below;
5. ``e2e``: a random Llama-3-8B-shape model (``--e2e-layers``), every decoder linear pruned 2:4, then
   another 50% unstructured: prefill tokens/s at 2048 tokens (eager, and replayed as a CUDA graph)
   and decode tokens/s at batch 1 and 8 (static KV cache, one step replayed as a CUDA graph; eager if
   a capture fails, said so), each model's dense run against ``kernels.sparsify`` with ``auto`` (this
   run's table) and the named backends; logits and GreedyDecoder tokens against the dense run;
6. ``prune``: a random Llama-3-8B-shape checkpoint with ``--prune-layers`` decoder layers (made on
   the spot), SparseGPT 2:4 and Wanda 50% through ``oneshot.prune`` on the GPU with 128 x 2048
   calibration tokens (the bundled WikiText-2 text): seconds per phase, peak GPU memory, and the
   32-layer time extrapolated from the per-layer time (said so in the table).

``--budget`` (seconds) shrinks the work to fit: sections past the budget are skipped (said so) and
the GEMM sizes and e2e layers shrink when little time is left. Writes OUT/gpu-check.json and
OUT/gpu-check.md and prints the table. Needs only torch, transformers, safetensors, tokenizers (and
Triton for the triton backend): no install step, nothing from the network (the bare GPU image).

``--dry-run``: CPU, tiny shapes, the reference and dense backends and the Triton kernels through the
interpreter (``TRITON_INTERPRET=1``); times mean nothing. tests/test_gpu_check.py runs it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

M_SIZES = (64, 256, 1024, 4096, 16384)  # the GEMM section's large M (decode sizes: the decode section)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, vocab_size=128256, num_hidden_layers=32)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            vocab_size=384, num_hidden_layers=2)
# distinct (name, N, K) of a Llama-3-8B decoder layer: q/o, k/v, gate/up, down
GEMM_SHAPES = [("q_proj,o_proj", 4096, 4096), ("k_proj,v_proj", 1024, 4096), ("gate_proj,up_proj", 14336, 4096),
               ("down_proj", 4096, 14336)]
TINY_GEMM_SHAPES = [("q_proj,o_proj", 128, 128), ("gate_proj,up_proj", 256, 128), ("down_proj", 128, 256)]
SECTIONS = ("correctness", "decode", "gemm", "e2e", "prune")
TRITON_MAX_M = 256  # the Triton kernel is written for decode sizes; above this it is not a contender
BARS = {"gemm_small_m": 1.5, "gemm_small_m_1024": 1.2, "gemm_large_m": 1.4, "decode_24": 1.35, "decode_bitmask": 1.3,
        "decode_b8": 1.25, "prefill": 1.2, "sparsegpt_s": 90.0, "wanda_s": 30.0, "peak_gb": 16.0}


class Results:
    """The run's results, written (atomically) after every step that adds to them."""

    def __init__(self, out: str, dry_run: bool, budget: float):
        self.out = out
        self.started = time.time()
        self.budget = budget
        self.data = {"dry_run": dry_run, "budget_s": budget, "sections": {}, "notes": []}
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        return self.budget - (time.time() - self.started)

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.data["notes"].append(text)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.time() - self.started, 1)
        for name, text in (("gpu-check.json", json.dumps(self.data, indent=1, default=str)),
                           ("gpu-check.md", markdown(self.data))):
            fd, tmp = tempfile.mkstemp(dir=self.out, prefix=f".{name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, os.path.join(self.out, name))

    def run(self, name: str, fn, *args, needs: float = 0.0) -> None:
        """Run one section; record its status, seconds and any error; save."""
        record = self.data["sections"].setdefault(name, {})
        if self.left() < needs:
            record.update(status="skipped", reason=f"{self.left():.0f} s of the budget left, needs ~{needs:.0f} s")
            self.note(f"{name}: skipped ({record['reason']})")
            self.save()
            return
        t = time.time()
        print(f"== {name} ({self.left():.0f} s of the budget left)", flush=True)
        try:
            fn(self, record, *args)
            record["status"] = "ok"
        except KeyboardInterrupt:
            record["status"] = "interrupted"
            record["seconds"] = round(time.time() - t, 1)
            self.data["interrupted"] = True
            self.save()
            raise
        except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(record["traceback"], file=sys.stderr, flush=True)
        record["seconds"] = round(time.time() - t, 1)
        self.save()


# ------------------------------------------------------------------------------------------ sections


def environment(res: Results, record: dict, device) -> None:
    import torch
    import transformers

    from oneshot.kernels.bench import device_info

    info = device_info(device)
    info["transformers"] = transformers.__version__
    info["python"] = sys.version.split()[0]
    info["commit"] = os.environ.get("ONESHOT_COMMIT", "unknown")
    if device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    record.update(info)
    print(json.dumps(info), flush=True)


TOLERANCE = {"float16": 2e-3, "bfloat16": 1.2e-2, "float32": 1e-4}  # relative Frobenius error of the output


def _weight(kind: str, n: int, k: int, dtype, device, seed: int):
    """(dense masked weight, weight object) of a 2:4 or a 50% bitmask random weight."""
    from oneshot.kernels import Bitmask, Packed24
    from oneshot.kernels.bench import random_24, random_bitmask

    if kind == "2:4":
        w = random_24(n, k, dtype, device, seed=seed)
        return w, Packed24.from_dense(w)
    w = random_bitmask(n, k, 0.5, dtype, device, seed=seed)
    return w, Bitmask.from_dense(w)


def correctness(res: Results, record: dict, device, dry: bool) -> None:
    import torch

    from oneshot.kernels import BACKENDS, available, choose, sparse_linear

    shapes = [(1, 64, 64), (5, 96, 256), (16, 64, 128)] if dry else \
        [(1, 4096, 4096), (7, 1024, 4096), (16, 14336, 4096), (64, 4096, 14336), (256, 4096, 4096),
         (1024, 14336, 4096), (4096, 1024, 4096)]
    dtypes = [torch.float16, torch.float32] if dry else [torch.float16, torch.bfloat16]
    cases, worst = [], {}
    for dtype in dtypes:
        name = str(dtype).split(".")[-1]
        for i, (m, n, k) in enumerate(shapes):
            for kind in ("2:4", "bitmask50"):
                w, weight = _weight(kind, n, k, dtype, device, seed=i)
                g = torch.Generator(device="cpu").manual_seed(100 + i)
                x = torch.randn(m, k, generator=g).to(dtype).to(device)
                bias = torch.randn(n, generator=g).to(dtype).to(device) if i % 2 else None
                ref = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
                for backend in [b for b in BACKENDS if b not in ("reference", "cpu")] + ["auto"]:
                    if backend != "auto" and backend not in available(x, weight):
                        continue
                    if backend == "triton" and m > TRITON_MAX_M:
                        continue
                    case = {"dtype": name, "kind": kind, "M": m, "N": n, "K": k, "bias": bias is not None,
                            "backend": backend, "tolerance": TOLERANCE[name]}
                    try:
                        y = sparse_linear(x, weight, bias, backend)
                        same = bool(torch.equal(y, sparse_linear(x, weight, bias, backend)))
                        y = y.float()
                    except Exception as exc:  # noqa: BLE001 - a backend that raises is a failed case, not the end
                        case["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        cases.append({**case, "pass": False})
                        print(f"FAIL {case}", flush=True)
                        continue
                    err = float((y - ref).norm() / ref.norm().clamp_min(1e-30))
                    ok = bool(torch.isfinite(y).all()) and err <= TOLERANCE[name]
                    case.update(rel_error=float(f"{err:.3g}"), same_bits_twice=same, **{"pass": ok})
                    if backend == "auto":
                        case["auto_chose"] = choose(x, weight)
                    cases.append(case)
                    key = f"{backend} {kind} {name}"
                    worst[key] = max(worst.get(key, 0.0), err)
                    if not ok:
                        print(f"FAIL {case}", flush=True)
                del w, weight
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    record.update(cases=cases, passed=sum(c["pass"] for c in cases), total=len(cases),
                  not_deterministic=[c for c in cases if c.get("same_bits_twice") is False],
                  worst={k: float(f"{v:.3g}") for k, v in worst.items()})
    print(f"correctness: {record['passed']}/{record['total']} cases pass; worst {record['worst']}", flush=True)


def _install_tuning(res: Results) -> dict:
    """This run's tuning table (decode section's cells, then the GEMM section's), written to OUT/tuning.json
    and installed for ``auto`` (the e2e section reads it)."""
    info = res.data["sections"].get("environment", {})
    gpu = info.get("name", "cpu")
    merged: dict = {}
    for section in ("decode", "gemm"):
        for table, shapes in res.data["sections"].get(section, {}).get("tuning_cells", {}).items():
            for shape, cells in shapes.items():
                merged.setdefault(table, {}).setdefault(shape, {}).update(cells)
    tuning = {gpu: merged}
    with open(os.path.join(res.out, "tuning.json"), "w", encoding="utf-8") as fh:
        json.dump(tuning, fh, indent=1, sort_keys=True)
    from oneshot.kernels import backends

    backends._TABLE = tuning
    return tuning


def decode(res: Results, record: dict, device, dry: bool, iters: int, workers: int) -> None:
    """Every fixed Triton variant at decode sizes (benchmarks/kernels/sweep.py): compiled in parallel
    first, then each checked (error, same bits twice) and timed against cuBLAS."""
    import torch

    from benchmarks.kernels import sweep
    from oneshot.kernels.bench import Timer

    if workers > 1:
        record["warm"] = sweep.spawn_warmers(workers, dry)
        print(f"  compiled {record['warm']['variants']} variants in {record['warm']['seconds']} s "
              f"({workers} processes)", flush=True)
        res.save()
    timer = Timer(device, warmup=max(3, iters // 5), iters=iters)
    dtype = torch.float32 if dry else torch.bfloat16
    rows = record.setdefault("rows", [])

    def on_case(case):
        rows.extend(case)
        best = max((r for r in case if "speedup" in r), key=lambda r: r["speedup"], default=None)
        r0 = case[0]
        print(f"  {r0['kind']:<10} {r0['N']}x{r0['K']} M={r0['M']:<3} dense {r0['dense_us']} us"
              + (f", best {best['variant']} {best['us']} us ({best['speedup']:.2f}x of ideal {best['ideal_speedup']})"
                 if best else ", no variant passed"), flush=True)
        res.save()

    sweep.run_sweep(device, dtype, timer, dry, on_case)
    record["failed"] = [r for r in rows if not r.get("ok")]
    record["tuning_cells"] = sweep.tuning_cells(rows)
    _install_tuning(res)


def gemm(res: Results, record: dict, device, dry: bool, iters: int) -> None:
    """Large M (prefill): dense cuBLAS against cuSPARSELt (searched algorithm), cutlass and expand (2:4),
    and expand (bitmask 50%), each call replayed as a CUDA graph."""
    import torch

    from oneshot.kernels import BACKENDS
    from oneshot.kernels.bench import Timer, fastest_table, gemm_case

    shapes = TINY_GEMM_SHAPES if dry else GEMM_SHAPES
    sizes = (64,) if dry else M_SIZES
    if not dry and res.left() < 200:
        sizes = tuple(m for m in sizes if m <= 4096)
        res.note(f"gemm: M = 16384 dropped to fit the budget ({res.left():.0f} s left)")
    timer = Timer(device, warmup=max(3, iters // 5), iters=iters)
    info = res.data["sections"].get("environment", {})
    rows = record.setdefault("rows", [])
    candidates = [b for b in BACKENDS if b not in ("dense", "reference", "cpu", "triton")]
    dtype = torch.float32 if dry else torch.bfloat16
    for kind in ("2:4", "bitmask50"):
        for layers, n, k in shapes:
            for m in sizes:
                case_rows = []
                for name in candidates:  # one backend at a time: one that raises loses only itself
                    try:
                        got = gemm_case(m, n, k, dtype, device, timer, [name], info, kind=kind)
                    except Exception as exc:  # noqa: BLE001
                        errors = record.setdefault("errors", {})
                        errors[f"{kind} {name} {n}x{k} M={m}"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        continue
                    case_rows += [r for r in got if r["backend"] != "dense" or not case_rows]
                rows += [{"layers": layers, **r} for r in case_rows]
                best = min((r for r in case_rows if r["backend"] != "dense"), key=lambda r: r["latency_us"],
                           default=None)
                dense = next((r for r in case_rows if r["backend"] == "dense"), None)
                if dense is not None:
                    print(f"  {kind:<10} {n}x{k} M={m:5d}: dense {dense['latency_us']} us"
                          + (f", best {best['backend']} {best['latency_us']} us ({best['speedup']:.2f}x)"
                             if best else ""), flush=True)
                res.save()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    name = str(dtype).split(".")[-1]
    record["tuning_cells"] = {key: fastest_table([r for r in rows if r["kind"] == kind])
                              for key, kind in ((name, "2:4"), (f"{name}/bitmask", "bitmask50"))}
    record["tuning"] = _install_tuning(res)


def make_checkpoint(directory: str, dims: dict, layers: int) -> float:
    """A random bf16 Llama checkpoint with these dimensions and ``layers`` decoder layers; GB written."""
    import transformers as tf
    from accelerate import init_empty_weights

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from benchmarks.common import write_random_shards
    from tiny import make_tokenizer

    config = tf.LlamaConfig(dtype="bfloat16", tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                            max_position_embeddings=8192, **{**dims, "num_hidden_layers": layers})
    with init_empty_weights():
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    shapes = {n: p.shape for n, p in skeleton.named_parameters()}
    total = write_random_shards(directory, shapes, layers, seed=0)
    config.save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return total / 1e9


def prune(res: Results, record: dict, device, dry: bool, layers: int, work: str) -> None:
    import torch

    import oneshot

    dims = TINY if dry else LLAMA3_8B
    full_layers = dims["num_hidden_layers"]
    nsamples, seqlen = (4, 64) if dry else (128, 2048)
    directory = os.path.join(work, "checkpoint")
    t = time.time()
    gb = make_checkpoint(directory, dims, layers)
    record["checkpoint"] = {"layers": layers, "of": full_layers, "gb": round(gb, 2),
                            "make_s": round(time.time() - t, 1),
                            "calibration": f"{nsamples} x {seqlen} tokens, bundled WikiText-2 validation text"}
    res.save()
    runs = record.setdefault("runs", {})
    variants = [("sparsegpt 2:4", dict(method="sparsegpt", pattern="2:4")),
                ("wanda 50%", dict(method="wanda", sparsity=0.5)),
                # the reference code's settings: statistics once per layer, each group's pattern by saliency
                ("sparsegpt 2:4 --sequential layer --nm-select saliency",
                 dict(method="sparsegpt", pattern="2:4", sequential="layer", nm_select="saliency"))]
    for label, options in variants:
        if not dry and res.left() < 45:
            res.note(f"prune: {label!r} skipped ({res.left():.0f} s of the budget left)")
            continue
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.time()
        result = oneshot.prune(directory, None, calib="bundled", nsamples=nsamples, seqlen=seqlen,
                               device=str(device), progress=False, **options)
        wall = time.time() - t
        report = result.report
        phases = report.get("phases_seconds", {})
        per_layer = (phases.get("prune_and_propagate", 0.0) + phases.get("layer_io", 0.0)) / layers
        run = {"wall_s": round(wall, 2), "phases_s": phases, "per_layer_s": round(per_layer, 3),
               "sparsity": report.get("sparsity"), "extrapolated_full_s": round(wall + (full_layers - layers) *
                                                                                  per_layer, 1),
               "forward_batch": report.get("forward_batch"), "compute_dtype": report.get("compute_dtype"),
               "peak_memory_report": report.get("peak_memory")}
        if device.type == "cuda":
            run["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
            run["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 2)
        runs[label] = run
        print(f"  {label}: {wall:.1f} s for {layers} layers ({per_layer:.2f} s a layer; {full_layers} layers "
              f"~{run['extrapolated_full_s']} s), peak GPU {run.get('peak_allocated_gb')} GB", flush=True)
        del result
        res.save()


def llama(dims: dict, layers: int, device, pattern: str = "2:4"):
    """A random-initialised bf16 Llama (untied head) on ``device`` with every decoder linear pruned by
    magnitude: 2:4, or ``"50%"`` unstructured (exactly half of every row)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**dims, "num_hidden_layers": layers}, max_position_embeddings=8192,
                         tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight
                    if pattern == "2:4":
                        groups = w.view(w.shape[0], -1, 4)
                        groups.scatter_(-1, groups.abs().argsort(-1)[..., :2], 0)
                    else:
                        pruned = int(round(float(pattern.rstrip("%")) / 100 * w.shape[1]))
                        w.scatter_(1, w.abs().topk(pruned, dim=1, largest=False).indices, 0)
    return model


def e2e(res: Results, record: dict, device, dry: bool, layers: int) -> None:
    """A random Llama-3-8B-shape model, every decoder linear pruned: prefill at batch 1 (eager, and
    replayed as a CUDA graph: no host cost per call) and decode at each batch (static cache, one step
    replayed as a CUDA graph), dense against the sparse kernels: 2:4 and bitmask 50%, ``auto`` with this
    run's tuning table, and the named backends; the logits against the same model's dense run; greedy
    tokens of GreedyDecoder against dense."""
    import torch

    from oneshot.kernels import sparsify
    from oneshot.kernels.bench import Timer, decode_step_seconds, set_backend, usable_backends
    from oneshot.kernels.decode import GreedyDecoder

    dims = TINY if dry else LLAMA3_8B
    prompt_len, context, batches = (32, 16, (1, 2)) if dry else (2048, 512, (1, 8))
    record.update(layers=layers, of=dims["num_hidden_layers"], prompt_len=prompt_len, context=context)
    timer = Timer(device, warmup=2, iters=3 if dry else 8, flush_l2=False)
    cuda = device.type == "cuda"
    runs = record.setdefault("runs", {})
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(dims["vocab_size"], (1, prompt_len), generator=g).to(device)
    short = prompt[:, :32]

    def measure(name: str, model, reference: dict) -> None:
        def prefill():
            with torch.no_grad():
                model(input_ids=prompt, use_cache=False, logits_to_keep=1)

        run = {"prefill_tokens_per_s": round(prompt_len / timer(prefill), 1)}
        if cuda:
            run["prefill_graph_tokens_per_s"] = round(prompt_len / timer(prefill, graph=True), 1)
            run["prefill_graph_mode"] = timer.mode
        with torch.no_grad():  # the swap must not change the model: last-token logits against its dense run
            logits = model(input_ids=prompt[:, :64], use_cache=False, logits_to_keep=1).logits.float()
        tokens = GreedyDecoder(model, max_len=64).generate(short, 8)
        if "logits" in reference:
            error = (logits - reference["logits"]).norm() / reference["logits"].norm()
            run["logits_rel_error_vs_dense"] = float(f"{float(error):.3g}")
            run["greedy_tokens_equal_dense"] = bool(torch.equal(tokens, reference["tokens"]))
        else:
            reference.update(logits=logits, tokens=tokens)
        for batch in batches:
            seconds, mode = decode_step_seconds(model, device, timer, batch, context)
            run[f"decode_b{batch}_tokens_per_s"] = round(batch / seconds, 1)
            run[f"decode_b{batch}_mode"] = mode
        runs[name] = run
        print(f"  {name}: {json.dumps(run)}", flush=True)
        res.save()
        if cuda:
            torch.cuda.empty_cache()

    for pattern, kind in (("2:4", "2:4"), ("50%", "bitmask")):
        label = "2:4" if kind == "2:4" else "bitmask50"
        if not dry and res.left() < 40:
            res.note(f"e2e: the {label} model skipped ({res.left():.0f} s of the budget left)")
            continue
        model = llama(dims, layers, device, pattern)
        reference: dict = {}
        measure(f"dense ({label} model)", model, reference)
        sparsify(model, backend="dense", kind=kind)
        backends = ["auto"] + [b for b in usable_backends(model) if b in ("triton", "cusparselt")]
        if dry:
            backends = ["triton"]
        for backend in backends:
            set_backend(model, backend)
            try:
                measure(f"{label} {backend}", model, reference)
            except Exception as exc:  # noqa: BLE001 - one backend's failure is a result, not the end
                runs[f"{label} {backend}"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                res.save()
            for module in model.modules():  # drop the backend's cached weight forms before the next one
                packed = getattr(module, "_weight", None)
                if packed is not None:
                    for key in [k for k in packed.cache if k != "dense"]:
                        packed.cache.pop(key)
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ the table


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(data: dict) -> str:
    sec = data["sections"]
    env = sec.get("environment", {})
    lines = ["# oneshot GPU check" + (" (dry run: CPU, tiny shapes, times mean nothing)" if data["dry_run"] else ""),
             "",
             f"GPU {env.get('name', env.get('device', '?'))}, driver "
             f"{env.get('nvidia_smi', {}).get('driver_version', '?')}, CUDA {env.get('cuda')}, cuSPARSELt "
             f"{env.get('cusparselt')}, torch {env.get('torch')}, Triton {env.get('triton')}, transformers "
             f"{env.get('transformers')}, commit {env.get('commit')}; budget {data['budget_s']:.0f} s, "
             f"{data.get('elapsed_s', 0):.0f} s used" + ("; **interrupted**" if data.get("interrupted") else ""), ""]
    for name, record in sec.items():
        if record.get("status") not in ("ok", None):
            lines.append(f"- section `{name}`: **{record.get('status')}** "
                         f"{record.get('error') or record.get('reason') or ''}")
    corr = sec.get("correctness", {})
    if corr.get("cases"):
        lines += ["", f"## Correctness: {corr['passed']}/{corr['total']} cases within tolerance", "",
                  "| backend, weight, dtype | worst relative error |", "|---|---|"]
        lines += [f"| {k} | {v:.3g} |" for k, v in corr["worst"].items()]
        if corr.get("not_deterministic"):
            lines.append(f"\n**{len(corr['not_deterministic'])} cases gave other bits on a second run.**")
    dec = sec.get("decode", {})
    if dec.get("rows"):
        from benchmarks.kernels.sweep import best_rows

        warm = dec.get("warm", {})
        lines += ["", "## Decode GEMM (M <= 16): the fastest passing Triton variant against cuBLAS, "
                  f"{dec['rows'][0]['dtype']} "
                  f"({len(dec['rows'])} variants checked, {len(dec.get('failed', []))} failed; compiled in "
                  f"{warm.get('seconds', '–')} s by {warm.get('workers', 1)} processes)", "",
                  "| weight | N x K | M | dense us | dense GB/s | best variant | us | GB/s | speedup | ideal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in best_rows(dec["rows"]):
            if "us" not in r:
                lines.append(f"| {r['kind']} | {r['N']} x {r['K']} | {r['M']} | {r['dense_us']} | "
                             f"{r['dense_gbps']} | none passed | | | | |")
                continue
            lines.append(f"| {r['kind']} | {r['N']} x {r['K']} | {r['M']} | {r['dense_us']} | {r['dense_gbps']} | "
                         f"`{r['variant']}` | {r['us']} | {r['gbps']} | {r['speedup']:.2f}x | "
                         f"{r['ideal_speedup']:.2f}x |")
    rows = sec.get("gemm", {}).get("rows", [])
    if rows:
        backends = sorted({r["backend"] for r in rows} - {"dense"})
        lines += ["", "## GEMM at large M against dense (speedup; fraction of the ideal in brackets)", "",
                  "| weight | N x K | M | dense us | " + " | ".join(backends) + " | best |",
                  "|---|---|---|---|" + "---|" * len(backends) + "---|"]
        keys = []
        for r in rows:
            key = (r.get("kind", "2:4"), r["N"], r["K"], r["M"])
            if key not in keys:
                keys.append(key)
        for key in keys:
            group = {r["backend"]: r for r in rows if (r.get("kind", "2:4"), r["N"], r["K"], r["M"]) == key}
            cells = []
            for b in backends:
                r = group.get(b)
                cells.append("–" if r is None else f"{r['speedup']:.2f}x ({r['fraction_of_ideal']:.2f})")
            sparse = [group[b] for b in backends if b in group]
            best = max(sparse, key=lambda r: r["speedup"], default=None)
            winner = f"{best['backend']} {_fmt(best['speedup'])}x" if best else "–"
            lines.append(f"| {key[0]} | {key[1]} x {key[2]} | {key[3]} | {group['dense']['latency_us']} | "
                         + " | ".join(cells) + f" | {winner} |")
    prune_sec = sec.get("prune", {})
    if prune_sec.get("runs"):
        ck = prune_sec["checkpoint"]
        lines += ["", f"## Pruning on the GPU: {ck['layers']} of {ck['of']} layers of the shape, {ck['calibration']}; "
                  f"the {ck['of']}-layer time extrapolated from the per-layer time", "",
                  "| run | seconds | s a layer | whole model (extrapolated) | peak GPU allocated GB | reserved GB |",
                  "|---|---|---|---|---|---|"]
        for label, r in prune_sec["runs"].items():
            lines.append(f"| {label} | {r['wall_s']} | {r['per_layer_s']} | {r['extrapolated_full_s']} | "
                         f"{r.get('peak_allocated_gb', '–')} | {r.get('peak_reserved_gb', '–')} |")
    e2e_sec = sec.get("e2e", {})
    if e2e_sec.get("runs"):
        runs = e2e_sec["runs"]
        batch_keys = sorted({k for r in runs.values() for k in r if k.startswith("decode_b") and
                             k.endswith("_tokens_per_s")}, key=lambda k: int(k[8:].split("_")[0]))
        lines += ["", f"## End to end: {e2e_sec['layers']} of {e2e_sec['of']} layers, prefill {e2e_sec['prompt_len']} "
                  f"tokens at batch 1, decode after {e2e_sec['context']} tokens (tokens/s; x dense)", "",
                  "| run | prefill eager | prefill graph | " + " | ".join(k[7:].split("_")[0] for k in batch_keys)
                  + " | timing | logits error vs dense | greedy tokens = dense |",
                  "|---|---|---|" + "---|" * len(batch_keys) + "---|---|---|"]
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} |")
                continue
            dense = runs.get(dense_of(name), r)
            cells = [f"{r[k]:.0f} ({r[k] / dense[k]:.2f}x)" if k in r and k in dense else "–"
                     for k in ["prefill_tokens_per_s", "prefill_graph_tokens_per_s"] + batch_keys]
            modes = sorted({v for k, v in r.items() if k.endswith("_mode")})
            error = r.get("logits_rel_error_vs_dense")
            same = r.get("greedy_tokens_equal_dense")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {', '.join(modes)} | "
                         + ("–" if error is None else f"{error:.3g}") + f" | {'–' if same is None else same} |")
    lines += ["", "## The bar", ""] + [f"- {line}" for line in bar_lines(data)]
    if data["notes"]:
        lines += ["", "Notes:"] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


def dense_of(run: str) -> str:
    """The e2e run a sparse run is compared with: the dense run of the same model."""
    return f"dense ({run.split()[0]} model)"


def bar_lines(data: dict) -> list[str]:
    sec = data["sections"]
    out = []
    decode_rows = [r for r in sec.get("decode", {}).get("rows", []) if "speedup" in r]
    for kind in ("2:4", "bitmask50", "bitmask70"):
        best: dict = {}
        for r in decode_rows:
            if r["kind"] == kind:
                key = (r["N"], r["K"], r["M"])
                best[key] = max(best.get(key, 0.0), r["speedup"])
        for label, small in (("large shapes", False), ("1024 x 4096", True)):
            cells = {key: v for key, v in best.items() if (key[:2] == (1024, 4096)) == small}
            if cells:
                bar = BARS["gemm_small_m_1024" if small else "gemm_small_m"]
                low = min(cells.values())
                where = min(cells, key=cells.get)
                out.append(f"{kind} GEMM M <= 16, {label}: {low:.2f}x at the worst case ({where[0]} x {where[1]}, "
                           f"M={where[2]}; bar {bar}x): " + ("met" if low >= bar else "missed"))
    rows = [r for r in sec.get("gemm", {}).get("rows", []) if r["backend"] != "dense" and r.get("kind", "2:4") == "2:4"]
    best = {}
    for r in rows:
        if r["M"] >= 4096:
            best[(r["N"], r["K"], r["M"])] = max(best.get((r["N"], r["K"], r["M"]), 0.0), r["speedup"])
    if best:
        low = min(best.values())
        out.append(f"2:4 GEMM M >= 4096: best backend's speedup {low:.2f}x at the worst shape "
                   f"(bar {BARS['gemm_large_m']}x): " + ("met" if low >= BARS["gemm_large_m"] else "missed"))
    runs = sec.get("e2e", {}).get("runs", {})
    for label, model, key, bar in (("decode b1", "2:4", "decode_b1_tokens_per_s", BARS["decode_24"]),
                                   ("decode b1", "bitmask50", "decode_b1_tokens_per_s", BARS["decode_bitmask"]),
                                   ("decode b8", "2:4", "decode_b8_tokens_per_s", BARS["decode_b8"]),
                                   ("decode b8", "bitmask50", "decode_b8_tokens_per_s", BARS["decode_b8"]),
                                   ("prefill (graph)", "2:4", "prefill_graph_tokens_per_s", BARS["prefill"]),
                                   ("prefill (eager)", "2:4", "prefill_tokens_per_s", BARS["prefill"])):
        dense = runs.get(f"dense ({model} model)", {})
        sparse = {k: v for k, v in runs.items() if k.split()[0] == model and "error" not in v and key in v}
        if sparse and key in dense:
            name, r = max(sparse.items(), key=lambda kv: kv[1][key])
            ratio = r[key] / dense[key]
            out.append(f"{label}: {ratio:.2f}x dense with {name} (bar {bar}x): "
                       + ("met" if ratio >= bar else "missed"))
        auto = runs.get(f"{model} auto", {})
        if key in auto and key in dense and auto[key] / dense[key] < 0.95:
            out.append(f"{label}, {model} auto: {auto[key] / dense[key]:.2f}x dense: auto lost to dense")
    pr = sec.get("prune", {}).get("runs", {})
    for label, bar in (("sparsegpt 2:4", BARS["sparsegpt_s"]), ("wanda 50%", BARS["wanda_s"])):
        if label in pr:
            r = pr[label]
            peak = r.get("peak_allocated_gb")
            ok = r["extrapolated_full_s"] <= bar and (peak is None or peak <= BARS["peak_gb"])
            out.append(f"{label}: ~{r['extrapolated_full_s']} s for the whole model (extrapolated; bar {bar:.0f} s), "
                       f"peak {peak} GB (bar {BARS['peak_gb']:.0f} GB): " + ("met" if ok else "missed"))
    return out or ["nothing measured"]


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu-check", help="directory for gpu-check.json, gpu-check.md, tuning.json")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds to fit in (default 420: 7 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted Triton (a harness check)")
    ap.add_argument("--prune-layers", type=int, default=None, help="decoder layers of the pruned checkpoint "
                    "(default 4 on a GPU; the whole-model time is extrapolated)")
    ap.add_argument("--e2e-layers", type=int, default=None, help="decoder layers of the e2e model (default 32)")
    ap.add_argument("--iters", type=int, default=30, help="timed runs per GEMM (median)")
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip: {', '.join(SECTIONS)}")
    ap.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)),
                    help="processes that compile the decode variants in parallel first")
    ap.add_argument("--work", default=None, help="scratch directory for the checkpoint (default: a temporary one)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SECTIONS):
        print(f"gpu_check: --skip takes {', '.join(SECTIONS)}; got {', '.join(sorted(skip - set(SECTIONS)))}",
              file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --dry-run checks the harness on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dry = args.dry_run
    res = Results(args.out, dry, args.budget)

    def stop(signum, frame):  # a timeout's SIGTERM: keep what finished
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    work = args.work or tempfile.mkdtemp(prefix="oneshot-gpu-check-")
    try:
        res.run("environment", environment, device)
        plan = [("correctness", correctness, (device, dry), 10),
                ("decode", decode, (device, dry, 5 if dry else args.iters, 1 if dry else args.workers), 60),
                ("gemm", gemm, (device, dry, 5 if dry else args.iters), 30),
                ("e2e", e2e, (device, dry, args.e2e_layers or (2 if dry else 32)), 40),
                ("prune", prune, (device, dry, args.prune_layers or (2 if dry else 4), work), 60)]
        for name, fn, fn_args, needs in plan:
            if name in skip:
                res.data["sections"][name] = {"status": "skipped", "reason": "--skip"}
                continue
            res.run(name, fn, *fn_args, needs=0 if dry else needs)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:
        res.note("interrupted: the sections above are what finished")
        res.save()
        print(markdown(res.data))
        return 130
    finally:
        if args.work is None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    res.save()
    print(markdown(res.data))
    failed = [n for n, r in res.data["sections"].items() if r.get("status") == "failed"]
    corr = res.data["sections"].get("correctness", {})
    return 1 if failed or corr.get("passed", 0) != corr.get("total", 0) else 0


if __name__ == "__main__":
    sys.exit(main())
