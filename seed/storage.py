"""Where things live and how small files are read and written, on local paths or fsspec URLs.

Roots come from ``storage.yaml``: local paths (relative ones resolve against the directory of
``storage.yaml``) or fsspec URLs such as ``s3://bucket/seed``. A URL root may carry fsspec
``storage_options`` (``{url: s3://bucket/caches, storage_options: {client_kwargs: {endpoint_url: ...}}}``):
profile, endpoint, ``anon`` and the like. Credentials never go here (a key that looks like one is
refused): fsspec reads them from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ...).

**How the options reach every reader and writer.** Making a ``Storage`` makes its options the ones in
force in this process (``activate``): the helpers here (``filesystem``, ``open_url``, ``write_bytes``,
``read_json``, ``exists``) pass the options of the root a URL lies under (``options_for``), and the
options are also installed as fsspec's per-protocol defaults (``fsspec.config.conf``), so code that
opens URLs itself (``zarr.open_group(url)``, ``fsspec.open(url)``) gets them without a change. Because
fsspec applies those defaults per protocol, not per path, roots on one protocol must agree on their
options; ``storage.yaml`` saying otherwise is refused.

The path rules every stage shares are methods of ``Storage``: a cache is
``<caches>/<cache.name>.zarr``, a run is ``<runs>/<train.run>/`` with one sub-directory per student,
a made teacher is ``<runs>/<pretrain.name>/teacher.pth``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from urllib.parse import urlsplit
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import yaml

from seed.errors import SeedError

ROOTS = ("shards", "caches", "runs", "reports")


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    return path.removeprefix("file://")


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


# Option names that hold a credential (s3fs key/secret/token, gcsfs token, adlfs account_key, sas_token,
# connection_string, client_secret, ...): refused in storage.yaml, which is shared and committed.
_SECRET_WORDS = {"key", "secret", "token", "password", "passwd", "credential", "credentials", "connection", "auth",
                 "authorization", "apikey", "passphrase"}
_SECRET_PARTS = ("secret", "password", "token", "apikey", "passphrase", "authorization")  # inside a longer name too
# gcsfs's ``token`` also names an access mode, which is no secret.
_TOKEN_MODES = {"anon", "google_default", "cloud", "browser", "cache"}


def _secret_option(options: Mapping[str, Any], prefix: str = "") -> str | None:
    """The dotted name of the first option (at any depth) that looks like a secret, or None."""
    for name, value in options.items():
        words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
        if str(name).lower() == "token" and value in _TOKEN_MODES:
            continue
        if words & _SECRET_WORDS or any(w in str(name).lower() for w in _SECRET_PARTS):
            return f"{prefix}{name}"
        if isinstance(value, Mapping):
            inner = _secret_option(value, f"{prefix}{name}.")
            if inner:
                return inner
    return None


def protocol(url: str) -> str:
    """The fsspec protocol of a URL (``s3`` for ``s3://b/k``; ``file`` for local paths)."""
    return url.split("://", 1)[0] if is_url(url) else "file"


def check_protocol(url: str, where: str, *, installed: bool = True) -> None:
    """Refuse a URL whose protocol fsspec does not know, in one line naming ``where`` it was given, and (with
    ``installed``, where the URL is about to be used) one whose package is not installed (``gs://`` without
    gcsfs). storage.yaml's roots are checked for the first when the file is read, for both when one is used."""
    if not is_url(url):
        return
    for part in url.split("::"):  # a chained URL: simplecache::s3://bucket/key
        name = part.split("://", 1)[0]
        try:
            fsspec.get_filesystem_class(name)
        except ImportError as exc:
            if installed:
                raise SeedError(f"{where}: {url}: the {name}:// protocol needs a package that is not installed "
                                f"({exc})") from None
        except ValueError:
            raise SeedError(f"{where}: {url}: unknown protocol {name}:// (expected a path, or a URL fsspec knows: "
                            "s3://, gs://, az://, memory://, file://, ...)") from None


def check_options(roots: Mapping[str, str], options: Mapping[str, Any], where: str) -> None:
    """Refuse storage options fsspec could not apply as written, or that hold a secret (one line, naming the root)."""
    for name, url in roots.items():
        if is_url(url) and urlsplit(url).password is not None:
            raise SeedError(f"{where}: the {name} root's URL holds a password; secrets never go in storage.yaml: give "
                            "credentials through the environment")
        check_protocol(url, f"{where}: root {name}", installed=False)
    for name, opts in options.items():
        if name not in ROOTS:
            raise SeedError(f"{where}: storage_options for unknown root {name!r} (known: {', '.join(ROOTS)})")
        if not isinstance(opts, Mapping):
            raise SeedError(f"{where}: {name}.storage_options must be a mapping, got {type(opts).__name__}")
        secret = _secret_option(opts)
        if secret:
            raise SeedError(f"{where}: {name}.storage_options.{secret} looks like a secret; secrets never go in "
                            "storage.yaml: give credentials through the environment (AWS_ACCESS_KEY_ID, "
                            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...)")
        if opts and not is_url(roots[name]):
            raise SeedError(f"{where}: {name} is a local path ({roots[name]}); storage_options apply to URL roots only")
    by_protocol: dict[str, tuple[str, Any]] = {}
    for name in ROOTS:
        if name not in roots or not is_url(roots[name]):
            continue
        opts = dict(options.get(name) or {})
        seen = by_protocol.setdefault(protocol(roots[name]), (name, opts))
        if seen[1] != opts:
            raise SeedError(f"{where}: roots {seen[0]} and {name} are both {protocol(roots[name])}:// URLs with different "
                            "storage_options; fsspec and zarr take options per protocol, so give them the same ones")


@dataclasses.dataclass(frozen=True)
class Storage:
    """The four roots and, per URL root, its fsspec ``storage_options`` (never credentials).

    Making one (or unpickling one, in a worker process) makes its options the ones in force in this
    process: see ``activate``.
    """

    shards: str
    caches: str
    runs: str
    reports: str
    storage_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        check_options(self._roots(), self.storage_options, "storage")
        activate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        activate(self)

    def _roots(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in ROOTS}

    def options_for(self, url: str) -> dict[str, Any]:
        """The storage options of the root ``url`` lies under (the longest matching root), else ``{}``."""
        best, opts = -1, {}
        for name in ROOTS:
            root = getattr(self, name).rstrip("/")
            if (url == root or url.startswith(root + "/")) and len(root) > best:
                best, opts = len(root), dict(self.storage_options.get(name) or {})
        return opts

    def resolve(self, root: str, path: str) -> str:
        """``path`` under the named root, unless it is already absolute or a URL."""
        if root not in ROOTS:
            raise SeedError(f"unknown storage root {root!r} (known: {', '.join(ROOTS)})")
        if is_url(path) or os.path.isabs(local_path(path)):
            return path
        check_protocol(getattr(self, root), f"storage root {root}")  # its package, now that it is used
        return join(getattr(self, root), path)

    def cache_url(self, name: str) -> str:
        """The teacher cache (a Zarr group) named ``name`` (``cache.name``)."""
        return self.resolve("caches", f"{name}.zarr")

    def run_dir(self, run: str) -> str:
        """The directory of a student run (``train.run``): config, report, one sub-directory per student."""
        return self.resolve("runs", run)

    def student_checkpoint(self, run: str, student: str) -> str:
        return join(self.run_dir(run), student, "checkpoint.pt")

    def teacher_scores(self, cache_name: str) -> str:
        """The teacher's evaluation scores, kept so a student-only re-run never loads the teacher."""
        return self.resolve("reports", f"{cache_name}-teacher-eval.json")

    def pretrained_teacher(self, name: str) -> str:
        """The teacher checkpoint made by pre-training run ``name`` (``pretrain.name``)."""
        return join(self.resolve("runs", name), "teacher.pth")

    def shard_lengths_record(self) -> str:
        """Samples per shard as counted once (``seed.shards.shard_lengths``), for shards without ``_info.json``.

        Under ``caches``: writable by every stage and shared by every process of this storage, where
        the shards themselves may be read-only.
        """
        return self.resolve("caches", "_shard_lengths.json")


_active: Storage | None = None
_MISSING = object()
_installed: dict[str, Any] = {}  # protocol -> fsspec's default before we installed ours (or _MISSING)


def activate(storage: Storage | None) -> None:
    """Make ``storage``'s options the ones in force in this process (None: none).

    Sets the registry ``options_for`` consults and installs the options as fsspec's defaults for
    their protocol (``fsspec.config.conf``; explicit arguments still win), restoring whatever
    defaults the previous active storage had replaced.
    """
    global _active
    import fsspec.config

    for proto, before in _installed.items():
        if before is _MISSING:
            fsspec.config.conf.pop(proto, None)
        else:
            fsspec.config.conf[proto] = before
    _installed.clear()
    _active = storage
    if storage is None:
        return
    for name in ROOTS:
        url, opts = getattr(storage, name), storage.storage_options.get(name)
        if opts and is_url(url) and protocol(url) not in _installed:
            proto = protocol(url)
            _installed[proto] = fsspec.config.conf.get(proto, _MISSING)
            fsspec.config.conf[proto] = {**fsspec.config.conf.get(proto, {}), **opts}


def active() -> Storage | None:
    """The storage whose options are in force (the last one made or unpickled), if any."""
    return _active


def options_for(url: str) -> dict[str, Any]:
    """The storage options of the active storage's root that ``url`` lies under, else ``{}``."""
    return _active.options_for(url) if _active is not None else {}


def filesystem(url: str) -> tuple[Any, str]:
    """``(fs, path)`` for a local path or URL, with its root's storage options."""
    from fsspec.core import url_to_fs

    return url_to_fs(url, **options_for(url))


def open_url(url: str, mode: str = "rb") -> Any:
    """``fsspec.open`` with the storage options of the root ``url`` lies under."""
    return fsspec.open(url, mode, **options_for(url))


def umask() -> int:
    """This process's file-creation mask, read from /proc on Linux (``os.umask`` can only read it by
    setting it, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | Path, directory: bool = False) -> None:
    """Give a file or directory made private by ``tempfile`` the mode a plain create would have given it
    (0666 or 0777 less the umask), so a team sharing a runs or caches directory can read what it holds."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole file to a local path or URL, creating its directory, so that ``url`` holds the old file
    or the new one, never part of one: one PUT on object stores; on a file system, a hidden temporary
    file beside it renamed over it (a full disk or a kill mid-write leaves the old file)."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{parent}/.{path.rsplit('/', 1)[-1]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # one per writer
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        sync_path(tmp)  # on the disk before the rename: a host crash must not leave an empty file in place
        fs.mv(tmp, path)
        sync_path(parent)  # and the rename itself
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def sync_path(path: str) -> None:
    """fsync a local file or directory (a directory: so that a rename in it survives a host crash), where the
    file system allows it; one that refuses leaves it as durable as it makes it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(url: str) -> Any:
    """The JSON document at ``url``, or None when there is none."""
    try:
        with open_url(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as exc:  # JSONDecodeError, or bytes that are no text
        raise SeedError(f"{url}: not valid JSON ({exc}); the file is damaged or half-written") from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def load_yaml(path: str | Path, kind: str) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is ``{}``); a clear error naming the file otherwise.

    ``kind`` names the file in messages: ``config file not found: run.yaml``.
    """
    p = Path(path)
    if not p.exists():
        raise SeedError(f"{kind} file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SeedError(yaml_problem(exc, str(p))) from None
    if not isinstance(data, dict):
        raise SeedError(f"{p}: expected a mapping at the top level of the {kind} file, got {type(data).__name__}")
    return data


def yaml_problem(exc: yaml.YAMLError, where: str) -> str:
    """A YAML parse error in one line: ``file:line:column: not valid YAML: problem``."""
    mark = getattr(exc, "problem_mark", None)
    place = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
    problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
    return f"{place}: not valid YAML: {problem}"


def find_storage_file(explicit: str | None = None) -> Path | None:
    """``explicit``, else ``$SEED_STORAGE``, else ``./storage.yaml``, else None (built-in defaults)."""
    for candidate in (explicit, os.environ.get("SEED_STORAGE"), "storage.yaml"):
        if candidate:
            p = Path(candidate)
            if p.exists():
                return p.absolute()
            if candidate is not None and candidate != "storage.yaml":
                raise SeedError(f"storage file not found: {p}")
    return None


def _root(value: Any, name: str, path: Path | None) -> tuple[Any, Any]:
    """A root entry of storage.yaml, ``"URL"`` or ``{url: URL, storage_options: {...}}``, as (url, options)."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"url", "storage_options"}
        if unknown:
            raise SeedError(f"{path}: storage root {name} has unknown key(s) {sorted(unknown)} (known: url, storage_options)")
        return value.get("url"), value.get("storage_options") or {}
    return value, {}


def load_storage(explicit: str | None = None) -> Storage:
    """The roots of ``storage.yaml`` (see ``find_storage_file``); each a path or URL string, or
    ``{url, storage_options}``. A top-level ``storage_options: {root: {...}}`` is read too: it is how
    ``dataclasses.asdict(storage)`` writes them for a process this one starts."""
    path = find_storage_file(explicit)
    base = path.parent if path else Path.cwd()
    data = load_yaml(path, "storage") if path is not None else {}
    unknown = set(data) - set(ROOTS) - {"storage_options"}
    if unknown:
        raise SeedError(f"{path}: unknown storage root(s) {sorted(unknown)} (known: {', '.join(ROOTS)})")
    top = data.get("storage_options") or {}
    if not isinstance(top, Mapping):
        raise SeedError(f"{path}: storage_options must map root names to options, got {type(top).__name__}")
    roots, options = {}, {}
    for name in ROOTS:
        value, opts = _root(data.get(name, f"data/{name}"), name, path)
        if not isinstance(value, str) or not value:
            raise SeedError(f"{path}: storage root {name} must be a path or URL string, got {value!r}")
        if opts and top.get(name):
            raise SeedError(f"{path}: storage_options for {name} given twice (in the root and at the top level)")
        if opts or top.get(name):
            options[name] = opts or top[name]
        if not is_url(value):  # a path (file:// taken off), relative ones to the storage file's directory
            value = local_path(value)
            value = value if os.path.isabs(value) else str((base / value).resolve())
        roots[name] = value
    check_options(roots, {**{k: v for k, v in top.items() if k not in options}, **options}, str(path))
    return Storage(**roots, storage_options=options)
