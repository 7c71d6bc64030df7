"""A compute stream: one worker thread that runs jobs strictly in submission order.

An expert's accelerator work (the target's forward, the online forward and backward, the
optimizer) goes here while its main thread keeps receiving, checking and answering messages:
the host's network and bookkeeping overlap the device's compute, as a CUDA stream overlaps
the host. Jobs run one at a time in the order given, so the nets see exactly the sequence of
operations a single-threaded loop would have run in the same order. No sockets here.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Stream:
    def __init__(self, name: str, on_error: Callable[[BaseException], None]) -> None:
        self.name = name
        self._on_error = on_error
        self._jobs: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._cond = threading.Condition()
        self._unfinished = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` after every job submitted before it."""
        with self._cond:
            if self._closed:
                raise RuntimeError(f"{self.name}: submit after close")
            self._jobs.append((fn, args))
            self._unfinished += 1
            self._cond.notify_all()

    def on_thread(self) -> bool:
        """Whether the caller is this stream's worker (a job)."""
        return threading.current_thread() is self._thread

    @property
    def idle(self) -> bool:
        """No job waiting or running."""
        return self._unfinished == 0

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._unfinished == 0, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Run what was submitted, then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return  # closed and empty
                fn, args = self._jobs.popleft()
            try:
                fn(*args)
            except BaseException as exc:  # a bad job never ends the stream
                log.exception("%s: job %s failed", self.name, getattr(fn, "__name__", fn))
                try:
                    self._on_error(exc)
                except Exception:
                    log.exception("%s: the error handler failed", self.name)
            finally:
                with self._cond:
                    self._unfinished -= 1
                    self._cond.notify_all()
