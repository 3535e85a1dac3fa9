"""Run a stage in several processes on this node.

Training stages go through ``torchrun`` over a ``seed`` command line: the student stage (``train.nproc``) and
pre-training (``pretrain.nproc``) write their resolved config and storage roots to a temporary directory, and
``torchrun`` starts that many ranks of the command (``-m pipeline.cli <stage> ... --events``), one per GPU on
CUDA. The ranks report each finished epoch as one machine-readable line (``epoch_event``) and a user's mistake
as ``MISTAKE``; every other line of their output (logs, warnings, tracebacks) is handed on as it comes.

Stages whose processes need not talk to each other (``seed teacher --procs``, ``seed evaluate --procs``) start
them as ``Children``: one ``seed`` command per device (``process_devices``), each pinned to its share of the
cores (``process_cores``), its output in a log file the parent reads and quotes when it fails.
"""

from __future__ import annotations

import collections
import contextlib
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
from typing import IO, Any

import torch

from seed.devices import cpu_core_ids, cpu_cores, resolve_device, split_cores
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


def process_devices(setting: str, n: int, name: str) -> list[str]:
    """The device of each of ``n`` processes (0 = one per visible GPU) of a stage whose device setting (``name``)
    is ``setting``: process i takes ``cuda:<i mod GPUs>`` on CUDA (the setting must then be auto or cuda), the CPU
    otherwise.

    More processes than GPUs share them round-robin; on one H200, 2 and 4 teacher processes sharing it were no
    faster than one (docs/benchmarks.md, run 5), so one per GPU is the default.
    """
    device = resolve_device(setting)
    if device.type == "cpu":
        return ["cpu"] * max(1, n)
    if setting not in ("auto", "cuda"):
        raise SeedError(f"{name}={setting} names one GPU for several processes; use auto or cuda (process i takes "
                        "cuda:i; choose GPUs with CUDA_VISIBLE_DEVICES)")
    count = torch.cuda.device_count()
    return [f"cuda:{i % count}" for i in range(n or count)]


def process_cores(n: int, cores: list[int] | None = None) -> list[list[int]] | None:
    """The cores each of ``n`` processes is pinned to: ``cores`` (default: this process's) in ``n`` contiguous
    shares; None (no pinning) for one process, on a platform without CPU affinity, or with fewer cores than
    processes."""
    if n < 2 or not hasattr(os, "sched_setaffinity"):
        return None
    return split_cores(cpu_core_ids() if cores is None else cores, n)


class Children:
    """Processes a stage starts on this node, each with its output (stdout and stderr) in a log file of
    ``directory``. Leaving the ``with`` block, however it is left, kills those still running and closes the logs.

    Each is pinned to its ``cores`` before it starts its threads (unless it has ended already), so that what it
    takes automatically (data workers, its forward's threads) counts its share, as ``torchrun``'s ranks count
    theirs. Each ends with this process, even killed (``seed.lifetime``).
    """

    def __init__(self, directory: str, events: str | None = None):
        self.directory, self.events = directory, events  # events: the prefix of the lines that report progress
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[str]] = []
        self._read: list[int] = []  # bytes of each log handed out by ``new_lines``

    def start(self, command: Sequence[str], *, cores: list[int] | None = None, env: dict[str, str] | None = None,
              pass_fds: Sequence[int] = ()) -> None:
        """Start ``command``; ``pass_fds``: open files it inherits under the same numbers."""
        output = open(f"{self.directory}/process-{len(self.procs)}.log", "w+")
        try:
            proc = subprocess.Popen(list(command), stdout=output, stderr=subprocess.STDOUT, env=child_env(env),
                                    pass_fds=tuple(pass_fds))
        except BaseException:
            output.close()
            raise
        self.procs.append(proc)
        self.logs.append(output)
        self._read.append(0)
        if cores is not None:
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(proc.pid, cores)

    def poll(self) -> tuple[bool, int | None]:
        """(whether to stop waiting: all have exited cleanly or one has failed, the lowest index of a failed one)."""
        codes = [proc.poll() for proc in self.procs]
        failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
        return failed is not None or all(code == 0 for code in codes), failed

    def new_lines(self, i: int) -> list[str]:
        """The whole lines process ``i`` has written since the last call."""
        with open(self.logs[i].name, "rb") as f:
            f.seek(self._read[i])
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._read[i] += end
        return data[:end].decode(errors="replace").splitlines()

    def tail(self, i: int, n: int = 20) -> str:
        """Process ``i``'s last ``n`` lines, its progress reports (``events``) left out."""
        with open(self.logs[i].name, errors="replace") as f:
            lines = [line for line in f.read().splitlines() if not (self.events and line.startswith(self.events))]
        return "\n".join(lines[-n:])

    def error(self, i: int, what: str, kept: str) -> SeedError | MachineError:
        """Process ``i``'s failure as the error to raise: a ``SeedError`` for the exit code 2 of a user's mistake
        (``pipeline.cli``), a ``MachineError`` for a crash or a signal; ``what`` names it, ``kept`` says what stays."""
        code = self.procs[i].returncode
        error = SeedError if code == 2 else MachineError
        how = f"failed with exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"was killed by {signal.Signals(-code).name}" + (", as the out-of-memory killer kills" if code == -9 else "")
        lines = self.tail(i)
        return error(f"{what} {how}; {kept}; " + (f"last lines:\n{lines}" if lines else "it wrote nothing"))

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *_: object) -> None:
        for proc, output in zip(self.procs, self.logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            output.close()
