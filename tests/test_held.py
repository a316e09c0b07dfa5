"""``oneshot.prune(model_object, ...)``: a model a deployment build already holds is pruned in place, on
its own device, and gives the tensors ``oneshot prune DIR`` gives; what reads a checkpoint is refused
in one line."""

import glob
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from oneshot import prune
from oneshot.calibration import load_calibration
from oneshot.errors import OneshotError

ARGS = dict(method="sparsegpt", sparsity=0.5, nsamples=4, seqlen=32, progress=False)


def _tensors(directory: str) -> dict:
    return {k: v for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))) for k, v in load_file(f).items()}


def _load(directory: str, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype), AutoTokenizer.from_pretrained(directory)


def test_a_bf16_model_object_gives_the_directory_runs_tensors(tiny_factory, calib_txt, tmp_path):
    src = tiny_factory("llama", "bfloat16")
    from_dir = prune(src, str(tmp_path / "dir"), calib=calib_txt, **ARGS)
    model, tok = _load(src, torch.bfloat16)
    param = model.model.layers[0].mlp.up_proj.weight
    result = prune(model, str(tmp_path / "held"), tokenizer=tok, calib=calib_txt, **ARGS)
    assert result.model is model and model.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight is param and (param == 0).float().mean() == 0.5  # in place
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # ties kept
    report = result.report
    assert report["source"] == "memory" and report["coverage"]["share_of_prunable"] == 1.0
    assert report["load"] == {"streaming": False, "why": "a model object, pruned in place"}
    written, expected = _tensors(str(tmp_path / "held")), _tensors(str(tmp_path / "dir"))
    assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in expected)
    reference = from_dir.model.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())
    with open(tmp_path / "held" / "report.json") as fh:
        assert json.load(fh)["sparsity"] == pytest.approx(0.5)


def test_an_moe_model_object_with_token_ids_and_no_tokenizer(tiny_factory, calib_txt, tmp_path):
    """Pre-tokenised windows instead of a tokenizer; every expert's matrices pruned, as from the directory."""
    src = tiny_factory("qwen3_moe")
    model, tok = _load(src, torch.float32)
    ids = load_calibration(calib_txt, tok, 4, 32, 0).input_ids
    result = prune(model, calibration=ids, **ARGS)
    assert result.out is None and result.model is model
    assert result.report["coverage"]["share_of_prunable"] == 1.0
    assert result.report["calibration"]["tokens"] == ids.numel()
    reference = prune(src, calib=calib_txt, load="full", **ARGS).model.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("options,needle", [
    (dict(resume=True, out="o"), "--resume does not apply to a model object"),
    (dict(load="stream"), "--load stream does not apply to a model object"),
    (dict(tokenizer=None), "pass tokenizer="),
    (dict(calibration=torch.zeros(8)), "calibration= must be integer token ids shaped [windows, seqlen]"),
    (dict(calibration=torch.zeros(2, 8)), "calibration= must be integer token ids"),
])
def test_what_does_not_apply_is_refused_in_one_line(options, needle, tiny_factory, calib_txt, tmp_path,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, tok = _load(tiny_factory("llama"), torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"tokenizer": tok, **options}
    with pytest.raises(OneshotError) as err:
        prune(model, calib=calib_txt, **{**ARGS, **options})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert not os.path.exists(tmp_path / "o")


def test_a_module_that_is_not_a_transformers_model_is_named():
    with pytest.raises(OneshotError, match="a Linear is not a transformers model"):
        prune(torch.nn.Linear(4, 4), calibration=torch.ones(1, 4, dtype=torch.long), progress=False)
