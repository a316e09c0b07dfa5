"""Issue 26 bar: a SparseGPT run killed (-9) at a random point and resumed writes the tensors of a run
that was never interrupted, streamed and in memory, with two CPU-bound processes beside it.

    python benchmarks/determinism.py [--kills 20] [--seed 0] [--busy 2] [--json PATH]

A random 10-layer Llama (hidden 256, sharded safetensors) is pruned by ``oneshot prune --method
sparsegpt --journal-interval 0`` once without interruption per ``--load`` (stream, full); these are
the references. Then, for each mode, ``--kills`` times: a fresh run is started, killed with SIGKILL
at a uniformly random moment between 0.2 s and the measured duration of an uninterrupted run under
the same load (so some kills land while loading, some in a layer, some in a journal write), then
``--resume`` finishes it; every tensor of every weight file is compared with the reference
(``torch.equal``), and the files' bytes too. A run that finished before the kill is counted apart
and drawn again. ``--busy`` CPU-bound processes spin beside it the whole time. Exit 0 when every
resumed output is identical. Results: benchmarks/RESULTS.md, "Determinism".
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
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


def _spin() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2147483648


def prune_cmd(model: str, calib: str, out: str, load: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "oneshot", "prune", model, "--out", out, "--calib", calib, "--method", "sparsegpt",
            "--nsamples", "16", "--seqlen", "64", "--quiet", "--journal-interval", "0", "--load", load, *extra]


def finished_layers(out: str) -> int:
    from oneshot.journal import Journal
    from oneshot.output import partial_dir

    return Journal.finished_in(partial_dir(out))


def compare(out: str, ref: str) -> list[str]:
    """Names of the tensors (or files) that differ between two outputs; empty when identical."""
    import torch
    from safetensors.torch import load_file

    names = sorted(n for n in os.listdir(ref) if n.endswith(".safetensors"))
    if names != sorted(n for n in os.listdir(out) if n.endswith(".safetensors")):
        return ["<file names>"]
    bad = []
    for name in names:
        a, b = load_file(os.path.join(ref, name)), load_file(os.path.join(out, name))
        if sorted(a) != sorted(b):
            bad.append(f"{name}: <keys>")
        bad += [f"{name}:{k}" for k in sorted(a) if k in b and not torch.equal(a[k], b[k])]
        if not bad and not filecmp.cmp(os.path.join(ref, name), os.path.join(out, name), shallow=False):
            bad.append(f"{name}: <bytes>")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="kills per mode (stream and full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--busy", type=int, default=2, help="CPU-bound processes beside the runs")
    p.add_argument("--modes", default="stream,full")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    from tiny import make_sharded_llama, sample_text

    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    rng = random.Random(a.seed)
    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(a.busy)]
    for proc in busy:
        proc.start()
    results = {"machine": machine(), "busy_processes": a.busy, "modes": {}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_sharded_llama(os.path.join(tmp, "model"), layers=10, hidden=256, max_shard_size="2MB")
            calib = os.path.join(tmp, "calib.txt")
            with open(calib, "w") as fh:
                fh.write(sample_text(6000, seed=1))
            for load in a.modes.split(","):
                ref = os.path.join(tmp, f"ref-{load}")
                t = time.perf_counter()
                subprocess.run(prune_cmd(model, calib, ref, load), env=env, check=True)
                duration = time.perf_counter() - t
                trials, finished_first = [], 0
                while len(trials) < a.kills:
                    out = os.path.join(tmp, f"out-{load}-{len(trials)}")
                    at = rng.uniform(0.2, duration)
                    proc = subprocess.Popen(prune_cmd(model, calib, out, load, "--resume"), env=env)
                    try:
                        proc.wait(timeout=at)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    else:  # it finished before the kill: draw again
                        finished_first += 1
                        shutil.rmtree(out)
                        continue
                    layers = finished_layers(out)
                    subprocess.run(prune_cmd(model, calib, out, load, "--resume"), env=env, check=True)
                    bad = compare(out, ref)
                    trials.append({"kill_after_s": round(at, 2), "layers_journaled": layers, "identical": not bad,
                                   "differing": bad[:5]})
                    print(f"{load} kill {len(trials)}/{a.kills}: at {at:.2f} s ({layers} layers journaled): "
                          f"{'identical' if not bad else 'DIFFERENT ' + ', '.join(bad[:3])}", flush=True)
                    shutil.rmtree(out)
                results["modes"][load] = {
                    "uninterrupted_s": round(duration, 2), "kills": len(trials),
                    "identical": sum(t["identical"] for t in trials), "finished_before_kill": finished_first,
                    "layers_journaled_at_kill": sorted(t["layers_journaled"] for t in trials), "trials": trials}
    finally:
        for proc in busy:
            proc.terminate()
    total = sum(m["kills"] for m in results["modes"].values())
    same = sum(m["identical"] for m in results["modes"].values())
    print(results["machine"])
    for load, m in results["modes"].items():
        print(f"{load}: {m['identical']}/{m['kills']} identical (uninterrupted {m['uninterrupted_s']} s; layers "
              f"journaled at the kills: {m['layers_journaled_at_kill']})")
    print(f"{'PASS' if same == total else 'FAIL'}: {same}/{total} resumed outputs identical")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    raise SystemExit(0 if same == total else 1)


if __name__ == "__main__":
    main()
