"""Issue 28's outside anchor: llama.cpp's dense BF16 and F16 decode on this CPU, beside this project's
kernels measured by ``benchmarks/cpu_kernels.py`` (llama.cpp is a benchmark tool here, never a dependency).

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcpp   # its sdist vendors llama.cpp
    tar xzf /tmp/lcpp/llama_cpp_python-*.tar.gz -C /tmp/lcpp
    python benchmarks/llamacpp.py --source /tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp

``--source`` builds ``llama-bench`` there (CMake, Ninja, ``GGML_NATIVE``: the CPU's own flags) unless
``--bench`` names a built one. The models are the end-to-end models of ``cpu_kernels.py``: the random
Llama of a 1B model's width (the same seed, saved in bf16 with SmolLM2's tokenizer, its vocabulary padded
by the converter) and SmolLM2-135M-Instruct in bf16, each converted by llama.cpp's own
``convert_hf_to_gguf.py`` to BF16 and F16. Decode: ``llama-bench -p 0 -n 32 -d 32`` (32 tokens generated
after a 32-token context, the threads of ``--threads``), repeated ``--repeats`` times; the JSON goes to
``benchmarks/results/llamacpp-<cpu>.json``. ``--with-oneshot`` times, in the same run, this project's
decode variants of each model (``cpu_kernels.decode_runs``: torch fp32 and bf16, the dense kernel, the
bitmask and 2:4 kernels on magnitude masks), then llama.cpp's BF16 again, so the drift shows. The GGUF
converter needs ``sentencepiece`` in the running Python (``pip install sentencepiece``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, ROOT, machine, save_result, smollm2_bf16  # noqa: E402


def build(source: str) -> str:
    out = os.path.join(source, "build")
    bench = os.path.join(out, "bin", "llama-bench")
    if not os.path.isfile(bench):
        subprocess.run(["cmake", "-S", source, "-B", out, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"],
                       check=True)
        subprocess.run(["cmake", "--build", out, "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
                       check=True)
    return bench


def llama_1b_dir() -> str:
    """cpu_kernels.py's random 1B-width Llama as a bf16 checkpoint with a tokenizer (made once)."""
    directory = os.path.join(OUT, "llama-1b-width-random-bf16")
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    from cpu_kernels import llama_1b
    from transformers import AutoTokenizer

    tmp = directory + ".tmp"
    llama_1b().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(smollm2_bf16()).save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def gguf(source: str, model_dir: str, outtype: str) -> str:
    path = os.path.join(OUT, "gguf", f"{os.path.basename(model_dir)}-{outtype}.gguf")
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        env = {**os.environ, "PYTHONPATH": os.path.join(source, "gguf-py")}
        subprocess.run([sys.executable, os.path.join(source, "convert_hf_to_gguf.py"), model_dir, "--outtype", outtype,
                        "--outfile", path + ".tmp"], check=True, env=env, stdout=subprocess.DEVNULL)
        os.replace(path + ".tmp", path)
    return path


def decode(bench: str, path: str, threads: int, repeats: int) -> dict:
    out = subprocess.run([bench, "-m", path, "-p", "0", "-n", "32", "-d", "32", "-t", str(threads), "-r",
                          str(repeats), "-o", "json"], check=True, capture_output=True, text=True).stdout
    row = json.loads(out)[0]
    return {"tokens_per_s": round(row["avg_ts"], 3), "stddev": round(row["stddev_ts"], 3),
            "build": row.get("build_commit"), "cpu": row.get("cpu_info"), "type": row.get("model_type")}


def show(label: str, name: str, row: dict) -> None:
    print(f"  {label:<26} {name:<22} {row['tokens_per_s']:8.3f} ± {row['stddev']:.3f} tok/s ({row['cpu']}, "
          f"build {row['build']})", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    ap.add_argument("--bench", help="a built llama-bench (default: build it under SOURCE/build)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--with-oneshot", action="store_true",
                    help="also time cpu_kernels.py's decode variants of each model in this run, then llama.cpp again")
    ap.add_argument("--decode-iters", type=int, default=20)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    bench = args.bench or build(args.source)
    models = {"llama 1B width (random)": llama_1b_dir(), "SmolLM2-135M bf16": smollm2_bf16()}
    result = {"machine": machine(), "threads": args.threads, "decode": {}}
    for label, directory in models.items():
        files = {outtype: gguf(args.source, directory, outtype) for outtype in ("bf16", "f16")}
        rows = result["decode"].setdefault(label, {})
        for outtype, path in files.items():
            rows[f"llama.cpp {outtype.upper()}"] = decode(bench, path, args.threads, args.repeats)
            show(label, f"llama.cpp {outtype.upper()}", rows[f"llama.cpp {outtype.upper()}"])
        if args.with_oneshot:  # this project's variants, then llama.cpp again: the drift of the machine between
            import torch
            from cpu_kernels import decode_runs
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(args.threads)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
            rows["oneshot"] = decode_runs(model, args.decode_iters, label)
            del model
            rows["llama.cpp BF16, after"] = decode(bench, files["bf16"], args.threads, args.repeats)
            show(label, "llama.cpp BF16, after", rows["llama.cpp BF16, after"])
    tag = re.sub(r"[^a-z0-9]+", "-", str(next(iter(result["decode"].values()))["llama.cpp BF16"]["cpu"]).lower())
    path = os.path.join(args.out, f"llamacpp-{tag.strip('-')[:40]}.json")
    save_result(path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
