"""Writes that only process 0 makes (TensorBoard events, sample grids, config.json) never stop a run.

The other processes do not wait for these writes, but they wait for process 0 in the step's next collective: an
exception here would hold them there until the distributed heartbeat times out, and the whole pod would restart
and recompile. So a failed write (a bucket's transient error, a full disk, a folder that is not writable) is
retried with a backoff, then logged in one line and skipped, and the run goes on. While a target keeps failing,
its writes get one try each (a broken folder costs no backoff per step), and its skips are logged at the 1st,
10th, 100th, ... A run's checkpoints are not among these writes: orbax writes them on every process, atomically,
and a failed save is an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

BACKOFF_S = (1.0, 4.0)  # the waits before the second and the third try


class HostWrites:
    """Runs writes to named targets ('TensorBoard', 'sample grids', ...) as the module says; `log` takes the
    one-line reports."""

    def __init__(self, log: Callable[[str], None], backoff: tuple[float, ...] | None = None) -> None:
        self.log = log
        self.backoff = BACKOFF_S if backoff is None else tuple(backoff)
        self.failing: dict[str, int] = {}  # target -> writes skipped since its last success
        self.skipped = 0

    def attempt(self, target: str, what: str, write: Callable[[], object]) -> bool:
        """Runs `write()` (of `what`, e.g. 'step 100's scalars', to `target`); True when it succeeded."""
        waits = () if target in self.failing else self.backoff
        for wait in (*waits, None):
            try:
                write()
            except Exception as e:  # noqa: BLE001 (whatever a write raises, the run must go on)
                error = e
                if wait is not None:
                    time.sleep(wait)
                continue
            if target in self.failing:
                self.log(f"{target}: writing again, after {self.failing.pop(target)} skipped")
            return True
        count = self.failing[target] = self.failing.get(target, 0) + 1
        self.skipped += 1
        if str(count).strip("0") == "1":  # 1, 10, 100, ...
            tries = f"after {len(waits) + 1} tries" if waits else "(one try while it fails)"
            self.log(
                f"{target}: could not write {what} {tries}: {type(error).__name__}: {error}; skipped, training goes "
                f"on ({count} skipped in a row)"
            )
        return False
