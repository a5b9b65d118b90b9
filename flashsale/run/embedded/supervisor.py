"""Supervision of the embedded servers: a dead child is restarted on its port.

One thread polls the children. When one has exited, it is started again on
the *same* port (the application's pools keep the URL) and on its data (the
AOF, the cluster), after a bounded, doubling delay. A budget bounds the
restarts: at most ``max_restarts`` attempts within ``window_s``. When the
budget is spent (the binary keeps failing, the data dir is unusable, the port
was taken...), the supervisor gives up and reports a one-line reason to its
listener, which makes ``flashsale up`` exit non-zero with it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from flashsale.run.embedded.proc import Aborted, Child

log = logging.getLogger("flashsale.run.embedded.servers")

POLL_INTERVAL_S = 0.1


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How often a dead embedded server is restarted before we give up."""

    max_restarts: int = 5  # attempts within window_s; 0: never restart
    window_s: float = 60.0
    backoff_base_s: float = 0.25  # the delay before the first attempt, doubled after each
    backoff_max_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_restarts <= 100:
            raise ValueError(f"max_restarts must be 0..100, not {self.max_restarts}")
        if not (0 < self.window_s <= 86_400 and 0 <= self.backoff_base_s <= self.backoff_max_s):
            raise ValueError(f"invalid restart policy {self}")


class RestartBudget:
    """The restart attempts made within the policy's sliding window."""

    def __init__(
        self, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._attempts: collections.deque[float] = collections.deque()

    def recent(self) -> int:
        horizon = self._clock() - self.policy.window_s
        while self._attempts and self._attempts[0] <= horizon:
            self._attempts.popleft()
        return len(self._attempts)

    def next_delay_s(self) -> float | None:
        """The delay before the next attempt, or None when the budget is spent."""
        recent = self.recent()
        if recent >= self.policy.max_restarts:
            return None
        p = self.policy
        return float(min(p.backoff_base_s * 2**recent, p.backoff_max_s))

    def record(self) -> None:
        self._attempts.append(self._clock())


# (port, abort) -> a child that is ready on that port; raises EmbeddedError
Launcher = Callable[[int, threading.Event], Child]


@dataclass
class Slot:
    """One supervised server: its current child and how to start another."""

    name: str
    child: Child
    launch: Launcher
    budget: RestartBudget


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(":;") if text else type(exc).__name__


class Supervisor:
    """A thread that restarts dead children; see the module docstring."""

    def __init__(self, slots: list[Slot], on_failure: Callable[[str], None]) -> None:
        self.slots = slots
        self._on_failure = on_failure
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name="embedded-supervisor", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stop supervising (an attempt under way is abandoned)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def children(self) -> list[Child]:
        with self._lock:
            return [slot.child for slot in self.slots]

    def _run(self) -> None:
        while not self._stopping.wait(POLL_INTERVAL_S):
            for slot in self.slots:
                if slot.child.proc.poll() is not None and not self._revive(slot):
                    return

    def _revive(self, slot: Slot) -> bool:
        """Restart ``slot``'s dead child; False when we gave up (or are stopping)."""
        dead = slot.child
        port, status = dead.port, dead.proc.returncode
        dead.reap(0)
        log.warning(
            "embedded %s (pid %d, port %d) exited with status %s: restarting it; last output: %s",
            slot.name, dead.proc.pid, port, status, dead.last_log_line(),
        )  # fmt: skip
        last_error = f"exited with status {status}"
        while (delay := slot.budget.next_delay_s()) is not None:
            if self._stopping.wait(delay):
                return False
            slot.budget.record()
            try:
                child = slot.launch(port, self._stopping)
            except Aborted:
                return False
            except Exception as exc:  # EmbeddedError, or e.g. OSError from an unusable data dir
                last_error = _one_line(exc)
                log.warning(
                    "embedded %s: restart on port %d failed: %s", slot.name, port, last_error
                )
                continue
            with self._lock:
                slot.child = child
            log.warning(
                "embedded %s restarted on port %d (pid %d)", slot.name, port, child.proc.pid
            )
            return True
        policy = slot.budget.policy
        reason = (
            f"embedded {slot.name} (port {port}) died and could not be restarted "
            f"({policy.max_restarts} attempts allowed per {policy.window_s:g} s, "
            f"FLASHSALE_EMBEDDED_RESTART_MAX): {last_error}; see {dead.log_path}"
        )
        log.error("%s", reason)
        self._on_failure(reason)
        return False
