"""Optional dependencies: a command that needs one checks for it first, before any model is loaded, and a
missing one is one line naming the extra that installs it (not a ModuleNotFoundError after minutes of work)."""
from __future__ import annotations

import importlib.util

from .errors import VelotuneError

# extra -> the modules it provides (pyproject.toml's optional-dependencies)
EXTRAS = {"serve": ("fastapi", "uvicorn"), "studio": ("fastapi", "uvicorn", "pypdf", "docx"),
          "audio": ("soundfile", "soxr"), "tts": ("snac",), "export": ("gguf",), "quant": ("bitsandbytes",),
          "data": ("datasets", "pyarrow"), "triton": ("triton",)}


class MissingExtraError(VelotuneError, ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require_extra(extra: str, feature: str):
    """Raises MissingExtraError when a module of `extra` is not installed; `feature` says what needs it."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(f"{feature} needs {' and '.join(missing)}, which is not installed: "
                                f"pip install 'velotune[{extra}]' (or bash scripts/setup.sh)")
