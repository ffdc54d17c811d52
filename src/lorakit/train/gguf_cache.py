"""A GGUF file as a model: its identity (size, a content digest, sha256), its header checked before anything is
written, and its conversion, once, into a cached safetensors directory (``train/gguf_convert.py``) that is reused
while the file is the same (see ``train/models.py``'s docstring)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

from lorakit.errors import ModelError
from lorakit.files import OutputError, cache_dir, write_atomic, write_directory
from lorakit.train.load_errors import LOAD_ERRORS
from lorakit.train.load_errors import first_line as _first_line


SOURCE_FILE = "lorakit-source.json"  # in a converted GGUF's cache directory: the file it came from
GGUF_MAGIC = b"GGUF"
_HEAD, _BLOCK, _SAMPLES = 2**20, 2**16, 16  # the content digest: the first MiB and 17 evenly spaced 64 KiB blocks
_RACY_NS = 2 * 10**9  # a file changed this recently may change again within one timestamp tick: always hashed


def is_gguf(path: Path) -> bool:
    """A GGUF model file: a file named *.gguf, in any case (.GGUF too)."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def gguf_fingerprint(path: Path) -> str:
    """A fast digest of a file's content: its size, its first MiB (a GGUF's header) and 17 evenly spaced 64 KiB
    blocks, the last ending at the end of the file. Reads about 2 MiB whatever the file's size."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        digest = hashlib.sha256(f"lorakit-gguf-1\0{size}\0".encode())
        digest.update(fh.read(_HEAD))
        if size > _HEAD:
            span = max(0, size - _HEAD - _BLOCK)
            for i in range(_SAMPLES + 1):
                fh.seek(_HEAD + span * i // _SAMPLES)
                digest.update(fh.read(_BLOCK))
    return digest.hexdigest()


def _gguf_key(path: Path) -> str:
    """The cache name of a user's .gguf: its stem and its content digest (``gguf_fingerprint``). A touched file keeps
    its conversion; a file replaced by another, even of the same size and modification time, gets its own."""
    try:
        return f"gguf/{path.stem}-{gguf_fingerprint(path)[:16]}"
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None


def _stat_token(st: os.stat_result) -> list[int]:
    """What changes whenever a file's content does: the change time, which no copy tool (cp -p, rsync -t) sets."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


_SHA256: dict[tuple[int, ...], str] = {}  # this process's hashes, by _stat_token


def file_sha256(path: Path) -> str:
    """The sha256 of a file as it is now (hashed once per process while the file is unchanged)."""
    with open(path, "rb") as fh:
        before = tuple(_stat_token(os.fstat(fh.fileno())))
        if before in _SHA256:
            return _SHA256[before]
        digest = hashlib.sha256()
        for block in iter(lambda: fh.read(2**22), b""):
            digest.update(block)
        if tuple(_stat_token(os.fstat(fh.fileno()))) == before:
            _SHA256[before] = digest.hexdigest()
    return digest.hexdigest()


def gguf_identity(spec: str) -> dict[str, Any] | None:
    """{"path", "size", "sha256"} of a .gguf model spec, hashed from the file as it is now (never taken from a
    conversion's record), or None for a built-in or a model directory."""
    path = Path(spec).expanduser()
    if spec.startswith("builtin:") or not is_gguf(path):
        return None
    try:
        return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256": file_sha256(path)}
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------- checking a GGUF file before converting it
class _Truncated(Exception):
    pass


class _Header:
    """Reads a GGUF header (little-endian) from a file of ``size`` bytes; past the end raises _Truncated."""

    SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

    def __init__(self, fh, size: int) -> None:
        self.fh, self.size, self.pos = fh, size, 0

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise _Truncated
        data = self.fh.read(n)
        if len(data) < n:
            raise _Truncated
        self.pos += n
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise _Truncated
        self.fh.seek(n, 1)
        self.pos += n

    def string(self) -> bytes:
        return self.read(self.unpack("Q"))

    def value(self, vtype: int):
        if vtype in self.SCALARS:
            return self.unpack(self.SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in self.SCALARS:
                self.skip(count * struct.calcsize(self.SCALARS[etype]))
            else:
                for _ in range(count):
                    self.value(etype)
            return None
        raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos - 4:,}")


def _gguf_length(fh, size: int) -> int | None:
    """The length a GGUF file's header says it has (its tensor data's end), or None where a tensor type is unknown
    here. Raises _Truncated, or ValueError for a damaged header."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    h = _Header(fh, size)
    h.read(4)
    version = h.unpack("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (lorakit reads versions 2 and 3)")
    n_tensors, n_kv = h.unpack("Q"), h.unpack("Q")
    if max(n_tensors, n_kv) > size:
        raise ValueError(f"{n_tensors:,} tensors and {n_kv:,} metadata entries in a {size:,}-byte file")
    alignment = 32
    for _ in range(n_kv):
        key = h.string()
        value = h.value(h.unpack("I"))
        if key == b"general.alignment" and isinstance(value, int) and value > 0:
            alignment = value
    end: int | None = 0
    for _ in range(n_tensors):
        h.string()
        n_dims = h.unpack("I")
        if n_dims > 8:
            raise ValueError(f"a tensor of {n_dims} dimensions at byte {h.pos - 4:,}")
        count = 1
        for _ in range(n_dims):
            count *= h.unpack("Q")
        ttype, offset = h.unpack("I"), h.unpack("Q")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            end = None
            continue
        if end is not None:
            end = max(end, offset + count // block * type_size)
    start = -(-h.pos // alignment) * alignment
    return None if end is None else start + end


def check_gguf(path: Path) -> None:
    """Refuse, naming the file and the fix, a .gguf that is empty, not GGUF, damaged or truncated."""
    again = "download or copy it again"
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                raise ModelError(f"{path} is empty (0 bytes), not a GGUF model; {again}")
            head = fh.read(16)
            if not head.startswith(GGUF_MAGIC):
                kind, fix = _what_it_is(head)
                raise ModelError(f"{path} is not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r}{kind}); {fix}")
            fh.seek(0)
            try:
                length = _gguf_length(fh, size)
            except _Truncated:
                raise ModelError(f"{path} is truncated at byte {size:,}, inside its GGUF header; {again}") from None
            except ValueError as exc:
                raise ModelError(f"{path} is not a valid GGUF file ({exc}); {again}") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}") from None
    if length is not None and size < length:
        raise ModelError(f"{path} is truncated at byte {size:,}: its header describes {length:,} bytes; {again}")


def _what_it_is(head: bytes) -> tuple[str, str]:
    """(what a non-GGUF file looks like, the fix) from its first bytes."""
    directory = "pass the directory that holds it with its config.json (what save_pretrained writes)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "; a safetensors file", directory
    if head.startswith((b"PK\x03\x04", b"\x80\x02", b"\x80\x04")):
        return "; a PyTorch checkpoint", directory
    fix = "pass a .gguf model file, or a model directory (config.json + weights)"
    try:
        head.decode("utf-8")
        return "; a text file", fix
    except UnicodeDecodeError:
        return "", fix


# ---------------------------------------------------------------------- the conversion cache
def _cache_error(gguf_path: Path, reason: str) -> ModelError:
    return ModelError(f"cannot write the converted copy of {gguf_path} into the cache {cache_dir()}: {reason}; set "
                      "LORAKIT_CACHE to a writable directory with room for it, e.g. LORAKIT_CACHE=/tmp/lorakit-cache")


def _reusable(target: Path, gguf_path: Path, weights: bool = True) -> bool:
    """Whether ``target`` is a whole conversion of ``gguf_path`` as the file is now (``weights=False``: or its
    config and tokenizer alone): its record's size, content digest and sha256 match (the sha256 is trusted without
    hashing when the record lists the file's inode and change time, checked earlier). A matching check is added to
    the record."""
    try:
        record = json.loads((target / SOURCE_FILE).read_text())
        if not (target / "config.json").is_file() or not isinstance(record, dict):
            return False
        if weights and record.get("weights", True) is False:
            return False
        st = gguf_path.stat()
        token = _stat_token(st)
        if record.get("size") != st.st_size:
            return False
        fingerprint = gguf_fingerprint(gguf_path)
        if record.get("fingerprint", fingerprint) != fingerprint:
            return False
        checked = record.get("checked") if isinstance(record.get("checked"), list) else []
        if token in checked:
            return True
        if record.get("sha256") != file_sha256(gguf_path):
            return False
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return False
    if time.time_ns() - st.st_ctime_ns > _RACY_NS:  # remember the check; a cache that cannot be written is no matter
        record.update(fingerprint=fingerprint, checked=(checked + [token])[-8:])
        try:
            write_atomic(target / SOURCE_FILE, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        except OutputError:
            pass
    return True


class _CacheLock:
    """A blocking lock on one cache entry (fcntl.flock on <entry>.lock beside it): one conversion at a time, the
    next one waits and then finds the finished copy. The lock file is removed on release."""

    def __init__(self, target: Path, gguf_path: Path) -> None:
        self.path = target.parent / f".{target.name}.lock"
        self.gguf_path = gguf_path
        self.fd: int | None = None

    def __enter__(self) -> _CacheLock:
        import fcntl

        while True:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise _cache_error(self.gguf_path, exc.strerror or str(exc)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"lorakit: waiting for another lorakit converting {self.gguf_path} into the cache",
                      file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the holder may have removed the file between our open and our lock: then lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def _read_gguf(gguf_path: Path):
    """The config, tokenizer and tensor plan transformers reads from a GGUF (``gguf_convert.read_gguf``), before
    anything is written; a file it cannot read is one error line."""
    from lorakit.train.gguf_convert import read_gguf

    try:
        return read_gguf(gguf_path)
    except LOAD_ERRORS as exc:
        raise ModelError(f"could not convert {gguf_path}: {_first_line(exc).rstrip('.')}; the file is damaged, or holds a model "
                         "architecture that transformers cannot read from GGUF") from None


def _write_conversion(gguf_path: Path, tmp: Path, gguf, weights: bool = True) -> None:
    """Write a converted GGUF into the directory ``tmp``: bf16 safetensors written tensor by tensor (``weights``; a
    file that is not converted tensor by tensor is converted whole), config, tokenizer, and the source file's record
    (with the storage dtype, and ``"weights": false`` when they were not written). A tensor that cannot be
    dequantised is a ModelError; a failed write (a full disk) is left to write_directory."""
    from lorakit.train.gguf_convert import STORAGE_DTYPE, convert, streams, write_metadata

    weights = weights or not streams(gguf)  # (a file transformers converts whole: its config is the saved model's)
    try:
        convert(gguf, tmp) if weights else write_metadata(gguf, tmp)
    except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError, EOFError) as exc:
        raise ModelError(f"could not convert {gguf_path}: {_first_line(exc).rstrip('.')}; the file is damaged, or holds a model "
                         "architecture that transformers cannot read from GGUF") from None
    source = {"path": str(gguf_path.resolve()), "size": gguf_path.stat().st_size,
              "fingerprint": gguf_fingerprint(gguf_path), "sha256": file_sha256(gguf_path),
              "dtype": str(STORAGE_DTYPE).split(".")[1], "checked": []} | ({} if weights else {"weights": False})
    (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))


# long: reuse, lock, reuse again, then one write of the whole directory
def _converted_gguf(gguf_path: Path, key: str, weights: bool = True) -> Path:
    """Dequantise a GGUF once into cache_dir()/key (safetensors + tokenizer, and the source file's size, content
    digest and sha256); reuse it while that record matches the file, convert again when it does not.

    ``weights=False`` (what reads the config or tokenizer only, and a packed load that re-packs the file's own blocks,
    ``train.gguf_packed``): a conversion without its safetensors is enough, and one is written (seconds) when there
    is none; a later load that needs the weights replaces it with the whole conversion. A 4-bit 8B GGUF trained with
    ``--base-dtype int4`` so never has a 16 GB bf16 copy on disk beside its packed cache.

    The conversion is written tensor by tensor at bfloat16 (F32 tensors of the file kept F32; ``gguf_convert``): its
    peak memory is one tensor, not the fp32 model, and its disk half an fp32 copy's. The record names the storage
    dtype ("dtype": "bfloat16"). A directory written by lorakit before this (fp32, its record without "dtype") is
    still a whole conversion of the file its record matches: it is reused as it is (loading casts to the dtype asked
    for), and replaced whole, by one rename, when the file changes; a directory is never part one, part the other."""
    target = cache_dir() / key
    if _reusable(target, gguf_path, weights):
        return target
    check_gguf(gguf_path)  # a bad file is refused before anything is written
    with _CacheLock(target, gguf_path):  # also refuses a cache that cannot be written, before the long conversion
        if _reusable(target, gguf_path, weights):  # another process converted it while this one waited
            return target
        stale = target.exists()
        if weights:
            again = "its weights (only its config and tokenizer were)" if _reusable(target, gguf_path, False) else \
                "again (the file changed since its conversion)"
            print(f"lorakit: converting {gguf_path} {again if stale else 'once'} into {target} (safetensors; later loads "
                  "take seconds)", file=sys.stderr, flush=True)
        gguf = _read_gguf(gguf_path)
        try:  # one rename: a later load finds a whole conversion or none
            write_directory(target, lambda tmp: _write_conversion(gguf_path, tmp, gguf, weights), replace=stale)
        except OutputError as exc:
            if _reusable(target, gguf_path, weights):  # a process that took no lock renamed its copy first: use it
                return target
            reason = str(exc).split("; what was there before", 1)[0].rsplit(": ", 1)[-1]
            raise _cache_error(gguf_path, reason) from None
    return target
