"""Faults around a run, found before the work with one line (issue 15, first part): one writer per
output, a corrupt or truncated checkpoint, an output directory that cannot be written or is too
small, and calibration text that is binary."""

import contextlib
import json
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


def test_resume_with_nothing_to_resume_says_it_started_fresh(llama, calib_txt, tmp_path):
    from oneshot.output import partial_dir

    out = tmp_path / "o"
    assert _prune(llama, out, calib_txt, "--resume") == 0
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any("was not found; started fresh" in n for n in notes), notes
    partial = partial_dir(str(tmp_path / "p"))  # a run killed before its first layer was journaled
    os.makedirs(partial)
    with open(os.path.join(partial, "leftover"), "w") as fh:
        fh.write("x")
    assert _prune(llama, tmp_path / "p", calib_txt, "--resume") == 0
    notes = json.loads((tmp_path / "p" / "report.json").read_text())["notes"]
    assert any("held no finished layer; started fresh" in n for n in notes), notes
    assert not os.path.exists(partial)


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


def test_verify_names_a_damaged_sidecar_and_files_of_another_run(llama, calib_txt, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _prune(llama, a, calib_txt, "--load", "stream") == 0
    assert _prune(llama, b, calib_txt, "--load", "stream", "--method", "magnitude") == 0
    assert main(["verify", str(a), "--quiet"]) == 0
    sidecar = json.loads((a / "oneshot_sparsity.json").read_text())
    report = json.loads((a / "report.json").read_text())
    assert sidecar["run_id"] == report["run_id"] and len(sidecar["files"]) > 1
    capsys.readouterr()

    mixed = tmp_path / "mixed"  # what two writers on one --out once made: a shard of the other run
    shutil.copytree(a, mixed)
    shard = sorted(n for n in os.listdir(a) if n.startswith("model-"))[0]
    shutil.copy(b / shard, mixed / shard)
    assert main(["verify", str(mixed)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith(f"FAIL {shard}: its contents differ from what run {sidecar['run_id']}")
               for line in out), out

    shutil.copy(a / shard, mixed / shard)
    shutil.copy(b / "report.json", mixed / "report.json")  # the report of another run
    assert main(["verify", str(mixed)]) == 1
    assert "FAIL report.json: written by run" in capsys.readouterr().out

    text = (a / "oneshot_sparsity.json").read_text()
    (mixed / "oneshot_sparsity.json").write_text(text[: len(text) // 2])  # truncated
    assert main(["verify", str(mixed)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith("FAIL ") and "oneshot_sparsity.json is damaged" in out and len(out.splitlines()) == 1
    assert err == ""

    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "not a oneshot output" in _one_line(capsys)


class _Faults:
    """Counts the writes of files under ``root`` (Python ``open`` for writing, safetensors' writers,
    ``os.replace``/``os.rename``) and makes the ``fail_at``-th one fail as a full disk does."""

    def __init__(self, monkeypatch, root):
        import builtins
        import errno

        import safetensors.torch
        import transformers.modeling_utils

        self.root, self.count, self.fail_at, self.failed = str(root), 0, None, None
        self.errno = errno.ENOSPC

        def hit(path, what):
            if not str(path).startswith(self.root):
                return
            self.count += 1
            if self.count == self.fail_at:
                self.failed = f"{what} {path}"
                raise OSError(self.errno, os.strerror(self.errno), str(path))

        real_open, real_replace, real_rename = builtins.open, os.replace, os.rename
        real_save = safetensors.torch.save_file

        def open_(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and isinstance(file, (str, os.PathLike)):
                hit(file, "open")
            return real_open(file, mode, *a, **k)

        def save(tensors, filename, *a, **k):
            hit(filename, "save_file")
            return real_save(tensors, filename, *a, **k)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "replace", lambda s, d, **k: (hit(d, "replace"), real_replace(s, d, **k))[1])
        monkeypatch.setattr(os, "rename", lambda s, d, **k: (hit(d, "rename"), real_rename(s, d, **k))[1])
        monkeypatch.setattr(safetensors.torch, "save_file", save)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save)


@pytest.mark.parametrize("load", ["full", "stream"])
def test_every_write_of_the_output_failing_in_turn(load, llama, calib_txt, tmp_path, capsys, monkeypatch):
    """A full disk at each write of a run in turn: one line, exit 2, the earlier output intact, nothing
    half-written beside it but the resumable partial directory, and --resume then finishes the run."""
    area = tmp_path / "area"
    out = area / "o"
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    faults = _Faults(monkeypatch, area)
    args = ("--load", load, "--overwrite")
    assert _prune(llama, out, calib_txt, *args) == 0  # counts the writes
    writes = faults.count
    assert writes >= 8, writes
    capsys.readouterr()
    failures = []
    for k in range(1, writes + 1):
        shutil.rmtree(area)
        out.mkdir(parents=True)
        (out / "keep.txt").write_text("old")
        faults.count, faults.fail_at, faults.failed = 0, k, None
        rc = _prune(llama, out, calib_txt, *args)
        err = capsys.readouterr().err.strip().splitlines()
        assert faults.failed, k
        ok = (rc == 2 and len(err) == 1 and err[0].startswith("oneshot: error: ")
              and "No space left on device" in err[0] and "free some space" in err[0])
        intact = sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
        stray = [n for n in os.listdir(area) if n not in ("o", ".o.oneshot-partial")]
        if not (ok and intact and not stray):
            failures.append((k, faults.failed, rc, err, sorted(os.listdir(out)), stray))
            continue
        if ".o.oneshot-partial" in os.listdir(area):  # kept for --resume, and the message says so
            assert "--resume" in err[0]
        faults.fail_at = None
        assert _prune(llama, out, calib_txt, *args, "--resume") == 0, (k, capsys.readouterr().err)
        assert (out / "report.json").exists() and not (out / "keep.txt").exists()
        assert sorted(os.listdir(area)) == ["o"]
        capsys.readouterr()
    assert not failures, failures


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB file system (tmpfs), where this platform lets the test mount one."""
    where = tmp_path / "tinyfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny file system needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"this platform does not allow mounting a tmpfs: {made.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", str(where)], check=False)


def test_a_real_full_file_system(llama, calib_txt, tiny_fs, capsys, monkeypatch):
    """Caught before the work by the free-space check; and when the disk fills anyway during the writes
    (the check switched off, as if another process took the space), one line and nothing left behind."""
    out = tiny_fs / "o"
    assert _prune(llama, out, calib_txt) == 2
    assert "GB free on" in _one_line(capsys)
    monkeypatch.setattr("oneshot.api.check_out", lambda *a, **k: None)
    for load in ("full", "stream"):
        assert _prune(llama, out, calib_txt, "--load", load) == 2
        line = _one_line(capsys)
        assert "No space left on device" in line and "free some space or choose another --out" in line, line
        assert not out.exists()
        leftovers = [n for n in os.listdir(tiny_fs) if n != ".o.oneshot-partial"]
        assert leftovers == [], leftovers
        shutil.rmtree(tiny_fs / ".o.oneshot-partial", ignore_errors=True)


def _bad_inputs(tmp_path, llama, calib_txt, monkeypatch):
    """Each row of docs/options.md's bad-input list: (extra arguments, model, calibration, a setup)."""
    short = tmp_path / "short.txt"
    short.write_text("too short")
    notext = tmp_path / "rows.jsonl"
    notext.write_text("".join(json.dumps({"body": "some words " * 50}) + "\n" for _ in range(50)))
    junk = tmp_path / "junk.txt"
    junk.write_bytes(os.urandom(100_000))
    truncated = tmp_path / "truncated"
    shutil.copytree(llama, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    def offline():
        from oneshot import hub

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub.forget()

    def existing_out():
        (tmp_path / "o").mkdir()
        (tmp_path / "o" / "keep.txt").write_text("old")

    def unwritable():
        import oneshot.checks as checks

        monkeypatch.setattr(checks.os, "access", lambda p, mode: False)

    def no_space():
        import oneshot.checks as checks

        free = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(checks.shutil, "disk_usage", lambda p: free._replace(free=1000))

    def no_memory():
        monkeypatch.setattr("oneshot.memory.available_bytes", lambda device: 1000)

    return {
        "unknown path": ([], str(tmp_path / "no-such-model"), calib_txt, None, "no-such-model"),
        "hub id not cached, offline": ([], "nobody-oneshot/no-such-model", calib_txt, offline, "no-such-model"),
        "sparsity outside (0, 1)": (["--sparsity", "1.5"], llama, calib_txt, None, "--sparsity"),
        "pattern not N:M": (["--pattern", "4:2"], llama, calib_txt, None, "4:2"),
        "pattern disagrees with --sparsity": (["--pattern", "2:4", "--sparsity", "0.7"], llama, calib_txt, None,
                                              "2:4"),
        "input dimension not divisible by M": (["--pattern", "1:3"], llama, calib_txt, None, "not divisible by 3"),
        "non-positive --nsamples": (["--nsamples", "0"], llama, calib_txt, None, "--nsamples"),
        "--seqlen beyond the context": (["--seqlen", "100000"], llama, calib_txt, None, "context"),
        "missing calibration": ([], llama, str(tmp_path / "none.txt"), None, "none.txt"),
        "too-short calibration": ([], llama, str(short), None, "short.txt"),
        "missing text column": ([], llama, str(notext), None, "text"),
        "existing --out": ([], llama, calib_txt, existing_out, "--overwrite"),
        "another run writing --out": ([], llama, calib_txt, "locked", "being written by another oneshot run"),
        "truncated safetensors": ([], str(truncated), calib_txt, None, "truncated or corrupt"),
        "--out not writable": ([], llama, calib_txt, unwritable, "not writable"),
        "no free space for --out": ([], llama, calib_txt, no_space, "GB free on"),
        "binary calibration": ([], llama, str(junk), None, "binary or undecodable"),
        "peak memory does not fit": ([], llama, calib_txt, no_memory, "host memory"),
    }


BAD_INPUTS = ["unknown path", "hub id not cached, offline", "sparsity outside (0, 1)", "pattern not N:M",
              "pattern disagrees with --sparsity", "input dimension not divisible by M", "non-positive --nsamples",
              "--seqlen beyond the context", "missing calibration", "too-short calibration", "missing text column",
              "existing --out", "another run writing --out", "truncated safetensors", "--out not writable",
              "no free space for --out", "binary calibration", "peak memory does not fit"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_every_listed_bad_input_is_one_line_and_loses_nothing(case, llama, calib_txt, tmp_path, capsys, monkeypatch):
    extra, model, calib, setup, needle = _bad_inputs(tmp_path, llama, calib_txt, monkeypatch)[case]
    out = tmp_path / "o"
    if callable(setup):
        setup()
    before = sorted(os.listdir(tmp_path))
    contents = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
    loaded = []
    monkeypatch.setattr("oneshot.run.Run.prune", lambda *a, **k: loaded.append(1))  # never reached
    with output_lock(str(out)) if setup == "locked" else _nothing():
        rc = main(["prune", model, "--calib", calib, "--nsamples", "2", "--seqlen", "16", "--out", str(out),
                   "--quiet", *extra])
    assert rc == 2, case
    line = _one_line(capsys)
    assert needle in line, line
    assert not loaded, "failed before the work"
    assert sorted(os.listdir(tmp_path)) == before, "nothing written beside --out"
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None) == contents


def _nothing():
    return contextlib.nullcontext()


def test_a_run_announces_its_size_and_time_before_the_first_layer(llama, calib_txt, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", llama, "--calib", calib_txt, "--nsamples", "2", "--seqlen", "16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    first = err.strip().splitlines()[0]
    assert first.startswith("LlamaForCausalLM, 2 layers: sparsegpt unstructured on cpu; calibration 2 x 16 = 32 "
                            "tokens; "), first
    assert "; about " in first or "; under a second " in first, first
    assert "GFLOP/s measured" in first
    estimate = json.loads((out / "report.json").read_text())["time_estimate"]
    assert estimate["tokens"] == 32 and estimate["seconds"] >= 0 and "suggestion" not in estimate


def test_the_estimate_suggests_a_cpu_sized_calibration(monkeypatch):
    import torch

    from oneshot import estimate

    monkeypatch.setattr(estimate, "measure_rate", lambda *a, **k: 3e11)  # this machine's 2 cores, about
    layers = {f"model.layers.{i}.{n}": s for i in range(30) for n, s in
              {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
               "up": (1536, 576), "down": (576, 1536)}.items()}
    structure = {"linears": layers, "num_layers": 30, "architecture": "LlamaForCausalLM"}
    big = estimate.estimate_time(structure, 576, 128, 2048, True, torch.device("cpu"), torch.float32)
    small = estimate.estimate_time(structure, 576, 32, 512, True, torch.device("cpu"), torch.float32)
    assert big["seconds"] > 600 and "suggestion" not in small
    assert big["suggestion"]["nsamples"] == 32 and big["suggestion"]["seconds"] == pytest.approx(small["seconds"])
    line = estimate.announce(structure, "sparsegpt", "2:4", torch.device("cpu"), 128, 2048, big)
    assert "calibration 128 x 2048 = 262,144 tokens" in line
    assert "on a CPU, --nsamples 32 --seqlen 512 would take about" in line and "meant for GPUs" in line
    # twice the tokens, about twice the time (the attention term grows with the window too)
    double = estimate.estimate_time(structure, 576, 64, 512, True, torch.device("cpu"), torch.float32)
    assert 1.9 < double["seconds"] / small["seconds"] < 2.1


@pytest.mark.slow
def test_two_runs_released_together_on_one_out_never_mix(tmp_path, calib_txt):
    """Two processes wait at a barrier (a file appearing), then start `prune` on the same --out with
    different methods: one writes, the other fails with one line, and the output is the winner's alone."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from tiny import make_sharded_llama

    model = make_sharded_llama(str(tmp_path / "model"), layers=4, hidden=64)
    out, go = tmp_path / "o", tmp_path / "go"
    script = ("import os, sys, time\n"
              f"while not os.path.exists({str(go)!r}): time.sleep(0.001)\n"
              "from oneshot.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__)), "HF_HUB_OFFLINE": "1"}
    procs = {method: subprocess.Popen([sys.executable, "-c", script, "prune", model, "--method", method, "--calib",
                                       calib_txt, "--nsamples", "2", "--seqlen", "32", "--load", "stream", "--out",
                                       str(out), "--quiet"], env=env, stderr=subprocess.PIPE, text=True)
             for method in ("wanda", "magnitude")}
    time.sleep(3)  # both importing and waiting
    go.write_text("")
    results = {m: (p.wait(), p.stderr.read().strip().splitlines()) for m, p in procs.items()}
    winners = [m for m, (rc, _) in results.items() if rc == 0]
    assert len(winners) == 1, results
    (loser_rc, loser_err), = [r for m, r in results.items() if m not in winners]
    assert loser_rc == 2 and len(loser_err) == 1 and loser_err[0].startswith("oneshot: error: "), loser_err
    assert json.loads((out / "report.json").read_text())["method"] == winners[0]
    assert main(["verify", str(out), "--quiet"]) == 0
    alone = tmp_path / "alone"
    assert _prune(model, alone, calib_txt, "--method", winners[0], "--seqlen", "32", "--load", "stream") == 0
    for name in sorted(n for n in os.listdir(alone) if n.endswith(".safetensors")):
        assert (out / name).read_bytes() == (alone / name).read_bytes(), name
