"""Writing files so that a reader (or a run after a crash) sees either the old file or the whole new one."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """
    Gives a temporary path next to `path` (`<name>.partial`, in the same folder so the rename stays on one file
    system) for the block to write. When the block ends without an error the temporary file is renamed over `path`;
    when it fails, it is removed and an existing `path` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f"{path.name}.partial")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


__all__ = ["atomic_write"]
