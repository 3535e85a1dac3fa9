"""What must hold across processes: augmentation draws do not depend on the interpreter's hash seed; MoCo's
Shuffle-BN across DDP ranks is its gather-shuffle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from seed.views import Recipe, draw_views


def test_draw_does_not_depend_on_the_process() -> None:
    keys = [f"k{i}" for i in range(50)]
    here = np.concatenate([draw_views(Recipe(), seed=0, key=k, views=4, height=28, width=28) for k in keys])
    code = ("import numpy as np, sys; from seed.views import Recipe, draw_views; "
            "sys.stdout.write(np.concatenate([draw_views(Recipe(), seed=0, key=f'k{i}', views=4, height=28, width=28) "
            "for i in range(50)]).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert bytes.fromhex(out) == here.tobytes()


_SHUFFLE_RANK = """
import sys, torch, torch.distributed as dist
from seed.data import Batch
from seed.objectives import MocoV2, Queue
rank, world, B, init = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
x = torch.randn(world, 2 * B, 6, generator=torch.Generator().manual_seed(1))[rank]
obj = MocoV2(model.train(), Queue(32, 4, torch.device("cpu")), momentum=0.99, temperature=0.2, shuffle_bn=1, seed=5)
k = obj.prepare(Batch(x, torch.arange(B), torch.zeros(B, dtype=torch.long), {}, 2), torch.device("cpu"))["k"]
torch.save(k, sys.argv[5])
dist.destroy_process_group()
"""


def test_shuffle_bn_across_ranks_is_mocos_gather_shuffle(tmp_path: Path) -> None:
    """Two gloo ranks: the keys' inputs are gathered, permuted by (seed, step), split over the ranks for the key
    encoder's BN, and each rank gets its own rows' keys back; equal to that computation in one process."""
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    B, world = 8, 2
    procs = [subprocess.Popen([sys.executable, "-c", _SHUFFLE_RANK, str(r), str(world), str(B),
                               f"tcp://127.0.0.1:{port}", str(tmp_path / f"k{r}.pt")]) for r in range(world)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    got = torch.cat([torch.load(tmp_path / f"k{r}.pt") for r in range(world)])

    torch.manual_seed(0)
    key = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(world, 2 * B, 6, generator=torch.Generator().manual_seed(1))
    x_keys = torch.cat([x[r, B:] for r in range(world)])                       # gathered in rank order
    perm = torch.randperm(world * B, generator=torch.Generator().manual_seed(5 * 1_000_003 + 0))
    expected = torch.empty(world * B, 4)
    for idx in perm.view(world, -1):                                           # each rank's BN batch
        expected[idx] = key.train()(x_keys[idx]).detach()
    assert torch.allclose(got, torch.nn.functional.normalize(expected, dim=1), atol=1e-6)
    per_rank = torch.cat([key(x[r, B:]).detach() for r in range(world)])       # without the shuffle
    assert not torch.allclose(got, torch.nn.functional.normalize(per_rank, dim=1), atol=1e-3)


def test_torchrun_output_ends_when_torchrun_exits_though_a_child_holds_the_pipe() -> None:
    import os
    import signal
    import time

    from seed.launcher import lines

    # the child exits at once; what it left behind (a sleep, as an orphaned data-loader worker would) keeps the pipe open
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & echo $!; echo last line"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.monotonic()
    got = list(lines(proc, grace=0.5))
    try:
        assert time.monotonic() - t0 < 10 and proc.returncode == 0
        assert got[1:] == ["last line"]
        os.kill(int(got[0]), 0)  # the straggler still runs: the lines ended without waiting for it
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_an_interrupted_launcher_stops_torchruns_whole_group() -> None:
    from seed.launcher import lines, stop

    proc = subprocess.Popen(["bash", "-c", "sleep 60 & echo $!; wait"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    child = int(next(lines(proc)))
    stop(proc, wait=5)
    assert proc.returncode is not None
    assert _ends(child, within=5)


def _ends(pid: int, within: float) -> bool:
    """Whether ``pid`` is gone, or a zombie waiting for init to reap it, within ``within`` seconds."""
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_children_hand_on_their_lines_and_their_failure_with_its_kind(tmp_path: Path) -> None:
    """``seed.launcher.Children`` (``seed teacher --procs``, ``seed evaluate --procs``): each process's lines read as
    they come, whole lines only; exit code 2 (a user's mistake, ``pipeline.cli``) is a ``SeedError``, any other a
    ``MachineError``, each quoting the process's last lines; processes still running are killed on leaving."""
    import time

    from seed.errors import MachineError, SeedError
    from seed.launcher import Children

    release = tmp_path / "go"
    code = ("import pathlib, sys, time; print('one', flush=True); sys.stdout.write('tw'); sys.stdout.flush(); "
            f"[time.sleep(0.05) for _ in iter(lambda: pathlib.Path({str(release)!r}).exists(), True)]; "
            "print('o', flush=True); print('seed: error: a mistake', file=sys.stderr); sys.exit(int(sys.argv[1]))")
    with Children(str(tmp_path)) as children:
        for exit_code in ("0", "2", "1"):
            children.start([sys.executable, "-c", code, exit_code])
        deadline = time.monotonic() + 30
        while children.new_lines(0) != ["one"]:   # "tw" is not a line yet
            assert time.monotonic() < deadline
        assert children.poll() == (False, None)
        release.touch()
        while not children.poll()[0]:         # until one has failed
            assert time.monotonic() < deadline
        assert children.poll()[1] in (1, 2)
        assert [p.wait(timeout=30) for p in children.procs] == [0, 2, 1]
        assert children.poll() == (True, 1)   # the first that failed, by index
        assert children.new_lines(0) == ["two", "seed: error: a mistake"]
        error = children.error(1, "evaluation process on cpu", "nothing was scored")
        assert isinstance(error, SeedError) and str(error) == (
            "evaluation process on cpu failed with exit code 2; nothing was scored; last lines:\n"
            "one\ntwo\nseed: error: a mistake")
        assert isinstance(children.error(2, "p", "kept"), MachineError)
        children.start([sys.executable, "-c", "import time; time.sleep(600)"])
    assert children.procs[3].returncode is not None and all(log.closed for log in children.logs)
    # killed (the out-of-memory killer's SIGKILL): said so; its progress reports (``events``) are not its last lines
    with Children(str(tmp_path), events="ev ") as children:
        children.start([sys.executable, "-c", "import os, signal; print('loaded', flush=True); "
                        "[print('ev', i, flush=True) for i in range(50)]; os.kill(os.getpid(), signal.SIGKILL)"])
        assert children.procs[0].wait(timeout=30) == -9
        assert str(children.error(0, "evaluation process on cpu", "nothing was scored")) == (
            "evaluation process on cpu was killed by SIGKILL, as the out-of-memory killer kills; nothing was scored; "
            "last lines:\nloaded")
