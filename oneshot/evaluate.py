"""Perplexity the way the SparseGPT / Wanda papers measure it.

The text (WikiText-2 raw test, documents joined with "\\n\\n") is tokenized once and cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped); the
perplexity is exp of the mean next-token negative log-likelihood over every predicted token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, batch_size: int = 1,
               device: str | torch.device = "cpu", progress: bool = False) -> dict:
    """Perplexity of ``model`` on a 1-D token stream in non-overlapping ``seqlen`` windows."""
    from tqdm.auto import tqdm

    windows = tokens.numel() // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    ids = tokens[: windows * seqlen].reshape(windows, seqlen)
    total_nll, count = 0.0, 0
    for batch in tqdm(ids.split(batch_size), desc="perplexity", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        count += batch[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / count), "windows": windows, "seqlen": seqlen, "tokens": count}
