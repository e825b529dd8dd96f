"""How far a run is and how fast it goes, said as it trains: when the step is compiling and how long that took (the
first step; with token buckets, each new text length), then per log line the step out of the total, steps/s and
images/s over the steps since the last line (never counting a compile), elapsed time and an estimate of the time
left. On a terminal a progress bar (tqdm) keeps the same figures on screen and the log lines print above it; in a log
file there are only lines.
"""

from __future__ import annotations

import sys
import time

import tqdm


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Fed by the loop: `compiling(what)` before a train-step call that compiles, `dispatched()` after each call
    returns (after a compile, its end), `finished(step)` once the step's result is on the host (late: after the next
    step is dispatched); `rates()` and `summary(step)` for the log line. `echo` prints a line (above the bar)."""

    def __init__(self, start_step: int, num_steps: int, batch_size: int, *, active: bool, bar: bool | None = None):
        self.num_steps, self.batch_size = num_steps, batch_size
        self.active = active
        show_bar = active and (sys.stdout.isatty() if bar is None else bar)
        self.bar = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True) if show_bar else None
        self._first_done: float | None = None  # when the run's first step finished (compile excluded after it)
        self._first_step = start_step
        self._first_dispatched: float | None = None  # when the first train-step call returned
        self._compiling: str | None = None  # what the pending compile is for, until its call returns
        self._compile_s = 0.0  # seconds of later compiles (new text lengths) in the current window
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def echo(self, line: str) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def compiling(self, what: str = "") -> None:
        """Before a train-step call that compiles; `what` says for which shapes (' for 32-token captions')."""
        self._called, self._compiling = time.perf_counter(), what
        waits = "the first step" if self._first_dispatched is None else "this step"
        self.echo(f"compiling the train step{what} ({waits} waits for it)")

    def dispatched(self) -> None:
        """After a train-step call returns: after a `compiling()`, the compile's end (its time is kept out of the
        rates: the first one precedes every window, a later one is taken out of its window's time)."""
        now = time.perf_counter()
        if self._compiling is not None:
            self.echo(f"train step{self._compiling} compiled in {now - self._called:.1f} s")
            if self._first_dispatched is not None:
                self._compile_s += now - self._called
            self._compiling = None
        if self._first_dispatched is None:
            self._first_dispatched = now

    def finished(self, step: int) -> None:
        """Step `step` (1-based count of steps done) is complete on the device."""
        now = time.perf_counter()
        if self._first_done is None:  # the first step's own time, from its dispatch: the window starts there
            self._first_done, self._first_step = now, step
            self._window_start, self._window_steps = self._first_dispatched or now, 1
        else:
            self._window_steps += 1
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def rates(self) -> dict[str, float]:
        """Steps/s and images/s since the last call (or the first step's dispatch), and restarts the window."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start - self._compile_s, 1e-9)
        steps = self._window_steps
        self._window_start, self._window_steps, self._compile_s = now, 0, 0.0
        return {"images_per_sec": steps * self.batch_size / elapsed, "steps_per_sec": steps / elapsed}

    def summary(self, step: int) -> str:
        """'N/total (p%), elapsed h:mm:ss, eta h:mm:ss' for step `step`; the eta from the pace since the first step."""
        text = f"{step}/{self.num_steps} ({step / self.num_steps:.0%})"
        if self._first_done is None:
            return text
        running, done_here = time.perf_counter() - self._first_done, step - self._first_step
        text += f", elapsed {_clock(running)}"
        if done_here > 0 and step < self.num_steps:
            text += f", eta {_clock((self.num_steps - step) * running / done_here)}"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
