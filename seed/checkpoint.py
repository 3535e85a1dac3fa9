"""Checkpoints: written atomically (temp file, then rename or single PUT) on local paths or fsspec URLs.

A training checkpoint holds everything a run needs to continue exactly: model, optimiser, the
objective's state (queues, key encoder), where it stands (``Position``: the epochs finished, and the
steps of the next one for a checkpoint written inside an epoch), the RNG state, the metrics so far and
the run's metadata (config, cache and bank fingerprints, architecture).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import torch

from seed import storage
from seed.errors import MachineError, SeedError, machine_failure
from seed.models import Encoder, freeze, mlp_encoder
from seed.storage import is_url, local_path

log = logging.getLogger(__name__)

PENDING = ".next"  # a checkpoint written whole but not yet moved into place (``save_together``)


@dataclasses.dataclass(frozen=True, order=True)
class Position:
    """Where a training checkpoint stands: ``epoch`` epochs finished and ``step`` steps of the next one (0 for
    a checkpoint written at an epoch's end). False for a run that has not begun."""

    epoch: int = 0
    step: int = 0

    @classmethod
    def of(cls, state: dict[str, Any]) -> Position:
        return cls(int(state.get("epoch", 0)), int(state.get("step", 0)))

    def __bool__(self) -> bool:
        return self.epoch > 0 or self.step > 0

    def __str__(self) -> str:
        return f"epoch {self.epoch}" if self.step == 0 else f"step {self.step:,} of epoch {self.epoch + 1}"


def save(obj: Any, url: str) -> None:
    """Write ``obj`` with ``torch.save`` so that ``url`` holds either the old or the new file, never half."""
    if is_url(url):
        buf = io.BytesIO()
        torch.save(obj, buf)
        storage.write_bytes(url, buf.getvalue())  # object stores PUT whole objects
        return
    path = Path(local_path(url))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # on the disk before the rename: a host crash must not leave an empty file in place
        storage.as_if_created(tmp)  # mkstemp makes it private (0600) whatever the umask
        os.replace(tmp, path)
        storage.sync_path(str(path.parent))  # and the rename itself
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError("... file write failed")
        Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise MachineError(f"could not write checkpoint {path} ({free / 2**20:.0f} MiB free on its disk; "
                           f"the previous file, if any, is untouched): {e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def exists(url: str) -> bool:
    return storage.exists(url)


def save_together(states: Sequence[tuple[str, Any]]) -> None:
    """Write checkpoints that belong together (the students of one run after the same epoch) so that a process
    killed at any point leaves the old set, or a new set that ``settle`` completes: each is first written whole
    beside its place (``<url>.next``), then all are moved in. One checkpoint is simply saved."""
    if len(states) == 1:
        save(states[0][1], states[0][0])
        return
    for url, state in states:
        save(state, url + PENDING)
    for url, _ in states:
        _move(url + PENDING, url)


def settle(urls: Sequence[str]) -> None:
    """Finish or undo a ``save_together`` of ``urls`` that a killed process left part-way.

    When every checkpoint's newest version (``<url>.next`` where there is one) stands at the same epoch and step,
    the new set was written whole and only its moves were cut short: the pending ones are moved in. Otherwise the
    new set was never all written, and the pending ones are removed: the checkpoints in place are the old set.
    """
    pending = {u for u in urls if exists(u + PENDING)}
    if not pending:
        return

    def position(url: str) -> Position | None:
        return Position.of(load(url)) if exists(url) else None

    newest = {position(u + PENDING) if u in pending else position(u) for u in urls}
    complete = len(newest) == 1 and None not in newest
    for url in sorted(pending):
        if complete:
            _move(url + PENDING, url)
        else:
            fs, path = storage.filesystem(url + PENDING)
            fs.rm_file(path)
    log.warning("checkpoints of %d students were being written when their process ended: %s", len(urls),
                f"completed at epoch {newest.pop()}" if complete else "the unfinished new set was removed, the old kept")


def _move(src: str, dst: str) -> None:
    """Move a whole file into place: a rename on a file system, a copy of the object then its removal on a store."""
    if not is_url(src):
        os.replace(local_path(src), local_path(dst))
        storage.sync_path(os.path.dirname(local_path(dst)) or ".")
        return
    fs, path = storage.filesystem(src)
    fs.copy(path, storage.filesystem(dst)[1])
    fs.rm_file(path)


def _safe_globals() -> list[Callable[..., Any] | tuple[Callable[..., Any], str]]:
    """The non-tensor objects real self-supervised checkpoints carry, allowed for ``weights_only`` loading,
    with the names they are pickled under: DINO's ``argparse.Namespace`` of training arguments, numpy
    scalars, dtypes and plain arrays (numpy 1 and numpy 2 names). Nothing here runs code when unpickled."""
    import argparse
    import importlib

    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    classes = [argparse.Namespace, np.dtype, np.ndarray] + [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [(c, f"{c.__module__}.{c.__qualname__}") for c in classes]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


def torch_load(url: str, what: str = "checkpoint") -> Any:
    """``torch.load`` of ``url`` on the CPU with ``weights_only=True`` and ``_safe_globals`` allowed; never
    full unpickling. A file holding anything else is refused in one line naming the file and the types."""
    try:
        with fsspec.open(url, "rb") as f, torch.serialization.safe_globals(_safe_globals()):
            # from object storage, the bytes first: torch's reader seeks about the file (a request each) and turns a
            # connection reset inside it into an error of its own, which would read as a damaged file
            source = io.BytesIO(f.read()) if is_url(url) else f
            return torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise SeedError(f"{what} not found: {url}") from exc
    except OSError as exc:
        if machine_failure(exc):  # a connection reset reading from object storage: a re-run reads it again
            raise MachineError(f"{url}: reading the {what} failed ({type(exc).__name__}: {exc}): the storage or the "
                               "network failed, not the file") from exc
        raise SeedError(f"{url}: {_why_unreadable(url, exc)}") from exc
    except Exception as exc:  # unpickling errors come in many types
        raise SeedError(f"{url}: {_why_unreadable(url, exc)}") from exc


def _why_unreadable(url: str, exc: Exception) -> str:
    """One line: the types a checkpoint holds that weights-only loading refuses, else the error's first line."""
    allowed = {g[1] for g in _safe_globals() if isinstance(g, tuple)}
    try:
        with fsspec.open(url, "rb") as f:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - allowed)
    except Exception:  # noqa: BLE001 - not a zip checkpoint at all: say what torch said
        unsafe = []
    if unsafe:
        return (f"holds objects that weights-only loading does not allow ({', '.join(unsafe)}); "
                "save its state_dict alone, e.g. torch.save(ckpt['state_dict'], path)")
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"not a readable torch checkpoint ({type(exc).__name__}: {first.strip()[:200]})"


def load(url: str) -> dict[str, Any]:
    """A checkpoint written by ``save`` (plain tensors and containers: ``weights_only=True``)."""
    return torch_load(url)


def training_state(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, at: Position, objective: dict[str, Any],
                   metrics: list[dict[str, Any]], meta: dict[str, Any],
                   partial: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a resumable checkpoint ``at`` a position holds. Inside an epoch, ``partial`` is what the epoch's
    metrics row needs of its steps so far (their summed losses, seconds and teacher forwards)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": at.epoch, "step": at.step,
            "objective": objective, "rng": torch.get_rng_state(), "metrics": metrics,
            **({"partial": partial} if at.step else {}), **meta}


def load_training(url: str, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """Restore model and optimiser from ``url``; refuses a checkpoint of another cache, bank or model.

    Returns the checkpoint (``epoch``, ``objective``, ``metrics``, ...) for the caller to restore the
    rest. The RNG state is restored here too.
    """
    state = load(url)
    for key in ("cache_fingerprint", "cache_revision", "bank_fingerprint", "teacher_sha256", "dim", "arch"):
        if key in meta and state.get(key) != meta[key]:
            raise SeedError(f"{url}: cannot resume, {key} differs (checkpoint {state.get(key)!r}, now {meta[key]!r})")
    if "against" in meta and "against" in state and state["against"] != meta["against"]:  # (older ones have none)
        from seed.cache import diff_fields

        raise SeedError(f"{url}: cannot resume, it was trained against something else: "
                        f"{'; '.join(diff_fields(state['against'], meta['against'], 'checkpoint'))}")
    load_weights(model, state["model"], url, "the model it resumes")
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    return state


def load_weights(model: torch.nn.Module, weights: Any, url: str, what: str) -> None:
    """``model.load_state_dict(weights)``, a mismatch said in one line naming ``url``, ``what`` the checkpoint says
    it holds and the first keys missing, unexpected or of another shape (a checkpoint edited by hand, another
    model's, or a timm release that renamed its parameters)."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes differ: torch names them in its message, one line per parameter
        found = re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from "
                           r"checkpoint, the shape in current model is torch.Size\((\[[^\]]*\])\)", str(exc))
        shapes = [f"{name} is {a} in the file, {b} in the model" for name, a, b in found[:2]]
        raise SeedError(f"{url}: its weights do not fit {what}: "
                        + ("; ".join(shapes) + (f" (and {len(found) - 2} more of another shape)" if len(found) > 2 else "")
                           if found else str(exc).splitlines()[0])) from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{len(keys)} {kind} (first: {keys[0]})" for kind, keys in
                 (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise SeedError(f"{url}: its weights do not fit {what}: parameters {', '.join(parts)}")


def load_student(url: str) -> tuple[Encoder, dict[str, Any]]:
    """The frozen student encoder saved at ``url`` by the student stage, and the checkpoint's contents."""
    state = load(url)
    try:
        arch, dim, small = state["arch"], int(state["dim"]), bool(state.get("small_input", False))
        weights = state["model"]
    except (KeyError, TypeError, ValueError) as exc:
        raise SeedError(f"{url}: not a student checkpoint of this project (no valid {exc} entry)") from None
    model = mlp_encoder(arch, dim, small_input=small)
    load_weights(model, weights, url, f"a {arch} student with a head of dim {dim}")
    freeze(model)
    return model, state
