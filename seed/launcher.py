"""Run a training stage in several ranks on this node: ``torchrun`` over a ``seed`` command line.

The student stage (``train.nproc``) and pre-training (``pretrain.nproc``) use it the same way: the stage
writes its resolved config and storage roots to a temporary directory, and ``torchrun`` starts that many
ranks of the command (``-m pipeline.cli <stage> ... --events``), one per GPU on CUDA. The ranks report
each finished epoch as one machine-readable line (``epoch_event``) and a user's mistake as ``MISTAKE``;
every other line of their output (logs, warnings, tracebacks) is handed on as it comes.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from seed.devices import cpu_cores
from seed.errors import MachineError, SeedError
from seed.lifetime import child_env

log = logging.getLogger(__name__)

EVENT = "seed-epoch "  # the line prefix of a rank-0 epoch report under ``torchrun``
MISTAKE = "seed-mistake"  # a rank's line saying it stopped on a user's mistake (a ``SeedError``)


def node_processes(nproc: int) -> int:
    """Ranks a stage runs on this node: ``nproc``, 0 = one per visible GPU (1 without)."""
    return nproc or max(1, torch.cuda.device_count())


def epoch_event(epoch: int, row: dict[str, Any]) -> str:
    """One finished epoch as a line of text ``torchrun`` reads back (the ``--events`` of a stage's command)."""
    return EVENT + json.dumps({"epoch": epoch, "row": row})


def torchrun(command: Sequence[str], n: int, *, stage: str,
             on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
             on_line: Callable[[str], None] = print) -> None:
    """Run ``python <command>`` in ``n`` ranks started by ``torchrun`` on this node, and wait for them.

    ``on_line`` is told first that the ranks start (``<stage>: <n> processes (torchrun)``); then rank 0's
    epoch events go to ``on_epoch``, every other line of the ranks' output to ``on_line``. A rank that fails
    stops them all (torchrun); the error then carries the ranks' one-line errors, or else the last lines,
    and is a ``SeedError`` when a rank stopped on a user's mistake (which a retry would repeat), a
    ``MachineError`` otherwise (a rank killed, an ``OSError``). ``stage`` names the stage in both.
    Intra-op threads default to this machine's cores split between the ranks; the ranks end with this
    process, even killed (``seed.lifetime``).
    """
    # torchrun's rendezvous store binds a port of its own choosing (port 0) on loopback, and so does the store
    # it hands the ranks: no port is picked before it is bound, so launches at the same moment cannot collide
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={n}",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", f"--rdzv-id=seed-{uuid.uuid4().hex}",
            "--local-addr=127.0.0.1", *command]
    env = child_env({**os.environ,
                     # each rank's share of the cores this process may use (its affinity: Slurm, taskset)
                     "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, cpu_cores() // n))),
                     "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),  # one node: ranks meet on loopback
                     # the ranks use the store torchrun bound (set to 1, torchrun would pick a port free and bind it later)
                     "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})
    tail: collections.deque[str] = collections.deque(maxlen=25)
    errors: list[str] = []  # the ranks' own one-line errors, which torchrun's report would push out of the tail
    mistakes = 0  # ranks that stopped on a user's mistake (their one-line error is among ``errors``)
    on_line(f"{stage}: {n} processes (torchrun)")
    # torchrun leads a process group of its own, so an interrupted launcher (Ctrl-C, a cancelled flow run)
    # can stop it, and it stops its ranks
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in lines(proc):
            if line.startswith(EVENT):
                event = json.loads(line[len(EVENT):])
                if on_epoch is not None:
                    on_epoch(int(event["epoch"]), event["row"])
                continue
            if MISTAKE in line:  # its one write cannot be split, but may land inside another rank's line
                mistakes += line.count(MISTAKE)
                line = line.replace(MISTAKE, "")
                if not line.strip():
                    continue
            tail.append(line)
            if line.startswith("seed: error:"):
                errors.append(line)
            on_line(line)
    except BaseException:
        stop(proc)
        raise
    if proc.returncode != 0:
        error = SeedError if mistakes else MachineError
        raise error(f"{stage}: its {n} processes failed (torchrun exit code {proc.returncode}); "
                    "epoch checkpoints so far are kept for a resume; "
                    + ("\n".join(dict.fromkeys(errors)) if errors else "last lines:\n" + "\n".join(tail)))


def lines(proc: subprocess.Popen, grace: float = 10.0) -> Iterator[str]:
    """``proc``'s output lines until it exits and its output ends.

    The output ends when every process holding the pipe has closed it. A process torchrun did not
    stop (a data-loader worker orphaned by a killed rank, say) can hold it past torchrun's exit, so
    once torchrun has exited the lines still buffered are read for ``grace`` seconds, and no longer;
    the pipe is then left to the reading thread (closing it under a blocked read would block).
    """
    assert proc.stdout is not None
    pending: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            pending.put(line.rstrip("\n"))
        pending.put(None)

    threading.Thread(target=pump, daemon=True, name="seed-torchrun-output").start()
    ended: float | None = None
    while True:
        try:
            line = pending.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is None:
                continue
            ended = ended if ended is not None else time.monotonic()
            if time.monotonic() - ended < grace:
                continue
            log.warning("torchrun exited but a process it started still holds its output open; not waiting for it")
            return
        if line is None:
            proc.stdout.close()
            proc.wait()
            return
        yield line


def stop(proc: subprocess.Popen, wait: float = 30.0) -> None:
    """Stop torchrun (SIGTERM: it stops its ranks, then exits), and kill its group after ``wait`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
