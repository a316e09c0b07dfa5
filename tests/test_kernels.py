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


def test_auto_is_dense_on_cpu_and_bad_backends_fail():
    packed = Packed24.from_dense(_random_24(64, 64, torch.float32))
    x = torch.randn(2, 64)
    assert torch.allclose(sparse_linear(x, packed), F.linear(x, packed.dense()))
    with pytest.raises(ValueError, match="unknown backend"):
        sparse_linear(x, packed, backend="magic")
    if not CUDA:
        with pytest.raises(ValueError, match="cannot run"):
            sparse_linear(x, packed, backend="cutlass")




def _need_triton():
    pytest.importorskip("triton", reason="triton is not installed (pip install 'oneshot[kernels]')")


@pytest.mark.parametrize("m,n,k", [(1, 64, 64), (5, 96, 256), (16, 64, 128), (33, 128, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_kernel_matches_reference(m, n, k, dtype):
    _need_triton()
    device = "cuda" if CUDA else "cpu"
    w = _random_24(n, k, dtype, seed=m + n + k, device=device)
    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    packed = Packed24.from_dense(w)
    got = sparse_linear(x, packed, bias, "triton")
    want = F.linear(x.float(), w.float(), bias.float())
    tol = 1e-2 if dtype == torch.float16 else 2e-3  # fp16 output rounding; tf32 on GPU
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * max(1.0, float(want.abs().max())))


@pytest.mark.slow
def test_triton_kernel_compiles_for_sm90():
    _need_triton()
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, in a fresh process
    code = "import json; from oneshot.kernels.triton24 import compile_for; print(json.dumps(compile_for(90, 'bf16')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stages.get("cubin", 0) > 0 and stages.get("ptx", 0) > 0


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
    assert main(["bench", str(unstructured), "--no-e2e"]) == 2
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
