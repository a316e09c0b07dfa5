"""Mixture-of-experts models: every expert's matrix pruned, coverage enforced, statistics per expert,
whole experts removed; on tiny random models of each architecture from transformers' configs."""

import json
import os

import pytest
import torch

from oneshot import prune
from oneshot.cli import main
from oneshot.constraint import Constraint
from oneshot.engine.moe import remove_experts
from oneshot.errors import OneshotError
from oneshot.formats.store import load_state_dict
from oneshot.masks import check_constraint
from oneshot.model.experts import ExpertMatrix, ExpertRouting
from oneshot.model.structure import block_coverage, find_decoder_layers, find_linears, get_weight
from tiny import MOE_ARCHS, expert_statistics, fail_after_first_layer, make_tiny_model

EXPERTS = {"qwen2_moe": 8, "qwen3_moe": 8, "mixtral": 8, "gpt_oss": 8, "deepseek_v3": 8, "qwen3_next": 8, "jamba": 4}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_tiny_model(arch, str(tmp_path_factory.mktemp(arch)))
        return made[arch]

    return get


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _prune(src, out, calib, *extra):
    return main(["prune", src, "--calib", calib, "--nsamples", "8", "--seqlen", "48", "--out", str(out), "--quiet",
                 *extra])


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_pruned_exactly_and_streaming_equals_in_memory(arch, moe, calib_txt, tmp_path):
    src = moe(arch)
    full, streamed = tmp_path / "full", tmp_path / "stream"
    assert _prune(src, full, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--load", "full") == 0
    assert _prune(src, streamed, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--load", "stream") == 0
    report = json.loads((streamed / "report.json").read_text())
    assert report["load"]["streaming"], report["load"]
    a, b = load_state_dict(str(full)), load_state_dict(str(streamed))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), "streaming differs from in memory"

    # every expert matrix of every MoE layer is in the report, each exactly 2:4
    experts = [e for e in report["linears"] if "expert" in e]
    dense, pruned = _load(src), _load(str(streamed))
    path, layers = find_decoder_layers(pruned)
    matrices = {}
    for i, layer in enumerate(layers):
        matrices.update(find_linears(layer, f"{path}.{i}"))
    fused = [m for m in matrices.values() if isinstance(m, ExpertMatrix)]
    assert len(experts) == len(fused) > 0
    assert {e["name"] for e in report["linears"]} == set(matrices)
    for name, module in matrices.items():
        w = get_weight(module)
        assert check_constraint(w, Constraint(0.5, 2, 4)) is None, name
        assert int((w == 0).sum()) == w.numel() // 2, name
    assert report["coverage"]["share_of_prunable"] == 1.0
    assert all(d["reason"] != "--ignore" for d in report["coverage"]["kept_dense"])
    assert report["coverage"]["kept_dense_by_reason"].get("router", 0) >= 1
    for entry in experts:  # tokens: every calibration token went through every expert (--moe-calibrate all)
        assert entry["tokens"] == 8 * 48 and entry["routed_tokens"] >= 0
    # routers and everything outside the pruned matrices are untouched
    touched = {id(p) for m in matrices.values() for p in [m.fused if isinstance(m, ExpertMatrix) else m.weight]}
    for name, p in pruned.named_parameters():
        if id(p) not in touched:
            assert torch.equal(p, dict(dense.named_parameters())[name]), name
    ids = torch.randint(0, pruned.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=ids).logits).all()
    assert main(["verify", str(streamed), "--quiet"]) == 0


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_wanda_unstructured_and_formats(arch, moe, calib_txt, tmp_path):
    src = moe(arch)
    out = tmp_path / "o"
    assert _prune(src, out, calib_txt, "--method", "wanda", "--sparsity", "0.5", "--format", "bitmask") == 0
    assert main(["verify", str(out), "--quiet"]) == 0
    sidecar = json.loads((out / "oneshot_sparsity.json").read_text())
    assert sidecar["format"] == "bitmask"
    assert any(".experts." in name for name in sidecar["layers"])


def _block(arch="qwen3_moe", seed=0):
    import transformers as tf

    from tiny import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(arch)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() in (2, 3):
                p.normal_(0, 0.08)
    return model


def _expert(block, e, x):
    """Expert ``e`` of a Qwen3-MoE block by hand: down(silu(gate x) * up x)."""
    gate_up = block.experts.gate_up_proj[e]
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ block.experts.down_proj[e].t()


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_expert_statistics_against_a_hand_computation(mode):
    model = _block()
    layer = model.model.layers[0]
    block = layer.mlp
    x = torch.randn(1, 40, 64)
    pruner, routing, out = expert_statistics(layer, lambda: block(x), mode)
    flat = x.reshape(-1, 64)
    _, weights, index = block.gate(flat)
    with torch.no_grad():
        reference = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for k in range(index.shape[1]):
                reference[t] += weights[t, k] * _expert(block, int(index[t, k]), flat[t : t + 1])[0]
    assert torch.allclose(out.reshape(-1, 64), reference, atol=1e-5), "the block's output keeps the real routing"
    for e in range(8):
        rows = (index == e).any(-1) if mode == "routed" else torch.ones(flat.shape[0], dtype=torch.bool)
        xs = flat[rows]
        st = pruner.stats.stats.get(f"L.mlp.experts.{e}.gate_up_proj")
        if xs.shape[0] == 0:
            assert st is None
            continue
        assert st.tokens == xs.shape[0]
        assert torch.allclose(st.hessian, xs.t() @ xs, atol=1e-4)
        with torch.no_grad():
            gate, up = (xs @ block.experts.gate_up_proj[e].t()).chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        down = pruner.stats.stats[f"L.mlp.experts.{e}.down_proj"]
        assert torch.allclose(down.hessian, h.t() @ h, atol=1e-4)
        assert int(routing.blocks["L.mlp.experts"].routed[e]) == int((index == e).sum())


def test_reap_scores_against_a_hand_computation():
    model = _block(seed=1)
    layer = model.model.layers[0]
    block = layer.mlp
    x = torch.randn(1, 32, 64)
    routing = ExpertRouting(layer, "L", {})
    routing.record = routing.saliency = True
    with routing, torch.no_grad():
        block(x)
        flat = x.reshape(-1, 64)
        _, weights, index = block.gate(flat)
        for e in range(8):
            pairs = (index == e).nonzero()
            got = routing.blocks["L.mlp.experts"]
            if len(pairs) == 0:
                assert got.routed[e] == 0
                continue
            norms = [float(weights[t, k]) * float(_expert(block, e, flat[t : t + 1]).norm()) for t, k in pairs.tolist()]
            assert got.routed[e] == len(pairs)
            assert float(got.saliency[e]) / float(got.routed[e]) == pytest.approx(sum(norms) / len(norms), rel=1e-4)


def test_removing_an_expert_no_token_reaches_leaves_the_logits(tmp_path):
    """gpt-oss's router has a bias: -1e4 on expert 5 means no token is routed to it; its top-k softmax
    renormalises over the chosen experts, so removing expert 5 changes nothing."""
    model = _block("gpt_oss", seed=2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.router.bias[5] = -1e4
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        routings = [ExpertRouting(layer, f"model.layers.{i}", {}) for i, layer in enumerate(model.model.layers)]
        for r in routings:
            r.record = True
            r.__enter__()
        model(input_ids=ids)
        for r in routings:
            r.__exit__(None, None, None)
        for i, (layer, r) in enumerate(zip(model.model.layers, routings)):
            entries = remove_experts(layer, f"model.layers.{i}", r, 1 / 8, "frequency", model.config)
            assert [x["expert"] for x in entries[0]["removed"]] == [5]
            assert entries[0]["removed"][0]["token_share"] == 0
        after = model(input_ids=ids).logits
    assert model.config.num_local_experts == 7
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 7
    assert model.model.layers[0].mlp.router.weight.shape[0] == 7
    assert torch.allclose(before, after, atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    reloaded = _load(str(tmp_path / "m"))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, after, atol=1e-5)


@pytest.mark.parametrize("arch,left", [("qwen3_moe", 6), ("deepseek_v3", 6), ("mixtral", 4)])
def test_remove_experts_with_pruning_reloads_smaller(arch, left, moe, calib_txt, tmp_path):
    src = moe(arch)
    out = tmp_path / "o"
    fraction = "0.25" if left == 6 else "0.5"
    assert _prune(src, out, calib_txt, "--method", "sparsegpt", "--sparsity", "0.5", "--remove-experts", fraction,
                  "--expert-score", "reap") == 0
    report = json.loads((out / "report.json").read_text())
    model = _load(str(out))
    config = model.config
    key = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}.get(arch, "num_experts")
    assert getattr(config, key) == left
    assert report["experts"]["experts_after"] == [left]
    assert report["experts"]["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert report["experts"]["weight_bytes_after"] < report["experts"]["weight_bytes_before"]
    for entry in report["experts_removed"]:
        assert len(entry["removed"]) == 8 - left
        if arch == "deepseek_v3":  # group-limited routing: the same number removed from each of the 2 groups
            assert sorted(r["expert"] // 4 for r in entry["removed"]) == [0, 1]
        else:  # the lowest scores go
            assert all(r["score"] <= entry["kept_scores"][0] + 1e-12 for r in entry["removed"])
    assert all(e.get("source_expert") is not None for e in report["linears"] if "expert" in e)
    assert report["coverage"]["share_of_prunable"] == 1.0
    ids = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    assert main(["verify", str(out), "--quiet"]) == 0


def test_routed_calibration_falls_back_for_rare_experts(moe, calib_txt):
    result = prune(moe("qwen3_moe"), None, method="sparsegpt", sparsity=0.5, calib=calib_txt, nsamples=4, seqlen=32,
                   progress=False, moe_calibrate="routed")
    experts = [e for e in result.report["linears"] if "expert" in e]
    fallen = [e for e in experts if e.get("calibrated_on")]
    assert fallen, "with 128 tokens, top-2 of 8, some expert gets fewer than 64"
    assert all(e["tokens"] == 128 for e in fallen)
    assert all(e["tokens"] == e["routed_tokens"] for e in experts if not e.get("calibrated_on"))
    assert any("calibrated on every token" in n for n in result.report["notes"])


def test_expert_statistics_in_chunks_give_the_same_model(moe, calib_txt, monkeypatch):
    import oneshot.engine.collect as collect

    def run():
        r = prune(moe("qwen3_moe"), None, method="sparsegpt", sparsity=0.5, calib=calib_txt, nsamples=4, seqlen=32,
                  progress=False)
        return {k: v.clone() for k, v in r.model.state_dict().items()}, r.report

    one, _ = run()
    real = collect.expert_chunks
    monkeypatch.setattr(collect, "expert_chunks", lambda lin, h, ho, budget: real(lin, h, ho, 40_000))
    chunked, report = run()
    assert any("chunks" in n for n in report["notes"])
    assert all(torch.equal(one[k], chunked[k]) for k in one)


def test_block_update_on_experts(moe, calib_txt):
    r = prune(moe("gpt_oss"), None, method="wanda", sparsity=0.5, calib=calib_txt, nsamples=4, seqlen=32,
              progress=False, update="block", block_epochs=1)
    assert len(r.report["block_update"]) == 2
    for name, module in find_linears(r.model.model.layers[0], "model.layers.0").items():
        w = get_weight(module)
        assert int((w == 0).sum()) >= w.numel() // 2, name


def test_unknown_block_weight_stops_before_loading(moe, calib_txt, monkeypatch, tmp_path):
    import transformers.models.qwen3_moe.modeling_qwen3_moe as qm

    original = qm.Qwen3MoeDecoderLayer.__init__

    def with_mystery(self, config, layer_idx):
        original(self, config, layer_idx)
        self.mystery = torch.nn.Parameter(torch.zeros(4, 4))

    monkeypatch.setattr(qm.Qwen3MoeDecoderLayer, "__init__", with_mystery)
    monkeypatch.setattr("oneshot.run.Run.prune", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(OneshotError, match=r"model\.layers\.0\.mystery .*--ignore it"):
        prune(moe("qwen3_moe"), str(tmp_path / "o"), calib=calib_txt, nsamples=2, seqlen=16, progress=False)
    monkeypatch.undo()
    layer = _block().model.layers[0]
    layer.mystery = torch.nn.Parameter(torch.zeros(4, 4))
    kept = block_coverage(layer, "L", find_linears(layer, "L"), ignore=["mystery"])
    assert {"name": "L.mystery", "shape": [4, 4], "reason": "--ignore"} in kept


def test_moe_options_checked_up_front(moe, tiny_factory, calib_txt, tmp_path):
    with pytest.raises(OneshotError, match="--sequential linear is not supported on mixture-of-experts"):
        prune(moe("qwen3_moe"), None, calib=calib_txt, nsamples=2, seqlen=16, sequential="linear", progress=False)
    with pytest.raises(OneshotError, match="has no mixture-of-experts layers"):
        prune(tiny_factory("llama"), None, calib=calib_txt, nsamples=2, seqlen=16, remove_experts=0.5, progress=False)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(OneshotError, match="--remove-experts must be a fraction"):
            prune(moe("qwen3_moe"), None, calib=calib_txt, remove_experts=bad, progress=False)
    with pytest.raises(OneshotError, match="removes none"):
        prune(moe("qwen3_moe"), None, calib=calib_txt, nsamples=2, seqlen=16, remove_experts=0.01, progress=False)
    with pytest.raises(OneshotError, match="--moe-calibrate must be"):
        prune(moe("qwen3_moe"), None, calib=calib_txt, moe_calibrate="some", progress=False)
    assert not os.path.exists(tmp_path / "o")


def test_ignore_an_expert_keeps_it_dense_and_listed(moe, calib_txt):
    r = prune(moe("qwen3_moe"), None, method="wanda", sparsity=0.5, calib=calib_txt, nsamples=2, seqlen=32,
              progress=False, ignore=[r"experts\.3\."])
    names = {e["name"] for e in r.report["linears"]}
    assert not any(".experts.3." in n for n in names) and any(".experts.2." in n for n in names)
    w = r.model.model.layers[0].mlp.experts.gate_up_proj[3]
    assert int((w == 0).sum()) == 0
    kept = {d["name"]: d["reason"] for d in r.report["coverage"]["kept_dense"]}
    assert kept["model.layers.0.mlp.experts.3.gate_up_proj"] == "--ignore"
    assert r.report["coverage"]["share_of_block_matrices"] < 0.9


@pytest.mark.parametrize("load", ["full", "stream"])
def test_resume_after_a_failure_with_experts_removed(load, tmp_path, calib_txt, monkeypatch):
    """A run that fails after its first layer is journaled resumes to the same bytes as one that
    never failed: the finished layer's experts are removed again before its tensors load."""
    src = make_tiny_model("qwen3_moe", str(tmp_path / "src"))
    options = dict(method="sparsegpt", sparsity=0.5, calib=calib_txt, nsamples=4, seqlen=32, progress=False,
                   remove_experts=0.25, load=load, journal_interval=0)
    prune(src, str(tmp_path / "ref"), **options)
    fail_after_first_layer(monkeypatch)
    with pytest.raises(OneshotError, match="injected"):
        prune(src, str(tmp_path / "out"), **options)
    monkeypatch.undo()
    result = prune(src, str(tmp_path / "out"), resume=True, **options)
    assert result.report["resumed_at_layer"] == 1
    a, b = load_state_dict(str(tmp_path / "ref")), load_state_dict(str(tmp_path / "out"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _load(str(tmp_path / "out")).config.num_experts == 6


def test_per_expert_linears_are_linears_and_their_router_stays_dense():
    """Older and remote-code MoE blocks: experts as a ModuleList of MLPs of nn.Linear, the router an
    nn.Linear named gate; a shared expert's one-output gate is a router too."""
    from torch import nn

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 32)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(16, 4, bias=False)
            self.experts = nn.ModuleList(MLP() for _ in range(4))
            self.shared_expert = MLP()
            self.shared_expert_gate = nn.Linear(16, 1, bias=False)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)
            self.block_sparse_moe = Block()
            self.norm = nn.LayerNorm(16)

    layer = Layer()
    names = set(find_linears(layer, "L"))
    assert "L.block_sparse_moe.gate" not in names and "L.block_sparse_moe.shared_expert_gate" not in names
    assert {f"L.block_sparse_moe.experts.{e}.w{k}" for e in range(4) for k in (1, 2, 3)} <= names
    assert "L.block_sparse_moe.shared_expert.w1" in names and "L.q_proj" in names
    kept = {d["name"]: d["reason"] for d in block_coverage(layer, "L", find_linears(layer, "L"))}
    assert kept == {"L.block_sparse_moe.gate.weight": "router",
                    "L.block_sparse_moe.shared_expert_gate.weight": "router"}


@pytest.mark.parametrize("load", ["stream", "full"])
def test_bfloat16_moe_checkpoint(load, tmp_path, calib_txt):
    """What users have: a bf16 checkpoint in the hub's per-expert layout. Layers compute in float32 on
    the CPU; every expert comes back in bf16, exactly 2:4, +0.0 in pruned slots."""
    src = make_tiny_model("qwen3_moe", str(tmp_path / "src"), torch.bfloat16)
    out = tmp_path / "o"
    assert _prune(src, out, calib_txt, "--method", "sparsegpt", "--pattern", "2:4", "--load", load,
                  "--remove-experts", "0.25") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["load"]["streaming"] == (load == "stream") and report["compute_dtype"] == "float32"
    model = _load(str(out))
    assert model.dtype == torch.bfloat16 and model.config.num_experts == 6
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    assert fused.dtype == torch.bfloat16
    for e in range(fused.shape[0]):
        w = fused[e].float()
        assert check_constraint(w, Constraint(0.5, 2, 4)) is None
        assert not (torch.signbit(fused[e]) & (fused[e] == 0)).any()
    assert main(["verify", str(out), "--quiet"]) == 0
