"""Disk tier: one file per chunk under <data dir>/kv/, LRU within a byte budget.

Writes are atomic (temp file in the same directory, then os.replace), so a
reader opens either the old file or the new one, never a partial write; an open
file stays readable even if it is replaced or evicted meanwhile. No fsync: this
is a cache, and a file torn by a power loss fails its checksum and is dropped.
Files are sharded into 256 subdirectories by the first two key characters to
keep directories small. LRU order is an in-memory index rebuilt from file
mtimes at start; a read bumps the file's mtime so the order survives restarts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

from cache.stats import CacheStats

log = logging.getLogger(__name__)

_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{2,200}$")  # hex digests; no path tricks
_STALE_TMP_S = 600  # temp files older than this were left by a crashed writer


class DiskTier:
    name = "disk"

    def __init__(
        self, root: str | os.PathLike, budget_bytes: int, stats: CacheStats | None = None
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be > 0 (omit the tier to disable it)")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.stats = stats if stats is not None else CacheStats()
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # key -> file size, oldest first
        self._bytes = 0
        self._warned = False
        self.failing = False  # the last write failed (full or read-only disk): /healthz reports it
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a read-only data dir: serve without the tier rather than not at all
            self._fail("write", "the tier's folder", e)
        self._rebuild_index()
        self._evict_over_budget()

    # -- reads / writes -----------------------------------------------------

    def get_many(self, keys: Sequence[str]) -> dict[str, bytearray]:
        found: dict[str, bytearray] = {}
        for key in keys:
            data = self._read(key)
            if data is not None:
                found[key] = data
        self.stats.add(
            self.name,
            hits=len(found),
            misses=len(keys) - len(found),
            bytes_read=sum(len(v) for v in found.values()),
        )
        return found

    def put(self, key: str, value: bytes) -> None:
        size = len(value)
        if size > self.budget_bytes:
            return
        path = self._path(key)
        tmp = None
        try:
            path.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=_TMP_SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
            os.replace(tmp, path)
            tmp = None
        except OSError as e:
            self._fail("write", key, e)
            return
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        with self._lock:
            self._bytes += size - self._index.pop(key, 0)
            self._index[key] = size
        self.failing = False
        self.stats.add(self.name, writes=1, bytes_written=size)
        self._evict_over_budget()

    def put_many(self, items: Mapping[str, bytes]) -> None:
        for key, value in items.items():
            self.put(key, value)

    def delete(self, key: str) -> None:
        with self._lock:
            self._bytes -= self._index.pop(key, 0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))

    def clear(self) -> None:
        """Delete this tier's files (*.kv and temp files) under root; nothing else."""
        with self._lock:
            self._index.clear()
            self._bytes = 0
        for path, _ in self._scan(include_tmp=True):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def keys(self) -> list[str]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._index)

    def usage(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._index),
                "bytes": self._bytes,
                "budget_bytes": self.budget_bytes,
                "root": str(self.root),
                "failing": self.failing,
            }

    def close(self) -> None:
        pass

    # -- internals ------------------------------------------------------------

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key[:2] / (key + _SUFFIX)

    def _read(self, key: str) -> bytearray | None:
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                # A bytearray is writable, so serde's tensors wrap it without copy.
                buf = bytearray(size)
                view, got = memoryview(buf), 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError:
            with self._lock:
                self._bytes -= self._index.pop(key, 0)
            return None
        except OSError as e:
            self._fail("read", key, e)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # LRU order that survives restarts
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:  # written by another process sharing the directory
                self._index[key] = size
                self._bytes += size
        return buf if got == size else buf[:got]  # short read: serde reports it

    def _evict_over_budget(self) -> None:
        victims: list[str] = []
        with self._lock:
            while self._bytes > self.budget_bytes and self._index:
                key, size = self._index.popitem(last=False)
                self._bytes -= size
                victims.append(key)
        for key in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key))
        if victims:
            self.stats.add(self.name, evictions=len(victims))

    def _rebuild_index(self) -> None:
        now = time.time()
        files = []
        for path, st in self._scan(include_tmp=True):
            if path.name.endswith(_TMP_SUFFIX):
                if now - st.st_mtime > _STALE_TMP_S:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                continue
            key = path.name[: -len(_SUFFIX)]
            if _KEY_RE.match(key) and path.parent.name == key[:2]:
                files.append((st.st_mtime_ns, key, st.st_size))
        files.sort()
        with self._lock:
            self._index = OrderedDict((key, size) for _, key, size in files)
            self._bytes = sum(size for _, _, size in files)

    def _scan(self, include_tmp: bool) -> list[tuple[Path, os.stat_result]]:
        out = []
        if not self.root.is_dir():
            return out
        for shard in self.root.iterdir():
            if not shard.is_dir() or len(shard.name) != 2:
                continue
            for path in shard.iterdir():
                name = path.name
                if name.endswith(_SUFFIX) or (include_tmp and name.endswith(_TMP_SUFFIX)):
                    with contextlib.suppress(FileNotFoundError):
                        out.append((path, path.stat()))
        return out

    def _fail(self, what: str, key: str, error: OSError) -> None:
        self.stats.add(self.name, errors=1)
        if what == "write":
            self.failing = True
        if not self._warned:
            self._warned = True
            log.warning(
                "disk tier %s: %s of %s failed (%s); serving misses", self.root, what, key, error
            )
        else:
            log.debug("disk tier %s: %s of %s failed (%s)", self.root, what, key, error)
