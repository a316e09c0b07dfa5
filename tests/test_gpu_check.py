"""benchmarks/gpu_check.py cannot rot: its CPU dry run (tiny shapes, reference and dense backends, the
Triton kernel through its interpreter) runs here, with the packages the bare GPU image lacks made
unimportable; and the pieces that only matter on a GPU (the tuning table, auto's choice, the bar
lines) are checked on made-up rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402

# the GPU image has torch, transformers, safetensors, tokenizers, triton: not these
ABSENT = ("datasets", "lm_eval", "gguf", "matplotlib")
LAUNCH = ("import runpy, sys\n"
          f"for name in {ABSENT!r}: sys.modules[name] = None\n"
          "sys.argv = ['gpu_check.py'] + sys.argv[1:]\n"
          f"runpy.run_path({os.path.join(ROOT, 'benchmarks', 'gpu_check.py')!r}, run_name='__main__')\n")

triton = pytest.importorskip("triton", reason="the dry run checks the Triton kernel through its interpreter")


def _dry_run(out, *extra, **popen):
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", LAUNCH, "--dry-run", "--out", str(out), *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_dry_run_without_the_packages_the_gpu_image_lacks(tmp_path):
    proc = _dry_run(tmp_path / "out")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    data = json.loads((tmp_path / "out" / "gpu-check.json").read_text())
    sections = data["sections"]
    assert {n: s["status"] for n, s in sections.items()} == {n: "ok" for n in ("environment", "correctness", "decode",
                                                                              "gemm", "e2e", "prune")}
    corr = sections["correctness"]
    assert corr["passed"] == corr["total"] > 0 and corr["not_deterministic"] == []
    assert {"dense", "triton", "expand", "auto"} <= {c["backend"] for c in corr["cases"]}
    assert {c["kind"] for c in corr["cases"]} == {"2:4", "bitmask50"}
    assert any(c["bias"] for c in corr["cases"]) and any(not c["bias"] for c in corr["cases"])
    decode = sections["decode"]["rows"]
    assert {r["kind"] for r in decode} == {"2:4", "bitmask50", "bitmask70"} and sections["decode"]["failed"] == []
    assert all(r["ok"] and r["deterministic"] and r["us"] > 0 for r in decode)
    gemm = sections["gemm"]["rows"]
    assert {r["backend"] for r in gemm} == {"dense", "expand"} and {r["kind"] for r in gemm} == {"2:4", "bitmask50"}
    assert all(r["latency_us"] > 0 for r in gemm)
    runs = sections["prune"]["runs"]
    assert set(runs) == {"sparsegpt 2:4", "wanda 50%", "sparsegpt 2:4 --sequential layer --nm-select saliency"}
    assert all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in runs.values())
    e2e = sections["e2e"]["runs"]
    assert set(e2e) == {"dense (2:4 model)", "2:4 triton", "dense (bitmask50 model)", "bitmask50 triton"}
    for run in ("2:4 triton", "bitmask50 triton"):  # the swap to the sparse forms changes nothing
        assert e2e[run]["logits_rel_error_vs_dense"] < 1e-4 and e2e[run]["greedy_tokens_equal_dense"]
    tuning = json.loads((tmp_path / "out" / "tuning.json").read_text())["cpu"]
    assert set(tuning) == {"float32", "float32/bitmask"}
    table = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "## Correctness" in table and "## The bar" in table and table in output


@pytest.mark.slow
def test_sigterm_keeps_what_finished(tmp_path):
    out = tmp_path / "out"
    proc = _dry_run(out, "--skip", "correctness")
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until the GEMM section has saved a row
        try:
            if json.loads((out / "gpu-check.json").read_text())["sections"].get("decode", {}).get("rows"):
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    data = json.loads((out / "gpu-check.json").read_text())
    if proc.returncode == 0:  # it finished before the signal came: nothing to check
        pytest.skip("the dry run finished before SIGTERM arrived")
    assert proc.returncode == 130, output[-2000:]
    assert data["interrupted"] is True
    assert data["sections"]["environment"]["status"] == "ok"
    assert data["sections"]["decode"]["rows"]
    assert "interrupted" in (out / "gpu-check.md").read_text()


def test_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--out", "unused"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_an_unknown_section_is_one_line(capsys):
    assert gpu_check.main(["--dry-run", "--out", "unused", "--skip", "gemm,kernels"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gpu_check: --skip takes correctness, decode, gemm, e2e, prune; got kernels"]


def _row(n, k, m, backend, speedup):
    return {"N": n, "K": k, "M": m, "backend": backend, "speedup": speedup, "latency_us": 10.0 / speedup,
            "fraction_of_ideal": speedup / 2, "layers": "x"}


def test_tuning_table_takes_the_fastest_or_dense():
    from oneshot.kernels.bench import fastest_table

    rows = [_row(64, 128, 1, "dense", 1.0), _row(64, 128, 1, "triton", 1.3), _row(64, 128, 1, "cusparselt", 1.1),
            _row(64, 128, 4096, "dense", 1.0), _row(64, 128, 4096, "cusparselt", 0.8)]
    assert fastest_table(rows) == {"64x128": {"1": "triton", "4096": "dense"}}


def test_auto_reads_the_table():
    from oneshot.kernels.backends import pick

    table = {"64x128": {"1": "triton", "16": "cusparselt", "4096": "dense"}}
    ok = ["dense", "reference", "cusparselt", "triton"]
    assert pick(table, (64, 128), 1, ok) == "triton"
    assert pick(table, (64, 128), 9, ok) == "cusparselt"  # the nearest tuned M at or above
    assert pick(table, (64, 128), 9, ["dense", "triton"]) == "dense"  # unavailable: on to 4096's choice
    assert pick(table, (64, 128), 100000, ok) == "dense"  # above the largest: the largest's
    assert pick(table, (32, 32), 1, ok) == "dense"  # a shape this GPU's table lacks
    assert pick({}, (32, 32), 1, ok) == "triton"  # no table: the rule of thumb
    assert pick({}, (32, 32), 1024, ok) == "cusparselt"


def _decode(kind, n, k, m, speedup):
    return {"kind": kind, "N": n, "K": k, "M": m, "speedup": speedup, "us": 1.0, "variant": "v"}


def test_bar_lines_say_met_and_missed():
    data = {"sections": {
        "decode": {"rows": [_decode("2:4", 4096, 4096, 1, 1.6), _decode("2:4", 4096, 4096, 16, 1.55),
                            _decode("2:4", 1024, 4096, 1, 1.1), _decode("bitmask50", 4096, 4096, 1, 1.2)]},
        "gemm": {"rows": [_row(64, 128, 4096, "dense", 1.0), _row(64, 128, 4096, "cusparselt", 1.2)]},
        "prune": {"runs": {"sparsegpt 2:4": {"extrapolated_full_s": 80.0, "peak_allocated_gb": 17.0},
                           "wanda 50%": {"extrapolated_full_s": 20.0, "peak_allocated_gb": 9.0}}},
        "e2e": {"runs": {"dense (2:4 model)": {"prefill_tokens_per_s": 100.0, "decode_b1_tokens_per_s": 10.0},
                         "2:4 auto": {"prefill_tokens_per_s": 90.0, "decode_b1_tokens_per_s": 14.0},
                         "dense (bitmask50 model)": {"decode_b1_tokens_per_s": 10.0},
                         "bitmask50 auto": {"decode_b1_tokens_per_s": 9.0}}}}}
    lines = gpu_check.bar_lines(data)
    assert "2:4 GEMM M <= 16, large shapes: 1.55x at the worst case (4096 x 4096, M=16; bar 1.5x): met" in lines
    assert any(line.startswith("2:4 GEMM M <= 16, 1024 x 4096: 1.10x") and line.endswith("missed") for line in lines)
    assert any(line.startswith("bitmask50 GEMM M <= 16, large shapes: 1.20x") and line.endswith("missed")
               for line in lines)
    assert any(line.startswith("2:4 GEMM M >= 4096") and line.endswith("missed") for line in lines)
    assert "decode b1: 1.40x dense with 2:4 auto (bar 1.35x): met" in lines
    assert any(line.startswith("decode b1: 0.90x dense with bitmask50 auto") for line in lines)
    assert "decode b1, bitmask50 auto: 0.90x dense: auto lost to dense" in lines
    assert any(line.startswith("prefill (eager): 0.90x") and line.endswith("missed") for line in lines)
    assert any(line.startswith("sparsegpt 2:4") and line.endswith("missed") for line in lines)  # 17 GB > 16
    assert any(line.startswith("wanda 50%") and line.endswith("met") for line in lines)


@pytest.mark.slow
def test_sweep_dry_run(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "kernels", "sweep.py"), "--dry-run",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "sweep.json").read_text())
    assert result["rows"] and all(r["ok"] and r["rel_error"] < 1e-4 and r["deterministic"] for r in result["rows"])
    assert set(result["tuning"]) == {"float32", "float32/bitmask"}
