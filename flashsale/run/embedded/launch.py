"""Starting one embedded server: on a free port at first (retried if another
process took it between the choice and the bind), then a slot for the
supervisor whose ``relaunch`` reuses that port (the application's pools keep
the URL), failing with a one-line reason."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flashsale.run.embedded.proc import (
    ADDR_IN_USE,
    LOOPBACK,
    Child,
    EmbeddedError,
    ServerExited,
    free_port,
    open_log,
    popen,
    stop_children,
)
from flashsale.run.embedded.supervisor import RestartBudget, RestartPolicy, Slot
from flashsale.run.embedded.users import RunAs

PORT_ATTEMPTS = 5


class _Exited(Exception):
    """The child exited before it was ready (its log's tail says why)."""

    def __init__(self, child: Child) -> None:
        super().__init__(child.name)
        self.child = child

    @property
    def port_taken(self) -> bool:
        return ADDR_IN_USE in self.child.tail().lower()


@dataclass(frozen=True)
class Launcher:
    """Starts a server's children in ``data_dir`` as ``run_as``."""

    data_dir: Path
    run_as: RunAs | None
    stop_timeout_s: float
    restart: RestartPolicy

    def once(
        self,
        name: str,
        port: int,
        argv_for: Callable[[int], list[str]],
        wait: Callable[[Child, threading.Event | None], None],
        stop_signal: signal.Signals,
        abort: threading.Event | None,
    ) -> Child:
        """One start of the server on ``port``, ready when it returns.

        Raises _Exited if it exited before it was ready.
        """
        log_path = self.data_dir / f"{name}.log"
        log, start = open_log(log_path, f"starting {name} on {LOOPBACK}:{port}")
        proc = popen(argv_for(port), log=log, cwd=self.data_dir, who=self.run_as)
        child = Child(name, proc, port, log, log_path, start, stop_signal)
        try:
            wait(child, abort)
        except ServerExited:
            child.reap(0)
            raise _Exited(child) from None
        except BaseException:
            stop_children([child], self.stop_timeout_s)
            raise
        return child

    def slot(
        self,
        name: str,
        argv_for: Callable[[int], list[str]],
        wait: Callable[[Child, threading.Event | None], None],
        stop_signal: signal.Signals,
        before: Callable[[], object],
    ) -> Slot:
        """The first start, on a free port (retried if another process took it),
        then supervised: a restart reuses that port (``relaunch``)."""
        child: Child | None = None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            port = free_port()
            before()
            try:
                child = self.once(name, port, argv_for, wait, stop_signal, None)
                break
            except _Exited as exc:
                if not exc.port_taken or attempt == PORT_ATTEMPTS:
                    code = exc.child.proc.returncode
                    raise exc.child.failure(f"exited with status {code}") from None
        assert child is not None

        def relaunch(port: int, abort: threading.Event) -> Child:
            before()
            try:
                return self.once(name, port, argv_for, wait, stop_signal, abort)
            except _Exited as exc:
                if exc.port_taken:
                    raise EmbeddedError(
                        f"port {port} is taken by another process (the application's "
                        "connection pools keep this port)"
                    ) from None
                code, last = exc.child.proc.returncode, exc.child.last_log_line()
                raise EmbeddedError(f"exited with status {code}: {last}") from None

        return Slot(name, child, relaunch, RestartBudget(self.restart))
