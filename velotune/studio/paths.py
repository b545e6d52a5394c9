"""The only way the Studio turns a path from a request into a file: a root name and a path relative to it.

A request names a file as "ROOT:relative/path" (ROOT one of the configured roots: models, datasets, runs). The
relative part may not be absolute, may not hold ".." or a hidden name (".cache"; listings do not show them
either), and after every symlink is followed it must still lie inside the root, and outside the Studio's own
directory unless it comes through the runs root (a models root of "." run from home would hold it); anything else
is refused before the file system is touched beyond that check. Nothing else in the Studio accepts a path from a
request.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import VelotuneError

MAX_LISTED = 500   # entries one directory listing returns


class PathRefused(VelotuneError):
    """A path outside the configured roots, or one that does not name what was asked for."""


@dataclass(frozen=True)
class PickedPath:
    root: str
    relative: str
    path: Path

    @property
    def ref(self) -> str:
        return f"{self.root}:{self.relative}"


class Roots:
    def __init__(self, roots: dict, private=(), private_except: str | None = None):
        self.roots = {name: Path(path).resolve() for name, path in roots.items()}
        self.private = [Path(p).resolve() for p in private]
        self.private_except = private_except

    def names(self) -> list[str]:
        return list(self.roots)

    def resolve(self, ref: str, *, must_exist: bool = True) -> PickedPath:
        """The file or directory `ref` ("ROOT:relative") names, checked to lie inside its root."""
        if not isinstance(ref, str) or ":" not in ref:
            raise PathRefused(f"path {ref!r}: expected ROOT:relative/path with ROOT one of {', '.join(self.roots)}")
        root_name, relative = ref.split(":", 1)
        root = self.roots.get(root_name)
        if root is None:
            raise PathRefused(f"path {ref!r}: unknown root {root_name!r} (known: {', '.join(self.roots)})")
        relative = relative.replace("\\", "/").strip()
        parts = PurePosixPath(relative).parts if relative else ()
        if relative.startswith("/") or (parts and (parts[0].endswith(":") or parts[0] == "/")):
            raise PathRefused(f"path {ref!r}: must be relative to the {root_name} root")
        if any(part == ".." for part in parts) or "\x00" in relative:
            raise PathRefused(f"path {ref!r}: '..' is not allowed")
        if any(part.startswith(".") for part in parts):
            raise PathRefused(f"path {ref!r}: hidden names are not shown or used")
        candidate = root.joinpath(*parts)
        resolved = Path(os.path.realpath(candidate))   # every symlink followed
        if resolved != root and root not in resolved.parents:
            raise PathRefused(f"path {ref!r}: leads outside the {root_name} root")
        if root_name != self.private_except and any(p == resolved or p in resolved.parents for p in self.private):
            raise PathRefused(f"path {ref!r}: lies in the Studio's own directory")
        if must_exist and not resolved.exists():
            raise PathRefused(f"path {ref!r}: no such file or directory")
        return PickedPath(root_name, "/".join(parts), resolved)

    def listing(self, ref: str) -> dict:
        """A directory's entries (directories first, then files by name), each with its ref and what it looks like
        (a model directory, an adapter directory, a data file)."""
        picked = self.resolve(ref)
        if not picked.path.is_dir():
            raise PathRefused(f"path {ref!r}: not a directory")
        entries = []
        for child in sorted(picked.path.iterdir(), key=lambda p: (not p.is_dir(), p.name.lower())):
            if child.name.startswith("."):
                continue
            try:
                inside = self.resolve(f"{picked.root}:{_join(picked.relative, child.name)}")
            except PathRefused:   # a symlink out of the root is not shown at all
                continue
            entries.append({"name": child.name, "ref": inside.ref, "dir": inside.path.is_dir(),
                            "kind": describe(inside.path)})
            if len(entries) >= MAX_LISTED:
                break
        return {"ref": picked.ref, "root": picked.root, "entries": entries,
                "parent": f"{picked.root}:{'/'.join(picked.relative.split('/')[:-1])}" if picked.relative else None}


def _join(relative: str, name: str) -> str:
    return f"{relative}/{name}" if relative else name


def describe(path: Path) -> str | None:
    """What a picker entry is: "model", "adapter", "data" or None."""
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "adapter"
        if (path / "config.json").is_file():
            return "model"
        return None
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt"):
        return "data"
    return None
