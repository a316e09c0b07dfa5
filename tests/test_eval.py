"""`oneshot eval` and `prune --eval`: perplexity against a hand computation, lm-eval on a local task."""

import json
import math

import pytest
import torch

from oneshot.cli import main

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'oneshot[eval]')")

WORDS = "the cat sat on mat dog ran far away big small red blue".split()


def _hand_perplexity(model_dir, text, seqlen):
    """The protocol written out: whole text tokenized once, non-overlapping windows, every next token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text)["input_ids"]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - seqlen + 1, seqlen):
        window = torch.tensor([ids[start:start + seqlen]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window).logits[0].double(), dim=-1)
        for t in range(seqlen - 1):
            nll -= float(logp[t, window[0, t + 1]])
            count += 1
    return math.exp(nll / count), count


def test_eval_perplexity_matches_hand_computation(tiny_factory, calib_txt, tmp_path, capsys):
    model = tiny_factory("llama")
    rc = main(["eval", model, "--ppl", calib_txt, "--seqlen", "64", "--tasks", "none", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)["models"][model]["perplexity"]
    expected, count = _hand_perplexity(model, open(calib_txt).read(), 64)
    assert result["tokens"] == count
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def _task_yaml(name: str, dataset: str) -> str:
    """An lm-eval multiple-choice task over {"question", "choices", "answer"} rows of ``dataset``."""
    return (f"task: {name}\n{dataset}test_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
            "metric_list:\n  - metric: acc\n")


def _local_task(tmp_path):
    import random

    rng = random.Random(0)
    docs = []
    for _ in range(10):
        docs.append({"question": " ".join(rng.choice(WORDS) for _ in range(5)),
                     "choices": [" ".join(rng.choice(WORDS) for _ in range(2)) for _ in range(3)],
                     "answer": rng.randrange(3)})
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks / "local.yaml").write_text(_task_yaml("oneshot_local", "dataset_path: json\n"
                                                 f"dataset_kwargs:\n  data_files:\n    test: {tasks / 'data.jsonl'}\n"))
    return str(tasks), docs


def _hand_accuracy(model_dir, docs):
    """Multiple choice as lm-eval scores it: sum log p(" " + choice | question), argmax, compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    right = 0
    for doc in docs:
        scores = []
        for choice in doc["choices"]:
            context = tok(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tok(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            cont = whole[len(context):]
            ids = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            scores.append(sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont)))
        right += int(max(range(len(scores)), key=lambda i: (scores[i], -i)) == doc["answer"])
    return right / len(docs)


@pytest.mark.slow
def test_eval_local_task_matches_hand_accuracy_and_baseline_deltas(tiny_factory, calib_txt, tmp_path, capsys):
    model = tiny_factory("llama")
    tasks, docs = _local_task(tmp_path)
    out = tmp_path / "pruned"
    assert main(["prune", model, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32", "--out", str(out),
                 "--method", "magnitude", "--sparsity", "0.7", "--quiet"]) == 0
    rc = main(["eval", str(out), "--baseline", model, "--ppl", calib_txt, "--seqlen", "64", "--tasks", "oneshot_local",
               "--include-path", tasks, "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    dense = result["models"][model]
    pruned = result["models"][str(out)]
    assert dense["tasks"]["oneshot_local"]["acc"] == pytest.approx(_hand_accuracy(model, docs))
    assert pruned["tasks"]["oneshot_local"]["acc"] == pytest.approx(_hand_accuracy(str(out), docs))
    assert result["delta"]["perplexity"] == pytest.approx(pruned["perplexity"]["perplexity"]
                                                          - dense["perplexity"]["perplexity"])
    assert pruned["perplexity"]["perplexity"] != dense["perplexity"]["perplexity"]
    # the table: one column per model and a delta column
    assert main(["eval", str(out), "--baseline", model, "--ppl", calib_txt, "--seqlen", "64", "--tasks", "none",
                 "--quiet"]) == 0
    assert main(["eval", str(out), "--baseline", model, "--ppl", calib_txt, "--seqlen", "64", "--tasks", "none"]) == 0
    table = capsys.readouterr().out
    assert "delta" in table.splitlines()[0] and table.splitlines()[1].startswith("perplexity")


def test_prune_eval_records_results_in_report(tiny_factory, calib_txt, tmp_path):
    out = tmp_path / "o"
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32",
               "--out", str(out), "--quiet", "--eval", "--eval-baseline", "--ppl", calib_txt, "--eval-seqlen", "64",
               "--tasks", "none"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    ev = report["eval"]
    assert ev["pruned"]["perplexity"]["perplexity"] > 0 and ev["dense"]["perplexity"]["perplexity"] > 0
    expected, _ = _hand_perplexity(str(out), open(calib_txt).read(), 64)
    assert ev["pruned"]["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_eval_baseline_alone_implies_eval_and_a_bf16_model_is_computed_in_float32(tiny_factory, calib_txt, tmp_path,
                                                                                   capsys):
    """`--eval-baseline` implies `--eval`; by default only the perplexity is measured (no zero-shot task),
    and on the CPU a 16-bit model is computed in float32, which the result and the table say."""
    out = tmp_path / "o"
    src = tiny_factory("llama", "bfloat16")
    rc = main(["prune", src, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32", "--out", str(out),
               "--eval-baseline", "--ppl", calib_txt, "--eval-seqlen", "64"])
    assert rc == 0
    ev = json.loads((out / "report.json").read_text())["eval"]
    assert set(ev) >= {"pruned", "dense", "delta"} and "tasks" not in ev["pruned"]
    assert ev["dense"]["dtype"] == "bfloat16" and ev["dense"]["compute_dtype"] == "float32"
    err = capsys.readouterr().err
    assert "dense: bfloat16 weights computed in float32 on the CPU" in err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oneshot.evaluate import perplexity, tokenize_text

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    tokens = tokenize_text(AutoTokenizer.from_pretrained(src), open(calib_txt).read())
    expected = perplexity(model, tokens, 64)["perplexity"]
    assert ev["dense"]["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--ppl", "missing.txt"], "not wikitext2, c4, none"),
    (["--ppl", "none", "--tasks", "no_such_task"], "unknown lm-eval task"),
    (["--ppl", "none", "--tasks", "none"], "nothing to evaluate"),
    (["--include-path", "missing-dir", "--tasks", "none"], "no such directory"),
])
def test_eval_bad_input_fails_fast(args, message, tiny_factory, capsys):
    assert main(["eval", tiny_factory("llama"), *args]) == 2
    assert message in capsys.readouterr().err


def test_prune_eval_bad_input_fails_before_pruning(tiny_factory, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--out", str(out), "--eval", "--ppl",
               "missing.txt"])
    assert rc == 2 and "missing.txt" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 for this test only (oneshot switches the hub libraries to offline mode)."""
    import datasets.config
    import huggingface_hub.constants

    from oneshot import hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    hub.forget()
    yield
    hub.forget()


def _uncached_task(tmp_path):
    tasks = tmp_path / "hubtasks"
    tasks.mkdir()
    (tasks / "hub.yaml").write_text(_task_yaml("oneshot_uncached",
                                               "dataset_path: oneshot-tests/no-such-dataset-anywhere\n"))
    return str(tasks)


def test_offline_tasks_without_data_fail_before_any_perplexity(offline, tiny_factory, calib_txt, tmp_path, capsys,
                                                               monkeypatch):
    import oneshot.evaluate

    computed = []
    monkeypatch.setattr(oneshot.evaluate, "perplexity", lambda *a, **k: computed.append(1))
    tasks = _uncached_task(tmp_path)
    model = tiny_factory("llama")
    capsys.readouterr()
    rc = main(["eval", model, "--ppl", calib_txt, "--tasks", "oneshot_uncached",
               "--include-path", tasks])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "their data are not all in the local cache" in err[0], err
    assert "HF_HUB_OFFLINE is set" in err[0] and "--tasks none" in err[0]
    assert computed == []
    out = tmp_path / "o"  # prune --eval: before any weight is pruned
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16",
               "--out", str(out), "--eval", "--tasks", "oneshot_uncached", "--include-path", tasks])
    assert rc == 2 and "not all in the local cache" in capsys.readouterr().err and not out.exists()
    # cached or local data pass the check (the local JSON task of the tests above)
    local, _ = _local_task(tmp_path)
    oneshot.evaluate.check_task_data(["oneshot_local"], oneshot.evaluate.task_manager(["oneshot_local"], local))


def test_perplexity_is_saved_before_the_tasks_can_fail(tiny_factory, calib_txt, tmp_path, capsys, monkeypatch):
    import oneshot.evaluate
    from oneshot.errors import OneshotError

    def fail(*a, **k):
        raise OneshotError("lm-eval failed (ConnectionError: the hub went away)")

    monkeypatch.setattr(oneshot.evaluate, "zero_shot", fail)
    local, _ = _local_task(tmp_path)
    out = tmp_path / "o"
    rc = main(["prune", tiny_factory("llama"), "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16",
               "--out", str(out), "--eval", "--ppl", calib_txt, "--eval-seqlen", "64", "--tasks", "oneshot_local",
               "--include-path", local])
    err = capsys.readouterr().err
    saved = json.loads((out / "report.json").read_text())["eval"]["pruned"]["perplexity"]["perplexity"]
    assert rc == 2 and f"the perplexity, computed before: {saved:.4f}" in err
    rc = main(["eval", str(out), "--ppl", calib_txt, "--seqlen", "64", "--tasks", "oneshot_local",
               "--include-path", local])
    err = capsys.readouterr().err
    assert rc == 2 and f"perplexity {saved:.4f}" in err and "zero-shot tasks next" in err
