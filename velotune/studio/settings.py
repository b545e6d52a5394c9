"""What one Studio process is allowed to see and do: where it listens, its token, its roots and its limits."""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 7860
DEFAULT_UPLOAD_BYTES = 10 * 1024 * 1024     # one uploaded file
DEFAULT_BODY_BYTES = 4 * 1024 * 1024        # one JSON request
DEFAULT_LOADED_MODELS = 3                    # chat engines kept in memory; the least recently used goes first
DEFAULT_MAX_JOBS = 1                         # training jobs at once (each takes the machine's cores or GPU)


@dataclass
class StudioSettings:
    """`roots`: name -> directory the file pickers may show (models, datasets); the Studio's own directory
    (`home`) holds the database, the runs (each run writes only inside its own directory) and uploads."""
    home: Path
    roots: dict = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token: str | None = None
    max_upload_bytes: int = DEFAULT_UPLOAD_BYTES
    max_body_bytes: int = DEFAULT_BODY_BYTES
    max_loaded_models: int = DEFAULT_LOADED_MODELS
    max_jobs: int = DEFAULT_MAX_JOBS
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        self.home = Path(self.home).expanduser().resolve()
        roots = {name: Path(path).expanduser().resolve() for name, path in self.roots.items()}
        for name, path in roots.items():
            if not path.is_dir():
                raise ConfigError(f"studio: the {name} directory {path} does not exist")
        self.roots = {**roots, "runs": self.runs_dir}
        if self.max_loaded_models < 1:
            raise ConfigError(f"studio: --max-loaded-models must be at least 1, got {self.max_loaded_models}")
        if self.max_jobs < 1:
            raise ConfigError(f"studio: --max-jobs must be at least 1, got {self.max_jobs}")

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def database(self) -> Path:
        return self.home / "studio.sqlite3"

    @property
    def needs_token(self) -> bool:
        """Anything but loopback is reachable by others on the network: every call then carries the token."""
        return self.host not in LOOPBACK_HOSTS

    def ensure_token(self) -> str | None:
        """The token to require: the one given, or (off loopback) a new random one the CLI prints."""
        if self.token is None and self.needs_token:
            self.token = secrets.token_urlsafe(24)
        return self.token

    def prepare(self):
        self.home.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(exist_ok=True)
        (self.home / "uploads").mkdir(exist_ok=True)
