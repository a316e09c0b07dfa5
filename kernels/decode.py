"""Greedy generation with a static KV cache, each step replayed as a CUDA graph on a GPU.

At decode a 32-layer model launches a few hundred kernels per token; eagerly the host's launch work
is a large part of the step, and cuSPARSELt's ``torch._cslt_sparse_mm`` alone costs ~0.35 ms of host
time per call. A CUDA graph replays the whole step (or the whole prefill) with no host work:

- the one-token decode step is captured once per batch size and replayed for every new token;
- the prefill is captured once per length bucket (prompts are right-padded to the bucket: the
  causal mask keeps the real tokens from seeing the padding, and the padded cache slots are
  overwritten by the decode steps before any step can attend to them);
- inputs, positions and the attention mask live in static buffers updated in place before a replay.

Works with transformers before 5.25 (explicit ``cache_position``, ``past_key_values``) and after
(``cache``, a cache that counts its own length, which is set back after a capture or a padded
prefill). On a CPU the same steps run eagerly.
"""

from __future__ import annotations

import inspect

import torch

PREFILL_BUCKETS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def cache_kwargs(model, cache, positions: torch.Tensor, batch: int) -> dict:
    """The forward keywords that put ``positions`` of a ``batch`` into ``cache``, for either cache API of
    transformers (``cache_position`` and ``past_key_values`` before 5.25; ``cache`` after)."""
    params = set(inspect.signature(type(model).forward).parameters)
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True,
              "position_ids": positions.view(1, -1).expand(batch, -1)}
    if "cache_position" in params:
        kwargs["cache_position"] = positions
    return kwargs


def set_length(cache, length: int) -> None:
    """Tell a self-counting static cache (transformers >= 5.25) that it holds ``length`` tokens."""
    for layer in getattr(cache, "layers", []):
        counter = getattr(layer, "cumulative_length", None)
        if torch.is_tensor(counter):
            counter.fill_(length)


def bucket_for(length: int, buckets=PREFILL_BUCKETS) -> int:
    for b in buckets:
        if length <= b:
            return b
    return length


class _Graphed:
    """``fn`` run eagerly, or captured on first use and replayed (a CUDA device and ``graph``)."""

    def __init__(self, fn, device: torch.device, graph: bool, before_capture=None):
        self.fn, self.device, self.graph, self.before = fn, device, graph and device.type == "cuda", before_capture
        self.captured = None
        self.mode = "cuda-graph" if self.graph else "eager"

    def __call__(self):
        if not self.graph:
            return self.fn()
        if self.captured is None:
            try:
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        self.before()
                        self.fn()
                torch.cuda.current_stream(self.device).wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                self.before()
                with torch.cuda.graph(g):
                    self.out = self.fn()
                self.captured = g
            except Exception as exc:  # noqa: BLE001 - a step that cannot be captured runs eagerly, and says so
                torch.cuda.synchronize(self.device)
                self.graph, self.mode = False, f"eager (capture failed: {type(exc).__name__}: {str(exc)[:120]})"
                self.before()
                return self.fn()
            self.before()
        self.captured.replay()
        return self.out


class GreedyDecoder:
    """``decoder.generate(input_ids, max_new_tokens)``: greedy tokens, as ``model.generate(do_sample=False)``
    gives, from a static cache of ``max_len`` tokens; CUDA graphs on a GPU unless ``graph=False``."""

    def __init__(self, model, max_len: int = 4096, graph: bool = True, buckets=PREFILL_BUCKETS):
        from transformers import StaticCache

        self.model, self.max_len, self.buckets = model, max_len, buckets
        self.device = next(model.parameters()).device
        self.graph = graph and self.device.type == "cuda"
        self.StaticCache = StaticCache
        self.batch = None
        self.steps: dict = {}

    def _setup(self, batch: int) -> None:
        if self.batch == batch:
            return
        self.batch = batch
        self.cache = self.StaticCache(config=self.model.config, max_cache_len=self.max_len)
        self.steps = {}
        dev = self.device
        self.step_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.step_pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.step_mask = torch.zeros(batch, 1, 1, self.max_len, dtype=torch.bool, device=dev)

    def _run(self, ids, positions, mask, keep):
        kwargs = cache_kwargs(self.model, self.cache, positions, ids.shape[0])
        with torch.no_grad():
            return self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep, **kwargs).logits

    def _prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        batch, length = prompt.shape
        bucket = bucket_for(length, self.buckets) if self.graph else length
        if bucket > self.max_len:
            raise ValueError(f"a prompt of {length} tokens does not fit a cache of {self.max_len}")
        if bucket not in self.steps:
            ids = torch.zeros(batch, bucket, dtype=torch.long, device=self.device)
            pos = torch.arange(bucket, device=self.device)
            span = torch.arange(self.max_len, device=self.device)
            mask = (span.view(1, -1) <= pos.view(-1, 1)).view(1, 1, bucket, self.max_len).expand(batch, 1, bucket,
                                                                                               self.max_len)
            keep = torch.zeros(1, dtype=torch.long, device=self.device)
            self.steps[bucket] = (ids, keep, _Graphed(lambda: self._run(ids, pos, mask, keep), self.device,
                                                      self.graph, lambda: set_length(self.cache, 0)))
        ids, keep, run = self.steps[bucket]
        ids.zero_()
        ids[:, :length] = prompt
        keep.fill_(length - 1)
        set_length(self.cache, 0)
        logits = run()
        set_length(self.cache, length)  # the padded slots are not part of the sequence
        return logits[:, -1]

    def _decode_step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        if "step" not in self.steps:
            ids, pos, mask = self.step_ids, self.step_pos, self.step_mask
            self.steps["step"] = _Graphed(lambda: self._run(ids, pos, mask, 1), self.device, self.graph,
                                          lambda: set_length(self.cache, int(self._position)))
        self._position = position
        self.step_ids.copy_(token.view(-1, 1))
        self.step_pos.fill_(position)
        self.step_mask.copy_((torch.arange(self.max_len, device=self.device) <= position)
                             .view(1, 1, 1, -1).expand_as(self.step_mask))
        set_length(self.cache, position)
        return self.steps["step"]()[:, -1]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        batch, length = input_ids.shape
        if length + max_new_tokens > self.max_len:
            raise ValueError(f"{length} + {max_new_tokens} tokens do not fit a cache of {self.max_len}")
        self._setup(batch)
        out = [input_ids]
        token = self._prefill(input_ids).argmax(-1)
        for i in range(max_new_tokens):
            out.append(token.view(-1, 1).clone())
            if i == max_new_tokens - 1:
                break
            token = self._decode_step(token, length + i).argmax(-1)
        return torch.cat(out, dim=1)

    @property
    def modes(self) -> dict:
        return {str(k): v.mode if isinstance(v, _Graphed) else v[2].mode for k, v in self.steps.items()}
