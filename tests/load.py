"""A bounded load of real HTTP requests from a few threads, recording every answer."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all (refused, reset, timed out)
    content_type: str
    body: bytes
    retry_after: str | None
    tag: str = ""
    started: float = 0.0  # time.monotonic() when the request was sent (set by Load)
    finished: float = 0.0  # and when its answer came

    def json(self):
        return json.loads(self.body)


def request(
    method: str, url: str, body: bytes | None = None, *, tag: str = "", timeout_seconds=15.0
) -> Answer:
    headers = {"content-type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_seconds) as response:
            return Answer(
                response.status,
                response.headers.get("content-type", ""),
                response.read(),
                response.headers.get("retry-after"),
                tag,
            )
    except urllib.error.HTTPError as exc:
        return Answer(
            exc.code,
            exc.headers.get("content-type", ""),
            exc.read(),
            exc.headers.get("retry-after"),
            tag,
        )
    except OSError as exc:
        return Answer(0, "", repr(exc).encode(), None, tag)


class Load:
    """``threads`` threads calling ``send`` in a loop until stopped, at most ``max_calls`` each."""

    def __init__(
        self,
        send: Callable[[], Answer],
        *,
        threads: int = 4,
        max_calls: int = 20_000,
        max_seconds: float = 180.0,
    ) -> None:
        self.send = send
        self.max_calls = max_calls
        self.max_seconds = max_seconds
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_calls):
            if self._stop.is_set() or time.monotonic() > deadline:
                return
            started = time.monotonic()
            answer = replace(self.send(), started=started, finished=time.monotonic())
            with self._lock:
                self.answers.append(answer)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def mark(self) -> int:
        with self._lock:
            return len(self.answers)

    def wait_for(
        self, wanted: Callable[[Answer], bool], *, count: int, since: int, timeout_seconds=60.0
    ) -> None:
        """Until ``count`` answers after index ``since`` satisfy ``wanted`` (or fail)."""
        deadline = time.monotonic() + timeout_seconds
        while True:
            with self._lock:
                seen = sum(1 for answer in self.answers[since:] if wanted(answer))
                total = len(self.answers)
            if seen >= count:
                return
            assert time.monotonic() < deadline, (
                f"only {seen} of {count} wanted answers among {total - since} in "
                f"{timeout_seconds} s; the last: {self.answers[-3:]}"
            )
            assert any(t.is_alive() for t in self._threads), "the load stopped early"
            time.sleep(0.05)
