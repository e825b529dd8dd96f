"""Training's progress report: compile time said once and kept out of every rate, step N/total, elapsed, eta."""

import pytest

from imagen_jax.train import progress as progress_lib


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_lib.time, "perf_counter", lambda: now[0])
    return now


def test_rates_never_count_the_compile_and_the_eta_follows_the_pace(clock, capsys):
    p = progress_lib.Progress(start_step=10, num_steps=20, batch_size=8, active=True, bar=False)
    p.compiling()
    clock[0] += 30.0  # tracing + compiling the step
    p.dispatched()
    clock[0] += 0.5  # the first step runs
    p.finished(11)
    first = p.rates()
    assert first == pytest.approx({"images_per_sec": 16.0, "steps_per_sec": 2.0})  # 1 step in 0.5 s, not 30.5
    for step in (12, 13, 14, 15):
        p.dispatched()
        clock[0] += 0.25
        p.finished(step)
    assert p.rates() == pytest.approx({"images_per_sec": 32.0, "steps_per_sec": 4.0})
    # 4 steps in 1 s since the first finished: 5 left take 1.25 s
    assert p.summary(15) == "15/20 (75%), elapsed 0:00:01, eta 0:00:01"
    out = capsys.readouterr().out.splitlines()
    assert out == ["compiling the train step (the first step waits for it)", "train step compiled in 30.0 s"]


def test_a_later_compile_says_its_text_length_and_stays_out_of_the_rates(clock, capsys):
    """Token buckets: a batch of a new text length compiles the step again, mid-run; the loop says for which length,
    and the compile's time is taken out of the window it falls in."""
    p = progress_lib.Progress(start_step=0, num_steps=20, batch_size=8, active=True, bar=False)
    p.compiling(" for 16-token captions")
    clock[0] += 30.0
    p.dispatched()
    clock[0] += 0.5
    p.finished(1)
    p.rates()
    p.compiling(" for 32-token captions")
    clock[0] += 20.0  # the second step waits for its compile
    p.dispatched()
    clock[0] += 0.5
    p.finished(2)
    p.dispatched()
    clock[0] += 0.5
    p.finished(3)
    assert p.rates() == pytest.approx({"images_per_sec": 16.0, "steps_per_sec": 2.0})  # 2 steps in 1 s, not 21
    assert capsys.readouterr().out.splitlines() == [
        "compiling the train step for 16-token captions (the first step waits for it)",
        "train step for 16-token captions compiled in 30.0 s",
        "compiling the train step for 32-token captions (this step waits for it)",
        "train step for 32-token captions compiled in 20.0 s",
    ]


def test_long_runs_read_in_hours_and_the_last_step_has_no_eta(clock):
    p = progress_lib.Progress(start_step=0, num_steps=100_000, batch_size=2048, active=True, bar=False)
    p.compiling()
    p.dispatched()
    p.finished(1)
    clock[0] += 7200.0
    p.finished(1001)
    assert p.summary(1001) == "1001/100000 (1%), elapsed 2:00:00, eta 197:59:52"  # 98999 steps at 7.2 s each
    p.finished(100_000)
    assert "eta" not in p.summary(100_000)


def test_other_processes_print_nothing(clock, capsys):
    p = progress_lib.Progress(start_step=0, num_steps=5, batch_size=8, active=False, bar=True)
    assert p.bar is None
    p.compiling()
    p.dispatched()
    p.echo("hello")
    assert capsys.readouterr().out == ""
