"""SIGTERM and SIGINT as a request to stop: the run in progress stops before its flip."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger("encore.scheduler")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stop_on_signals(
    stop: threading.Event, *, then: Callable[[], None] | None = None
) -> Iterator[threading.Event]:
    """Set ``stop`` on the first SIGTERM or SIGINT (and call ``then``); a second SIGINT
    interrupts at once. Installed from the main thread, restored on exit."""

    def handler(signum: int, frame: object) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logger.warning(
            "%s: stopping (a run in progress stops before its flip; the served run stays)",
            signal.Signals(signum).name,
        )
        stop.set()
        if then is not None:
            then()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
