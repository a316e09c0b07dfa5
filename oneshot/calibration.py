"""Calibration sources -> token windows ``[nsamples, seqlen]``.

Sources (``--calib``):
  PATH.txt (or any plain-text file)      random windows of the tokenized text
  PATH.jsonl | PATH.json | PATH.parquet  the ``--text-field`` column, documents joined with "\\n\\n"
  hf:NAME[:CONFIG[:SPLIT]]               any ``datasets`` dataset (split defaults to train)
  wikitext2 | c4                         the papers' presets, from the Hugging Face hub (offline, wikitext2
                                         falls back to the bundled text, with a note in the report)
  bundled                                the WikiText-2 validation text shipped with oneshot (no network)
  self                                   text the model generates from its BOS token (no data at all)

Windows start at uniformly random token offsets drawn from a generator seeded by ``seed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import data
from .errors import OneshotError
from .hub import offline_reason

PRESETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", {}),
    "c4": ("allenai/c4", None, "train", {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}}),
}
TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class Calibration:
    input_ids: torch.Tensor  # int64 [nsamples, seqlen]
    info: dict = field(default_factory=dict)


def describe_source(spec: str) -> str:
    """Check a source spec without reading it; returns its kind. Raises OneshotError on bad specs."""
    if spec == "self":
        return "self"
    if spec == "bundled":
        return "bundled"
    if spec in PRESETS:
        return "preset"
    if spec.startswith("hf:"):
        if not spec[3:].split(":")[0]:
            raise OneshotError(f"--calib {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
        return "hf"
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        raise OneshotError(f"--calib {spec!r} is a directory; give a text, jsonl, json or parquet file")
    if not os.path.isfile(path):
        raise OneshotError(
            f"--calib {spec!r}: no such file (sources: a path, hf:NAME[:CONFIG[:SPLIT]], wikitext2, c4, bundled, self)"
        )
    return "file"


def _texts_from_dataset(dataset, text_field: str, spec: str) -> list[str]:
    if text_field not in dataset.column_names:
        raise OneshotError(
            f"--calib {spec!r} has no {text_field!r} column (columns: {', '.join(dataset.column_names)}); "
            "choose one with --text-field"
        )
    return dataset[text_field]


def _load_texts(spec: str, text_field: str, budget_chars: int, seed: int) -> tuple[list[str], str | None]:
    """The source's documents, and a note when another source stood in for it (offline)."""
    kind = describe_source(spec)
    if kind == "bundled":
        return [data.read(data.CALIBRATION)], None
    if spec == "wikitext2":
        offline = offline_reason()
        if offline is not None:
            return [data.read(data.CALIBRATION)], (f"--calib wikitext2: the hub cannot be used ({offline}); "
                                                   "calibrated on the bundled WikiText-2 validation text instead")
    elif kind != "file":
        offline_reason()  # probe once: offline, datasets reads its cache only and fails at once
    if kind == "file":
        path = os.path.expanduser(spec)
        ext = os.path.splitext(path)[1].lower()
        if ext not in TABULAR:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return [fh.read()], None
        import datasets

        try:
            dataset = datasets.load_dataset(TABULAR[ext], data_files=path, split="train")
        except Exception as exc:  # noqa: BLE001
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise OneshotError(f"--calib {spec!r}: could not read it as {TABULAR[ext]} ({first})") from exc
        return _sample_docs(_texts_from_dataset(dataset, text_field, spec), budget_chars, seed), None

    import datasets

    if kind == "preset":
        name, config, split, extra = PRESETS[spec]
    else:
        parts = spec[3:].split(":")
        name = parts[0]
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        extra = {}
    try:
        dataset = datasets.load_dataset(name, config, split=split, **extra)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OneshotError(
            f"--calib {spec!r}: could not load dataset {name!r} from the Hugging Face hub or cache ({first}); "
            "pass a local file instead with --calib PATH (.txt, .jsonl, .json or .parquet)"
        ) from exc
    return _sample_docs(_texts_from_dataset(dataset, text_field, spec), budget_chars, seed), None


def _sample_docs(texts, budget_chars: int, seed: int) -> list[str]:
    """A seeded random subset of documents holding at least ``budget_chars`` characters (all if fewer)."""
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, total = [], 0
    for index in order:
        text = texts[index]
        if not text or not text.strip():
            continue
        picked.append(text)
        total += len(text)
        if total >= budget_chars:
            break
    return picked


def windows_from_tokens(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of a 1-D token stream."""
    if tokens.numel() < seqlen:
        raise OneshotError(
            f"calibration text {what} has {tokens.numel()} tokens, too short for one window of --seqlen {seqlen}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


@dataclass
class CalibrationText:
    """A source's documents, read before the model is touched (a source that cannot be read fails
    first), and a note when another source stood in for the one asked for."""

    spec: str
    texts: list[str]
    fallback: str | None = None


def read_calibration(spec: str, nsamples: int, seqlen: int, seed: int, text_field: str = "text") -> CalibrationText:
    """The documents of a text source (everything but ``self``, which needs the model)."""
    budget = nsamples * seqlen * 6 * 4  # ~4 characters a token, 6x the windows' tokens to sample from
    texts, fallback = _load_texts(spec, text_field, budget, seed)
    return CalibrationText(spec, texts, fallback)


def tokenize_calibration(text: CalibrationText, tokenizer, nsamples: int, seqlen: int, seed: int) -> Calibration:
    """Token windows ``[nsamples, seqlen]`` at seeded random offsets of the tokenized documents."""
    joined = "\n\n".join(text.texts)
    tokens = torch.tensor(tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)
    ids = windows_from_tokens(tokens, nsamples, seqlen, seed, repr(text.spec))
    fallback = text.fallback
    info = {"source": "bundled" if fallback else text.spec,
            **({"requested": text.spec, "note": fallback} if fallback else {})}
    return Calibration(
        ids,
        {
            **info,
            "documents": len(text.texts),
            "tokens_available": int(tokens.numel()),
            "nsamples": nsamples,
            "seqlen": seqlen,
            "tokens": nsamples * seqlen,
            "seed": seed,
        },
    )


def load_calibration(spec: str, tokenizer, nsamples: int, seqlen: int, seed: int,
                     text_field: str = "text") -> Calibration:
    """Token windows from a text source: :func:`read_calibration` then :func:`tokenize_calibration`."""
    return tokenize_calibration(read_calibration(spec, nsamples, seqlen, seed, text_field), tokenizer, nsamples,
                                seqlen, seed)


@torch.no_grad()
def generate_calibration(model, tokenizer, nsamples: int, seqlen: int, seed: int, device,
                         batch_size: int = 16) -> Calibration:
    """``self``: windows sampled from the model, each starting at its BOS token (no data needed)."""
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.eos_token_id
    if start is None:
        raise OneshotError("--calib self needs a BOS or EOS token to start from, and the tokenizer has neither")
    torch.manual_seed(seed)
    was_cache = model.config.use_cache
    model.config.use_cache = True
    chunks = []
    try:
        for first in range(0, nsamples, batch_size):
            n = min(batch_size, nsamples - first)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
                pad_token_id=start,
                use_cache=True,
            )
            chunks.append(out[:, :seqlen].cpu())
    finally:
        model.config.use_cache = was_cache
    ids = torch.cat(chunks)
    return Calibration(
        ids, {"source": "self", "documents": 0, "nsamples": nsamples, "seqlen": seqlen, "tokens": int(ids.numel()),
              "seed": seed}
    )
