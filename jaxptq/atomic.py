"""Atomic outputs: write beside the target, then rename, so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO


def write_file(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> pathlib.Path:
    """Calls `write` on a temporary file beside `path`, then renames it over `path`."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are for everyone to read
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def write_bytes(path: str | os.PathLike[str], data: bytes) -> pathlib.Path:
    return write_file(path, lambda f: f.write(data))


@contextlib.contextmanager
def folder(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
    """Yields a temporary folder beside `path`; when the block succeeds it replaces `path`."""
    target = pathlib.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
