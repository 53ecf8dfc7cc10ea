"""Checkpoint files on the client's side: where :meth:`Client.save_checkpoint` writes, and what
:meth:`Client.load_checkpoint` reads (a path, a binary file, or the bytes themselves)."""

from __future__ import annotations

import os
from typing import BinaryIO

from ._flow import Buffer


def write_checkpoint(content: memoryview, file: str | os.PathLike[str] | BinaryIO | None) -> memoryview | None:
    """``content`` written to ``file`` (a path is replaced atomically: a crash never leaves half a file),
    or returned as it is (a view of the response, not a copy) without a file."""
    if file is None:
        return content
    if isinstance(file, str | os.PathLike):
        path = os.fspath(file)
        partial = f"{path}.partial"
        with open(partial, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    else:
        file.write(content)
    return None


def read_checkpoint(file: str | os.PathLike[str] | BinaryIO | bytes | bytearray | memoryview) -> Buffer:
    """The bytes of a checkpoint given as a path, a binary file or bytes (bytes are sent as they are)."""
    if isinstance(file, bytes | memoryview):
        return file
    if isinstance(file, bytearray):
        return memoryview(file)
    if isinstance(file, str | os.PathLike):
        with open(file, "rb") as f:
            return f.read()
    data = file.read()
    if not isinstance(data, bytes):
        raise TypeError(f"the checkpoint file must be opened in binary mode ('rb'), got {type(data).__name__}")
    return data
