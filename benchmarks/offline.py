"""How fast oneshot fails when the Hugging Face hub cannot be reached (issue 13: under 5 s, one line,
no retries). Each case is a fresh `oneshot prune` process, timed from start to exit, with the hub's
endpoint pointed at a closed local port (or, with --real, whatever this machine's network does).

    python benchmarks/offline.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="use this machine's network as it is (no fake endpoint)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model("llama", os.path.join(tmp, "tiny"))
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["HF_HOME"] = os.path.join(tmp, "hf-home")  # an empty cache
        if not args.real:
            env["HF_ENDPOINT"] = "http://127.0.0.1:9"
        cases = {
            "hub model id": ["HuggingFaceTB/SmolLM2-135M", "--sparsity", "0.5"],
            "--calib c4": [tiny, "--calib", "c4"],
            "--calib hf:allenai/c4": [tiny, "--calib", "hf:allenai/c4"],
        }
        print(machine())
        print("| case | exit | seconds | stderr lines | message |\n|---|---|---|---|---|")
        for name, argv in cases.items():
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "oneshot", "prune", *argv, "--out", os.path.join(tmp, "o")],
                                  capture_output=True, text=True, env=env, cwd=tmp)
            seconds = time.perf_counter() - t
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            print(f"| {name} | {proc.returncode} | {seconds:.1f} | {len(lines)} | {lines[-1][:110] if lines else ''} |")


if __name__ == "__main__":
    main()
