"""Process 0's own writes (TensorBoard events, sample grids, config.json) never stop a run: retried, then logged
and skipped (issue 29, point 4)."""

from __future__ import annotations

import os

import pytest
import tensorflow as tf

from imagen_jax.train import host_writes
from imagen_jax.train.host_writes import HostWrites
from imagen_jax.train.metrics import MetricWriter
from tests.test_train import assets, tiny_config  # noqa: F401  (the module's shards and tiny T5)


def _failing(times: int, calls: list):
    def write():
        calls.append(1)
        if len(calls) <= times:
            raise OSError(f"transient {len(calls)}")

    return write


def test_a_write_is_retried_then_skipped_and_a_failing_target_costs_one_try():
    lines, calls = [], []
    writes = HostWrites(lines.append, backoff=(0.0, 0.0))
    assert writes.attempt("TensorBoard", "step 1's scalars", _failing(2, calls)) and len(calls) == 3 and not lines

    calls.clear()
    assert not writes.attempt("TensorBoard", "step 2's scalars", _failing(99, calls))
    assert len(calls) == 3  # three tries, then skipped
    assert lines == [
        "TensorBoard: could not write step 2's scalars after 3 tries: OSError: transient 3; skipped, training goes on "
        "(1 skipped in a row)"
    ]
    for step in range(3, 12):  # while it fails: one try each, reported at the 10th
        calls.clear()
        assert not writes.attempt("TensorBoard", f"step {step}'s scalars", _failing(99, calls)) and len(calls) == 1
    assert len(lines) == 2 and lines[1].startswith("TensorBoard: could not write step 11's scalars (one try while")
    assert lines[1].endswith("(10 skipped in a row)")
    assert writes.attempt("sample grids", "a.png", lambda: None) and len(lines) == 2  # other targets unaffected
    assert writes.attempt("TensorBoard", "step 12's scalars", lambda: None)
    assert lines[2] == "TensorBoard: writing again, after 10 skipped" and writes.skipped == 10


def test_events_go_on_in_a_new_file_after_the_folder_recovers(tmp_path):
    lines = []
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "tensorboard").write_text("not a folder")  # every write fails
    writer = MetricWriter(str(workdir), echo=lines.append, writes=HostWrites(lines.append, backoff=(0.0,)))
    writer.scalars(1, {"loss": 0.5})
    assert lines[0].startswith("TensorBoard: could not write step 1's scalars after 2 tries:")
    assert lines[1] == "step 1: loss=0.5"  # the console line still comes
    os.remove(workdir / "tensorboard")
    writer.scalars(2, {"loss": 0.25})
    writer.close()
    assert lines[2] == "TensorBoard: writing again, after 1 skipped"
    (events,) = tf.io.gfile.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
    steps = [e.step for e in tf.compat.v1.train.summary_iterator(events) if e.summary.value]
    assert steps == [2]


@pytest.mark.slow  # a tiny run of 4 steps, sampling twice: ~40 s
def test_training_goes_on_to_the_end_when_process_0_cannot_write(assets, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A samples 'folder' and a TensorBoard 'folder' that are files, and a config.json that is a folder: every
    one of process 0's writes fails; the run still trains to the end and writes all its checkpoints."""
    from imagen_jax.train.loop import run

    monkeypatch.setattr(host_writes, "BACKOFF_S", (0.0, 0.0))
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "samples").write_text("not a folder")
    (workdir / "tensorboard").write_text("not a folder")
    (workdir / "config.json").mkdir()
    run(tiny_config(assets, num_steps=4, checkpoint_every=2, log_every=1, sample_every=2), str(workdir))
    captured = capsys.readouterr()
    out = captured.out + captured.err  # the progress lines go where the progress bar is
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert "config.json: could not write the run's config after 3 tries" in out
    assert f"sample grids: could not write {workdir}/samples/step_0000002.png after 3 tries" in out
    assert "TensorBoard: could not write step 1's scalars after 3 tries" in out
    assert "finished at step 4" in out and "step 4: grad_norm=" in out
