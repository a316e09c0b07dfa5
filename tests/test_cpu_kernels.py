"""kernels/cpu.py: the CPU kernels (dense, bitmask, 2:4 through the bitmask layout) on every path this
CPU has, against the fp32 reference on every pattern, ragged shapes and M = 1..8; the same bits at any
thread count; oneshot.load(..., kernels="cpu") and its fallback; auto's measured choice; the bench."""

import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from oneshot.cli import main
from oneshot.kernels import cpu
from oneshot.kernels.bench import random_24, random_bitmask
from oneshot.kernels.weights import Bitmask, DenseWeight, Packed24

if platform.machine() not in ("x86_64", "AMD64") or shutil.which("c++") is None:
    pytest.skip("the CPU kernels need x86-64 and a C++ compiler", allow_module_level=True)


@pytest.fixture(scope="module")
def paths():
    assert cpu.build() is not None, cpu.build_error()  # a compiler is here: the build must work
    return list(range(cpu.isa() + 1))  # scalar, and every faster path this CPU runs


def _weight(kind, n, k, dtype, seed=0):
    if kind == "2:4":
        return Packed24.from_dense(random_24(n, k, dtype, "cpu", seed=seed))
    if kind == "dense":
        return DenseWeight(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype))
    sparsity = int(kind.removeprefix("bitmask")) / 100
    return Bitmask.from_dense(random_bitmask(n, k, sparsity, dtype, "cpu", seed=seed))


KINDS = ["dense", "bitmask0", "bitmask50", "bitmask70", "bitmask100", "2:4"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_every_kernel_matches_the_fp32_reference(kind, dtype, paths):
    """Ragged shapes (N not a multiple of the 4-row block, K not of the 32-column group), M = 1..8, each
    path: fp32 x to 1e-5 of the output's scale, bias added."""
    for n, k in [(37, 200), (64, 96), (5, 36)]:
        if kind == "2:4" and k % 4:
            continue
        w = _weight(kind, n, k, dtype, seed=n)
        want_w = w.dense().float()
        bias = torch.randn(n)
        for m in (1, 2, 3, 4, 5, 8):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            want = F.linear(x, want_w, bias)
            scale = want.abs().max().item() + 1
            for path in paths:
                got = cpu.cpu_linear(x, w, bias, path)
                assert got.shape == (m, n) and got.dtype == torch.float32
                assert (got - want).abs().max().item() <= 1e-5 * scale * (k / 32 + 1), (kind, n, k, m, path)


def test_bf16_activations_and_leading_dims(paths):
    w = _weight("bitmask50", 40, 128, torch.bfloat16)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    want = F.linear(x.float(), w.dense().float())
    for path in paths:
        got = cpu.cpu_linear(x, w, None, path)
        assert got.dtype == torch.bfloat16 and got.shape == (2, 3, 40)
        assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-2)


def test_same_bits_at_every_thread_count(paths):
    w = _weight("bitmask60", 300, 520, torch.bfloat16)
    d = _weight("dense", 300, 520, torch.bfloat16)
    x = torch.randn(3, 520)
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out[threads] = [cpu.cpu_linear(x, w, None, p) for p in paths] + [cpu.cpu_linear(x, d, None, p)
                                                                             for p in paths]
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(out[1], out[threads]))


def test_isa_follows_the_environment(paths, monkeypatch):
    monkeypatch.setenv("ONESHOT_CPU_ISA", "scalar")
    assert cpu.isa() == 0 and cpu.isa_name() == "scalar"
    monkeypatch.setenv("ONESHOT_CPU_ISA", "avx2")
    assert cpu.isa() == min(1, paths[-1])
    monkeypatch.setenv("ONESHOT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ONESHOT_CPU_ISA"):
        cpu.isa()


def test_layout_is_built_once_and_counts_every_byte(paths):
    w = _weight("bitmask50", 64, 256, torch.bfloat16)
    first = cpu.layout(w)
    assert cpu.layout(w) is first and first[0] == "blocked"
    kept = int((w.dense() != 0).sum())
    groups = 256 // 32
    assert first[1].numel() == kept * 2 + (64 // 4) * groups * 16 + 64  # values, a mask word per row, the pad
    assert first[3].shape == (16, groups)


def test_auto_on_a_cpu_measures_once_and_remembers(paths):
    from oneshot.kernels import sparse_linear

    w = _weight("bitmask70", 96, 256, torch.float32)
    x = torch.randn(1, 256)
    y = sparse_linear(x, w, None, "auto")
    assert torch.allclose(y, F.linear(x, w.dense()), rtol=1e-4, atol=1e-4)
    choices = cpu.measured_choices()
    assert choices["bitmask float32 96x256 M=1"] in ("cpu", "dense")
    assert set(w.cache) == ({"cpu"} if choices["bitmask float32 96x256 M=1"] == "cpu" else {"dense"})


@pytest.mark.parametrize("fmt,args", [("bitmask", ["--sparsity", "0.5"]), ("packed24", ["--pattern", "2:4"]),
                                      ("dense", ["--sparsity", "0.5"])])
def test_load_with_cpu_kernels_generates_the_plain_loads_tokens(fmt, args, tiny_factory, calib_txt, tmp_path,
                                                               paths):
    import oneshot
    from oneshot.kernels import SparseLinear

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--format", fmt, "--quiet", *args]) == 0
    plain = oneshot.load(str(out))
    fast = oneshot.load(str(out), kernels="cpu")
    swapped = [m for m in fast.modules() if isinstance(m, SparseLinear)]
    assert len(swapped) == 14 and fast.oneshot_kernels["replaced"] == 14
    assert {m.kind for m in swapped} == {{"packed24": "2:4", "bitmask": "bitmask", "dense": "dense"}[fmt]}
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, fast(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    want = plain.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(fast.generate(ids, max_new_tokens=5, do_sample=False), want)


def test_load_falls_back_to_dense_in_one_line_without_a_build(tiny_factory, calib_txt, tmp_path, monkeypatch,
                                                             capsys):
    import oneshot
    from oneshot.kernels import SparseLinear

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--format", "bitmask", "--quiet"]) == 0
    monkeypatch.setattr(cpu, "_STATE", {"error": "CalledProcessError: no compiler (simulated)"})
    capsys.readouterr()
    model = oneshot.load(str(out), kernels="cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "kernels='cpu' is unavailable here" in err[0] and "no compiler" in err[0]
    assert not any(isinstance(m, SparseLinear) for m in model.modules())
    assert model.oneshot_kernels["replaced"] == 0 and len(model.oneshot_kernels["kept"]) == 14


def test_sparsify_dense_kind_runs_the_dense_kernel(tiny_factory, paths):
    from transformers import AutoModelForCausalLM

    from oneshot.kernels import SparseLinear, sparsify

    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama")).eval()
    ids = torch.tensor([[1, 17, 42, 99, 5]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        replaced = sparsify(model, backend="cpu", kind="dense")
        got = model(input_ids=ids).logits
    assert len(replaced) == 14 and all(model.get_submodule(n).kind == "dense" for n in replaced)
    assert isinstance(model.get_submodule(replaced[0]), SparseLinear)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bench_on_a_cpu_times_every_load_and_prints_the_table(tiny_factory, calib_txt, tmp_path, paths, capsys):
    import json

    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                 "--out", str(out), "--format", "bitmask", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["bench", str(out), "--device", "cpu", "--m", "1", "--batches", "1", "--iters", "10",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["decode_tokens_per_s"]) == {"sparse kernels", "torch bf16", "torch fp32", "dense kernel"}
    assert all(v["batch1"] > 0 for v in result["decode_tokens_per_s"].values())
    cases = {r["case"].split()[0] for r in result["gemv"]}
    assert {"torch", "dense", "bitmask50"} <= cases and result["bandwidth_gbps"] > 0
    assert main(["bench", str(out), "--device", "cpu", "--m", "1", "--batches", "1", "--iters", "10",
                 "--no-e2e"]) == 0
    assert "vs fastest dense" in capsys.readouterr().out
