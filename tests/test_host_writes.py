"""Process 0's own writes (TensorBoard events, sample grids, config.json) never stop a run: retried, then logged
and skipped (issue 29, point 4)."""

from __future__ import annotations

import os

import tensorflow as tf

from imagen_jax.train.host_writes import HostWrites
from imagen_jax.train.metrics import MetricWriter


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


# A whole run whose process-0 writes all fail: tests/test_compile_cache.py (one run serves both checks).
