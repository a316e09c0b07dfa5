"""On-disk formats, `oneshot convert`, `oneshot.load` and `oneshot verify` (issue 4)."""

import itertools
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import oneshot
from oneshot.cli import main
from oneshot.formats import FORMATS, load_state_dict
from oneshot.formats.base import pack_bits, unpack_bits
from oneshot.kernels import compress24, decompress24, is_24, packed24_nbytes

# every way to keep at most 2 of 4 (the 6 exact 2:4 patterns and the degenerate ones)
PATTERNS = [p for p in itertools.product([0, 1], repeat=4) if sum(p) <= 2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _random_24(rows, cols, dtype, seed=0, exact=True):
    """A 2:4 matrix using every pattern; kept entries are never zero (accidental zeros replaced)."""
    g = torch.Generator().manual_seed(seed)
    pool = [p for p in PATTERNS if sum(p) == 2] if exact else PATTERNS
    choice = torch.randint(len(pool), (rows, cols // 4), generator=g)
    keep = torch.tensor(pool, dtype=torch.bool)[choice].reshape(rows, cols)
    values = torch.randn(rows, cols, generator=g).to(dtype)
    values = torch.where(values == 0, torch.ones((), dtype=dtype), values)
    return torch.where(keep, values, torch.zeros((), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("exact", [True, False])
def test_packed24_round_trip_every_pattern(dtype, exact):
    w = _random_24(96, 64, dtype, exact=exact)
    values, meta = compress24(w)
    assert values.shape == (96, 32) and meta.shape == (96, 8) and meta.dtype == torch.uint8
    assert torch.equal(_bits(decompress24(values, meta)), _bits(w))
    if exact:  # the kept values are exactly the non-zeros, in column order
        assert torch.equal(values, w[w != 0].reshape(96, 32))


def test_packed24_each_pattern_alone_and_odd_group_count():
    for pattern in PATTERNS:
        w = torch.tensor(pattern * 3, dtype=torch.float32).reshape(1, 12) * torch.arange(1, 13)
        values, meta = compress24(w)
        assert meta.shape == (1, 2)  # 3 groups: two nibbles and a padding nibble
        assert torch.equal(decompress24(values, meta), w)


def test_packed24_keeps_negative_zero_and_rejects_three_entries():
    w = torch.zeros(2, 8)
    w[0, 1] = -0.0
    w[0, 6] = 3.0
    values, meta = compress24(w)
    assert torch.equal(_bits(decompress24(values, meta)), _bits(w))  # -0.0 survives
    w[1, :3] = torch.tensor([1.0, 2.0, -0.0])
    assert not is_24(w)
    with pytest.raises(ValueError, match="not 2:4"):
        compress24(w)


def test_size_arithmetic():
    w = _random_24(64, 256, torch.bfloat16)
    parts = FORMATS["packed24"].encode(w)
    packed = sum(t.numel() * t.element_size() for t in parts.values())
    assert packed == packed24_nbytes(64, 256, 2)
    assert packed / (w.numel() * 2) == 0.5625  # 16-bit: cols bytes of values + cols/8 of positions per row
    parts = FORMATS["bitmask"].encode(w)
    assert parts["values"].numel() == w.numel() // 2
    assert parts["mask"].numel() == 64 * 256 // 8
    assert torch.equal(FORMATS["bitmask"].decode(parts), w)


@pytest.mark.parametrize("fmt", ["dense", "packed24", "bitmask"])
def test_nbytes_arithmetic_equals_encoded_bytes(fmt):
    w = _random_24(40, 72, torch.float16, exact=False)
    assert FORMATS[fmt].nbytes(w) == sum(t.numel() * t.element_size() for t in FORMATS[fmt].encode(w).values())


def test_bitmask_round_trip_any_pattern_and_bits():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(33, 45, generator=g).to(torch.bfloat16)
    w[torch.rand(33, 45, generator=g) < 0.6] = 0
    w[0, 0] = -0.0
    parts = FORMATS["bitmask"].encode(w)
    assert torch.equal(_bits(FORMATS["bitmask"].decode(parts)), _bits(w))
    mask = torch.rand(5, 19, generator=g) < 0.5
    assert torch.equal(unpack_bits(pack_bits(mask), 19), mask)


def _prune(src, calib, out, *extra):
    rc = main(["prune", src, "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet",
               *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def _same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a if a[k].is_floating_point())


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.arange(20).unsqueeze(0) % 300 + 4).logits


@pytest.mark.parametrize("arch,extra", [
    ("llama", ["--method", "wanda", "--pattern", "2:4"]),
    ("gpt2", ["--method", "sparsegpt", "--pattern", "2:4"]),  # Conv1D weights are stored [in, out]
    ("llama", ["--method", "ria", "--pattern", "2:4", "--ria-permute"]),  # 2:4 only along the permutation
])
def test_formats_round_trip_through_convert(arch, extra, tiny_factory, calib_txt, tmp_path):
    src = tiny_factory(arch, "bfloat16")
    dense = tmp_path / "dense"
    report = _prune(src, calib_txt, dense, *extra)
    assert report["storage"]["format"] == "dense"
    assert report["storage"]["formats"]["packed24"]["of_dense"] == pytest.approx(0.5625, abs=1e-6)
    state = load_state_dict(str(dense))
    reference = _logits(oneshot.load(str(dense)))
    for fmt in ("packed24", "bitmask"):
        out = tmp_path / fmt
        assert main(["convert", str(dense), "--format", fmt, "--out", str(out), "--quiet"]) == 0
        assert not any(n.startswith("model") for n in os.listdir(out))  # plain transformers files replaced
        assert json.loads((out / "oneshot_sparsity.json").read_text())["format"] == fmt
        assert _same_state(load_state_dict(str(out)), state)
        assert torch.equal(_logits(oneshot.load(str(out))), reference)
        assert main(["verify", str(out), "--quiet"]) == 0
    # back to dense, in place: loadable by plain transformers again, bit-exact
    assert main(["convert", str(tmp_path / "packed24"), "--format", "dense", "--quiet"]) == 0
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "packed24"), dtype="auto")
    assert torch.equal(_logits(model), reference)


def test_prune_writes_packed24_directly_and_it_is_smaller(tiny_factory, calib_txt, tmp_path):
    report = _prune(tiny_factory("llama", "bfloat16"), calib_txt, tmp_path / "p", "--pattern", "2:4",
                    "--format", "packed24", "--plot")
    assert report["storage"]["format"] == "packed24"
    assert (tmp_path / "p" / "report.png").stat().st_size > 1000
    dense = _prune(tiny_factory("llama", "bfloat16"), calib_txt, tmp_path / "d", "--pattern", "2:4")
    assert report["storage"]["weight_file_bytes"] < dense["storage"]["weight_file_bytes"]
    assert _same_state(load_state_dict(str(tmp_path / "p")), load_state_dict(str(tmp_path / "d")))


def test_format_errors_fail_fast(tiny_factory, calib_txt, tmp_path, capsys):
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--out", str(tmp_path / "x"), "--format",
               "packed24"])
    assert rc == 2 and "use --format bitmask" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    out = tmp_path / "u"
    _prune(tiny_factory("llama"), calib_txt, out)
    assert main(["convert", str(out), "--format", "packed24"]) == 2
    assert main(["convert", str(out), "--format", "zip"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["convert", str(out), "--format", "bitmask", "--out", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "f").read_text() == "x"  # never clobbered
    assert main(["convert", str(tmp_path), "--format", "bitmask"]) == 2  # not a oneshot output


def _weights_file(directory):
    return next(directory / n for n in os.listdir(directory) if n.endswith(".safetensors"))


@pytest.mark.parametrize("defect", ["dense_row", "nan", "negative_zero", "untied_head", "fewer_zeros"])
def test_verify_catches_each_planted_defect(defect, tiny_factory, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    pattern = ["--sparsity", "0.5"] if defect == "fewer_zeros" else ["--pattern", "2:4"]
    _prune(tiny_factory("llama"), calib_txt, out, *pattern, "--load", "full")  # one weight file to plant in
    assert main(["verify", str(out), "--quiet"]) == 0
    path = _weights_file(out)
    tensors = load_file(str(path))
    key = "model.layers.1.mlp.down_proj.weight"
    if defect in ("dense_row", "fewer_zeros"):
        tensors[key][3] = 0.5
    elif defect == "nan":
        tensors["model.norm.weight"][0] = float("nan")
    elif defect == "negative_zero":
        w = tensors[key]
        w[w == 0] = -0.0
    else:  # the config ties the head to the embeddings, but the files carry a different head
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(path), metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    expected = {"dense_row": "not 2:4", "nan": "NaN", "negative_zero": "-0.0", "untied_head": "differs from",
                "fewer_zeros": "zeros, its metadata records"}[defect]
    assert lines and all(line.startswith("FAIL ") for line in lines)
    assert any(expected in line for line in lines), lines
