"""Every bad input gets one clear line and a non-zero exit, before the model is loaded where possible,
and a failed or interrupted run leaves nothing half-written."""

import json
import os
import subprocess
import sys

import pytest
import torch

from oneshot import api
from oneshot import run as run_module
from oneshot.cli import main
from oneshot.model import structure


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the weights are loaded: these errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the error was found")

    monkeypatch.setattr(api, "load_model", refuse)
    monkeypatch.setattr(run_module, "load_model", refuse)


def run(args, capsys):
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    return rc, lines


def assert_one_error(rc, lines, *needles):
    assert rc != 0
    errors = [line for line in lines if line.startswith("oneshot: error:")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]


def base(src, calib, out, *extra):
    return ["prune", src, "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet", *extra]


@pytest.mark.parametrize("model,needle", [
    ("./does/not/exist", "no such directory"),
    ("/tmp/definitely-missing.gguf", "no such GGUF file"),
    ("not a valid id!", "not a Hugging Face hub id"),
    ("some-owner/some-model-that-is-not-cached", "its config is not in the local Hugging Face cache"),
])
def test_unknown_model(model, needle, calib_txt, tmp_path, capsys, no_load):
    assert_one_error(*run(base(model, calib_txt, tmp_path / "o"), capsys), needle)


def test_directory_without_config(calib_txt, tmp_path, capsys, no_load):
    (tmp_path / "empty").mkdir()
    assert_one_error(*run(base(str(tmp_path / "empty"), calib_txt, tmp_path / "o"), capsys), "no config.json")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_sparsity_outside_unit_interval(value, tiny_factory, calib_txt, tmp_path, capsys, no_load):
    rc, lines = run(base(tiny_factory("llama"), calib_txt, tmp_path / "o", "--sparsity", value), capsys)
    assert_one_error(rc, lines, "--sparsity")


@pytest.mark.parametrize("pattern", ["2-4", "4:2", "0:4", "2:2", "a:b"])
def test_bad_pattern(pattern, tiny_factory, calib_txt, tmp_path, capsys, no_load):
    assert_one_error(*run(base(tiny_factory("llama"), calib_txt, tmp_path / "o", "--pattern", pattern), capsys),
                     "--pattern")


def test_pattern_and_sparsity_disagree(tiny_factory, calib_txt, tmp_path, capsys, no_load):
    args = base(tiny_factory("llama"), calib_txt, tmp_path / "o", "--pattern", "2:4", "--sparsity", "0.7")
    assert_one_error(*run(args, capsys), "2:4", "0.7")


def test_input_dimension_not_divisible(tiny_factory, calib_txt, tmp_path, capsys, no_load):
    # hidden 64 and intermediate 128 are not multiples of 5
    args = base(tiny_factory("llama"), calib_txt, tmp_path / "o", "--pattern", "3:5")
    assert_one_error(*run(args, capsys), "not divisible by 5", "q_proj")


@pytest.mark.parametrize("flag", ["--nsamples", "--seqlen"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_non_positive_counts(flag, value, tiny_factory, calib_txt, tmp_path, capsys, no_load):
    args = base(tiny_factory("llama"), calib_txt, tmp_path / "o")
    args[args.index(flag) + 1] = value
    assert_one_error(*run(args, capsys), flag)


def test_seqlen_beyond_context(tiny_factory, calib_txt, tmp_path, capsys, no_load):
    args = base(tiny_factory("llama"), calib_txt, tmp_path / "o")
    args[args.index("--seqlen") + 1] = "512"
    assert_one_error(*run(args, capsys), "beyond the model's context of 256")


def test_calibration_too_short(tiny_factory, tmp_path, capsys, no_load):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    assert_one_error(*run(base(tiny_factory("llama"), str(short), tmp_path / "o"), capsys), "too short for one window")


def test_missing_calibration_and_unknown_method(tiny_factory, tmp_path, capsys, no_load):
    assert_one_error(*run(base(tiny_factory("llama"), str(tmp_path / "none.txt"), tmp_path / "o"), capsys),
                     "no such file")
    args = base(tiny_factory("llama"), str(tmp_path / "none.txt"), tmp_path / "o", "--method", "obc")
    assert_one_error(*run(args, capsys), "unknown --method")


def test_existing_out_refused_and_untouched(tiny_factory, calib_txt, tmp_path, capsys, no_load):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert_one_error(*run(base(tiny_factory("llama"), calib_txt, out), capsys), "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


def test_overwrite_replaces(tiny_factory, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    assert main(base(tiny_factory("llama"), calib_txt, out, "--overwrite")) == 0
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()
    assert [p for p in os.listdir(tmp_path) if "oneshot-" in p] == []


def _tree_bytes(root) -> dict:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("where", ["same", "parent", "symlink", "gguf-folder"])
def test_out_that_would_replace_the_source_is_refused(where, tiny_factory, calib_txt, tmp_path, capsys, no_load):
    """--out equal to the source, containing it, or reaching it through a link: exit 2, one line, whatever
    --overwrite says, and the source's bytes unchanged."""
    import shutil

    src = tmp_path / "models" / "src"
    shutil.copytree(tiny_factory("llama"), src)
    model, out = str(src), src
    if where == "parent":
        out = tmp_path / "models"
    elif where == "symlink":
        out = tmp_path / "link"
        os.symlink(src, out)
    elif where == "gguf-folder":  # a GGUF file inside --out: the folder would be replaced
        model = str(src / "model.gguf")
        (src / "model.gguf").write_bytes(b"GGUF")
    before = _tree_bytes(src)
    rc, lines = run(base(model, calib_txt, out, "--overwrite"), capsys)
    assert rc == 2
    assert_one_error(rc, lines, "would replace it")
    assert _tree_bytes(src) == before


def test_out_inside_the_hub_cache_is_refused(tiny_factory, calib_txt, tmp_path, capsys, no_load, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    out = cache / "models--org--name" / "snapshots" / "abc"
    assert_one_error(*run(base(tiny_factory("llama"), calib_txt, out, "--overwrite"), capsys), "hub cache")
    assert not out.exists()


def _edited_copy(src_dir, dst, edit):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src_dir)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).write_bytes(open(os.path.join(src_dir, name), "rb").read())
    return str(dst)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nan_is_named_where_it_first_appears(method, tiny_factory, calib_txt, tmp_path, capsys):
    """A NaN weight in the checkpoint is named, not blamed on the inputs of the layers after it."""
    src = _edited_copy(tiny_factory("llama"), tmp_path / "nan-model",
                       lambda m: m.model.layers[1].self_attn.q_proj.weight.__setitem__((0, 0), float("nan")))
    out = tmp_path / "o"
    assert_one_error(*run(base(src, calib_txt, out, "--method", method), capsys),
                     "model.layers.1.self_attn.q_proj.weight: the checkpoint holds 1 NaN/Inf value(s)")
    assert not out.exists()


def test_overflow_with_finite_weights(tiny_factory, calib_txt, tmp_path, capsys):
    """Finite weights whose activations overflow: the layer where it happens, and no advice to use float32
    to a float32 run."""
    src = _edited_copy(tiny_factory("llama"), tmp_path / "huge-model",
                       lambda m: m.model.layers[0].post_attention_layernorm.weight.fill_(3e38))
    out = tmp_path / "o"
    rc, lines = run(base(src, calib_txt, out, "--method", "magnitude"), capsys)
    assert_one_error(rc, lines, "non-finite", "decoder layer 1", "even in float32")
    assert "try --dtype float32" not in lines[-1]
    # a statistics-based solver finds it at layer 0's statistics, also with one line
    assert_one_error(*run(base(src, calib_txt, out, "--method", "sparsegpt"), capsys), "gate_proj", "NaN/Inf",
                     "even in float32")
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if "oneshot-" in p] == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_failure_while_writing_leaves_nothing(error, tiny_factory, calib_txt, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*a, **k):
        raise error("stopped while writing")

    monkeypatch.setattr(run_module, "write_json", boom)
    try:
        rc = main(base(tiny_factory("llama"), calib_txt, out, "--overwrite"))
    except RuntimeError:
        rc = 1
    assert rc != 0
    assert (out / "keep.txt").read_text() == "old" and os.listdir(out) == ["keep.txt"]
    assert [p for p in os.listdir(tmp_path) if "oneshot-" in p] == []


@pytest.mark.slow
def test_console_script_exit_codes(tiny_factory, calib_txt, tmp_path):
    """The installed entry point: one error line on stderr and exit 2; --json on success."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    bad = subprocess.run([sys.executable, "-m", "oneshot", "prune", tiny_factory("llama"), "--out", str(tmp_path / "x"),
                          "--sparsity", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("oneshot: error:")
    ok = subprocess.run([sys.executable, "-m", "oneshot", "prune", tiny_factory("llama"), "--out", str(tmp_path / "y"),
                         "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16", "--method", "wanda", "--json"],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["method"] == "wanda"


def test_model_io_rejects_unsupported_layout():
    from oneshot.errors import OneshotError

    with pytest.raises(OneshotError, match="could not find the decoder layers"):
        structure.find_decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_linear_that_never_runs_is_named(tiny_factory, calib_txt, tmp_path, capsys, monkeypatch):
    """A linear inside a decoder block that the forward never calls cannot be pruned: one clear line."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "extra"
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama"))
    model.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes(open(os.path.join(tiny_factory("llama"), name), "rb").read())
    from transformers.models.llama import modeling_llama

    init = modeling_llama.LlamaMLP.__init__

    def with_unused(self, config):
        init(self, config)
        self.unused = torch.nn.Linear(config.hidden_size, 8, bias=False)

    monkeypatch.setattr(modeling_llama.LlamaMLP, "__init__", with_unused)
    for sequential in ("layer", "linear"):
        rc, lines = run(base(str(src), calib_txt, tmp_path / f"o-{sequential}", "--sequential", sequential), capsys)
        assert_one_error(rc, lines, "mlp.unused", "never ran")
        assert not (tmp_path / f"o-{sequential}").exists()


def test_memory_guard_refuses_before_loading(tiny_factory, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "10000000", "--seqlen", "32",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "GiB of host memory" in err and "fewer --nsamples" in err
    assert not out.exists()


def test_memory_estimate_against_measured_run(tiny_factory, calib_txt, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "8", "--seqlen", "64",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    estimate, measured = report["memory_estimate"]["host_bytes"], report["peak_memory"]["host_rss_bytes"]
    # the process's own RSS dominates a tiny model; the estimate must be within 2x either way
    assert measured / 2 <= estimate <= measured * 2
    assert report["memory_estimate"]["activations_bytes"] == 8 * 64 * 64 * 4 * 2


def test_offloaded_activations_leave_the_device_estimate():
    from transformers import LlamaConfig

    from oneshot.config import PruneConfig
    from oneshot.memory import estimate

    hf = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, dtype="bfloat16")
    layer = 4096 * 4096 + 4096 * 11008
    structure = {"num_layers": 32, "linears": {f"{i}.{n}": s for i in range(32)
                                                for n, s in (("q", (4096, 4096)), ("down", (4096, 11008)))},
                 "parameters": 32 * layer + 2 * 32000 * 4096}
    base = dict(model="m", nsamples=128, seqlen=2048, device="cpu")
    on, off = (estimate(PruneConfig(**base, offload_activations=o), hf, structure) for o in (False, True))
    assert on["parts"]["activations"] == 128 * 2048 * 4096 * 4 * 2  # bf16 layers run in fp32 on the CPU
    # offloaded, one window in and one out stay on the device
    assert on["device_bytes"] - off["device_bytes"] == on["parts"]["activations"] // 128 * 126
    streamed = estimate(PruneConfig(**base), hf, structure, streaming=True)
    assert streamed["parts"]["weights"] == 2 * 32000 * 4096 * 2  # embeddings and head, not the layers
    # the model twice, less one layer
    assert on["host_bytes"] - streamed["host_bytes"] > 2 * 32 * layer * 2 - 3 * layer * 2
