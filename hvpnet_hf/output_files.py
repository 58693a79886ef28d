"""
Writing files so that a reader (or a run after a crash) sees either the old file or the whole new one, and checking
the output paths a command is given before it starts its work.
"""

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


def check_output_file(path: str | os.PathLike, setting: str) -> None:
    """
    Refuses an output file that `setting` names when it could not be written: an existing folder, or a file in a
    folder that does not exist (it is not created, so that a mistyped path is not taken for a new folder).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{setting} {path} is a folder; name the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{setting} {path}: the folder {path.parent} does not exist")


def check_output_dir(path: str | os.PathLike, setting: str) -> None:
    """Refuses an output folder that `setting` names when it is an existing file (a missing folder is created)."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{setting} {path}: {folder} is a file, not a folder")


__all__ = ["atomic_write", "check_output_dir", "check_output_file"]
