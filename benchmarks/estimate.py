"""Issue 15: the time estimate printed before the first layer, against the measured run.

    python benchmarks/estimate.py [--runs sparsegpt:32x512,wanda:32x512,sparsegpt:16x2048]

Each run prunes the bf16 SmolLM2-135M-Instruct checkpoint (WikiText-2 validation calibration) in its
own process with ``--json`` and compares ``time_estimate.seconds`` with the run's ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, VALID, machine, smollm2_bf16  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="sparsegpt:32x512,wanda:32x512,sparsegpt:16x2048")
    a = p.parse_args()
    model = smollm2_bf16()
    rows = []
    for run in a.runs.split(","):
        method, size = run.split(":")
        nsamples, seqlen = (int(v) for v in size.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([sys.executable, "-m", "oneshot", "prune", model, "--method", method, "--calib",
                                   VALID, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--out",
                                   os.path.join(tmp, "o"), "--json"], capture_output=True, text=True, check=True,
                                  cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
        report = json.loads(done.stdout)
        est = report["time_estimate"]
        rows.append((method, nsamples, seqlen, est["seconds"], report["seconds"], est["gflops_per_second"]))
        print(rows[-1], flush=True)
    print(machine())
    print("| method | calibration | estimate s | measured s | estimate / measured | matmul GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for method, n, s, est, real, rate in rows:
        print(f"| {method} | {n} x {s} | {est:.0f} | {real:.0f} | {est / real:.2f} | {rate:g} |")


if __name__ == "__main__":
    main()
