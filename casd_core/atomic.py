"""Atomic file writes: a reader sees the old file or the new one, never half of one, and a
crash or cancel leaves no partial file behind.

:func:`atomic_path` is for files Python writes. :func:`atomic_output` is for files a GDAL
driver writes (vector layers): the partial file keeps the real suffix, so the driver is
chosen right, and is named ``.<stem>.casd-partial-<pid><suffix>``, so
:func:`remove_stale_partials` can sweep those whose writer process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside ``path`` that replaces it when the block succeeds and is
    removed when it fails; the result is readable by all (``mkstemp`` makes it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


PARTIAL_MARK = ".casd-partial-"
_PARTIAL_RE = re.compile(r"^\..+\.casd-partial-(\d+)(\.[A-Za-z0-9]+)?(-wal|-shm|-journal)?$")


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before the atomic rename."""
    return path.with_name(f".{path.stem}{PARTIAL_MARK}{os.getpid()}{path.suffix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a partial path to write; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    tmp = partial_path(path)
    _remove_with_aux(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove_with_aux(tmp)


def _remove_with_aux(path: Path) -> None:
    for candidate in (path, *(Path(f"{path}{aux}") for aux in ("-wal", "-shm", "-journal"))):
        with contextlib.suppress(FileNotFoundError):
            candidate.unlink()


def remove_stale_partials(folder: str | os.PathLike) -> int:
    """Delete partial files (under ``folder``) whose writing process no longer runs."""
    removed = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for candidate in folder.rglob(f".*{PARTIAL_MARK}*"):
        match = _PARTIAL_RE.match(candidate.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
