"""Webdataset tar shards: read any standard shard, write Fashion-MNIST and image-folder trees as shards.

Reading accepts what other tools write (ImageNet as commonly packed): per sample ``KEY.jpg``
(``.jpeg``, ``.png``, ``.webp``) and optionally ``KEY.cls`` (integer as text) or ``KEY.json``
(with a ``label``/``cls``/``class``/``target`` field); samples without a label get -1. Shards are local paths,
brace patterns (``shard-{000..009}.tar``), globs, ``::``-joined lists or any fsspec URL.

Samples come in tar order, which fixes each sample's row in the cache; an image that does not
decode is reported by ``decode_image`` and skipped by the caller; the teacher stage records it
(key and reason) in the cache.
"""

from __future__ import annotations

import bz2
import collections
import dataclasses
import functools
import gzip
import io
import json
import logging
import lzma
import os
import re
import shutil
import socket
import struct
import tarfile
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from pathlib import Path

import braceexpand
import fsspec
import numpy as np
import torch
from PIL import Image
from webdataset import tariterators

from seed.errors import MachineError, SeedError, machine_failure
from seed.storage import as_if_created, filesystem, is_url, write_bytes

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INFO_FILE = "_info.json"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    """One raw sample of a shard: the encoded image bytes, its label and where it came from."""

    key: str
    image: bytes | memoryview | None  # None when the sample has no image member (a view: seed.workers.PackedSamples)
    ext: str
    label: int
    url: str
    index: int  # position in the shard, the sample's row offset in the cache


def expand_urls(spec: str | Iterable[str]) -> list[str]:
    """Expand brace patterns, globs and ``::`` lists into a sorted list of shard URLs."""
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for part in parts:
        try:
            expanded = list(braceexpand.braceexpand(part))
        except ValueError as exc:  # braceexpand.UnbalancedBracesError
            raise SeedError(f"shard pattern {part!r}: {exc}; expected balanced braces, e.g. "
                            "train-{000000..000099}.tar") from None
        for url in expanded:
            if any(c in url for c in "*?["):
                fs, _, paths = fsspec.get_fs_token_paths(url)
                matches = sorted(paths)
                if not matches:
                    raise SeedError(f"no shards match {url!r}")
                protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
                urls += [p if protocol == "file" else f"{protocol}://{p}" for p in matches]
            else:
                urls.append(url)
    if not urls:
        raise SeedError(f"no shards given in {spec!r}")
    return urls


def _label(fields: dict[str, bytes]) -> int:
    if "cls" in fields:
        return int(fields["cls"].decode("utf-8").strip())
    if "json" in fields:
        meta = json.loads(fields["json"])
        for name in ("label", "cls", "class", "target"):
            if not isinstance(meta, dict) or name not in meta:
                continue
            value = meta[name]  # a class index: 3, 3.0 or "3"; anything else is a label that cannot be read
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ValueError(f"json {name}={value!r} is not a class index")
    return -1


class DamagedShard(SeedError):
    """A tar shard that is cut short, has a header that does not parse, or has data after its end.

    ``offset``: the byte where the damage was found; ``member``: the last member read whole before it.
    """

    def __init__(self, message: str, *, url: str, offset: int, member: str | None):
        super().__init__(message)
        self.url, self.offset, self.member = url, offset, member

    def __reduce__(self) -> tuple[Any, ...]:  # crosses from DataLoader workers whole
        return _damaged_shard, (str(self), self.url, self.offset, self.member)


def _damaged_shard(message: str, url: str, offset: int, member: str | None) -> DamagedShard:
    return DamagedShard(message, url=url, offset=offset, member=member)


Damaged = Literal["stop", "keep"]
"""What a reader does at a damaged shard (``data.damaged``): ``stop`` raises ``DamagedShard``; ``keep`` keeps
the samples read before the damage, and the stage records the shard as damaged with what was lost."""

OnDamage = Callable[[DamagedShard], None]


def damage_handler(policy: Damaged, seen: list[DamagedShard] | None = None) -> OnDamage | None:
    """The ``on_damage`` argument of ``iter_shard`` for a policy: None (raise) for ``stop``; for ``keep``, log
    a warning and append the damage to ``seen`` (so the stage can report it)."""
    if policy == "stop":
        return None

    def keep(exc: DamagedShard) -> None:
        log.warning("%s (data.damaged=keep: the samples before byte %d are kept, the rest is lost)", exc, exc.offset)
        if seen is not None:
            seen.append(exc)

    return keep


_HOW_TO_PROCEED = ("copy the shard again, leave it out of data.train, or set data.damaged=keep to keep the samples "
                   "before the damage and record the shard as damaged")


class _Tracked:
    """A read-only stream that counts the bytes it hands out and keeps at least the last ``keep`` of them
    (whole reads, dropped oldest first: no copy per read), so that the end of a tar can be checked
    after ``tarfile`` has stopped reading it."""

    def __init__(self, raw: Any, keep: int):
        self.raw, self.keep, self.pos = raw, keep, 0
        self.recent: collections.deque[bytes] = collections.deque()
        self.kept = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.pos += len(data)
        if data:
            self.recent.append(data)
            self.kept += len(data)
            while self.kept - len(self.recent[0]) >= self.keep:
                self.kept -= len(self.recent.popleft())
        return data

    @property
    def tail(self) -> bytes:
        return b"".join(self.recent)


def _tar_members(stream: Any, url: str, skip: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The regular files of a tar (``fname``, ``data``, ``__url__``) in order, read as a stream, with a
    check that webdataset's reader and ``tarfile`` leave out: the archive must end with its end
    marker (zero blocks) and nothing else.

    ``tarfile`` in stream mode ends silently at a header cut short or one that does not parse, and at
    the end of the input; a shard truncated by a failed copy would then look complete with fewer
    samples. Raises ``DamagedShard`` naming the shard, the byte offset and what was found there.

    A compressed tar (gzip, bzip2, xz) is decompressed as it is read and then read as an uncompressed one, end
    check included: a tar cut short inside a compressed stream that was finished around it (``tar c | gzip``
    with tar killed) is damage like any other. A compressed stream cut short raises ``EOFError``.

    ``skip``: members whose data is not wanted (by name): given as ``None``, and in an uncompressed tar on a
    seekable stream seeked over instead of read, with the same checks for an archive cut short (where the rest
    of a tar goes to ``tarfile``, at GNU long names, global pax headers or sparse files, they are read and given).
    """
    stream = _Exact(stream, seek=skip is not None)
    first = stream.read(tarfile.BLOCKSIZE)
    for magic, unpack in _COMPRESSED.items():
        if first.startswith(magic):
            stream = _Exact(unpack(_Prefixed(first, stream)))
            first = stream.read(tarfile.BLOCKSIZE)
            break
    yield from _plain_members(first, stream, url, skip)


class _Exact:
    """A stream whose ``read(n)`` returns n bytes unless the stream ends first: the reader takes a short read
    for a cut, where some streams (fsspec's HTTP stream, decompressors) return what they have at hand.
    ``seek``: ``skip`` moves over data without reading it where the stream can seek and tell its size."""

    def __init__(self, raw: Any, seek: bool = False):
        self.raw, self.size, self.pos = raw, None, 0
        if seek and getattr(raw, "seekable", lambda: False)():
            try:
                self.pos = raw.tell()
                self.size = raw.seek(0, io.SEEK_END)
                raw.seek(self.pos)
            except (OSError, ValueError):
                self.size = None

    def skip(self, size: int) -> int:
        """Move ``size`` bytes on (fewer where the stream ends first); the bytes moved over. A negative size (a
        crafted header's base-256 size) is refused as ``read`` refuses it, instead of moving back."""
        if size < 0:
            raise ValueError(f"read length must be non-negative or -1, got {size}")
        if self.size is None:
            return len(self.read(size))
        to = min(self.pos + size, self.size)
        self.raw.seek(to)
        moved, self.pos = to - self.pos, to
        return moved

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if not (size < 0 or len(data) >= size or not data):
            parts = [data]
            got = len(data)
            while got < size and (more := self.raw.read(size - got)):
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        return data


_COMPRESSED: dict[bytes, Callable[[Any], Any]] = {  # what tarfile's "r|*" unpacks
    b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f, mode="rb"), b"BZh": bz2.BZ2File, b"\xfd7zXZ\x00": lzma.LZMAFile}
_OCTAL = re.compile(rb" *([0-7]*) *(?:\0.*)?", re.S)  # a number field as tar writers write it
_NUMBERS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))  # mode .. mtime, devices
_SIZE = 3                                               # its index in _NUMBERS
_EXTENDED = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE, tarfile.XHDTYPE,
                       tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})
_PAX = frozenset({tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE})          # a pax header for the next member alone
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")                           # tarfile's own patterns
_PAX_CHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")


class _Prefixed:
    """A stream with ``head`` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, raw: Any):
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + self.raw.read(size - len(data)) if len(data) < size else data


def _header(block: bytes) -> tuple[str, int, bytes]:
    """(name, size, type) of a tar header block, as ``tarfile.TarInfo.frombuf`` reads it, raising what it
    raises (``tarfile.HeaderError``). Headers whose numbers are plain octal (what tar writers write) and whose
    checksum is the usual unsigned one are read here, in a few microseconds; any other goes to ``frombuf``,
    which takes three times as long."""
    if len(block) == tarfile.BLOCKSIZE and block.count(0) != tarfile.BLOCKSIZE:
        numbers = [_OCTAL.fullmatch(block, a, z) for a, z in _NUMBERS]
        chksum = _OCTAL.fullmatch(block, 148, 156)
        size = numbers[_SIZE]
        if all(numbers) and size and chksum and int(chksum[1] or b"0", 8) == 256 + sum(block) - sum(block[148:156]):
            kind = block[156:157]
            name = block[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
            prefix = block[345:500].split(b"\0", 1)[0]
            if kind == tarfile.AREGTYPE and name.endswith("/"):
                kind = tarfile.DIRTYPE                                        # an old V7 directory
            if kind == tarfile.DIRTYPE:
                name = name.rstrip("/")
            if prefix and kind not in tarfile.GNU_TYPES:
                name = prefix.decode(tarfile.ENCODING, "surrogateescape") + "/" + name
            return name, int(size[1] or b"0", 8), kind
    info = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    return info.name, info.size, info.type


def _plain_members(block: bytes, stream: Any, url: str, skip: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """``_tar_members`` of an uncompressed tar whose first block is ``block``: headers read by ``_header``,
    members read and skipped as ``tarfile`` does in stream mode (regular files and unknown types have data,
    directories, links and devices none), stopping where it stops; a pax header's ``path`` and ``size``
    apply to the member after it (``_pax_member``). GNU long names, global pax headers, sparse files and
    anything ``_pax_member`` leaves hand the rest of the archive to ``tarfile``. About three times faster
    than ``tarfile`` alone, which parses every header field in Python. ``skip``: as ``_tar_members``."""
    pos, last = 0, None                                                       # last: (name, header offset)
    while True:
        try:
            name, size, kind = _header(block)
        except tarfile.HeaderError as exc:
            if pos == 0 and block.count(0) != tarfile.BLOCKSIZE:  # not a tar: what opening it with tarfile raises
                raise tarfile.ReadError(str(exc) if block else "empty file") from None
            break                                                  # (a zero block first: an empty tar)
        head = tarfile.BLOCKSIZE                                   # header bytes before the member's data
        if kind in _PAX:
            pax = _pax_member(block, size, stream)
            if isinstance(pax, bytes):
                yield from _tarfile_members(_Prefixed(pax, stream), url, base=pos, before=last)
                return
            name, size, kind, head = pax
        elif kind in _EXTENDED:
            yield from _tarfile_members(_Prefixed(block, stream), url, base=pos, before=last)
            return
        last = (name, pos)
        regular = kind in tarfile.REGULAR_TYPES
        padded = _blocks(size) if regular or kind not in tarfile.SUPPORTED_TYPES else 0
        want = size if regular else padded
        data: bytes | None = None
        if regular and skip is not None and skip(name):
            got = stream.skip(size)
        else:
            data = stream.read(want)
            got = len(data)
        if got < want:
            raise _cut(url, name, pos)
        if regular:
            if not _metadata(name):
                yield {"fname": name, "data": data, "__url__": url}
            if padded > size and stream.skip(padded - size) < padded - size:
                raise _cut(url, name, pos)
        pos += head + padded
        block = stream.read(tarfile.BLOCKSIZE)
    _check_end(stream, url, pos, block, last[0] if last else None)


def _pax_member(block: bytes, size: int, stream: Any) -> tuple[str, int, bytes, int] | bytes:
    """The member a pax header (``block``, its records ``size`` bytes) describes: (name, size, type, header
    bytes), with the records' ``path`` and ``size`` applied as ``tarfile`` applies them.

    webdataset's writer puts one before every member (a float mtime does not fit the plain header).
    Records ``tarfile`` would read differently (a character set, GNU sparse files, undecodable text, a
    zero length), records or a next header cut short or damaged, and a next header that is itself an
    extension are left to ``tarfile``: then the bytes read so far are returned, to be handed over with it.
    """
    padded = _blocks(size)
    records = stream.read(padded)
    consumed = block + records
    if len(records) < padded:
        return consumed
    following = stream.read(tarfile.BLOCKSIZE)
    consumed += following
    try:
        name, size, kind = _header(following)
    except tarfile.HeaderError:
        return consumed
    if kind in _EXTENDED or _PAX_CHARSET.search(records):
        return consumed
    at = 0
    while (match := _PAX_RECORD.match(records, at)) is not None:
        length = int(match[1])
        if length == 0:
            return consumed
        try:
            keyword = match[2].decode("utf-8")
            value = records[match.end(2) + 1:match.start(1) + length - 1].decode("utf-8")
        except UnicodeDecodeError:
            return consumed
        if keyword.startswith("GNU.sparse."):
            return consumed
        if keyword == "path":
            name = value.rstrip("/")
        elif keyword == "size":
            try:
                size = int(value)
            except ValueError:
                size = 0                                                      # as tarfile does
        at += length
    return name, size, kind, tarfile.BLOCKSIZE + padded + tarfile.BLOCKSIZE


def _blocks(size: int) -> int:
    """Bytes that ``size`` bytes of member data take in a tar: whole blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _metadata(name: str) -> bool:
    """webdataset's metadata members (``__key__``-like names at the top level), which are not samples."""
    return "/" not in name and name.startswith("__") and name.endswith("__")


def _cut(url: str, name: str, offset: int) -> DamagedShard:
    return DamagedShard(f"{url}: damaged tar shard, unexpected end of data in member {name!r} (header at byte {offset}); "
                        f"{_HOW_TO_PROCEED}", url=url, offset=offset, member=None)


def _tarfile_members(stream: Any, url: str, base: int = 0,
                     before: tuple[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """``_tar_members`` by ``tarfile``: compressed tars, and the rest of a plain one from byte ``base``
    (where ``_plain_members`` met a header it leaves to ``tarfile``, after the member ``before``: its
    name and header offset)."""
    tracked = _Tracked(stream, keep=4 * tarfile.RECORDSIZE)
    member = None
    try:
        tf = tarfile.open(fileobj=tracked, mode="r|*")  # type: ignore[call-overload]
        for member in tf:
            if not member.isreg():
                continue
            data = tf.extractfile(member).read()
            if _metadata(member.name):
                continue
            yield {"fname": member.name, "data": data, "__url__": url}
            tf.members = []  # stream mode: do not keep every header
    except tarfile.ReadError as exc:
        last = (member.name, base + member.offset) if member is not None else before
        if last is None:
            raise                                                             # not a tar at all
        raise DamagedShard(f"{url}: damaged tar shard, {exc} in member {last[0]!r} (header at byte {last[1]}); "
                           f"{_HOW_TO_PROCEED}", url=url, offset=last[1], member=None) from exc
    if getattr(tf.fileobj, "comptype", "tar") != "tar":
        return  # compressed bytes given (``_tar_members`` decompresses first): their tail is not the tar's
    end = tf.offset                              # where tarfile looked for the next header and stopped
    tail = tracked.tail
    seen = tail[len(tail) - (tracked.pos - end):] if tracked.pos - end <= len(tail) else None
    _check_end(stream, url, base + end, seen, member.name if member is not None else before[0] if before else None)


def _check_end(stream: Any, url: str, end: int, seen: bytes | None, last: str | None) -> None:
    """What follows the last member, from byte ``end`` (``seen``: the bytes from there already read, None when
    unknown), must be the end marker: at least two zero blocks and nothing but zeros."""
    rest = b"".join(iter(lambda: stream.read(1 << 20), b""))
    after = (seen if seen is not None else b"x") + rest
    if len(after) < 2 * tarfile.BLOCKSIZE or after.strip(b"\0"):
        what = (f"it ends {len(after)} bytes after the last member instead of an end marker (cut short?)"
                if len(after) < 2 * tarfile.BLOCKSIZE and not after.strip(b"\0")
                else "what follows the last member read is neither a valid header nor the end marker "
                     "(a damaged header, or data after the end)")
        where = f"after member {last!r}" if last is not None else "at its start"
        raise DamagedShard(f"{url}: damaged tar shard at byte {end} {where}: {what}; {_HOW_TO_PROCEED}", url=url,
                           offset=end, member=last)


def _text_key(key: str) -> str:
    """A member name's key as text every stage stores and compares alike: names that are not UTF-8 (a Latin-1
    tar, say; read with surrogate escapes) get their odd bytes as ``\\xe9`` escapes, not lone surrogates that
    neither the cache's string arrays nor a hash can take."""
    if key.isascii():
        return key
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def iter_shard(url: str, on_damage: OnDamage | None = None, images: bool = True) -> Iterator[Sample]:
    """Samples of one tar shard in tar order. A damaged (truncated, corrupt) tar raises ``DamagedShard``
    naming it, unless ``on_damage`` is given (``damage_handler``): then the samples read whole before the
    damage are all there is, and ``on_damage`` is told. An unreadable one raises ``SeedError``. Never
    fewer samples in silence. ``images=False``: the samples without their image bytes (``image`` None), which
    in an uncompressed shard on a local file are seeked over, not read (counting, labels: a few KB a sample, about
    1/27 of the bytes at ImageNet sizes; an object store's reader fetches blocks of several MB anyway), with the
    same damage found."""
    try:
        with fsspec.open(url, "rb") as stream:
            members = _tar_members(stream, url, skip=None if images else _image_member)
            try:
                for index, fields in enumerate(tariterators.group_by_keys(members)):
                    key = _text_key(fields["__key__"])
                    ext = next((e for e in IMAGE_EXTS if e in fields), "")
                    try:
                        label = _label(fields)
                    except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                        raise SeedError(f"{url}: sample {key!r} has an unreadable label ({exc})") from exc
                    yield Sample(key, fields.get(ext) if ext else None, ext, label, url, index)
            except DamagedShard as exc:
                if on_damage is None:
                    raise
                on_damage(exc)
    except FileNotFoundError as exc:
        raise SeedError(f"shard not found: {url}") from exc
    except ValueError as exc:
        if "duplicate file name" not in str(exc):
            raise SeedError(f"{url}: not a readable tar shard (ValueError: {exc})") from exc
        member = str(exc.args[0]).split(":", 1)[0].strip("('\" ")
        raise SeedError(f"{url}: member {member!r} appears twice in one sample (the same key twice in a row); "
                        "each sample's members must appear once, together") from exc
    except OSError as exc:
        if machine_failure(exc):
            raise MachineError(f"{url}: reading the shard failed ({type(exc).__name__}: {exc}): the storage or the "
                               "network failed, not the shard; a re-run reads it again") from exc
        raise SeedError(f"{url}: not a readable tar shard ({type(exc).__name__}: {exc})") from exc
    except (tarfile.TarError, EOFError) as exc:
        raise SeedError(f"{url}: not a readable tar shard ({type(exc).__name__}: {exc})") from exc


def _image_member(name: str) -> bool:
    """Whether a member holds a sample's image (its extension, as webdataset's grouping splits and lowercases it)."""
    ext = tariterators.base_plus_ext(name)[1]
    return ext is not None and ext.lower() in IMAGE_EXTS


MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 9,459 x 9,459): larger headers are refused


def _check_header(sample: Sample, im: Image.Image) -> None:
    w, h = im.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"{sample.ext} header claims {w} x {h} = {w * h:,} pixels, over the limit of {MAX_PIXELS:,} "
                         "(a decompression bomb, or an image to downscale before sharding)")


def _open(sample: Sample) -> Image.Image:
    if sample.image is None:
        raise ValueError(f"no image member (expected one of {', '.join('.' + e for e in IMAGE_EXTS)})")
    if not sample.image:
        raise ValueError(f"empty {sample.ext} member (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is stricter
            im = Image.open(io.BytesIO(sample.image))
    except Image.DecompressionBombError as exc:  # PIL's hard limit, at twice ours
        pixels = next((int(x) for x in str(exc).replace("(", " ").split() if x.isdigit()), 0)
        raise ValueError(f"{sample.ext} header claims {pixels:,} pixels, over the limit of {MAX_PIXELS:,} "
                         "(a decompression bomb, or an image to downscale before sharding)") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"{sample.ext} does not decode: {type(exc).__name__}: {str(exc).split(' <')[0]}") from exc
    _check_header(sample, im)
    return im


# decode_image hands torch PIL's read-only pixel array, which it only reads (copied straight into the CHW tensor).
# Filtered once here, for this module only: warnings.catch_warnings around each call would cost every image and
# is not thread-safe (images are decoded in a background thread).
_READ_ONLY = "The given NumPy array is not writable"
warnings.filterwarnings("ignore", message=_READ_ONLY, category=UserWarning, module=__name__)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes | memoryview) -> tuple[int, int, int, int] | None:
    """(height, width, bit depth, colour type) of a PNG's header chunk, when ``data`` starts with one that is
    whole (its checksum right) and within ``MAX_PIXELS``; else None (PIL then reads it, or names the fault)."""
    if len(data) < 33 or bytes(data[:8]) != _PNG_SIGNATURE or bytes(data[8:16]) != b"\0\0\0\rIHDR":
        return None
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if struct.unpack_from(">I", data, 29)[0] != zlib.crc32(data[12:29]) or not 0 < width * height <= MAX_PIXELS:
        return None
    return height, width, depth, colour


def _plain_png(data: bytes | memoryview) -> bool:
    """Whether ``data`` is a PNG whose pixels libpng (torchvision's ``decode_png``) gives exactly as PIL does: 8 bits
    per channel, greyscale or RGB, no transparency chunk, within ``MAX_PIXELS`` (the chunk headers up to the
    first image data are read; nothing is decoded). Palette, alpha, 16-bit and everything else go to PIL."""
    header = _png_header(data)
    if header is None or header[2] != 8 or header[3] not in (0, 2):
        return False
    pos = 33
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"tRNS":
            return False
        elif kind == b"IDAT":
            return True
        pos += 12 + length
    return False


@functools.cache
def _libpng() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision's ``decode_png`` to RGB; None without it (torchvision 0.29 deprecated its image decoders in
    favour of TorchCodec: once they are gone, every PNG goes to PIL, with the same pixels)."""
    try:
        from torchvision.io import ImageReadMode, decode_png
    except ImportError:
        return None
    return functools.partial(decode_png, mode=ImageReadMode.RGB)


def decode_image(sample: Sample) -> torch.Tensor:
    """Decode to a uint8 ``[3, h, w]`` tensor. Grayscale, palette and CMYK sources become RGB by PIL's
    conversion, alpha is dropped (as PIL's ``convert("RGB")`` and torchvision's loaders do), and 16-bit
    grayscale keeps its top 8 bits (PIL's conversion would clip it to white).

    Plain 8-bit greyscale and RGB PNGs (``_plain_png``: Fashion-MNIST's, for one) are decoded by libpng through
    torchvision, to the same pixels: 10 us for a 28 x 28 image where PIL's per-image overhead made it 48. Any
    other image, and one libpng refuses, goes to PIL.

    Raises ``ValueError`` naming the reason when the sample has no image, an empty one, one whose header
    claims more than ``MAX_PIXELS``, or one that does not decode.
    """
    libpng = _libpng()
    if libpng is not None and sample.image and _plain_png(sample.image):
        try:
            return libpng(torch.frombuffer(bytearray(sample.image), dtype=torch.uint8)).contiguous()
        except RuntimeError:
            pass  # PIL decodes it, or says what is wrong with it
    im = _open(sample)
    try:
        with im:
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                grey = (np.asarray(im).astype(np.uint32).clip(0, 65535) >> 8).astype(np.uint8)
                rgb = np.repeat(grey[..., None], 3, axis=2)
            else:
                rgb = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # (convert would copy an RGB image)
    except Exception as exc:  # PIL raises many types for corrupt data
        raise ValueError(f"{sample.ext} does not decode: {type(exc).__name__}: {str(exc).split(' <')[0]}") from exc
    out = torch.empty(3, rgb.shape[0], rgb.shape[1], dtype=torch.uint8)
    return out.copy_(torch.from_numpy(rgb).permute(2, 0, 1))  # read-only (see _READ_ONLY), copied once into CHW


def image_size(sample: Sample) -> tuple[int, int]:
    """(height, width) from the image header alone (no pixel is decoded); ``ValueError`` when unreadable,
    empty or over ``MAX_PIXELS``. A PNG's header chunk is read here (0.3 us for Fashion-MNIST's, 5-8 through
    PIL), any other image's by PIL."""
    header = _png_header(sample.image) if sample.image else None
    if header is not None:
        return header[0], header[1]
    with _open(sample) as im:
        w, h = im.size
    return h, w


def count_samples(url: str, on_damage: OnDamage | None = None) -> int:
    """Number of samples in a shard (scans the tar headers; images are neither read, where the store can seek
    over them, nor decoded)."""
    return sum(1 for _ in iter_shard(url, on_damage, images=False))


def shard_lengths(urls: list[str], record: str | None = None, damaged: Damaged = "stop") -> list[int]:
    """Samples per shard: from a ``_info.json`` beside the shards when it lists them, else by scanning.

    ``record`` (a JSON file, ``Storage.shard_lengths_record``) keeps the scanned counts keyed by shard
    URL and identity (size plus mtime, ETag or the like), so each shard is scanned once, not once per
    process; a shard whose identity changed is scanned again. ``damaged="keep"``: a damaged shard counts
    the samples before its damage, and that count is not recorded (every run finds the damage again).
    """
    lengths = lengths_from_info(urls)
    if lengths is not None:
        return lengths
    if record is None:
        return [count_samples(u, damage_handler(damaged)) for u in urls]
    return _recorded_lengths(urls, record, damaged)


RECORD_FORMAT = "seed-shard-lengths"
RECORD_VERSION = 1
# What changes when a file is rewritten (local mtime; object-store ETag, LastModified, generation)
_CHANGE_KEYS = ("mtime", "ETag", "etag", "LastModified", "last_modified", "generation", "updated",
                "VersionId", "version_id")
_SAVE_EVERY_S = 60.0  # a long first count keeps what it counted so far if it is interrupted


def _recorded_lengths(urls: list[str], record: str, damaged: Damaged) -> list[int]:
    known = _read_record(record)
    keys = [_canonical(u) for u in urls]
    idents = _identities(urls)  # taken before counting: a rewrite meanwhile only causes a recount
    lengths: list[int] = []
    new: dict[str, dict] = {}
    saved = time.monotonic()
    told = False
    for url, key, ident in zip(urls, keys, idents):
        entry = known.get(key)
        if ident is not None and entry is not None and entry["identity"] == ident:
            lengths.append(entry["samples"])
            continue
        if not told:  # the first shard counted here: said once
            told = True
            unknown = sum(1 for k, i in zip(keys, idents) if i is None or known.get(k, {}).get("identity") != i)
            log.info("counting the samples of %d shard(s) no _info.json lists (first: %s), once for this storage; "
                     "seed shards describe <their directory> writes one, after which no stage counts them", unknown, url)
        seen: list[DamagedShard] = []
        n = count_samples(url, damage_handler(damaged, seen))
        if entry is not None and entry["samples"] != n:
            log.warning("shard %s changed since it was counted: %d samples then, %d now", url, entry["samples"], n)
        lengths.append(n)
        if ident is not None and not seen:  # no identity, nothing to tell a rewrite by: not recorded
            new[key] = {"samples": n, "identity": ident}
            if time.monotonic() - saved > _SAVE_EVERY_S:
                _save_record(record, new)
                saved = time.monotonic()
    if new:
        _save_record(record, new)
    return lengths


def _canonical(url: str) -> str:
    """One key per file whichever way it was written (``/x/a.tar``, ``file:///x/a.tar``)."""
    fs, path = fsspec.core.url_to_fs(url)
    return str(fs.unstrip_protocol(path))


def _identity(entry: dict) -> dict[str, str | int] | None:
    """Size plus every change marker of a file's fsspec details; None when nothing would show a rewrite."""
    if entry.get("type", "file") != "file" or entry.get("size") is None:
        return None
    marks = {k: str(entry[k]) for k in _CHANGE_KEYS if entry.get(k) is not None}
    if not marks and entry.get("created") is not None:  # in-memory and similar filesystems: a rewrite recreates
        marks = {"created": str(entry["created"])}
    return {"size": int(entry["size"]), **marks} if marks else None


def _identities(urls: list[str]) -> list[dict[str, str | int] | None]:
    """Each shard's identity from one listing per directory (one request, not one per shard, on object stores)."""
    by_dir: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_dir.setdefault(url.rsplit("/", 1)[0], []).append(i)
    out: list[dict[str, str | int] | None] = [None] * len(urls)
    for indices in by_dir.values():
        fs, path = fsspec.core.url_to_fs(urls[indices[0]])
        fs.invalidate_cache(path.rsplit("/", 1)[0] or "/")  # a cached listing (s3fs) would keep a rewritten shard's old ETag
        try:
            listing = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e
                       for e in fs.ls(path.rsplit("/", 1)[0] or "/", detail=True)}
        except (OSError, ValueError, NotImplementedError):
            listing = {}  # e.g. HTTP without directory listings: ask per shard
        for i in indices:
            entry = listing.get(urls[i].rsplit("/", 1)[-1])
            if entry is None:
                try:
                    entry = fs.info(fsspec.core.url_to_fs(urls[i])[1])
                except (OSError, ValueError, NotImplementedError):
                    continue  # a missing shard: counting it names it
            out[i] = _identity(entry)
    return out


def _read_record(record: str) -> dict[str, dict]:
    """The record's valid entries; a missing, corrupt or foreign record is empty (shards get recounted)."""
    try:
        with fsspec.open(record, "r") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        log.warning("shard length record %s unreadable (%s); shards will be recounted", record, exc)
        return {}
    if not (isinstance(data, dict) and data.get("format") == RECORD_FORMAT
            and data.get("version") == RECORD_VERSION and isinstance(data.get("shards"), dict)):
        log.warning("shard length record %s is not a %s v%d record; shards will be recounted",
                    record, RECORD_FORMAT, RECORD_VERSION)
        return {}
    return {k: v for k, v in data["shards"].items()
            if isinstance(v, dict) and type(v.get("samples")) is int and isinstance(v.get("identity"), dict)}


def _save_record(record: str, new: dict[str, dict]) -> None:
    """Merge ``new`` into the record as it is now (others may have added shards) and replace it whole.

    Concurrent writers may drop each other's entries; that only costs a recount. A failed write is
    a warning: the counts are still right, only not kept.
    """
    data = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "shards": {**_read_record(record), **new}}
    try:
        write_bytes(record, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    except OSError as exc:
        log.warning("could not save shard lengths to %s (%s); they will be counted again next time", record, exc)


def _info_of(urls: list[str], above: bool = False) -> tuple[dict[str, Any], set[str]] | None:
    """The ``_info.json`` in the directory holding all of ``urls`` (``above``: in its parent, where
    ``seed shards`` writes the top-level one), and the shards' file names; None when the shards are in
    several directories or there is no such file."""
    if not urls:
        return None
    parent = urls[0].rsplit("/", 1)[0]
    if any(u.rsplit("/", 1)[0] != parent for u in urls) or (above and "/" not in parent):
        return None
    try:
        with fsspec.open(f"{parent.rsplit('/', 1)[0] if above else parent}/{INFO_FILE}", "r") as f:
            info = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, OSError):
        return None
    return info, {u.rsplit("/", 1)[-1] for u in urls}


def _splits_listing(urls: list[str]) -> list[dict[str, Any]] | None:
    """The splits of the ``_info.json`` beside ``urls`` that list them, when there is one listing them all,
    else None (no tar is opened)."""
    found = _info_of(urls)
    if found is None:
        return None
    info, names = found
    splits = [split for split in info.get("splits", {}).values() if names & set(split.get("filenames", []))]
    listed = set().union(*(split.get("filenames", []) for split in splits))
    return splits if names <= listed else None


def headers_read(urls: list[str]) -> bool:
    """Whether the ``_info.json`` beside ``urls`` lists them all in splits whose every image header read when they
    were written (``seed shards`` records it: it writes no sample whose header does not read)."""
    splits = _splits_listing(urls) or []
    return bool(splits) and all(split.get(HEADERS_READ) is True for split in splits)


def lengths_from_info(urls: list[str]) -> list[int] | None:
    """Samples per shard from the ``_info.json`` beside ``urls`` when there is one listing them all, else None
    (no tar is opened)."""
    splits = _splits_listing(urls)
    if splits is None:
        return None
    known: dict[str, int] = {}
    for split in splits:
        known.update(zip(split.get("filenames", []), split.get("shard_lengths", [])))
    names = [u.rsplit("/", 1)[-1] for u in urls]
    return [int(known[n]) for n in names] if all(n in known for n in names) else None


def classes_from_info(urls: list[str]) -> int | None:
    """The number of classes (largest label + 1) of the splits holding ``urls``, from the ``_info.json`` beside
    them when it records one for each (``seed shards`` writes it when every sample has a label), else None."""
    splits = _splits_listing(urls)
    if not splits or any("num_classes" not in split for split in splits):
        return None
    return max(int(split["num_classes"]) for split in splits)


def class_names(urls: list[str]) -> list[str] | None:
    """The class names, in label order, that ``seed shards imagefolder`` recorded for the shards ``urls``: the
    ``classes`` of the ``_info.json`` one level above their directory, when it lists them all; else None."""
    found = _info_of(urls, above=True)
    if found is None:
        return None
    info, names = found
    listed = set().union(*(split.get("filenames", []) for split in info.get("splits", {}).values()))
    classes = info.get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) and names <= listed else None


# ---------------------------------------------------------------------------------------------
# Describing shards made by other tools


_SHARD_FILE = re.compile(r".+\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)")  # what describe takes for a shard


class _Stopped(Exception):
    """A shard's reading given up: another one failed, or the user interrupted."""


def _described(url: str, stop: threading.Event) -> dict[str, Any]:
    """One shard read whole: its samples, those whose image header does not read (key and why), its labels."""
    n, unread, top, unlabelled = 0, [], -1, 0
    for sample in iter_shard(url):
        if stop.is_set():
            raise _Stopped
        n += 1
        try:
            image_size(sample)
        except ValueError as exc:
            unread.append({"key": sample.key, "reason": str(exc)})
        unlabelled += sample.label < 0
        top = max(top, sample.label)
    return {"samples": n, "unread": unread, "max_label": top, "unlabelled": unlabelled}


def _their_splits(info: Any, url: str) -> dict[str, dict[str, Any]]:
    """The splits of an existing ``_info.json``, checked for what describe reads of them."""
    entries = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(entries, dict):
        raise SeedError(f"{url}: expected an object with 'splits' (name -> {{filenames: [...], ...}}); remove it to "
                        "write a new one")
    for name, entry in entries.items():
        files = entry.get("filenames") if isinstance(entry, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise SeedError(f"{url}: split {name!r} has no 'filenames' list of file names; remove the file to write a "
                            "new one")
        stated = entry.get("shard_lengths")
        if stated is not None and (not isinstance(stated, list) or len(stated) != len(files)
                                   or not all(type(x) is int for x in stated)):
            raise SeedError(f"{url}: split {name!r}: 'shard_lengths' is not a list of {len(files)} integers, one per "
                            "file name; remove the file to write a new one")
    return {name: dict(entry) for name, entry in entries.items()}


def describe_shards(directory: str, *, split: str | None = None, threads: int | None = None, overwrite: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Read every shard in ``directory`` once and write the ``_info.json`` beside them that ``seed shards`` writes
    with its own: each split's shard lengths, ``num_classes`` when every sample has a label, and
    ``headers_read`` when every sample's image header reads. Stages then take the counts from it instead of
    scanning the tars, and a resumed pre-training or online run skips to its place by counting.

    Without an ``_info.json`` the shards (``*.tar``, and compressed tars) make one split, ``split`` (default: the
    directory's name). An existing one (as timm's ImageNet shards have) is replaced only with ``overwrite``: its
    splits must list every shard, its shard lengths (where it has them) must be the ones counted and its
    ``num_classes`` at least the labels' (else nothing is written), and its other fields are kept. A damaged
    tar stops it, naming the shard. ``threads`` read that many shards at once (default: one on a local file
    system, where the tar parsing's CPU is the limit and threads only contend for the interpreter lock, 16 for
    a URL, where each read waits on the store's latency). The file is written whole once every shard is read.
    Returns the written ``_info.json``, with ``unread``: per split, the samples whose header did not read."""
    from seed.report import progress_bar

    directory = directory.rstrip("/")
    fs, root = filesystem(directory)
    if not fs.isdir(root):
        raise SeedError(f"{directory}: no such directory")
    names = sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
                   if _SHARD_FILE.fullmatch(n))
    if not names:
        raise SeedError(f"{directory}: no tar shards in it (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz)")
    info_url = f"{directory}/{INFO_FILE}"
    existing: dict[str, Any] | None = None
    if fs.exists(f"{root}/{INFO_FILE}"):
        if not overwrite:
            raise SeedError(f"{info_url} exists; pass --overwrite to count the shards it lists and add what it lacks "
                            "(its other fields are kept)")
        try:
            with fsspec.open(info_url, "r") as f:
                existing = json.load(f)
        except ValueError as exc:  # not JSON, not UTF-8
            raise SeedError(f"{info_url}: not a JSON file ({exc}); remove it to write a new one") from exc
        splits = _their_splits(existing, info_url)
        if split is not None and split not in splits:
            log.warning("--split %s: %s names its own splits (%s); they are kept", split, info_url, ", ".join(splits))
        listed = [n for entry in splits.values() for n in entry["filenames"]]
        unlisted = sorted(set(names) - set(listed))
        if unlisted:
            raise SeedError(f"{info_url} lists no split for {len(unlisted)} shard(s) here (first: {unlisted[0]}); "
                            "remove it to describe all the shards as one split")
        missing = sorted(set(listed) - set(names))
        if missing:
            raise SeedError(f"{info_url} lists {len(missing)} shard(s) not here (first: {missing[0]})")
    else:
        splits = {split or directory.rsplit("/", 1)[-1]: {"filenames": names}}
    urls = {n: f"{directory}/{n}" for n in names}
    order = [n for entry in splits.values() for n in entry["filenames"]]
    stop = threading.Event()
    found: dict[str, dict[str, Any]] = {}
    pool = ThreadPoolExecutor(max(1, min(threads or (16 if is_url(directory) else 1), len(order))),
                              thread_name_prefix="seed-describe")
    try:
        with progress_bar(total=len(order), unit="shard", desc=f"describing {directory}", disable=not progress) as bar:
            for n, d in zip(order, pool.map(functools.partial(_described, stop=stop), [urls[n] for n in order])):
                found[n] = d
                bar.update()
    except BaseException:  # a damaged shard, Ctrl-C: the other readers stop at their next sample, unwaited for
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    unread: dict[str, list[dict[str, str]]] = {}
    for name, entry in splits.items():
        files = entry["filenames"]
        lengths = [found[n]["samples"] for n in files]
        stated = entry.get("shard_lengths")
        if stated is not None and stated != lengths:
            n, want, got = next((n, a, b) for n, a, b in zip(files, stated, lengths) if a != b)
            raise SeedError(f"{urls[n]}: {info_url} says {want} samples, the shard holds {got}; nothing was written "
                            "(remove the file, or make the shards again)")
        unread[name] = [{**u, "url": urls[n]} for n in files for u in found[n]["unread"]]
        labelled = sum(lengths) > 0 and not any(found[n]["unlabelled"] for n in files)
        counted = max(found[n]["max_label"] for n in files) + 1 if labelled else None
        stated_classes = entry.get("num_classes")
        if counted is None:
            entry.pop("num_classes", None)  # as seed shards writes it: only where every sample has a label
        elif stated_classes is None:
            entry["num_classes"] = counted
        elif type(stated_classes) is not int or stated_classes < counted:
            raise SeedError(f"{info_url}: split {name!r} says num_classes {stated_classes!r}, its labels go up to "
                            f"{counted - 1}; nothing was written (remove the field, or the file)")
        entry.update({"name": entry.get("name", name), "num_samples": sum(lengths), "shard_lengths": lengths,
                      HEADERS_READ: not unread[name]})
    info = {**(existing or {"name": directory.rsplit("/", 1)[-1]}), "described": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "splits": splits}
    write_bytes(info_url, json.dumps(info, indent=1).encode())
    return {**info, "unread": unread}


# ---------------------------------------------------------------------------------------------
# Writing


def _write_split(samples: Iterable[tuple[str, bytes, str, int]], out_dir: Path, name: str, per_shard: int) -> dict:
    """Write (key, image bytes, ext, label) samples as ``{name}-NNNNNN.tar`` shards in ``out_dir``."""
    filenames: list[str] = []
    lengths: list[int] = []
    tar: tarfile.TarFile | None = None
    labels = (-1, -1)  # (smallest, largest) label written
    for i, (key, data, ext, label) in enumerate(samples):
        labels = (label, label) if i == 0 else (min(labels[0], label), max(labels[1], label))
        if "." in key:
            raise SeedError(f"sample key {key!r} contains a dot; webdataset splits keys at the first dot")
        if i % per_shard == 0:
            if tar is not None:
                tar.close()
            filenames.append(f"{name}-{len(filenames):06d}.tar")
            lengths.append(0)
            # pax: a plain header where the member's fields fit (the same bytes as ustar), an extended one where a
            # long or non-ASCII name does not (ustar refuses names past about 100 characters)
            tar = tarfile.open(out_dir / filenames[-1], "w", format=tarfile.PAX_FORMAT)
        assert tar is not None
        _add_member(tar, f"{key}.{ext}", data)
        if label >= 0:
            _add_member(tar, f"{key}.cls", str(label).encode())
        lengths[-1] += 1
    if tar is not None:
        tar.close()
    split = {"name": name, "num_samples": sum(lengths), "filenames": filenames, "shard_lengths": lengths}
    return split | ({"num_classes": labels[1] + 1} if labels[0] >= 0 else {})  # every sample labelled


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed mtime: byte-reproducible shards
    tar.addfile(info, io.BytesIO(data))


def publish(tmp: Path, out: str, overwrite: bool) -> None:
    """Move a finished local directory to ``out`` (local or fsspec URL); nothing that looks complete is left
    there part-way. Locally a rename (an earlier output is renamed aside first and removed once the new one is
    in place: a kill between the two leaves it as ``.<name>.replaced-<pid>``). To an object store the shards
    go first, then each split's ``_info.json``, then the top-level one: a cut upload has no listing that
    names shards it lacks."""
    fs, path, exists = _check_out(out, overwrite)
    if not is_url(out):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        aside = Path(path).parent / f".{Path(path).name}.replaced-{os.getpid()}" if exists else None
        if aside is not None:
            os.replace(path, aside)
        os.replace(tmp, path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return
    if exists:
        fs.rm(path, recursive=True)
    files = sorted((p for p in tmp.rglob("*") if p.is_file()),
                   key=lambda p: (p.name == INFO_FILE, p.parent == tmp, str(p)))  # shards, split listings, top
    for f in files:
        fs.put_file(str(f), f"{path}/{f.relative_to(tmp).as_posix()}")


def _check_out(out: str, overwrite: bool) -> tuple[Any, str, bool]:
    """``out``'s file system, path and whether it exists; refused when it holds something and ``overwrite`` is off
    (checked before a conversion starts, and again as it is published)."""
    fs, _, (path,) = fsspec.get_fs_token_paths(out)
    exists = fs.exists(path)
    if exists and not overwrite and fs.ls(path):
        raise SeedError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return fs, path, exists


def _write_splits(splits: dict[str, Iterable[tuple[str, bytes, str, int]]], out: str, per_shard: int, overwrite: bool,
                  extra: dict | None = None) -> dict:
    """Write each split to ``out/<split>/`` with an ``_info.json`` (timm's layout; ``extra`` added to the top-level
    one), atomically. Every sample's image header must read (``image_size``): the callers make sure of it, and
    each split records it (``HEADERS_READ``), so an epoch knows its examples from the counts alone."""
    if per_shard <= 0:
        raise SeedError(f"--per-shard must be > 0, got {per_shard}")
    _check_out(out, overwrite)  # before the conversion, not after it
    parent = _local_tmp_parent(out)
    _remove_stale_builds(Path(parent or tempfile.gettempdir()))
    tmp = Path(tempfile.mkdtemp(prefix=f"{_BUILD_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=parent))
    as_if_created(tmp, directory=True)  # mkdtemp makes it private; the published directory should not be
    try:
        info: dict = {"name": os.path.basename(out.rstrip("/")), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                      **(extra or {}), "splits": {}}
        for name, samples in splits.items():
            (tmp / name).mkdir()
            split = {**_write_split(samples, tmp / name, name, per_shard), HEADERS_READ: True}
            if split["num_samples"] == 0:
                raise SeedError(f"split {name!r} has no samples")
            info["splits"][name] = split
            (tmp / name / INFO_FILE).write_text(json.dumps({"splits": {name: split}}, indent=1))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        publish(tmp, out, overwrite)
        return info
    finally:
        for samples in splits.values():  # a generator stopped part-way (Ctrl-C) closes its progress bar now
            close = getattr(samples, "close", None)
            if close is not None:
                close()
        shutil.rmtree(tmp, ignore_errors=True)


_BUILD_PREFIX = ".seed-shards-"
HEADERS_READ = "headers_read"  # a split's _info.json field: every sample's image header reads (seed shards wrote it)


def _remove_stale_builds(parent: Path) -> None:
    """Remove what killed conversions left in ``parent``: build directories named after this host and a
    process that no longer runs (a build of another host, or of a live process, is left alone)."""
    # the whole name matched: the glob host-*-* would also take the builds of host "node-4190000" on host "node"
    mine = re.compile(re.escape(_BUILD_PREFIX + socket.gethostname()) + r"-(\d+)-[^-]+")
    for path in parent.glob(f"{_BUILD_PREFIX}*"):
        match = mine.fullmatch(path.name)
        if match is None or _alive(int(pid := match[1])):
            continue
        log.info("removing %s, left by a conversion that was stopped (process %s)", path, pid)
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _local_tmp_parent(out: str) -> str | None:
    """Build next to a local output (same filesystem, so the final rename is atomic)."""
    if "://" in out and not out.startswith("file://"):
        return None
    parent = Path(out.removeprefix("file://")).absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain): magic, dims, then uint8 data. Truncation raises ``SeedError``."""
    if not path.exists():
        raise SeedError(f"missing IDX file: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise SeedError(f"{path}: cannot read ({exc}); the file looks truncated or corrupt") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise SeedError(f"{path}: not an IDX file of unsigned bytes (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SeedError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise SeedError(f"{path}: truncated or padded IDX data: {len(raw) - header} bytes, header says {expected} ({dims})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx(source: Path, stem: str) -> Path:
    for candidate in (source / f"{stem}.gz", source / stem):
        if candidate.exists():
            return candidate
    raise SeedError(f"missing Fashion-MNIST file {stem}(.gz) in {source}")


def load_fashion_mnist(source: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[n, 28, 28]`` uint8 and labels ``[n]`` of one split, checked against each other."""
    source = Path(source)
    if not source.is_dir():
        raise SeedError(f"Fashion-MNIST source directory not found: {source} (apt-get install dataset-fashion-mnist)")
    images_file, labels_file = (_find_idx(source, s) for s in FASHION_MNIST_FILES[split])
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SeedError(f"{images_file} and {labels_file} disagree: images {images.shape}, labels {labels.shape}")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def fashion_mnist_to_shards(out: str, *, source: str = FASHION_MNIST_DIR, per_shard: int = 1000,
                            limit: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Convert Fashion-MNIST to ``out/train`` and ``out/test`` shards of ``KEY.png`` + ``KEY.cls``."""
    from seed.report import progress_bar

    data = {split: load_fashion_mnist(source, split, limit) for split in ("train", "test")}

    def samples(split: str) -> Iterator[tuple[str, bytes, str, int]]:
        images, labels = data[split]
        for i in progress_bar(range(len(images)), desc=f"fashion-mnist {split}", unit="img", disable=not progress):
            yield f"fmnist-{split}-{i:06d}", _png(images[i]), "png", int(labels[i])

    return _write_splits({s: samples(s) for s in data}, out, per_shard, overwrite)  # PNGs made here: every header reads


def imagefolder_to_shards(src: str, out: str, *, split: str = "train", per_shard: int = 1000,
                          limit: int | None = None, overwrite: bool = False, progress: bool = True,
                          shuffle: bool = True, seed: int = 0) -> dict:
    """Convert a class-per-folder tree (``SRC/<class>/<image>``) to shards; classes get sorted indices.

    Image bytes are stored as they are (no re-encoding); the key is ``<class>_<file stem>``. ``shuffle``: the
    images go into the shards in an order drawn from ``seed`` (the same tree and seed give the same shards),
    so each shard holds a random sample of the classes. In the tree's order, an ImageNet-style tree makes
    shards of one or two classes each, and a training epoch, which reads shards one after another through a shuffle buffer of
    a few thousand images, would then draw each batch from a handful of classes. ``limit``: the first N
    images of that order. A file whose header does not read as an image (empty, another format under an image
    extension, over ``MAX_PIXELS``) is skipped with a warning and listed under ``skipped`` in ``_info.json``;
    pixels are not decoded here (a JPEG cut short is named and skipped by the teacher stage).
    """
    from seed.report import progress_bar

    root = Path(src)
    if not root.is_dir():
        raise SeedError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SeedError(f"{root} has no class sub-directories")
    files = [(c, p) for ci, c in enumerate(classes) for p in sorted((root / c).iterdir())
             if p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    if not files:
        raise SeedError(f"{root} holds no images ({', '.join(IMAGE_EXTS)})")
    if shuffle:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    files = files[:limit] if limit is not None else files
    index = {c: i for i, c in enumerate(classes)}
    keys: dict[str, Path] = {}
    for c, p in files:  # one sample per key: x.jpg and x.png, or a.b.png and a_b.png, would make one key twice
        key = f"{c}_{p.stem}".replace(".", "_")
        if key in keys:
            raise SeedError(f"{keys[key]} and {p} would both be sample {key!r} (a key is <class>_<file stem>, dots "
                            "made underscores); rename one of them")
        keys[key] = p

    skipped: list[dict[str, str]] = []  # filled as the shards are written, before _info.json is

    def samples() -> Iterator[tuple[str, bytes, str, int]]:
        for key, p in progress_bar(keys.items(), total=len(keys), desc=f"imagefolder {split}", unit="img",
                                   disable=not progress):
            data, ext = p.read_bytes(), p.suffix.lower().lstrip(".")
            try:  # the header only (no pixel decoded): not an image, empty, or over MAX_PIXELS
                image_size(Sample(key, data, ext, 0, str(p), 0))
            except ValueError as exc:
                log.warning("%s: skipped, %s", p, exc)
                skipped.append({"file": str(p), "reason": str(exc)})
                continue
            yield key, data, ext, index[p.parent.name]

    order = f"shuffled, seed {seed}" if shuffle else "class by class, as in the tree"
    info = _write_splits({split: samples()}, out, per_shard, overwrite,
                         extra={"classes": classes, "order": order, "skipped": skipped})
    if skipped:
        log.warning("%s: %d of %d images skipped, their headers unreadable (the first: %s; all in %s/%s)", src,
                    len(skipped), len(keys), skipped[0]["file"], out, INFO_FILE)
    return info
