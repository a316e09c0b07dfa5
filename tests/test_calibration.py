"""Calibration sources -> token windows."""

import json

import pytest
import torch

from oneshot.calibration import describe_source, generate_calibration, load_calibration, windows_from_tokens
from oneshot.cli import main
from oneshot.errors import OneshotError
from tiny import make_tokenizer, sample_text


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_txt_windows_are_seeded_slices_of_the_text(tok, calib_txt):
    a = load_calibration(calib_txt, tok, 6, 40, seed=0)
    b = load_calibration(calib_txt, tok, 6, 40, seed=0)
    c = load_calibration(calib_txt, tok, 6, 40, seed=1)
    assert a.input_ids.shape == (6, 40) and a.input_ids.dtype == torch.long
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    stream = torch.tensor(tok(open(calib_txt).read(), add_special_tokens=False)["input_ids"])
    for window in a.input_ids:  # every window is a contiguous slice of the tokenized text
        hits = (stream.unfold(0, 40, 1) == window).all(1)
        assert hits.any()
    assert a.info["tokens"] == 240 and a.info["seed"] == 0 and a.info["tokens_available"] == stream.numel()


def test_windows_from_tokens_bounds():
    tokens = torch.arange(10)
    w = windows_from_tokens(tokens, 50, 10, 0, "x")
    assert (w == tokens).all()  # only one possible window
    with pytest.raises(OneshotError, match="too short"):
        windows_from_tokens(tokens, 1, 11, 0, "x")


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_tabular_sources_with_text_field(fmt, tok, tmp_path):
    docs = [sample_text(300, seed=i) for i in range(5)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)))
    elif fmt == "json":
        path.write_text(json.dumps([{"body": d, "id": i} for i, d in enumerate(docs)]))
    else:
        import datasets

        datasets.Dataset.from_dict({"body": docs, "id": list(range(5))}).to_parquet(str(path))
    calib = load_calibration(str(path), tok, 4, 32, seed=0, text_field="body")
    assert calib.input_ids.shape == (4, 32) and 1 <= calib.info["documents"] <= 5  # a seeded sample of docs
    with pytest.raises(OneshotError, match="no 'text' column .*body"):
        load_calibration(str(path), tok, 4, 32, seed=0)


def test_hub_presets_fail_clearly_offline(tok):
    with pytest.raises(OneshotError, match="--calib PATH"):
        load_calibration("c4", tok, 4, 32, seed=0)
    with pytest.raises(OneshotError, match="could not load dataset 'nobody/nothing'"):
        load_calibration("hf:nobody/nothing:default:validation", tok, 4, 32, seed=0)


def test_describe_source(tmp_path):
    assert describe_source("self") == "self" and describe_source("wikitext2") == "preset"
    assert describe_source("hf:wikitext:wikitext-2-raw-v1") == "hf"
    with pytest.raises(OneshotError):
        describe_source("hf:")
    with pytest.raises(OneshotError, match="is a directory"):
        describe_source(str(tmp_path))


def test_self_generated_calibration(tiny_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_factory("llama")
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    a = generate_calibration(model, tok, 3, 20, seed=0, device="cpu")
    b = generate_calibration(model, tok, 3, 20, seed=0, device="cpu")
    assert a.input_ids.shape == (3, 20) and (a.input_ids[:, 0] == tok.bos_token_id).all()
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.info["source"] == "self"


def test_prune_with_no_data(tiny_factory, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", tiny_factory("gemma2"), "--calib", "self", "--nsamples", "4", "--seqlen", "24",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "self" and report["calibration"]["tokens"] == 96
