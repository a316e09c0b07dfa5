"""Issue 3's methods against their definitions: RIA, DSnoT, OWL, lstsq / ADMM / block updates."""

import json

import pytest
import torch

from oneshot.allocation import outlier_density, owl_sparsities
from oneshot.cli import main
from oneshot.config import PruneConfig
from oneshot.constraint import Constraint
from oneshot.errors import OneshotError
from oneshot.masks import check_constraint, n_pruned
from oneshot.solvers import SOLVERS, Stats
from oneshot.solvers.dsnot import expected_error, refine
from oneshot.solvers.ria import balanced_permutation, ria_score
from oneshot.updates.weights import lstsq_rows, output_error, update_weight


def _stats(x: torch.Tensor, hessian: bool = True) -> Stats:
    return Stats(tokens=x.shape[0], sq_norms=(x * x).sum(0), hessian=x.t() @ x if hessian else None, sums=x.sum(0))


def _layer(out_features=48, in_features=64, tokens=1024, seed=0, mean=0.5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.rand(in_features, generator=g) * 3 + 0.1
    x = (torch.randn(tokens, in_features, generator=g) @ mix + mean) * scales  # non-zero channel means
    return torch.randn(out_features, in_features, generator=g), x


OPTS = {"blocksize": 16, "dampening": 0.01, "dsnot_init": "wanda"}


def test_ria_score_matches_definition():
    w, x = _layer()
    st = _stats(x, hessian=False)
    a = w.abs()
    want = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * x.pow(2).sum(0).sqrt().pow(0.5)
    assert torch.allclose(ria_score(w, st), want)
    res = SOLVERS["ria"].fn(w, st, Constraint(0.5), {})
    assert (res.mask.sum(1) == n_pruned(w.shape[1], 0.5)).all()  # compared within rows
    # within every row, each pruned score is at most each kept one
    pruned_max = torch.where(res.mask, want, torch.full_like(want, -1.0)).max(1).values
    kept_min = torch.where(res.mask, torch.full_like(want, float("inf")), want).min(1).values
    assert (pruned_max <= kept_min).all()


def test_ria_permutation_restores_order_and_is_nm_along_it():
    w, x = _layer(in_features=64)
    # make a few input channels dominate so the natural grouping crowds them
    x[:, :8] *= 20
    st = _stats(x, hessian=False)
    res = SOLVERS["ria"].fn(w, st, Constraint(0.5, 2, 4), {"ria_permute": True})
    perm = torch.tensor(res.info["input_permutation"])
    assert sorted(perm.tolist()) == list(range(64))
    assert res.info["permutation_score_gain"] > 0
    assert check_constraint(res.weight[:, perm], Constraint(0.5, 2, 4)) is None  # N:M along the permutation
    # weights stay in the original order: kept entries are the dense values in place
    assert torch.equal(res.weight[~res.mask], w[~res.mask])
    # the balanced deal puts the 8 strongest channels into 8 different groups
    score = ria_score(w, st)
    p = balanced_permutation(score, 4)
    groups = {int(torch.nonzero(p == c)) // 4 for c in torch.argsort(score.sum(0), descending=True)[:8].tolist()}
    assert len(groups) == 8


@pytest.mark.parametrize("constraint", [Constraint(0.5), Constraint(0.7), Constraint(0.5, 2, 4), Constraint(0.5, 4, 8)])
@pytest.mark.parametrize("init", ["wanda", "magnitude", "ria", "sparsegpt"])
def test_dsnot_never_increases_its_objective_and_keeps_counts(constraint, init):
    w, x = _layer(seed=3)
    st = _stats(x)
    base = SOLVERS[init].fn(w, st, constraint, OPTS)
    value = torch.where(base.mask, w, base.weight)
    before = expected_error(w, value, base.mask, st.mean()).abs()
    mask, info = refine(w, value, base.mask, st, constraint, cycles=50, threshold=0.0)
    after = expected_error(w, value, mask, st.mean()).abs()
    assert (after <= before + 1e-5).all()
    assert info["dsnot_swaps"] > 0 and after.mean() < before.mean()
    assert torch.equal(mask.sum(1), base.mask.sum(1))  # each row's sparsity exactly as before
    res = SOLVERS["dsnot"].fn(w, st, constraint, {**OPTS, "dsnot_init": init, "dsnot_threshold": 0.0})
    assert check_constraint(res.weight, constraint) is None
    assert torch.equal(res.mask.sum(1), base.mask.sum(1))


def test_dsnot_threshold_stops_rows_and_cycles_bound_swaps():
    w, x = _layer(seed=4)
    st = _stats(x, hessian=False)
    base = SOLVERS["wanda"].fn(w, st, Constraint(0.5), {})
    _, none = refine(w, w, base.mask, st, Constraint(0.5), threshold=1e9)
    assert none["dsnot_swaps"] == 0
    _, few = refine(w, w, base.mask, st, Constraint(0.5), cycles=2, threshold=0.0)
    assert few["dsnot_swaps"] <= 2 * w.shape[0]


def test_lstsq_equals_closed_form_and_lowers_error():
    w, x = _layer(out_features=8, in_features=32, tokens=512, seed=5)
    st = _stats(x)
    res = SOLVERS["wanda"].fn(w, st, Constraint(0.5), {})
    h = st.hessian / st.tokens
    cand = lstsq_rows(w, res.weight, res.mask, h, 0.0)
    for r in range(w.shape[0]):
        keep = ~res.mask[r]
        xk = x[:, keep]
        want = torch.linalg.lstsq(xk.double(), (x @ w[r]).double().unsqueeze(1)).solution.squeeze(1)
        assert torch.allclose(cand[r, keep].double(), want, rtol=1e-3, atol=1e-3), r
        assert (cand[r, ~keep] == 0).all()
    assert output_error(cand, w, h) < output_error(res.weight, w, h)


@pytest.mark.parametrize("kind", ["lstsq", "admm"])
def test_updates_are_judged_on_heldout_windows(kind):
    w, x = _layer(seed=6, tokens=2048)
    fit, val = x[:1536], x[1536:]
    st = _stats(fit)
    st.heldout = _stats(val)
    res = SOLVERS["wanda"].fn(w, st, Constraint(0.5), {})
    new, info = update_weight(kind, w, res.weight, res.mask, st)
    assert info["update_judged_on"] == "held-out windows"
    assert info["update_error_after"] <= info["update_error_before"]
    assert (new[res.mask] == 0).all() and not torch.equal(new, res.weight)
    assert info["update_fit_error_after"] < info["update_fit_error_before"]  # plenty of tokens: it helps
    # with far too few fitting tokens the held-out judge must refuse an overfitted update
    tiny = _stats(x[:8])
    tiny.heldout = _stats(x[8:])
    res2 = SOLVERS["wanda"].fn(w, tiny, Constraint(0.5), {})
    new2, info2 = update_weight(kind, w, res2.weight, res2.mask, tiny)
    h_val = tiny.heldout.hessian / tiny.heldout.tokens
    assert output_error(new2, w, h_val) <= output_error(res2.weight, w, h_val) + 1e-6


def test_owl_sparsities_weighted_mean_is_exact():
    dens = [0.01, 0.03, 0.02, 0.08, 0.05]
    params = [100, 300, 200, 100, 250]
    s = owl_sparsities(dens, params, 0.7, 0.08)
    mean = sum(a * b for a, b in zip(s, params)) / sum(params)
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16)
    assert s[3] == min(s) and s[0] == max(s)  # most outliers, least pruned
    with pytest.raises(ValueError):
        owl_sparsities(dens, params, 0.95, 0.2)
    w = torch.ones(4, 4)
    w[0, 0] = 100
    assert outlier_density([w], [torch.ones(4)], 5.0) == pytest.approx(1 / 16)


def _prune(src, calib, out, *extra):
    rc = main(["prune", src, "--calib", calib, "--nsamples", "8", "--seqlen", "48", "--out", str(out), "--quiet",
               *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("extra", [
    ["--method", "dsnot", "--init", "sparsegpt", "--pattern", "2:4"],
    ["--method", "dsnot", "--sparsity", "0.6"],
    ["--method", "ria", "--pattern", "4:8"],
    ["--method", "wanda", "--update", "lstsq"],
    ["--method", "sparsegpt", "--update", "admm", "--sparsity", "0.7"],
])
def test_methods_end_to_end(extra, tiny_factory, calib_txt, tmp_path):
    report = _prune(tiny_factory("llama"), calib_txt, tmp_path / "out", *extra)
    pattern = extra[extra.index("--pattern") + 1] if "--pattern" in extra else None
    target = report["target_sparsity"]
    for e in report["linears"]:
        if pattern:
            n, m = map(int, pattern.split(":"))
            assert e["sparsity"] == pytest.approx(1 - n / m)
        else:
            assert e["sparsity"] == pytest.approx(target, abs=1 / e["shape"][1])
        if "--update" in extra:
            assert e["update_error_after"] <= e["update_error_before"]
    if "--update" in extra:
        assert report["heldout_windows"] == 1


def test_ria_permutation_file_end_to_end(tiny_factory, calib_txt, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    report = _prune(tiny_factory("llama"), calib_txt, out, "--method", "ria", "--pattern", "2:4", "--ria-permute")
    sidecar = json.loads((out / "oneshot_sparsity.json").read_text())
    permuted = [e["name"] for e in report["linears"] if e.get("permuted")]
    if permuted:
        perms = load_file(str(out / "oneshot_permutations.safetensors"))
        assert set(perms) == set(permuted)
        assert sidecar["layers"][permuted[0]]["input_permutation"] == "oneshot_permutations.safetensors"
    from transformers import AutoModelForCausalLM

    from oneshot.model.structure import get_weight

    model = AutoModelForCausalLM.from_pretrained(str(out))
    for name, module in model.named_modules():
        if name in {e["name"] for e in report["linears"]}:
            w = get_weight(module)
            w = w[:, perms[name].long()] if name in permuted else w
            assert check_constraint(w, Constraint(0.5, 2, 4)) is None, name


def test_owl_end_to_end_weighted_mean(tiny_factory, calib_txt, tmp_path):
    report = _prune(tiny_factory("qwen2"), calib_txt, tmp_path / "out", "--method", "wanda", "--sparsity", "0.7",
                    "--allocation", "owl", "--owl-lambda", "0.1")
    alloc = report["allocation"]
    assert len(alloc["layer_sparsity"]) == report["num_layers"]
    total = sum(e["shape"][0] * e["shape"][1] for e in report["linears"])
    zeros = sum(e["sparsity"] * e["shape"][0] * e["shape"][1] for e in report["linears"])
    # the allocation's parameter-weighted mean is the target exactly; what lands differs only by the
    # rounding of each row's count (at most half a weight per row)
    params = {}
    for e in report["linears"]:
        layer = e["name"].rsplit(".", 2)[0]
        params[layer] = params.get(layer, 0) + e["shape"][0] * e["shape"][1]
    weights = list(params.values())
    mean = sum(s * w for s, w in zip(alloc["layer_sparsity"], weights)) / sum(weights)
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert len(set(alloc["layer_sparsity"])) > 1
    assert abs(zeros / total - 0.7) <= max(0.5 / e["shape"][1] for e in report["linears"])


@pytest.mark.parametrize("arch,target", [("llama", "layer"), ("llama", "model"), ("gpt2", "model")])
def test_block_update_keeps_masks_and_lowers_heldout_loss(arch, target, tiny_factory, calib_txt, tmp_path):
    src = tiny_factory(arch)  # gpt2: Conv1D stores the weight transposed
    out = tmp_path / "out"
    report = _prune(src, calib_txt, out, "--method", "wanda", "--pattern", "2:4", "--update", "block",
                    "--block-epochs", "3", "--block-lr", "1e-3", "--block-batch", "2", "--block-target", target)
    blocks = report["block_update"]
    assert len(blocks) == report["num_layers"]
    assert all(b["heldout_loss_after"] <= b["heldout_loss_before"] for b in blocks)
    assert any(b["kept"] for b in blocks)
    from transformers import AutoModelForCausalLM

    from oneshot.model.structure import get_weight

    model = AutoModelForCausalLM.from_pretrained(str(out))
    names = {e["name"] for e in report["linears"]}
    for name, module in model.named_modules():
        if name in names:
            w = get_weight(module)
            assert check_constraint(w, Constraint(0.5, 2, 4)) is None, name
            assert not (torch.signbit(w) & (w == 0)).any()


def test_presets_and_overrides():
    cfg = PruneConfig.from_options("m", preset="best")
    assert cfg.method == "sparsegpt" and cfg.update == "block"
    cfg = PruneConfig.from_options("m", preset="best", method="wanda", block_epochs=1)
    assert cfg.method == "wanda" and cfg.block_epochs == 1 and cfg.update == "block"
    assert PruneConfig.from_options("m", preset="fast").method == "wanda"
    with pytest.raises(OneshotError):
        PruneConfig.from_options("m", preset="nope")
    # --sequential auto: one pass for sparsegpt, the dense layer's statistics otherwise and for the block update
    assert PruneConfig.from_options("m").sequential_mode == "linear"
    assert PruneConfig.from_options("m", pattern="2:4").sequential_mode == "linear"
    assert PruneConfig.from_options("m", method="wanda").sequential_mode == "layer"
    assert PruneConfig.from_options("m", preset="best").sequential_mode == "layer"
    assert PruneConfig.from_options("m", sequential="layer").sequential_mode == "layer"
    for bad in ({"nm_select": "nope"}, {"sparsegpt_order": "nope"}):
        with pytest.raises(OneshotError, match=next(iter(bad)).replace("_", "-")):
            PruneConfig.from_options("m", **bad).validate()


def test_cli_defaults_are_the_config_defaults_and_never_override_a_preset(monkeypatch):
    """One source for every default: the CLI passes only what was given, so a preset's values survive
    and an empty command line gives PruneConfig's own defaults."""
    import dataclasses

    from oneshot import cli, config

    monkeypatch.setitem(config.PRESETS, "probe", {"nsamples": 7, "seqlen": 64, "sequential": "layer", "calib": "x"})
    args = cli.build_parser().parse_args(["prune", "m", "--preset", "probe"])
    skip = ("command", "model", "out", "preset", "quiet", "json", "plot", "eval", "eval_baseline") + cli.EVAL_FLAGS
    given = {k: v for k, v in vars(args).items() if k not in skip}
    assert all(v is None for v in given.values()), {k: v for k, v in given.items() if v is not None}
    cfg = PruneConfig.from_options("m", None, "probe", **given)
    assert (cfg.nsamples, cfg.seqlen, cfg.sequential, cfg.calib) == (7, 64, "layer", "x")
    plain = PruneConfig.from_options("m", None, None, **given)
    for f in dataclasses.fields(PruneConfig):
        if f.name not in ("model", "out", "preset"):
            assert getattr(plain, f.name) == getattr(PruneConfig(model="m"), f.name), f.name


@pytest.mark.parametrize("extra,message", [
    (["--allocation", "owl", "--pattern", "2:4"], "unstructured"),
    (["--ria-permute", "--pattern", "2:4"], "--method ria"),
    (["--method", "dsnot", "--init", "nope"], "--init"),
    (["--update", "block", "--sequential", "linear"], "--sequential layer"),
    (["--update", "lstsq", "--heldout", "8"], "--heldout"),
])
def test_bad_method_options_fail_fast(extra, message, capsys, tmp_path):
    rc = main(["prune", "some/model", "--out", str(tmp_path / "o"), "--nsamples", "8", *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("sequential", ["linear", "layer"])
def test_reported_error_is_its_definition(sequential, tiny_factory, calib_txt, monkeypatch):
    """Each linear's relative_error is ‖x(W−Ŵ)ᵀ‖²/‖xWᵀ‖² over the calibration inputs that reach it in
    the pruned model: from the solve's Hessian (linear) or the forward hook (layer), both recomputed
    here from a plain forward of the pruned model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import oneshot.engine.loop
    from oneshot import prune
    from oneshot.calibration import load_calibration
    from oneshot.model.structure import find_linears, get_weight

    monkeypatch.setattr(oneshot.engine.loop, "ERROR_TOKENS", 10**6)  # the hook measures every token too
    src = tiny_factory("llama")
    result = prune(src, method="sparsegpt", sparsity=0.5, calib=calib_txt, nsamples=4, seqlen=32,
                   sequential=sequential, progress=False)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ids = load_calibration(calib_txt, AutoTokenizer.from_pretrained(src), 4, 32, 0).input_ids
    inputs = {}

    def keep(name):
        def hook(module, args):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    for name, module in find_linears(result.model).items():
        module.register_forward_pre_hook(keep(name))
    with torch.no_grad():
        result.model(ids)
    dense_weights = {n: get_weight(m) for n, m in find_linears(dense).items()}
    for entry in result.report["linears"]:
        name = entry["name"]
        x, w = inputs[name], dense_weights[name]
        delta = w - get_weight(find_linears(result.model)[name])
        want = float((x @ delta.t()).square().sum() / (x @ w.t()).square().sum())
        assert entry["error_tokens"] == 4 * 32
        assert entry["relative_error"] == pytest.approx(want, rel=1e-3), name


def test_joint_solve_of_linears_sharing_an_input_equals_separate(tiny_factory, calib_txt, monkeypatch):
    """q/k/v and gate/up are solved as one stacked matrix (sparsegpt's rows are independent): the
    same masks and, to rounding, the same weights as solving each linear alone."""
    import dataclasses

    from oneshot import prune
    from oneshot.model.structure import find_linears, get_weight

    src = tiny_factory("llama")
    runs = {}
    for joint in (True, False):
        if not joint:
            monkeypatch.setitem(SOLVERS, "sparsegpt", dataclasses.replace(SOLVERS["sparsegpt"], rows_apart=None))
        result = prune(src, method="sparsegpt", pattern="2:4", calib=calib_txt, nsamples=4, seqlen=32, progress=False)
        runs[joint] = ({n: get_weight(m) for n, m in find_linears(result.model).items()},
                       {e["name"]: e.get("solved_with") for e in result.report["linears"]})
    solved_with = runs[True][1]
    assert solved_with["model.layers.1.self_attn.k_proj"] == "model.layers.1.self_attn.q_proj"
    assert solved_with["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert not any(runs[False][1].values())
    for name, weight in runs[True][0].items():
        other = runs[False][0][name]
        assert torch.equal(weight == 0, other == 0), name
        assert torch.allclose(weight, other, rtol=1e-4, atol=1e-5), name


def test_joint_solve_hint_is_checked_before_use():
    """A follower the hint names that turns out to read another input is solved from its own
    statistics, never with the leader's."""
    from torch import nn

    from oneshot.engine.layer import LayerPruner

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 8, bias=False), nn.Linear(16, 8, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x * x + 1)

    torch.manual_seed(0)
    layer = Toy()
    dense_b = layer.b.weight.detach().clone()
    x = torch.randn(4, 32, 16)
    with LayerPruner({"L.a": layer.a, "L.b": layer.b}, SOLVERS["sparsegpt"], Constraint(0.5, 2, 4),
                     {"blocksize": 128, "dampening": 0.01}, 1, torch.device("cpu"), 64,
                     followers={"a": ["b"]}, prefix="L") as pruner, torch.no_grad():
        layer(x)
    assert pruner.stats.leader == {"L.a": "L.a", "L.b": "L.b"} and "solved_with" not in pruner.entries["L.b"]
    xb = (x * x + 1).reshape(-1, 16)
    h = xb.t() @ xb
    alone = SOLVERS["sparsegpt"].fn(dense_b, Stats(tokens=xb.shape[0], sq_norms=h.diagonal().clone(), hessian=h),
                                    Constraint(0.5, 2, 4), {"blocksize": 128, "dampening": 0.01})
    assert torch.allclose(layer.b.weight, alone.weight, rtol=1e-4, atol=1e-5)
