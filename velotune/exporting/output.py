"""Output paths of an export: refuse to replace what exists unless asked, and write small files atomically."""
from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from ..models.checkpoint import publish_file, temporary_file_beside


def check_output(path, overwrite: bool):
    """Refuses an existing file or non-empty directory unless `overwrite`; called before any work is done."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise CheckpointError(f"{path}: already exists (pass overwrite=True, or --overwrite, to replace it)")


def write_text_atomic(path: Path, text: str):
    """Writes `text` under a temporary name beside `path`, then renames it into place."""
    tmp = temporary_file_beside(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        publish_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
