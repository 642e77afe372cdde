"""Starting runs for `POST /v1/runs`: the same `encore` CLI code, in a detached process.

The API never imports torch or the training code; a run needs both, so it runs in its own
process that outlives the request (and a restart of the server).
"""

from __future__ import annotations

import subprocess
import sys

from encore.settings import Settings


def launch_run(settings: Settings, run_id: str, user_ids: list[int] | None) -> subprocess.Popen:
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if user_ids is None:
        command = ["run", "--run-id", run_id]
    else:
        users_file = logs / f"backfill-{run_id}.txt"
        users_file.write_text("\n".join(map(str, user_ids)) + "\n")
        command = ["backfill", "--users", str(users_file), "--run-id", run_id]
    with (logs / f"run-{run_id}.log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "encore", *command],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
