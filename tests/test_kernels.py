"""kernels/: format conversions against PyTorch's helpers, backends against an fp32 reference, the
Triton kernel through the interpreter, an sm_90 compile, the inference swap, and the bench harness."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from oneshot.cli import main
from oneshot.kernels import (
    BACKENDS,
    Packed24,
    compress24,
    from_cutlass,
    sparse_linear,
    sparsify,
    to_cutlass,
)
from oneshot.kernels.bench import Timer, gemm_bytes, gemm_case

PATTERNS = [p for p in itertools.product([0, 1], repeat=4) if sum(p) <= 2]
CUDA = torch.cuda.is_available()


def _random_24(n, k, dtype, seed=0, degenerate=True, device="cpu"):
    """Every 2:4 pattern (and the groups with fewer than two non-zeros); no accidental zeros kept."""
    g = torch.Generator().manual_seed(seed)
    pool = PATTERNS if degenerate else [p for p in PATTERNS if sum(p) == 2]
    keep = torch.tensor(pool, dtype=torch.bool)[torch.randint(len(pool), (n, k // 4), generator=g)].reshape(n, k)
    w = torch.randn(n, k, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones((), dtype=dtype), w)
    return torch.where(keep, w, torch.zeros((), dtype=dtype)).to(device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_layout_equals_pytorch_helper_on_every_pattern(dtype):
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    w = _random_24(128, 256, dtype)
    values, meta = compress24(w)
    packed, meta_reordered = to_cutlass(values, meta)
    want_packed, want_meta = sparse_semi_structured_from_dense_cutlass(w)
    assert torch.equal(packed, want_packed) and torch.equal(meta_reordered, want_meta)
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta_reordered), w)
    back_values, back_meta = from_cutlass(want_packed, want_meta)
    assert torch.equal(back_values, values) and torch.equal(back_meta, meta)


def test_cutlass_layout_rejects_bad_shapes():
    values, meta = compress24(_random_24(16, 64, torch.float16))
    with pytest.raises(ValueError, match="rows % 32"):
        to_cutlass(values, meta)


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_cpu_backends_against_fp32_masked_linear(backend):
    w = _random_24(96, 128, torch.bfloat16, degenerate=False)
    x = torch.randn(3, 7, 128).to(torch.bfloat16)
    bias = torch.randn(96).to(torch.bfloat16)
    packed = Packed24.from_dense(w)
    want = F.linear(x.float(), w.float(), bias.float())
    got = sparse_linear(x, packed, bias, backend)
    assert got.shape == (3, 7, 96) and got.dtype == torch.bfloat16
    if backend == "reference":
        assert torch.equal(got, want.to(torch.bfloat16))
    else:
        assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)


def test_auto_on_cpu_matches_dense_and_bad_backends_fail():
    packed = Packed24.from_dense(_random_24(64, 64, torch.float32))
    x = torch.randn(2, 64)
    assert torch.allclose(sparse_linear(x, packed), F.linear(x, packed.dense()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_linear(x, packed, backend="magic")
    if not CUDA:
        with pytest.raises(ValueError, match="cannot run"):
            sparse_linear(x, packed, backend="cutlass")




def _need_triton():
    pytest.importorskip("triton", reason="triton is not installed (pip install 'oneshot[kernels]')")


def _random_sparse(n, k, dtype, sparsity, seed=0):
    """A [n, k] weight with about ``sparsity`` of its entries +0.0 and no accidental zeros kept."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones((), dtype=dtype), w)
    return torch.where(torch.rand(n, k, generator=g) < sparsity, torch.zeros((), dtype=dtype), w)


TRITON_CASES = [  # (M, N, K): decode sizes, ragged K (not a multiple of the tile, of 8, of 64), N not a tile multiple
    (1, 64, 256), (3, 40, 100), (5, 33, 260), (8, 64, 192), (16, 48, 320),
]
TRITON_CONFIGS = [None, "fma-n16-k64-s1-w4-p3-kernel", "fma-n8-k128-s3-w4-p3-kernel", "fma-n16-k64-s2-w4-p3-pass",
                  "dot-n16-k128-s1-w4-p3-kernel", "dot-n32-k64-s4-w4-p3-kernel", "dot-n16-k64-s2-w4-p3-pass"]


@pytest.mark.parametrize("config,dtype", [(c, torch.float32) for c in TRITON_CONFIGS]
                         + [(c, torch.bfloat16) for c in TRITON_CONFIGS[::3]])
def test_triton_kernels_match_fp32_reference_on_every_pattern(config, dtype):
    """Every variant kind (CUDA-core and tl.dot, unsplit, split K reduced in the kernel or by a second
    pass) on 2:4 (every pattern, degenerate groups too) and bitmask at 0, 50, 70 and 100% sparsity,
    with and without bias, through the interpreter (on a GPU for real); two runs give the same bits."""
    _need_triton()
    from oneshot.kernels import Bitmask

    device = "cuda" if CUDA else "cpu"
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for i, (m, n, k) in enumerate(TRITON_CASES):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(m, k, generator=g).to(dtype).to(device)
        bias = torch.randn(n, generator=g).to(dtype).to(device) if i % 2 else None
        levels = (0.0, 0.5, 0.7, 1.0) if i == 1 else (0.5,) if i % 2 else (0.7,)  # every level, ragged K among them
        weights = [Bitmask.from_dense(_random_sparse(n, k, dtype, s, seed=i).to(device)) for s in levels]
        if k % 4 == 0:
            weights.append(Packed24.from_dense(_random_24(n, k, dtype, seed=i, device=device)))
        for weight in weights:
            backend = "triton" if config is None else f"triton:{config}"
            got = sparse_linear(x, weight, bias, backend)
            want = F.linear(x.float(), weight.dense().float(), None if bias is None else bias.float())
            scale = max(float(want.norm()), 1e-3)
            err = float((got.float() - want).norm()) / scale
            assert got.shape == (m, n) and got.dtype == dtype and bool(torch.isfinite(got).all())
            assert err <= tol, (config, weight.kind, getattr(weight, "sparsity", 0.5), (m, n, k), err)
            assert torch.equal(got, sparse_linear(x, weight, bias, backend)), "two runs differ"


def test_triton_expand_writes_the_dense_weight():
    _need_triton()
    from oneshot.kernels import Bitmask
    from oneshot.kernels.backends import triton_parts
    from oneshot.kernels.triton_sparse import expand

    for weight in (Bitmask.from_dense(_random_sparse(37, 200, torch.float16, 0.6)),
                   Packed24.from_dense(_random_24(37, 200, torch.float16))):
        assert torch.equal(expand(*triton_parts(weight), *weight.shape), weight.dense())


def test_sweep_configs_and_tuning_choices():
    from oneshot.kernels.backends import pick
    from oneshot.kernels.triton_sparse import Config, auto_split, default_config, sweep_configs

    for n, k in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        for m in (1, 4, 8, 16):
            configs = sweep_configs(n, k, m)
            assert configs and len(configs) == len(set(configs)) <= 30
            assert all(Config.from_key(c.key()) == c for c in configs)
            assert any(not c.use_dot for c in configs) == (m <= 8)  # the CUDA-core dot beside tl.dot for small M
            assert all(c.split_k * c.block_k <= k + c.block_k for c in configs)
            assert default_config(0, n, k, m).use_dot == (m > 4)
    assert auto_split(1024, 4096, 16, 256) == 16 and auto_split(14336, 4096, 16, 256) == 1
    table = {"64x128": {"1": "triton:fma-n16-k64-s1-w4-p3-kernel", "16": "dense"}}
    assert pick(table, (64, 128), 1, ["dense", "triton"]) == "triton:fma-n16-k64-s1-w4-p3-kernel"
    assert pick(table, (64, 128), 1, ["dense"]) == "dense"
    assert pick({}, (64, 128), 4096, ["dense", "triton", "expand"], "bitmask") == "expand"


@pytest.mark.slow
def test_triton_kernels_compile_for_sm90_and_sm100():
    """Ahead of time, no GPU: a CUDA-core and a tl.dot variant of each format for Hopper and Blackwell,
    with ptxas's register report and no spills."""
    _need_triton()
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, in a fresh process
    code = ("import json; from oneshot.kernels.triton_sparse import Config, compile_report; print(json.dumps("
            "[compile_report(f, Config(16, 128, 2, d), 16 if d else 1, cap) for f in (0, 1) for d in (False, True) "
            "for cap in (90, 100)]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(reports) == 8
    for r in reports:
        assert r["cubin_bytes"] > 0 and r["ptx_bytes"] > 0 and 0 < r["registers"] <= 255, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_sparsify_generation_equals_masked_dense(backend, tiny_factory, calib_txt, tmp_path):
    if backend == "triton":
        _need_triton()
    import oneshot

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--pattern", "2:4", "--format", "packed24", "--quiet"]) == 0
    dense = oneshot.load(str(out))
    sparse = copy.deepcopy(dense)
    replaced = sparsify(sparse, backend=backend)
    assert len(replaced) == 14 and all("layers" in name for name in replaced)  # 7 per block; the head stays
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        a = dense(input_ids=ids).logits
        b = sparse(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    gen_a = dense.generate(ids, max_new_tokens=8, do_sample=False)
    gen_b = sparse.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(gen_a, gen_b)


@pytest.mark.parametrize("fmt,args", [("bitmask", ["--sparsity", "0.5"]), ("packed24", ["--pattern", "2:4"])])
def test_load_with_triton_kernels_generates_the_plain_loads_tokens(fmt, args, tiny_factory, calib_txt, tmp_path):
    """The issue-24 bar on a CPU: an output of each sparse format loads with kernels="triton" (the
    interpreter here), every pruned linear a SparseLinear read from the stored parts, and greedy
    generation gives the plain load's tokens, through generate() and through GreedyDecoder."""
    _need_triton()
    import oneshot
    from oneshot.kernels import SparseLinear
    from oneshot.kernels.decode import GreedyDecoder

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--format", fmt, "--quiet", *args]) == 0
    plain = oneshot.load(str(out))
    fast = oneshot.load(str(out), kernels="triton")
    swapped = [m for m in fast.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14 and fast.oneshot_kernels == {"kernels": "triton", "format": fmt, "replaced": 14,
                                                           "kept": {}}
    assert {m.kind for m in swapped} == {"2:4" if fmt == "packed24" else "bitmask"}
    ids = torch.tensor([[1, 17, 42, 99, 5]])  # no pad token (3): generate() would mask it
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, fast(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    want = plain.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=5, do_sample=False), want)
    assert torch.equal(GreedyDecoder(fast, max_len=16).generate(ids, 5), want)


def test_load_with_kernels_refuses_what_cannot_run(tiny_factory, calib_txt, tmp_path, monkeypatch):
    import oneshot
    from oneshot import OneshotError

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--format", "bitmask", "--quiet"]) == 0
    with pytest.raises(OneshotError, match="unknown kernels='magic'"):
        oneshot.load(str(out), kernels="magic")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not CUDA:
        with pytest.raises(OneshotError, match="cannot run the bitmask"):
            oneshot.load(str(out), kernels="triton")


def test_greedy_decoder_matches_recomputing_every_step(tiny_factory):
    """Static cache, right-padded prefill buckets, explicit positions and masks: the tokens of a full
    forward pass per step, at batch 2 (one prompt holding the pad token, which generate() would mask)."""
    from transformers import AutoModelForCausalLM

    from oneshot.kernels.decode import GreedyDecoder

    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama")).eval()
    def recomputed(ids, steps):
        for _ in range(steps):
            with torch.no_grad():
                token = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, token[:, None]], 1)
        return ids

    ids = torch.tensor([[1, 17, 42, 99, 5], [1, 3, 4, 5, 6]])
    decoder = GreedyDecoder(model, max_len=24, buckets=(8, 16))
    assert torch.equal(decoder.generate(ids, 7), recomputed(ids, 7))
    assert torch.equal(decoder.generate(ids[:, :3], 4), recomputed(ids[:, :3], 4))  # the same cache, reused
    with pytest.raises(ValueError, match="do not fit"):
        decoder.generate(ids, 30)


def test_bench_harness_rows_and_byte_arithmetic():
    assert gemm_bytes(1, 4096, 4096, 2, False) / gemm_bytes(1, 4096, 4096, 2, True) == pytest.approx(1.777, rel=1e-2)
    rows = gemm_case(4, 64, 128, torch.float32, torch.device("cpu"), Timer(torch.device("cpu"), 2, 5),
                     backends=list(BACKENDS))
    assert rows[0]["backend"] == "dense" and rows[0]["speedup"] == 1.0
    for row in rows:
        assert row["latency_us"] > 0 and row["gbps"] > 0 and row["M"] == 4


def test_oneshot_bench_cli(tiny_factory, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
          "--out", str(out), "--pattern", "2:4", "--quiet"])
    capsys.readouterr()
    assert main(["bench", str(out), "--m", "1,8", "--iters", "3", "--batches", "1", "--decode-context", "4",
                 "--prompt-len", "16", "--backends", "reference", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["M"] for r in result["gemm"]} == {1, 8}
    assert {"dense", "auto"} <= set(result["end_to_end"]) and result["sparse_linears"] == 14
    unstructured = tmp_path / "u"
    main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
          "--out", str(unstructured), "--quiet"])
    # the 2:4 backends harness (named --backends) refuses a model with no 2:4 layers; the CPU bench,
    # which also runs bitmask, is tested in test_cpu_kernels
    assert main(["bench", str(unstructured), "--no-e2e", "--backends", "reference"]) == 2
    assert "no 2:4 linear layers" in capsys.readouterr().err
    assert main(["bench", str(out), "--m", "0"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt"])
def test_gpu_backends_against_reference(backend):
    w = _random_24(256, 512, torch.bfloat16, degenerate=False, device="cuda")
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    packed = Packed24.from_dense(w)
    if backend not in BACKENDS or not BACKENDS[backend][1](x, packed):
        pytest.skip(f"{backend} is not available on this GPU/build")
    got = sparse_linear(x, packed, None, backend)
    want = F.linear(x.float(), w.float())
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
