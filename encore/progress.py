"""Progress as a callback: a role reports how far a stage is, its caller draws the bar."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    """``progress(stage, done, total, **fields)``: ``done`` of ``total`` units of ``stage``,
    and figures to show beside it (a loss, say). The CLI's rich bars are one."""

    def __call__(self, stage: str, done: int, total: int, **fields: float | int | str) -> None: ...
