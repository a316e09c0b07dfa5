"""Every supported architecture end to end through the CLI on a tiny random-initialised model."""

import json

import pytest
import torch

from oneshot.cli import main
from oneshot.constraint import Constraint
from oneshot.masks import check_constraint, n_pruned
from oneshot.model.structure import find_decoder_layers, find_linears, get_weight
from tiny import ARCHS

CASES = [(arch, "sparsegpt", "2:4") for arch in ARCHS] + [(arch, "wanda", "unstructured") for arch in ARCHS]
CASES += [("llama", "magnitude", "4:8"), ("gpt2", "magnitude", "unstructured"), ("opt", "sparsegpt", "unstructured")]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("arch,method,pattern", CASES)
def test_prune_end_to_end(arch, method, pattern, tiny_factory, calib_txt, tmp_path):
    src = tiny_factory(arch)
    out = tmp_path / "out"
    rc = main(["prune", src, "--method", method, "--pattern", pattern, "--calib", calib_txt,
               "--nsamples", "8", "--seqlen", "48", "--out", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    sidecar = json.loads((out / "oneshot_sparsity.json").read_text())
    assert sidecar["method"] == method and sidecar["pattern"] == report["pattern"]

    dense, pruned = _load(src), _load(str(out))
    path, layers = find_decoder_layers(pruned)
    linears = {}
    for i, layer in enumerate(layers):
        linears.update(find_linears(layer, f"{path}.{i}"))
    assert set(linears) == {e["name"] for e in report["linears"]}
    constraint = Constraint(0.5, 2, 4) if pattern == "2:4" else Constraint(0.5, 4,
                                                                           8) if pattern == "4:8" else Constraint(0.5)
    for name, module in linears.items():
        w = get_weight(module)
        assert check_constraint(w, constraint) is None, name
        # random weights have no accidental zeros: the count is exactly the target (per row for wanda / N:M)
        assert int((w == 0).sum()) == n_pruned(w.numel(), 0.5), name
        assert not (torch.signbit(w) & (w == 0)).any(), f"{name} holds -0.0"
        assert sidecar["layers"][name]["sparsity"] == pytest.approx(0.5)

    # everything outside the decoder linears is untouched, ties are kept
    pruned_params = dict(pruned.named_parameters())
    linear_weights = {f"{n}.weight" for n in linears}
    for name, p in dense.named_parameters():
        if name not in linear_weights and name in pruned_params:
            assert torch.equal(p, pruned_params[name]), name
    emb = pruned.get_input_embeddings().weight
    head = pruned.get_output_embeddings().weight
    if dense.get_output_embeddings().weight.data_ptr() == dense.get_input_embeddings().weight.data_ptr():
        assert head.data_ptr() == emb.data_ptr()

    ids = torch.randint(0, pruned.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
        dense_logits = dense(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.equal(logits, dense_logits)


def test_bfloat16_checkpoint_keeps_dtype_and_positive_zeros(tiny_factory, calib_txt, tmp_path):
    src = tiny_factory("llama", "bfloat16")
    out = tmp_path / "out"
    assert main(["prune", src, "--method", "sparsegpt", "--sparsity", "0.6", "--calib", calib_txt,
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    model = _load(str(out))
    assert model.dtype == torch.bfloat16
    report = json.loads((out / "report.json").read_text())
    for entry in report["linears"]:
        w = model.get_submodule(entry["name"]).weight
        assert w.dtype == torch.bfloat16
        assert not (torch.signbit(w) & (w == 0)).any()
        per_row = n_pruned(w.shape[1], 0.6)  # sparsegpt compares within each row by default
        assert int((w == 0).sum()) >= per_row * w.shape[0]
        assert entry["mask_sparsity"] == pytest.approx(per_row / w.shape[1])


def test_shared_statistics_for_siblings(tiny_factory, calib_txt, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", tiny_factory("llama"), "--method", "sparsegpt", "--calib", calib_txt,
                 "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet"]) == 0
    entries = json.loads((out / "report.json").read_text())["linears"]
    shared = {e["name"].split(".")[-1]: e["shared_stats_with"] for e in entries
              if e["name"].startswith("model.layers.0.")}
    assert shared["q_proj"] is None and shared["k_proj"].endswith("q_proj") and shared["v_proj"].endswith("q_proj")
    assert shared["o_proj"] is None and shared["down_proj"] is None
    assert shared["gate_proj"] is None and shared["up_proj"].endswith("gate_proj")


def test_ignore_skips_linears(tiny_factory, calib_txt, tmp_path):
    out = tmp_path / "out"
    assert main(["prune", tiny_factory("llama"), "--method", "wanda", "--calib", calib_txt, "--nsamples", "4",
                 "--seqlen", "32", "--out", str(out), "--quiet", "--ignore", r"mlp\.down_proj"]) == 0
    names = [e["name"] for e in json.loads((out / "report.json").read_text())["linears"]]
    assert names and not any("down_proj" in n for n in names)
    model = _load(str(out))
    assert not (model.model.layers[0].mlp.down_proj.weight == 0).any()


def test_json_output_and_determinism(tiny_factory, calib_txt, tmp_path, capsys):
    src = tiny_factory("qwen2")
    reports = []
    for name in ("a", "b"):
        capsys.readouterr()
        assert main(["prune", src, "--method", "sparsegpt", "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                     "--out", str(tmp_path / name), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    from oneshot.formats.store import load_state_dict

    a = load_state_dict(str(tmp_path / "a"))
    b = load_state_dict(str(tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["relative_error"] for e in reports[0]["linears"]] == [e["relative_error"] for e in reports[1]["linears"]]
    assert reports[0]["calibration"]["tokens"] == 4 * 32


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("sequential", ["layer", "linear"])
def test_small_batches_match_one_batch(method, sequential, tiny_factory, calib_txt, tmp_path):
    """Batches that stop at each unsolved linear give the same result as one forward over all windows."""
    from oneshot.formats.store import load_state_dict

    src = tiny_factory("mistral")
    reports = {}
    for name, batch in (("one", "0"), ("many", "1")):
        assert main(["prune", src, "--method", method, "--calib", calib_txt, "--nsamples", "6", "--seqlen", "32",
                     "--batch-size", batch, "--sequential", sequential, "--out", str(tmp_path / name), "--quiet"]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    assert reports["one"]["forward_batch"] == 6 and reports["many"]["forward_batch"] == 1
    if sequential == "linear":  # one pass with every window in it; batches stop at each unsolved linear
        assert reports["one"]["forward_passes_per_layer"] == 1 and reports["many"]["forward_passes_per_layer"] > 1
    else:  # statistics pass, then output pass
        assert reports["one"]["forward_passes_per_layer"] == reports["many"]["forward_passes_per_layer"] == 2
    a = load_state_dict(str(tmp_path / "one"))
    b = load_state_dict(str(tmp_path / "many"))
    for key in a:
        if key.endswith("proj.weight"):
            assert ((a[key] == 0) == (b[key] == 0)).float().mean() > 0.99, key
            assert torch.allclose(a[key], b[key], atol=1e-4), key


def test_sequential_layer_mode_uses_dense_statistics(tiny_factory, calib_txt, tmp_path):
    """--sequential layer (the reference way) gathers every statistic from the dense layer: o_proj's
    statistics then differ from the default, where o_proj sees the pruned q/k/v."""
    from oneshot.formats.store import load_state_dict

    src = tiny_factory("llama")
    weights, reports = {}, {}
    for mode in ("linear", "layer"):
        assert main(["prune", src, "--method", "wanda", "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
                     "--sequential", mode, "--out", str(tmp_path / mode), "--quiet"]) == 0
        weights[mode] = load_state_dict(str(tmp_path / mode))
        reports[mode] = json.loads((tmp_path / mode / "report.json").read_text())
    q = "model.layers.0.self_attn.q_proj.weight"
    o = "model.layers.0.self_attn.o_proj.weight"
    assert torch.equal(weights["linear"][q], weights["layer"][q])  # the first linear sees the same input
    assert not torch.equal(weights["linear"][o], weights["layer"][o])
    for mode in reports:
        assert reports[mode]["sparsity"] == pytest.approx(0.5)


def test_quiet_prints_nothing_and_default_shows_progress(tiny_factory, calib_txt, tmp_path, capfd):
    src = tiny_factory("llama")
    capfd.readouterr()
    assert main(["prune", src, "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "q"),
                 "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert main(["prune", src, "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "v"),
                 "--method", "wanda"]) == 0
    err = capfd.readouterr().err
    assert "pruned LlamaForCausalLM with wanda" in err and "sparsity 0.5000" in err
