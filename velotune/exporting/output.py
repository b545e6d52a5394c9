"""Output paths of an export: refuse to replace what exists unless asked, and write small files atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import CheckpointError


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
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
