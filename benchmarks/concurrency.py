"""Issue 15 bar: two `oneshot prune` runs started on one --out at random offsets never make a mixed output.

    python benchmarks/concurrency.py [--trials 100] [--max-offset 2.0] [--seed 0]

Each trial starts two processes on the same --out, one with Wanda and one with magnitude pruning, the
second a random 0 to ``--max-offset`` seconds after the first (in random order), both with
``--load stream`` (a small sharded Llama: 6 decoder layers, one shard each). Afterwards exactly one
run must have written the output, the other must have failed with exit 2 and one line (another run
holds the lock, or --out exists by then); ``oneshot verify`` must pass; and every weight file must be
byte-identical to the output of a lone run of the method the report names. Results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from benchmarks.common import machine  # noqa: E402

METHODS = ("wanda", "magnitude")


def prune_cmd(model: str, calib: str, out: str, method: str) -> list[str]:
    return [sys.executable, "-m", "oneshot", "prune", model, "--method", method, "--calib", calib, "--nsamples", "4",
            "--seqlen", "64", "--load", "stream", "--out", out, "--quiet"]


def weight_files(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--max-offset", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from tiny import make_sharded_llama, sample_text

    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_sharded_llama(os.path.join(tmp, "model"), layers=6, hidden=128)
        calib = os.path.join(tmp, "calib.txt")
        with open(calib, "w") as fh:
            fh.write(sample_text(6000, seed=1))
        reference = {}
        for method in METHODS:  # what a lone run of each method writes
            reference[method] = os.path.join(tmp, f"ref-{method}")
            subprocess.run(prune_cmd(model, calib, reference[method], method), env=env, check=True)
        counts = {"trials": 0, "mixed": 0, "both_failed": 0, "both_wrote": 0, "verify_failed": 0,
                  "loser_not_one_line": 0, "lock_refusals": 0, "exists_refusals": 0}
        offsets = []
        t0 = time.perf_counter()
        for trial in range(a.trials):
            out = os.path.join(tmp, f"out-{trial}")
            order = list(METHODS)
            rng.shuffle(order)
            offset = rng.uniform(0, a.max_offset)
            offsets.append(offset)
            first = subprocess.Popen(prune_cmd(model, calib, out, order[0]), env=env, stderr=subprocess.PIPE,
                                     text=True)
            time.sleep(offset)
            second = subprocess.Popen(prune_cmd(model, calib, out, order[1]), env=env, stderr=subprocess.PIPE,
                                      text=True)
            results = [(proc.wait(), proc.stderr.read()) for proc in (first, second)]
            counts["trials"] += 1
            winners = [order[k] for k, (rc, _) in enumerate(results) if rc == 0]
            losers = [err for rc, err in results if rc != 0]
            if len(winners) == 0:
                counts["both_failed"] += 1
            elif len(winners) == 2:
                counts["both_wrote"] += 1
            for err in losers:
                lines = err.strip().splitlines()
                if len(lines) != 1 or not lines[0].startswith("oneshot: error: ") or \
                        not [rc for rc, e in results if e == err][0] == 2:
                    counts["loser_not_one_line"] += 1
                elif "being written by another oneshot run" in lines[0]:
                    counts["lock_refusals"] += 1
                elif "exists and is not empty" in lines[0]:
                    counts["exists_refusals"] += 1
            if os.path.isdir(out):
                with open(os.path.join(out, "report.json")) as fh:
                    method = json.load(fh)["method"]
                with open(os.path.join(out, "oneshot_sparsity.json")) as fh:
                    sidecar_method = json.load(fh).get("method", method)
                ref = reference[method]
                same = (sidecar_method == method and weight_files(out) == weight_files(ref)
                        and all(filecmp.cmp(os.path.join(out, n), os.path.join(ref, n), shallow=False)
                                for n in weight_files(out)))
                counts["mixed"] += 0 if same else 1
                verify = subprocess.run([sys.executable, "-m", "oneshot", "verify", out, "--quiet"], env=env,
                                        capture_output=True, text=True)
                counts["verify_failed"] += verify.returncode != 0
                shutil.rmtree(out)
            print(f"trial {trial + 1}/{a.trials}: offset {offset:.2f} s, {order[0]} first; wrote: "
                  f"{','.join(winners) or 'none'}", flush=True)
        print(machine())
        print(f"{counts['trials']} trials in {time.perf_counter() - t0:.0f} s, offsets 0-{a.max_offset} s "
              f"(median {sorted(offsets)[len(offsets) // 2]:.2f} s)")
        print(json.dumps(counts, indent=1))
        bad = counts["mixed"] + counts["both_failed"] + counts["both_wrote"] + counts["verify_failed"] + \
            counts["loser_not_one_line"]
        print("PASS: no mixed output" if bad == 0 else f"FAIL: {bad} bad trial outcomes")
        raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
