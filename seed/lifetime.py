"""Processes a stage starts end with the stage's process, however it ends.

``seed teacher --procs`` and ``seed student`` with ``train.nproc`` > 1 start processes and stop them when
they fail or are interrupted (Ctrl-C). Killed instead (SIGKILL, the out-of-memory killer, or a scheduler
cancelling the run), their ``finally`` blocks never run, and the processes they started would run on:
holding GPUs, and writing the shards or checkpoints a re-run is about to write. So the stage gives its
processes its pid (``child_env``), and each of them (and, through ``torchrun``, each rank) watches that
process and ends itself soon after it is gone (``exit_with_parent``, called by the ``seed`` command).
What a watcher stops is what a crash would: a shard without its completion record, an epoch without its
checkpoint, both redone by the re-run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping

PARENT_ENV = "SEED_PARENT_PID"
EXIT_CODE = 143  # as a process ended by SIGTERM: not a clean exit


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) for processes that must end with this process."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (where ``/proc`` says so, a zombie, ended but not yet waited for, counts as
    gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (macOS), or gone since
        return True


def exit_with_parent(poll: float = 1.0) -> int | None:
    """When this process was started with ``child_env``: a daemon thread that ends it (exit code ``EXIT_CODE``)
    within ``poll`` seconds of the starting process being gone. Returns the pid watched, or None."""
    value = os.environ.get(PARENT_ENV, "")
    if not value.isdigit() or int(value) == os.getpid():
        return None
    parent = int(value)

    def watch() -> None:
        while alive(parent):
            time.sleep(poll)
        os.write(2, f"seed: the process that started this one (pid {parent}) has ended; stopping\n".encode())
        os._exit(EXIT_CODE)

    threading.Thread(target=watch, daemon=True, name="seed-exit-with-parent").start()
    return parent
