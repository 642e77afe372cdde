"""The local engine: batches scored in a spawn process pool, with backpressure and a prompt
stop. Each process loads the model version once, through the inference seam."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

from encore.bundle import Bundle
from encore.errors import RunStopped
from encore.experiments import Challenger
from encore.settings import Settings
from inference import Arms, ScoredBatch, Users, load_arms

logger = logging.getLogger("encore.scheduler.pool")

# How often the parent looks at the stop flag while it waits for a batch.
STOP_POLL_SECONDS = 0.2
# Workers that have not exited this long after a stop are terminated.
WORKER_EXIT_SECONDS = 2.0


def score_in_pool(
    settings: Settings,
    bundle: Bundle,
    batches: list,
    top_n: int,
    on_result: Callable[[ScoredBatch], None],
    *,
    stop: threading.Event,
    challenger: Bundle | None = None,
    arm: Challenger | None = None,
) -> None:
    """Score batches in a spawn pool with a bounded number in flight; results as they finish.

    When ``stop`` is set, no batch is submitted any more, queued ones are cancelled, the
    workers are stopped and :class:`~encore.errors.RunStopped` is raised.
    """
    pool = ProcessPoolExecutor(
        max_workers=settings.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(
            str(bundle.path),
            top_n,
            settings.torch_threads,
            str(challenger.path) if challenger else None,
            arm.as_json() if arm else None,
        ),
    )
    todo = iter(batches)
    pending: set[Future] = set()

    def submit_next() -> None:
        batch = next(todo, None)
        if batch is not None:
            pending.add(pool.submit(score_batch, batch))

    try:
        for _ in range(settings.resolved_batches_in_flight):
            submit_next()
        while pending:
            done, _ = wait(pending, timeout=STOP_POLL_SECONDS, return_when=FIRST_COMPLETED)
            if stop.is_set():
                raise RunStopped("stopped on request before the flip")
            for future in done:
                pending.discard(future)
                result = future.result()
                submit_next()  # keep the workers busy while this batch is written
                on_result(result)
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    # A worker may be seconds into importing torch or loading the bundle: waiting for it
    # would not bound the stop, and nothing it computes is needed any more.
    processes = list((pool._processes or {}).values())  # no public way to reach them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.join(timeout=WORKER_EXIT_SECONDS / max(len(processes), 1))
        if process.is_alive():
            process.kill()  # workers ignore SIGTERM: the parent decides when they stop
    for process in processes:
        process.join(timeout=WORKER_EXIT_SECONDS)


# The scoring process's model versions, loaded once by the pool's initializer.
_model: Arms | None = None


def init_worker(
    bundle_path: str,
    top_n: int,
    torch_threads: int,
    challenger_path: str | None = None,
    arm: dict | None = None,
) -> None:
    """ProcessPoolExecutor initializer: load the model versions once per process."""
    # Ctrl-C reaches the whole process group, and a supervisor may signal it too: a worker
    # that died of it would break the pool. The parent stops its workers itself. First, as
    # importing torch takes seconds.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    global _model
    torch.set_num_threads(torch_threads)
    _model = load_arms(
        Path(bundle_path),
        top_n=top_n,
        challenger=Path(challenger_path) if challenger_path else None,
        arm=Challenger.from_json(arm) if arm else None,
    )


def score_batch(users: Users) -> ScoredBatch:
    """Score one batch in a pool process; only what the store keeps travels back."""
    if _model is None:  # pragma: no cover - the initializer always ran in a pool worker
        raise RuntimeError("score_batch called outside an initialized worker")
    return _model.score(users).for_store()
