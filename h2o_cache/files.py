"""Writing files a user owns: atomically, never over an input, and never over an existing output by surprise."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename, on error it goes.

    A reader (or a crash) therefore sees the old file or the whole new one, never a half-written one. The temporary
    name keeps ``path``'s suffix, so writers that pick a format by extension (matplotlib) still work.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output(path: str | os.PathLike, *, option: str, force: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Check, before any work, that ``path`` can be written; return it.

    Raises ``ValueError`` (naming ``option``) when ``path`` is one of ``inputs``, already exists without ``force``,
    is a folder, or lies in a folder that does not exist.
    """
    out = Path(path)
    for inp in inputs:
        if inp is not None and Path(inp).exists() and out.exists() and out.resolve() == Path(inp).resolve():
            raise ValueError(f"{option} {str(path)!r} is also an input; choose another output file")
    if out.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a folder; give a file name")
    if not out.parent.is_dir():
        raise ValueError(f"{option} {str(path)!r}: the folder {str(out.parent)!r} does not exist")
    if out.exists() and not force:
        raise ValueError(f"{option} {str(path)!r} already exists; pass --force to overwrite it")
    if not os.access(out.parent, os.W_OK):
        raise ValueError(f"{option} {str(path)!r}: the folder {str(out.parent)!r} is not writable")
    return out
