"""Every method, allocation, update, pattern and format end to end on float32, bfloat16 and float16
checkpoints, so that no dtype is ever left out of a path again (issue 13: `--update block` crashed
on every 16-bit checkpoint).

The cases cover each value of each option at least once per dtype (a covering set, not the full
product); each runs the CLI on a tiny Llama saved in that dtype and checks the output: exit 0, the
dtype kept, the pattern exact in every pruned linear, no -0.0, `oneshot verify` passing, and finite
logits from plain transformers (or `oneshot.load` for the compressed formats)."""

import json

import pytest
import torch

from oneshot.cli import main
from oneshot.constraint import Constraint
from oneshot.masks import check_constraint
from oneshot.model.structure import find_decoder_layers, find_linears, get_weight

DTYPES = ["float32", "bfloat16", "float16"]
# (method, allocation, update, pattern, format)
CASES = [
    ("sparsegpt", "uniform", "none", "unstructured", "dense"),
    ("sparsegpt", "uniform", "block", "2:4", "packed24"),
    ("sparsegpt", "owl", "lstsq", "unstructured", "bitmask"),
    ("wanda", "owl", "none", "unstructured", "bitmask"),
    ("wanda", "uniform", "admm", "4:8", "dense"),
    ("magnitude", "uniform", "lstsq", "2:4", "dense"),
    ("ria", "uniform", "admm", "2:4", "packed24"),
    ("dsnot", "uniform", "block", "4:8", "bitmask"),
]


def _flags(method, allocation, update, pattern, fmt):
    flags = ["--method", method, "--allocation", allocation, "--update", update, "--format", fmt]
    flags += ["--sparsity", "0.5"] if pattern == "unstructured" else ["--pattern", pattern]
    if update == "block":
        flags += ["--block-epochs", "1"]
    return flags


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,allocation,update,pattern,fmt", CASES)
def test_every_path_in_every_dtype(dtype, method, allocation, update, pattern, fmt, tiny_factory, calib_txt,
                                   tmp_path):
    import oneshot
    from oneshot.verify import verify

    src = tiny_factory("llama", dtype)
    out = tmp_path / "o"
    rc = main(["prune", src, "--calib", calib_txt, "--nsamples", "8", "--seqlen", "32", "--out", str(out), "--quiet",
               *_flags(method, allocation, update, pattern, fmt)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dtype"] == dtype
    assert report["compute_dtype"] == "float32"  # 16-bit layers run in float32 on the CPU
    if update == "block":
        assert len(report["block_update"]) == 2
    result = verify(str(out))
    assert result["ok"], result["failures"]
    model = oneshot.load(str(out))
    assert model.dtype == getattr(torch, dtype)
    constraint = Constraint(0.5) if pattern == "unstructured" else Constraint(0.5, *map(int, pattern.split(":")))
    path, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        for name, module in find_linears(layer, f"{path}.{i}").items():
            w = get_weight(module)
            if allocation == "uniform":
                assert check_constraint(w, constraint) is None, name
            assert not (torch.signbit(w) & (w == 0)).any(), f"{name} holds -0.0"
    with torch.no_grad():
        logits = model(torch.arange(1, 17).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_streamed_block_update_in_16_bits(dtype, tmp_path, calib_txt):
    """The preset that crashed: `--preset best` on a sharded 16-bit checkpoint, streamed."""
    from tiny import make_sharded_llama

    src = make_sharded_llama(str(tmp_path / "src"), layers=3, dtype=getattr(torch, dtype))
    out = tmp_path / "o"
    rc = main(["prune", src, "--preset", "best", "--block-epochs", "1", "--calib", calib_txt, "--nsamples", "8",
               "--seqlen", "32", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["load"]["streaming"] and report["dtype"] == dtype and len(report["block_update"]) == 3
