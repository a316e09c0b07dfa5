"""Structured pruning (issue 16): heads, MLP channels and whole blocks removed, with group OBS."""

import json
import os

import pytest
import torch

from oneshot.cli import main
from oneshot.structured import group_errors, inverse_hessian, remove_groups


def _prune(src, out, calib, *extra):
    return main(["prune", src, "--calib", calib, "--nsamples", "4", "--seqlen", "32", "--out", str(out), "--quiet",
                 *extra])


def _tensors(directory) -> dict:
    """Every tensor of a checkpoint directory, whatever its shards."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    return {k: v for f in files for k, v in load_file(os.path.join(directory, f)).items()}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oneshot: error: "), err
    return err[0]


def test_group_obs_is_the_least_squares_solution():
    """Removing a set of column groups with the OBS update gives the least-squares fit of the dense output
    on the kept inputs, and each group's OBS cost is the brute-force error of removing it alone."""
    torch.manual_seed(0)
    x = torch.randn(12, 400, dtype=torch.float64)
    h = x @ x.T
    w = torch.randn(5, 12, dtype=torch.float64)
    y = w @ x
    result = remove_groups(w, h, 2, 2, dampening=0.0, forced=[1, 4])
    cut = [2, 3, 8, 9]
    keep = [c for c in range(12) if c not in cut]
    best = torch.linalg.lstsq(x[keep].T, y.T).solution.T
    assert torch.allclose(result.weight[:, keep], best, atol=1e-9) and not result.weight[:, cut].any()
    # the reported error is summed in float32 (an 8192-wide Hessian has no float64 copy to spare)
    assert result.error == pytest.approx(float(((y - best @ x[keep]) ** 2).sum()), rel=1e-6)
    costs = group_errors(w, inverse_hessian(h, 0.0), 2, torch.arange(6))
    for g in range(6):
        kept = [c for c in range(12) if c // 2 != g]
        fit = torch.linalg.lstsq(x[kept].T, y.T).solution.T
        assert float(costs[g]) == pytest.approx(float(((y - fit @ x[kept]) ** 2).sum()), rel=1e-9)
    # the greedy choice of one group is the cheapest one
    assert remove_groups(w, h, 2, 1, dampening=0.0).removed == [int(torch.argmin(costs))]


def _params(directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    return model, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("structure,fraction", [("channels", 0.25), ("heads", 0.1), ("heads,channels", 0.3),
                                                ("blocks", 0.5), ("heads,channels,blocks", 0.5)])
def test_the_output_is_a_smaller_plain_checkpoint(structure, fraction, tiny_factory, calib_txt, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_factory("llama")
    out = tmp_path / "o"
    assert _prune(src, out, calib_txt, "--structure", structure, "--remove", str(fraction)) == 0
    dense, before = _params(src)
    model, after = _params(out)  # plain transformers, its config updated
    report = json.loads((out / "report.json").read_text())
    st = report["structured"]
    assert report["total_parameters"] == after and st["parameters_before"] == before
    removed = st["decoder_parameters_before"] - st["decoder_parameters_after"]
    assert removed == before - after, "only decoder-block parameters go"
    assert abs(removed / st["decoder_parameters_before"] - fraction) < 0.1
    text = model.config
    layers = model.model.layers
    assert text.num_hidden_layers == len(layers) == st["layers_after"]
    for layer in layers:
        assert layer.mlp.down_proj.in_features == text.intermediate_size
        assert layer.self_attn.q_proj.out_features == text.num_attention_heads * text.head_dim
        assert layer.self_attn.k_proj.out_features == text.num_key_value_heads * text.head_dim
    assert text.num_attention_heads % text.num_key_value_heads == 0
    ids = torch.arange(24).unsqueeze(0) % text.vocab_size
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
        model.generate(ids, max_new_tokens=4, do_sample=False)  # the KV cache works with the new shapes
    assert main(["verify", str(out), "--quiet"]) == 0
    del dense, AutoModelForCausalLM


def test_channels_that_contribute_nothing_go_first_and_change_nothing(tiny_factory, calib_txt, tmp_path):
    """Channels whose down_proj columns are zero are removed before any other, with no change to the logits
    (8 of them: the kept width is a multiple of 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(src)
    dead_channels = [3, 7, 11, 19, 23, 42, 77, 100]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, dead_channels] = 0.0
    dead = tmp_path / "dead"
    model.save_pretrained(dead)
    AutoTokenizer.from_pretrained(src).save_pretrained(dead)
    eight = 8 * 3 * model.config.hidden_size / sum(p.numel() for p in model.model.layers[0].parameters())
    out = tmp_path / "o"
    assert _prune(str(dead), out, calib_txt, "--structure", "channels", "--remove", f"{eight:.6f}") == 0
    report = json.loads((out / "report.json").read_text())["structured"]
    assert all(e["mlp"]["removed_channels"] == dead_channels for e in report["layers"])
    pruned = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(32).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_structure_then_two_four_on_what_remains(tiny_factory, calib_txt, tmp_path):
    """Channels removed, then 2:4 on every remaining linear, in one run: the kept width is a multiple of M."""
    out = tmp_path / "o"
    assert _prune(tiny_factory("llama"), out, calib_txt, "--structure", "channels", "--remove", "0.2",
                  "--pattern", "2:4") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pattern"] == "2:4" and report["sparsity"] == pytest.approx(0.5)
    assert report["structured"]["layers"][0]["mlp"]["channels_after"] % 8 == 0
    assert main(["verify", str(out), "--quiet"]) == 0


def test_the_smaller_preset_removes_mlp_channels(tiny_factory, calib_txt, tmp_path):
    """``--preset smaller``: the best structured recipe measured (MLP channels, 20%); --remove overrides it."""
    from oneshot.config import PruneConfig

    cfg = PruneConfig.from_options("m", preset="smaller", remove=0.35)
    assert (cfg.structure, cfg.remove, cfg.unstructured) == ("channels", 0.35, False)
    out = tmp_path / "o"
    assert _prune(tiny_factory("llama"), out, calib_txt, "--preset", "smaller") == 0
    st = json.loads((out / "report.json").read_text())["structured"]
    assert 0.1 < 1 - st["decoder_parameters_after"] / st["decoder_parameters_before"] < 0.3
    assert all(layer["mlp"]["channels_after"] < layer["mlp"]["channels_before"] for layer in st["layers"])


def test_removing_nothing_changes_nothing(tiny_factory, calib_txt, tmp_path):
    src = tiny_factory("llama")
    out = tmp_path / "o"
    assert _prune(src, out, calib_txt, "--structure", "channels", "--remove", "0.0001") == 0

    a, b = _tensors(src), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gqa_heads_leave_the_same_count_in_every_group(tiny_factory, calib_txt, tmp_path):
    src = tiny_factory("llama")  # 4 query heads, 2 key/value heads
    out = tmp_path / "o"
    assert _prune(src, out, calib_txt, "--structure", "heads", "--remove", "0.1") == 0
    report = json.loads((out / "report.json").read_text())["structured"]
    for entry in report["layers"]:
        att = entry["attention"]
        assert att["heads_after"] == 2 and att["kv_heads_after"] == 2
        assert sorted(h // 2 for h in att["removed_heads"]) == [0, 1], "one from each key/value group"


@pytest.mark.parametrize("args,needle", [
    (["--structure", "channels", "--remove", "1.5"], "--remove must be a fraction strictly between 0 and 1"),
    (["--structure", "channels", "--remove", "0"], "--remove must be a fraction strictly between 0 and 1"),
    (["--structure", "rows", "--remove", "0.2"], "--structure takes heads, channels, blocks"),
    (["--structure", "channels"], "--structure needs --remove"),
    (["--remove", "0.2"], "--remove needs --structure"),
    (["--structure", "heads", "--remove", "0.5"], "--structure heads can remove at most"),
    (["--structure", "channels", "--remove", "0.95"], "more than the MLP channels of a decoder block hold"),
    (["--structure", "blocks", "--remove", "0.99"], "keep at least one"),
])
def test_bad_requests_fail_up_front(args, needle, tiny_factory, calib_txt, tmp_path, capsys, monkeypatch):
    src = tiny_factory("llama")
    capsys.readouterr()
    loaded = []
    monkeypatch.setattr("oneshot.run.Run._load", lambda *a, **k: loaded.append(1))
    assert _prune(src, tmp_path / "o", calib_txt, *args) == 2
    assert needle in _one_line(capsys)
    assert not loaded and not (tmp_path / "o").exists()


def test_the_summary_says_what_went(tiny_factory, calib_txt, tmp_path, capsys):
    src = tiny_factory("llama")
    capsys.readouterr()
    assert main(["prune", src, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32", "--out", str(tmp_path / "o"),
                 "--structure", "heads,channels", "--remove", "0.3"]) == 0
    err = capsys.readouterr().err
    assert "pruned LlamaForCausalLM structurally -> " in err
    line = next(x for x in err.splitlines() if x.strip().startswith("structured: removed"))
    assert "heads 4 -> 2 a layer" in line and "MLP channels 128 -> " in line and "parameters 98,624 -> " in line
    report = json.loads((tmp_path / "o" / "report.json").read_text())["structured"]
    assert all("error" in option for option in report["width_plan"]["tried_on_layer_0"])


def test_a_bf16_checkpoint_stays_bf16(tiny_factory, calib_txt, tmp_path):
    """What users have: bf16 weights, computed in float32 on the CPU, written back in bf16."""

    out = tmp_path / "o"
    assert _prune(tiny_factory("llama", "bfloat16"), out, calib_txt, "--structure", "heads,channels",
                  "--remove", "0.3") == 0
    tensors = _tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model, after = _params(out)
    assert json.loads((out / "report.json").read_text())["total_parameters"] == after
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(16).unsqueeze(0)).logits).all()


def _layers(model):
    from oneshot.model.structure import find_decoder_layers

    return find_decoder_layers(model)[1]


def _dead_unit_model(src, dest, zero):
    """``src`` with ``zero(layer)`` applied to every decoder layer, saved to ``dest`` with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for layer in _layers(model):
            zero(layer)
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    return model


def _same_logits(dense, out):
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, its config updated
    ids = torch.arange(32).unsqueeze(0) % dense.config.vocab_size
    with torch.no_grad():
        a, b = pruned(input_ids=ids).logits, dense(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5), float((a - b).abs().max())
    return pruned


@pytest.mark.parametrize("arch", ["phi3", "opt", "gpt_neox", "gpt2", "qwen2", "gemma2",
                                  "qwen3_moe", "mixtral", "gpt_oss", "qwen2_moe"])
def test_dead_channels_go_first_in_every_mlp_layout(arch, tiny_factory, calib_txt, tmp_path):
    """Fused gate/up (Phi-3), fc1/fc2 on the layer (OPT), GPT-NeoX, GPT-2's Conv1D, biases, and fused
    experts (halves, interleaved and transposed in gpt-oss, with a shared expert in Qwen2-MoE, each
    expert its own channels): 8 channels whose consumer columns are zero go, and nothing changes."""
    from oneshot.structured.surgery import channel_cost, expert_consumers, mlp_parts, weight_matrix

    src = tiny_factory(arch)
    dead = {}

    def zero(layer):
        parts = mlp_parts(layer)
        if parts.experts:  # a different set of channels in every expert
            for e, (_name, matrix) in enumerate(sorted(expert_consumers(layer, parts).items(),
                                                      key=lambda kv: kv[1].index)):
                dead[e] = [(3 * e + 5 * k) % matrix.weight.shape[1] for k in range(8)]
                matrix.weight[:, dead[e]] = 0.0
        else:
            dead[0] = [3, 7, 11, 19, 23, 42, 77, 100]
            weight_matrix(dict(layer.named_modules())[parts.consumer])[:, dead[0]] = 0.0

    dense = _dead_unit_model(src, tmp_path / "dead", zero)
    layer = _layers(dense)[0]
    fraction = 8 * channel_cost(layer, mlp_parts(layer)) / sum(p.numel() for p in layer.parameters())
    out = tmp_path / "o"
    assert _prune(str(tmp_path / "dead"), out, calib_txt, "--structure", "channels", "--remove", f"{fraction:.6f}") == 0
    report = json.loads((out / "report.json").read_text())["structured"]
    for entry in report["layers"]:
        removed = entry["mlp"]["removed_channels"]
        assert removed == ([sorted(dead[e]) for e in sorted(dead)] if "experts" in entry["mlp"] else dead[0])
    pruned = _same_logits(dense, out)
    assert sum(p.numel() for p in pruned.parameters()) == report["parameters_after"]
    assert main(["verify", str(out), "--quiet"]) == 0


@pytest.mark.parametrize("arch", ["phi3", "qwen2", "gemma3"])
def test_dead_heads_go_first_in_every_attention_layout(arch, tiny_factory, calib_txt, tmp_path):
    """Phi-3's fused qkv_proj (its forward reads the head count from the config), Qwen2's q/k/v biases,
    Gemma 3's separate head_dim and q/k norms: one query head of each key/value group whose output
    columns are zero goes, and the logits stay."""
    from oneshot.structured.surgery import attention_parts, head_cost, head_counts, weight_matrix

    src = tiny_factory(arch)
    heads, kv, head_dim = head_counts(__import__("transformers").AutoConfig.from_pretrained(src))
    gone = [1, 2]  # groups {0, 1} and {2, 3}

    def zero(layer):
        o = weight_matrix(dict(layer.named_modules())[attention_parts(layer).o])
        for h in gone:
            o[:, h * head_dim:(h + 1) * head_dim] = 0.0

    dense = _dead_unit_model(src, tmp_path / "dead", zero)
    layer = _layers(dense)[0]
    block = sum(p.numel() for p in layer.parameters())
    fraction = 2 * head_cost(layer, attention_parts(layer), head_dim, False) / block
    out = tmp_path / "o"
    assert _prune(str(tmp_path / "dead"), out, calib_txt, "--structure", "heads", "--remove", f"{fraction:.6f}") == 0
    report = json.loads((out / "report.json").read_text())["structured"]
    assert all(e["attention"]["removed_heads"] == gone for e in report["layers"])
    pruned = _same_logits(dense, out)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (heads - 2, kv)


@pytest.mark.parametrize("arch,structure,needle", [
    ("opt", "heads", "derives the head size from hidden_size / heads"),
    ("gpt2", "heads", "no q/k/v/o projections"),
    ("deepseek_v3", "channels", "the decoder blocks differ in size"),
])
def test_layouts_that_cannot_be_cut_are_refused_in_one_line(arch, structure, needle, tiny_factory, calib_txt,
                                                           tmp_path, capsys):
    src = tiny_factory(arch)
    capsys.readouterr()
    assert _prune(src, tmp_path / "o", calib_txt, "--structure", structure, "--remove", "0.05") == 2
    assert needle in _one_line(capsys) and not (tmp_path / "o").exists()


def test_mixture_of_experts_heads_and_expert_channels(tiny_factory, calib_txt, tmp_path):
    """Heads and every expert's channels in one run; the config's expert width follows."""
    src = tiny_factory("qwen3_moe")
    out = tmp_path / "b"
    assert _prune(src, out, calib_txt, "--structure", "heads,channels", "--remove", "0.25") == 0
    st = json.loads((out / "report.json").read_text())["structured"]
    model, after = _params(out)
    assert st["parameters_after"] == after
    assert model.config.moe_intermediate_size == st["layers"][0]["mlp"]["channels_after"] < 32
    assert model.config.intermediate_size == 128, "the dense width is not the experts'"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(16).unsqueeze(0)).logits).all()


def _middle_blocks_least_influential(monkeypatch):
    """Block Influence made to pick blocks 1 and 3 of 6, so the kept ones are renumbered."""
    import oneshot.structured.run as structured_run

    monkeypatch.setattr(structured_run, "block_influence",
                        lambda model, layers, *a, **k: [0.5 if i not in (1, 3) else 0.01 for i in range(len(layers))])


@pytest.mark.parametrize("load", ["full", "stream"])
def test_resume_finishes_byte_identical_with_blocks_gone_in_the_middle(load, calib_txt, tmp_path, monkeypatch):
    """Blocks 1 and 3 dropped, heads and channels cut, then 2:4 on what remains; the run fails after its
    first layer is journaled: ``--resume`` takes what went from the journal (the blocks, each finished
    layer's cut replayed to load its tensors), goes on, and writes the bytes of a run never stopped.
    Loaded whole and streamed give the same bytes, and the kept blocks are renumbered."""
    from oneshot import prune
    from tiny import fail_after_first_layer, make_sharded_llama

    src = make_sharded_llama(str(tmp_path / "src"), layers=6)  # sharded bf16
    _middle_blocks_least_influential(monkeypatch)
    options = dict(method="sparsegpt", pattern="2:4", structure="heads,channels,blocks", remove=0.5, calib=calib_txt,
                   nsamples=4, seqlen=32, progress=False, journal_interval=0, load=load)
    prune(src, str(tmp_path / "ref"), **options)
    error = fail_after_first_layer(monkeypatch)
    with pytest.raises(error, match="injected"):
        prune(src, str(tmp_path / "out"), **options)
    monkeypatch.undo()  # Block Influence is not asked again: the journal has the blocks
    result = prune(src, str(tmp_path / "out"), resume=True, **options)
    assert result.report["resumed_at_layer"] == 1
    st = result.report["structured"]
    assert st["blocks"]["removed"] == [1, 3] and st["layers_after"] == 4
    assert [e["layer"] for e in st["layers"]] == [0, 1, 2, 3]
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "out")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(".layers.4." in k for k in a)
    if load == "stream":  # the same bytes as the whole model gives
        _middle_blocks_least_influential(monkeypatch)
        prune(src, str(tmp_path / "full"), **{**options, "load": "full"})
        c = _tensors(tmp_path / "full")
        assert sorted(a) == sorted(c) and all(torch.equal(a[k], c[k]) for k in a)
    assert main(["verify", str(tmp_path / "out"), "--quiet"]) == 0


def test_a_streamed_removal_reads_one_layer_at_a_time(tiny_factory, calib_txt, tmp_path, monkeypatch):
    """Streamed, the layers come from the checkpoint one at a time (never two materialised at once),
    and the output is the same as loaded whole."""
    import oneshot.stream as stream

    live, most = set(), [0]
    load, release = stream.StreamIO.load, stream.StreamIO.release

    def counting_load(self, i, layer, device):
        load(self, i, layer, device)
        live.add(i)
        most[0] = max(most[0], len(live))

    def counting_release(self, i, layer, device):
        release(self, i, layer, device)
        live.discard(i)

    monkeypatch.setattr(stream.StreamIO, "load", counting_load)
    monkeypatch.setattr(stream.StreamIO, "release", counting_release)
    src = tiny_factory("qwen3_moe")
    args = ["--structure", "heads,channels,blocks", "--remove", "0.4"]
    assert _prune(src, tmp_path / "s", calib_txt, *args, "--load", "stream") == 0
    assert most[0] == 1
    monkeypatch.undo()
    assert _prune(src, tmp_path / "f", calib_txt, *args, "--load", "full") == 0
    a, b = _tensors(tmp_path / "s"), _tensors(tmp_path / "f")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_gloo_ranks_remove_what_one_process_removes(tiny_factory, calib_txt, tmp_path):
    """torchrun with 2 CPU processes: Block Influence and the consumers' Hessians summed over the ranks'
    windows, so both ranks remove the same blocks, heads and channels as one process, with the same
    compensation up to the order of the sums."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    args = [tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "8", "--seqlen", "32", "--quiet",
            "--structure", "heads,channels,blocks", "--remove", "0.4"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "oneshot", "prune", *args, "--out", two], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "oneshot", "prune", *args, "--out", one], check=True, env=env, timeout=600)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert rb["distributed"]["world_size"] == 2

    def what_went(st):
        return st["blocks"]["removed"], [(e.get("attention", {}).get("removed_heads"),
                                          e.get("mlp", {}).get("removed_channels")) for e in st["layers"]]

    assert what_went(ra["structured"]) == what_went(rb["structured"])
    a, b = _tensors(one), _tensors(two)
    assert sorted(a) == sorted(b)
    assert all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4) for k in a)


@pytest.mark.parametrize("two_four", [False, True])
def test_a_block_update_refits_the_cut_layers(two_four, calib_txt, tmp_path, monkeypatch):
    """``--update block`` after the cut: each kept layer is refitted toward its uncut self (``layer``)
    or toward the dense model's stream (``model``), which also runs through the removed blocks, so the
    layer after a removed block learns to stand in for it. Its held-out loss decides: a refit that
    does not lower it is not kept."""
    from oneshot import prune
    from tiny import make_sharded_llama

    src = make_sharded_llama(str(tmp_path / "src"), layers=6)
    _middle_blocks_least_influential(monkeypatch)
    reports = {}
    for target in ("layer", "model"):
        reports[target] = prune(src, str(tmp_path / target), structure="channels,blocks", remove=0.5, calib=calib_txt,
                                nsamples=8, seqlen=32, progress=False, update="block", block_target=target,
                                block_epochs=2, **({"pattern": "2:4"} if two_four else {})).report
    for report in reports.values():
        updates = report["block_update"]
        assert [u["layer"] for u in updates] == [f"model.layers.{k}" for k in range(4)], "one per kept layer"
        for u in updates:
            assert u["heldout_loss_after"] <= u["heldout_loss_before"]
            assert u["kept"] == (u["heldout_loss_after"] < u["heldout_loss_before"])
    # toward the dense stream, the layer after removed block 1 starts further off than toward its uncut self
    after = {t: {u["layer"]: u["heldout_loss_before"] for u in r["block_update"]} for t, r in reports.items()}
    assert after["model"]["model.layers.1"] > after["layer"]["model.layers.1"]
    assert main(["verify", str(tmp_path / "model"), "--quiet"]) == 0
