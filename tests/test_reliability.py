"""Faults around a run, found before the work with one line (issue 15, first part): one writer per
output, a corrupt or truncated checkpoint, an output directory that cannot be written or is too
small, and calibration text that is binary."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from oneshot.cli import main
from oneshot.output import lock_path, output_lock


def _prune(src, out, calib, *extra):
    return main(["prune", src, "--calib", calib, "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--quiet",
                 *extra])


@pytest.fixture
def llama(tiny_factory, capsys):
    src = tiny_factory("llama")
    capsys.readouterr()  # the fixture's own progress output
    return src


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("oneshot: error: "), err
    return err[0]


def test_a_second_writer_fails_at_once_naming_the_first(llama, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    with output_lock(str(out)):
        t = time.perf_counter()
        assert _prune(llama, out, calib_txt) == 2
        assert time.perf_counter() - t < 30
        line = _one_line(capsys)
        assert "being written by another oneshot run" in line and f"PID {os.getpid()}" in line
        assert not out.exists()
    assert not os.path.exists(lock_path(str(out))), "the lock file goes with its run"
    assert _prune(llama, out, calib_txt) == 0


def test_a_killed_writer_does_not_block_the_next(llama, calib_txt, tmp_path):
    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from oneshot.output import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert os.path.exists(lock_path(str(out))), "kill -9 leaves the file, not the lock"
    assert _prune(llama, out, calib_txt) == 0


@pytest.mark.parametrize("load", ["stream", "full"])
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_is_named_before_loading(load, damage, llama, calib_txt, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(llama, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(4096))
    assert _prune(str(src), tmp_path / "o", calib_txt, "--load", load) == 2
    line = _one_line(capsys)
    assert str(weights) in line and "truncated or corrupt" in line
    assert not (tmp_path / "o").exists()


def test_an_unwritable_or_full_output_directory_fails_first(llama, calib_txt, tmp_path, capsys, monkeypatch):
    import oneshot.checks as checks

    real_access = os.access
    monkeypatch.setattr(checks.os, "access", lambda p, mode: False if str(p).startswith(str(tmp_path / "ro"))
                        else real_access(p, mode))  # simulated: root may write anywhere
    (tmp_path / "ro").mkdir()
    assert _prune(llama, tmp_path / "ro" / "o", calib_txt) == 2
    assert "is not writable" in _one_line(capsys)
    monkeypatch.undo()

    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: free._replace(free=1000))
    loaded = []
    monkeypatch.setattr("oneshot.run.Run.prune", lambda *a, **k: loaded.append(1))
    assert _prune(llama, tmp_path / "o", calib_txt) == 2
    line = _one_line(capsys)
    assert "GB free on" in line and "choose another --out" in line and not loaded


def test_binary_calibration_text_is_refused(llama, tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_bytes(os.urandom(200_000))
    assert _prune(llama, tmp_path / "o", str(junk)) == 2
    assert "binary or undecodable" in _one_line(capsys)


def test_resume_on_a_complete_output_changes_nothing(llama, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    assert _prune(llama, out, calib_txt, "--resume") == 0
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    assert _prune(llama, out, calib_txt, "--resume") == 0
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    capsys.readouterr()
    # a different configuration is refused, naming the effective values of both
    assert _prune(llama, out, calib_txt, "--resume", "--sparsity", "0.6") == 2
    line = _one_line(capsys)
    assert "is complete and was made with a different configuration: --sparsity (0.5 then, 0.6 now)" in line
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_an_interrupt_says_what_was_kept_and_how_to_go_on(llama, calib_txt, tmp_path, capsys, monkeypatch):
    import oneshot.run as run_module

    out = tmp_path / "o"
    original = run_module.Run._layer_done

    def interrupt_after_first(self, i, layer, state):
        original(self, i, layer, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.Run, "_layer_done", interrupt_after_first)
    assert _prune(llama, out, calib_txt, "--journal-interval", "0") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 finished layer(s) are kept in" in err[0] and "--resume" in err[0], err
    assert not out.exists()
    monkeypatch.undo()
    assert _prune(llama, out, calib_txt, "--journal-interval", "0", "--resume") == 0

    monkeypatch.setattr(run_module.Run, "prune", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert _prune(llama, tmp_path / "p", calib_txt) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"oneshot: interrupted; nothing was written (--out {tmp_path / 'p'} is as it was)"], err
