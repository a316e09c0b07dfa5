"""glibc's default heap against `oneshot.runtime.reuse_host_heap`, the setting `oneshot prune` uses
while the layers run on the CPU: the issue-2 SparseGPT runs on SmolLM2-135M (32 x 512 calibration
tokens of the shared WikiText-2 validation text), each setting in its own process.

    python benchmarks/host_heap.py [--patterns unstructured,2:4] [--repeat 1]

"layer work" is `prune_and_propagate` from report.json; peak RSS is the whole process's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import ROOT, VALID, machine, smollm2_gguf  # noqa: E402


def inner(setting: str, pattern: str, out: str) -> None:
    """One prune in this process; ``default`` swaps the heap setting for a no-op."""
    import oneshot.engine.loop

    if setting == "default":
        oneshot.engine.loop.reuse_host_heap = lambda enabled=True: contextlib.nullcontext()
    from oneshot.cli import main

    extra = [] if pattern == "unstructured" else ["--pattern", pattern]
    rc = main(["prune", smollm2_gguf(), "--method", "sparsegpt", "--calib", VALID, "--nsamples", "32",
               "--seqlen", "512", "--out", out, "--quiet", *extra])
    raise SystemExit(rc)


def run(setting: str, pattern: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out")
        subprocess.run([sys.executable, __file__, "--inner", setting, "--patterns", pattern, "--out", out],
                       check=True, cwd=ROOT)
        with open(os.path.join(out, "report.json")) as fh:
            report = json.load(fh)
    return {"layer_work": report["phases_seconds"]["prune_and_propagate"],
            "rss": report["peak_memory"]["host_rss_bytes"] / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--inner", choices=("default", "reuse"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.inner:
        inner(a.inner, a.patterns, a.out)
    rows = []
    for pattern in a.patterns.split(","):
        results = {"default": [], "reuse": []}
        for k in range(a.repeat):  # alternate which setting goes first
            for setting in (("default", "reuse") if k % 2 == 0 else ("reuse", "default")):
                results[setting].append(run(setting, pattern))
        best = {s: min(r, key=lambda x: x["layer_work"]) for s, r in results.items()}
        rows.append((pattern, best["default"], best["reuse"]))
    print(machine())
    print(f"SparseGPT, SmolLM2-135M, best of {a.repeat}\n")
    print("| pattern | glibc default: layer work s | peak RSS GiB | reuse_host_heap: layer work s | peak RSS GiB "
          "| saved |")
    print("|---|---|---|---|---|---|")
    for pattern, d, r in rows:
        print(f"| {pattern} | {d['layer_work']:.1f} | {d['rss']:.2f} | {r['layer_work']:.1f} | {r['rss']:.2f} | "
              f"{1 - r['layer_work'] / d['layer_work']:.0%} |")


if __name__ == "__main__":
    main()
