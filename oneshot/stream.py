"""Streaming: prune a checkpoint bigger than memory, one decoder layer at a time (issue 6).

The model is built on the ``meta`` device. Everything outside the decoder layers except the output
head (embeddings, final norm, rotary tables) is read from the checkpoint's safetensors shards up
front; each decoder layer's tensors are read only when that layer is pruned, written to the output
as its own shard right after, and freed. Peak host memory is about the embeddings plus one layer
plus the calibration activations, whatever the size of the model.

The output is a sharded transformers checkpoint: ``model-0000i-of-0000n.safetensors`` per decoder
layer, a last shard with the rest (embeddings, norms, head; a tied head is not stored, as
transformers does) and ``model.safetensors.index.json``. Tensor names are the model's own, so the
output equals, tensor for tensor, what the in-memory path writes with ``save_pretrained``.

GGUF files, ``.bin`` checkpoints and runs that need the whole model at once (``--calib self``
generates text with it; no ``--out`` to write to) load fully instead; the report says why.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack

import torch
from torch import nn

from .engine import LayerIO
from .errors import OneshotError
from .formats.ondisk import expert_sources, layout_only, on_disk
from .formats.store import encode, file_prefix, file_sha256, files_bytes, format_sizes, size_summary, tensor_key
from .model.source import ModelSource, hub_error
from .model.structure import find_decoder_layers, find_linears, stores_transposed
from .output import write_json

INDEX = "model.safetensors.index.json"


def checkpoint_files(directory: str) -> dict[str, str] | None:
    """Tensor name -> shard path of a safetensors checkpoint directory; None when it has none."""
    index = os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return {key: os.path.join(directory, name) for key, name in weight_map.items()}
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as fh:
            return {key: single for key in fh.keys()}
    return None


def local_checkpoint(source: ModelSource) -> str | None:
    """The directory holding the safetensors shards: the local directory, or the hub snapshot
    (downloaded to the usual cache, shards and JSON only). None for GGUF."""
    if source.kind == "gguf":
        return None
    if source.kind == "local":
        return source.path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source.path, allow_patterns=["*.json", "*.safetensors"])
    except Exception as exc:  # noqa: BLE001 - one clear line
        raise hub_error(source, "weights", exc) from exc


def streaming_plan(mode: str, source: ModelSource, out: str | None, calib_kind: str) -> tuple[bool, str]:
    """(stream?, why) for ``--load auto|stream|full``; ``stream`` that cannot is an error up front."""
    reason = None
    if source.kind == "gguf":
        reason = "GGUF files are dequantized whole by transformers; they cannot stream"
    elif out is None:
        reason = "streaming writes each layer to the output as it goes; there is no --out"
    elif calib_kind == "self":
        reason = "--calib self generates text with the whole model"
    elif source.kind == "local" and checkpoint_files(source.path) is None:
        reason = "the checkpoint has no model.safetensors or model.safetensors.index.json (only .bin?)"
    if mode == "full":
        return False, "--load full"
    if reason is not None:
        if mode == "stream":
            raise OneshotError(f"--load stream: {reason}; use --load full or auto")
        return False, reason
    return True, "safetensors checkpoint" if mode == "auto" else "--load stream"


def _renamer(model, names: dict):
    """Checkpoint key -> model tensor name, as transformers' loader renames it (legacy names, the
    base-model prefix). Per-expert tensors that load as fused experts are assembled by
    :meth:`StreamedModel.read`; checkpoints that need other conversions cannot stream."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if any(not isinstance(t, WeightRenaming) and not layout_only(t) for t in transforms):
        raise OneshotError(f"{type(model).__name__}: its checkpoints need weight conversions when loaded, "
                           "which cannot stream; use --load full")
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(key: str) -> str:
        return rename_source_key(key, renamings, [], prefix, names)[0]

    return rename


def output_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors by the names ``save_pretrained`` would write them under (transformers' reverse renaming)."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, tensors))


class StreamedModel:
    """A meta-device model whose tensors are read from the checkpoint's shards on demand."""

    def __init__(self, directory: str, hf_config, dtype: str = "auto", trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        files = checkpoint_files(directory)
        if files is None:
            raise OneshotError(f"{directory}: no safetensors checkpoint to stream from")
        self.directory, self.files = directory, files
        self.dtype = self._dtype(dtype, hf_config, files)
        with init_empty_weights():  # parameters on meta; buffers (rotary tables) real, on the CPU
            model = AutoModelForCausalLM.from_config(hf_config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        model.eval()
        model.config.use_cache = False
        self.model = model
        self.path, self.layers = find_decoder_layers(model)
        names = dict(model.named_parameters(remove_duplicate=False))
        names.update(dict(model.named_buffers()))
        self.key = {}  # model tensor name -> checkpoint key, through transformers' own renamings
        rename = _renamer(model, names)
        for key in files:
            name = rename(key)
            if name in names:
                self.key[name] = key
        head = model.get_output_embeddings()
        self.head = {f"{n}.weight" for n, m in model.named_modules() if m is head} if head is not None else set()
        self.layer_names = [
            [n for n in names if n.startswith(f"{self.path}.{i}.")] for i in range(len(self.layers))
        ]
        in_layers = {n for group in self.layer_names for n in group}
        params = dict(model.named_parameters(remove_duplicate=False))
        self.assembled = {}  # fused expert parameter -> per expert, the checkpoint tensors it is made of
        for n, p in params.items():
            if n not in self.key and p.dim() == 3:
                sources = expert_sources(model, n, tuple(p.shape))
                if sources is not None and all(k in files for parts in sources for k, *_ in parts):
                    self.assembled[n] = sources
        missing = [n for n in params if n not in self.key and n not in self.head and n not in self.assembled]
        if missing:
            raise OneshotError(f"{directory}: the checkpoint holds no {missing[0]} ({len(missing)} tensors of the "
                               "model missing or named differently); use --load full")
        self.rest = [n for n in self.key if n not in in_layers]

    @staticmethod
    def _dtype(dtype: str, hf_config, files: dict[str, str]) -> torch.dtype:
        if dtype != "auto":
            return getattr(torch, dtype)
        text = getattr(hf_config, "text_config", None) or hf_config
        named = getattr(text, "dtype", None) or getattr(hf_config, "dtype", None)
        if named is not None:
            return named if isinstance(named, torch.dtype) else getattr(torch, str(named).replace("torch.", ""))
        from safetensors import safe_open

        codes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
        for key, path in files.items():
            with safe_open(path, "pt") as fh:
                code = fh.get_slice(key).get_dtype()
            if code in codes:
                return codes[code]
        return torch.float32

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of these model names from the shards, in the run's dtype (floating ones)."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        out = {name: self._assemble(name) for name in names if name in self.assembled}
        for name in names:
            if name not in out:
                by_file.setdefault(self.files[self.key[name]], []).append(name)
        with ExitStack() as stack:
            for path, group in by_file.items():
                fh = stack.enter_context(safe_open(path, "pt"))
                for name in group:
                    t = fh.get_tensor(self.key[name])
                    out[name] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def _assemble(self, name: str) -> torch.Tensor:
        """A fused expert parameter from the checkpoint's per-expert tensors."""
        from safetensors import safe_open

        shape = tuple(self.model.get_parameter(name).shape)
        fused = torch.empty(shape, dtype=self.dtype)
        with ExitStack() as stack:
            handles = {}
            for e, parts in enumerate(self.assembled[name]):
                for key, rows, cols, transposed in parts:
                    path = self.files[key]
                    if path not in handles:
                        handles[path] = stack.enter_context(safe_open(path, "pt"))
                    t = handles[path].get_tensor(key)
                    fused[e, rows, cols] = t.t() if transposed else t
        return fused

    def place(self, tensors: dict[str, torch.Tensor], device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, value in tensors.items():
            set_module_tensor_to_device(self.model, name, device, value=value)

    def load_rest(self, device) -> None:
        """Embeddings, norms and whatever else sits outside the layers, minus the output head."""
        self.place(self.read([n for n in self.rest if n not in self.head]), device)
        if getattr(self.model.config, "tie_word_embeddings", False) or not any(n in self.key for n in self.head):
            self.model.tie_weights()
        head, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        self._tied = head is not None and head.weight is emb.weight

    def unload_rest(self) -> None:
        """Everything outside the layers back to meta once the layer inputs are captured (the
        embeddings of a big vocabulary are hundreds of MB); the output reads them again at the end."""
        from accelerate.utils import set_module_tensor_to_device

        layer_names = {n for group in self.layer_names for n in group}
        for name, param in list(self.model.named_parameters()):
            if name not in layer_names and param.device.type != "meta":
                set_module_tensor_to_device(self.model, name, "meta")

    def tied_head(self) -> bool:
        return bool(getattr(self, "_tied", False))

    def output_rest(self) -> dict[str, torch.Tensor]:
        """The tensors of the last shard: everything outside the layers, the head unless tied."""
        names = [n for n in self.rest if not (n in self.head and self.tied_head())]
        state = dict(self.model.state_dict(keep_vars=True))
        out = {}
        for name in names:
            value = state.get(name)
            if value is None or value.device.type == "meta":
                value = self.read([name])[name]
            out[name] = value.detach().to("cpu")
        return out


class StreamIO(LayerIO):
    """Layers read from the checkpoint when the engine needs them and freed (back to meta) after."""

    streaming = True

    def __init__(self, streamed: StreamedModel):
        self.streamed = streamed
        self.seconds = 0.0

    def prepare(self, model, device) -> None:
        t = time.perf_counter()
        self.streamed.load_rest(device)
        self.seconds += time.perf_counter() - t

    def captured(self, model) -> None:
        self.streamed.unload_rest()

    def prepare_head(self, model, device) -> None:
        if not self.streamed.tied_head():
            self.streamed.place(self.streamed.read([n for n in self.streamed.head if n in self.streamed.key]), device)

    def load(self, i: int, layer: nn.Module, device) -> None:
        t = time.perf_counter()
        names = [n for n in self.streamed.layer_names[i] if n in self.streamed.key or n in self.streamed.assembled]
        self.streamed.place(self.streamed.read(names), device)
        left = [n for n, p in layer.named_parameters() if p.device.type == "meta"]
        if left:
            raise OneshotError(f"{self.streamed.path}.{i}.{left[0]}: not in the checkpoint; use --load full")
        self.seconds += time.perf_counter() - t

    def release(self, i: int, layer: nn.Module, device) -> None:
        layer.to("meta")

    def finish(self, model) -> None:
        pass


def layer_tensors(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A pruned layer's persistent tensors by their model names, on the CPU."""
    return {f"{prefix}.{k}": v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}


def transposed_names(layer: nn.Module, prefix: str, ignore=()) -> set[str]:
    return {name for name, module in find_linears(layer, prefix, ignore).items() if stores_transposed(module)}


class ShardWriter:
    """Writes a pruned layer's tensors as its own shard in any oneshot format, then the rest and the
    index. Shard ``i`` of ``n`` holds decoder layer ``i``; the last one everything else."""

    def __init__(self, directory: str, fmt: str, num_layers: int, model=None):
        self.directory, self.fmt, self.num_layers, self.model = directory, fmt, num_layers, model
        self.prefix = file_prefix(fmt)

    def shard_name(self, i: int) -> str:
        return f"{self.prefix}-{i + 1:05d}-of-{self.num_layers + 1:05d}.safetensors"

    def write(self, i: int, tensors: dict[str, torch.Tensor], sidecar: dict, perms: dict) -> dict:
        """Encode and write shard ``i`` atomically; returns its part of the storage summary."""
        from safetensors.torch import save_file

        if self.model is not None:
            tensors = output_names(self.model, tensors)
        layers = {k: v for k, v in on_disk(sidecar["layers"], tensors, self.model).items()
                  if tensor_key(k, v) in tensors}
        part = {**sidecar, "layers": layers}
        stored = encode(tensors, part, perms, self.fmt)
        name = self.shard_name(i)
        path = os.path.join(self.directory, name)
        save_file({k: v.contiguous() for k, v in stored.items()}, path + ".tmp",
                  metadata={"format": "pt"})  # one key: safetensors orders several by hash, which varies by process
        digest = file_sha256(path + ".tmp")  # still in the page cache: the sidecar records it at the end
        os.replace(path + ".tmp", path)
        sizes = format_sizes(tensors, part, perms) if layers else {}
        return {"keys": sorted(stored), "bytes": sum(v.numel() * v.element_size() for v in stored.values()),
                "sha256": digest, "file": name,
                "layers": layers,
                "sizes": {k: v["pruned_layer_bytes"] for k, v in sizes.items()}}

    def finish(self, shards: dict[int, dict]) -> dict:
        """The index, from every shard's keys; returns the storage summary of the whole output."""
        weight_map, total = {}, 0
        sizes: dict[str, int] = {}
        for i in sorted(shards):
            for key in shards[i]["keys"]:
                weight_map[key] = self.shard_name(i)
            total += shards[i]["bytes"]
            for fmt, b in shards[i]["sizes"].items():
                sizes[fmt] = sizes.get(fmt, 0) + b
        write_json(os.path.join(self.directory, f"{self.prefix}.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        return {"format": self.fmt, "weight_file_bytes": files_bytes(self.directory, self.fmt),
                "formats": size_summary(sizes)}


def save_metadata(streamed: StreamedModel, source_dir: str, tokenizer, directory: str) -> None:
    """config.json (as save_pretrained writes it), generation_config.json if the source has one, tokenizer."""
    config = streamed.model.config
    config.use_cache = True
    config.save_pretrained(directory)
    config.use_cache = False
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(source_dir)
    except (OSError, ValueError):  # the source has none
        generation = None
    if generation is not None:
        generation.save_pretrained(directory)  # a failure to write is the run's failure
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
