"""What /healthz reports beyond liveness: can the data dir take writes, is the disk tier failing.

A full or read-only data dir never fails an answer (bookkeeping warns and goes on, the disk tier
serves misses), so the operator learns about it here: status "degraded" with the reason.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from rag.service import RAGService

PROBE_EVERY_S = 5.0  # probes come every few seconds: one synced write per interval is enough
_probed: dict[Path, tuple[float, tuple[bool, str | None]]] = {}


def data_dir_writable(data_dir: Path) -> tuple[bool, str | None]:
    """Whether one byte can be written (and synced) under the data dir; the error if not.
    Remembered for PROBE_EVERY_S."""
    now = time.monotonic()
    seen = _probed.get(data_dir)
    if seen is not None and now - seen[0] < PROBE_EVERY_S:
        return seen[1]
    result = _probe(data_dir)
    _probed[data_dir] = (now, result)
    return result


def _probe(data_dir: Path) -> tuple[bool, str | None]:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=data_dir, prefix=".healthz.")
    except OSError as e:
        return False, f"{type(e).__name__}: {e.strerror or e}"
    try:
        os.write(fd, b"x")  # a full filesystem still creates an empty file: write a byte
        os.fsync(fd)
        return True, None
    except OSError as e:
        return False, f"{type(e).__name__}: {e.strerror or e}"
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def health(rag: RAGService) -> dict:
    """The dependency fields of /healthz, and the status they add up to."""
    redis = rag.redis_state()
    writable, error = data_dir_writable(rag.settings.data_dir)
    disk = rag.disk_state()
    ok = redis != "down" and writable and disk != "failing"
    return {
        "status": "ok" if ok else "degraded",
        "redis": redis,
        "disk_tier": disk,
        "data_dir": {"path": str(rag.settings.data_dir), "writable": writable, "error": error},
    }
