"""Joining Ray, for the roles that can use it (the nightly run's engine, the pairing).

Ray is an optional dependency (`uv sync --extra ray`): nothing here imports it until a caller
asks for it.
"""

from __future__ import annotations

import os

from encore.errors import EncoreError


def import_ray():
    """The ``ray`` module, or an error saying how to install it."""
    # Under `uv run`, Ray would otherwise rebuild the project's environment for every worker
    # from an upload of the working directory; the workers use this same environment.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise EncoreError(
            "the ray engine needs Ray: install it with `uv sync --extra ray` "
            "(or choose ENCORE_ENGINE=local)"
        ) from exc
    return ray


def join_ray(address: str | None) -> bool:
    """Connect to Ray unless this process already is: to ``address`` (``auto`` or host:port),
    or to a local Ray started for this process. True when this call connected."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address)
    else:
        # "local": a Ray of this process's own, even where `ray start` left one running on
        # this machine (which ray.init() would otherwise join, and refuse num_cpus for).
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return True
