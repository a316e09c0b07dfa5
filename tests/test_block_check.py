"""Issue 25: ``--update block`` is checked on the whole model (the held-out next-token loss through
the model's own head), a refit that makes it worse is undone layer by layer, and the refit's loss
weighs every token alike (``--block-loss relative``)."""

from __future__ import annotations

import pytest
import torch

import oneshot.engine.guard as guard
from oneshot import prune
from oneshot.constraint import Constraint
from oneshot.formats.store import load_state_dict
from oneshot.masks import check_constraint
from oneshot.updates.block import block_loss
from tiny import ARCHS, MOE_ARCHS, make_sharded_llama, make_tiny_model

OPTIONS = dict(method="sparsegpt", sparsity=0.5, nsamples=8, seqlen=48, progress=False, update="block",
               block_epochs=2, journal_interval=0)


def _record_solver_weights(monkeypatch) -> dict[int, dict[str, torch.Tensor]]:
    """Each layer's tensors as the solver left them (what ModelCheck saves), by layer index."""
    seen: dict[int, dict[str, torch.Tensor]] = {}
    original = guard.ModelCheck.advance

    def advance(self, layer, i, *args, **kwargs):
        seen[i] = guard._layer_file_tensors(layer, self.storage)
        return original(self, layer, i, *args, **kwargs)

    monkeypatch.setattr(guard.ModelCheck, "advance", advance)
    return seen


def _refit_worse(monkeypatch) -> None:
    """The whole-model check sees the refit as worse: the first loss it asks (the refit's) is higher."""
    calls = []
    original = guard.heldout_loss

    def fake(*args, **kwargs):
        real = original(*args, **kwargs)  # the real forward still runs
        calls.append(real)
        return 10.0 if len(calls) % 2 == 1 else 1.0

    monkeypatch.setattr(guard, "heldout_loss", fake)


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe"])
def test_the_refit_is_checked_on_the_whole_model(arch, calib_txt, tmp_path):
    """Both held-out losses are measured through the model's head (gemma3: scaled embeddings,
    sliding-window layers, norms around the MLP; qwen3_moe: experts) and the decision follows them;
    a streamed run (which reads the output head only for this) measures the same."""
    src = make_tiny_model(arch, str(tmp_path / "src"))
    report = prune(src, str(tmp_path / "out"), calib=calib_txt, load="full", **OPTIONS).report
    streamed = prune(src, str(tmp_path / "streamed"), calib=calib_txt, load="stream", **OPTIONS).report
    check = report["block_update_check"]
    assert streamed["block_update_check"] == check
    assert check["heldout_windows"] == 1
    assert 0 < check["heldout_loss_refit"] < 20 and 0 < check["heldout_loss_solver"] < 20
    assert check["kept"] == (check["heldout_loss_refit"] <= check["heldout_loss_solver"])
    undone = any("solver weights back" in note for note in report["notes"])
    assert undone == (not check["kept"])
    assert all(b.get("undone", False) == undone for b in report["block_update"])


@pytest.mark.parametrize("load", ["full", "stream"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_a_refit_that_makes_the_model_worse_is_undone(load, pattern, calib_txt, tmp_path, monkeypatch):
    """Every layer is written with exactly the solver's weights (bf16, +0.0 in pruned slots, exact
    N:M), the report says why, and the counts are the solver's."""
    src = make_sharded_llama(str(tmp_path / "src"), layers=3, hidden=64)
    solver = _record_solver_weights(monkeypatch)
    _refit_worse(monkeypatch)
    extra = {"pattern": "2:4"} if pattern == "2:4" else {}
    result = prune(src, str(tmp_path / "out"), calib=calib_txt, load=load, **OPTIONS, **extra)
    report = result.report
    assert report["block_update_check"]["kept"] is False
    assert any("solver weights back" in note for note in report["notes"])
    out = load_state_dict(str(tmp_path / "out"))
    assert sorted(solver) == [0, 1, 2]
    for i, tensors in solver.items():
        for name, value in tensors.items():
            assert torch.equal(out[f"model.layers.{i}.{name}"], value), (i, name)
    for entry in report["linears"]:
        w = out[entry["name"] + ".weight"]
        assert entry["zeros"] == int((w == 0).sum())
        assert not (torch.signbit(w) & (w == 0)).any()
        if pattern == "2:4":
            assert check_constraint(w.float(), Constraint(0.5, 2, 4)) is None


def test_undone_refits_give_the_same_bytes_streamed_and_in_memory(calib_txt, tmp_path, monkeypatch):
    src = make_sharded_llama(str(tmp_path / "src"), layers=3, hidden=64)
    _refit_worse(monkeypatch)
    for load in ("full", "stream"):
        prune(src, str(tmp_path / load), calib=calib_txt, load=load, **OPTIONS)
    a, b = load_state_dict(str(tmp_path / "full")), load_state_dict(str(tmp_path / "stream"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kept_refit_changes_the_weights(calib_txt, tmp_path, monkeypatch):
    """The other way round: the check says the refit is better, and the solver's weights are not what
    is written (the refit moved the kept weights)."""
    src = make_sharded_llama(str(tmp_path / "src"), layers=3, hidden=64)
    solver = _record_solver_weights(monkeypatch)
    calls = []

    def better(*args, **kwargs):
        calls.append(1)
        return 1.0 if len(calls) % 2 == 1 else 10.0

    monkeypatch.setattr(guard, "heldout_loss", better)
    report = prune(src, str(tmp_path / "out"), calib=calib_txt, **OPTIONS).report
    assert report["block_update_check"]["kept"] is True
    out = load_state_dict(str(tmp_path / "out"))
    changed = [i for i, t in solver.items() if any(b["kept"] for b in report["block_update"][i:i + 1])
               and not torch.equal(out[f"model.layers.{i}.mlp.down_proj.weight"], t["mlp.down_proj.weight"])]
    assert changed, "a kept refit should have moved some kept weights"


def test_the_relative_loss_weighs_every_token_alike():
    """One token 100x the others' norm (an attention sink) dominates the plain MSE, not the relative one."""
    target = torch.ones(1, 8, 16)
    target[0, 0] *= 100.0
    off_sink = target.clone()
    off_sink[0, 1:] *= 1.5  # every ordinary token 50% off
    off_only_sink = target.clone()
    off_only_sink[0, 0] *= 1.05  # only the sink, 5% off
    assert block_loss(off_only_sink, target, "mse") > block_loss(off_sink, target, "mse")
    assert block_loss(off_sink, target, "relative") > block_loss(off_only_sink, target, "relative")
    assert block_loss(target, target, "relative") == 0
    zeros = torch.zeros(1, 4, 16)  # a padded window: no division by zero
    assert torch.isfinite(block_loss(zeros + 1e-3, zeros, "relative"))


# ---------------------------------------------------------------- --learn-masks

ALL = ARCHS + MOE_ARCHS


@pytest.mark.parametrize("arch", ALL)
def test_learned_nm_masks_end_exact_on_every_architecture(arch, calib_txt, tmp_path):
    """Every supported dense and MoE layout runs the refit with moving 2:4 masks (bf16 for every other
    one, float32 for the rest); every pruned matrix ends exactly 2:4 with +0.0 in pruned slots, and
    the report says how many linears learned their masks (fused experts and Conv1D keep the solver's)."""
    dtype = torch.bfloat16 if ALL.index(arch) % 2 else torch.float32
    src = make_tiny_model(arch, str(tmp_path / "src"), dtype=dtype)
    report = prune(src, str(tmp_path / "out"), calib=calib_txt, method="sparsegpt", pattern="2:4", nsamples=2,
                   seqlen=16, progress=False, update="block", block_epochs=1, learn_masks=True).report
    from transformers import AutoModelForCausalLM

    from oneshot.model.structure import find_decoder_layers, find_linears, get_weight

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    path, layers = find_decoder_layers(model)
    zeros = {e["name"]: e["zeros"] for e in report["linears"]}
    for i, layer in enumerate(layers):
        for name, module in find_linears(layer, f"{path}.{i}").items():
            w = get_weight(module)
            assert check_constraint(w.float(), Constraint(0.5, 2, 4)) is None, name
            assert not (torch.signbit(w) & (w == 0)).any(), name
            assert int((w == 0).sum()) == zeros[name], name
    assert all("learned_masks" in b for b in report["block_update"])
    if arch in ("llama", "qwen3", "gemma3", "mixtral"):  # nn.Linear attention at least
        assert sum(b["learned_masks"] for b in report["block_update"]) > 0


def test_learned_masks_move_and_only_the_best_epoch_is_kept(calib_txt, tmp_path):
    """On a Llama, the refit moves some groups' patterns away from the solver's, the held-out loss it
    keeps is never above the solver's, and a block whose refit is not kept has the solver's masks."""
    src = make_tiny_model("llama", str(tmp_path / "src"))
    report = prune(src, None, calib=calib_txt, method="sparsegpt", pattern="2:4", nsamples=16, seqlen=64,
                   progress=False, update="block", block_epochs=4, learn_masks=True).report
    blocks = report["block_update"]
    assert any(b["groups_changed"] > 0 for b in blocks)
    assert all(b["heldout_loss_after"] <= b["heldout_loss_before"] for b in blocks)
    assert all(b["groups_changed"] == 0 for b in blocks if not b["kept"])


def test_the_patterns_table():
    from oneshot.updates.learned import patterns

    table = patterns(2, 4)
    assert table.shape == (6, 4) and (table.sum(1) == 2).all() and len({tuple(r.tolist()) for r in table}) == 6
    assert patterns(4, 8).shape == (70, 8)


@pytest.mark.parametrize("extra,message", [
    ({"learn_masks": True, "pattern": "2:4"}, "needs --update block"),
    ({"learn_masks": True, "update": "block"}, "unstructured masks are not learned yet"),
    ({"block_loss": "l1", "update": "block"}, "--block-loss must be"),
])
def test_learn_masks_and_block_loss_refused_in_one_line(extra, message, calib_txt, tmp_path):
    from oneshot.errors import OneshotError

    src = make_tiny_model("llama", str(tmp_path / "src"))
    with pytest.raises(OneshotError, match=message):
        prune(src, str(tmp_path / "out"), calib=calib_txt, method="sparsegpt", nsamples=4, seqlen=32, progress=False,
              **extra)
