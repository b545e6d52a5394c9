"""The Studio's memory: runs, chats, arena votes and settings in one SQLite file, so that nothing is lost when
the server restarts.

The schema is versioned with SQLite's `user_version`: each entry of MIGRATIONS moves the file one version up, in
one transaction, so a file from any earlier Studio opens and is brought up to date. A file from a newer Studio
is refused (its tables may mean something this one does not know) rather than altered.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from ..errors import VelotuneError

MIGRATIONS = [
    # version 1
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
        status TEXT NOT NULL, model TEXT NOT NULL, data TEXT NOT NULL, config_yaml TEXT NOT NULL,
        summary TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE chats (
        id TEXT PRIMARY KEY, created REAL NOT NULL, updated REAL NOT NULL, title TEXT NOT NULL,
        model TEXT NOT NULL, messages TEXT NOT NULL, settings TEXT NOT NULL DEFAULT '{}');
    CREATE TABLE votes (
        id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, model_a TEXT NOT NULL, model_b TEXT NOT NULL,
        outcome TEXT NOT NULL, prompt TEXT NOT NULL DEFAULT '');
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(VelotuneError):
    """The database cannot be used (from a newer Studio, or not a Studio database)."""


class Store:
    """One connection shared by the server's threads, one statement at a time (a lock: SQLite's own locking
    is for processes; the writes here are tiny)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable Studio database ({exc})") from None

    def _migrate(self):
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer velotune Studio (schema {version}; this one knows "
                             f"up to {SCHEMA_VERSION}); upgrade velotune or use another --home")
        for number in range(version, SCHEMA_VERSION):
            with self._lock:
                self._db.execute("BEGIN")
                try:
                    for statement in _statements(MIGRATIONS[number]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {number + 1}")
                    self._db.execute("COMMIT")
                except Exception:
                    self._db.execute("ROLLBACK")
                    raise

    def close(self):
        with self._lock:
            self._db.close()

    def _rows(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(row) for row in self._db.execute(sql, args).fetchall()]

    def _run(self, sql: str, args=()) -> int:
        with self._lock:
            return self._db.execute(sql, args).lastrowid

    # ---- runs ---------------------------------------------------------------------------------------------
    def add_run(self, name: str, model: str, data: str, config_yaml: str) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        now = time.time()
        self._run("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?)",
                  (run_id, name, now, now, "created", model, data, config_yaml, "{}"))
        return run_id

    def update_run(self, run_id: str, *, status: str | None = None, summary: dict | None = None):
        if status is not None:
            self._run("UPDATE runs SET status=?, updated=? WHERE id=?", (status, time.time(), run_id))
        if summary is not None:
            self._run("UPDATE runs SET summary=?, updated=? WHERE id=?", (json.dumps(summary), time.time(), run_id))

    def run(self, run_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM runs WHERE id=?", (run_id,))
        return _decoded(rows[0], "summary") if rows else None

    def runs(self) -> list[dict]:
        return [_decoded(row, "summary") for row in self._rows("SELECT * FROM runs ORDER BY created DESC")]

    # ---- chats --------------------------------------------------------------------------------------------
    def save_chat(self, chat_id: str | None, title: str, model: dict, messages: list, settings: dict) -> str:
        now = time.time()
        if chat_id is None:
            chat_id = uuid.uuid4().hex[:12]
            self._run("INSERT INTO chats VALUES (?,?,?,?,?,?,?)", (chat_id, now, now, title, json.dumps(model),
                                                                   json.dumps(messages), json.dumps(settings)))
        else:
            self._run("UPDATE chats SET updated=?, title=?, model=?, messages=?, settings=? WHERE id=?",
                      (now, title, json.dumps(model), json.dumps(messages), json.dumps(settings), chat_id))
        return chat_id

    def chat(self, chat_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM chats WHERE id=?", (chat_id,))
        return _decoded(rows[0], "model", "messages", "settings") if rows else None

    def chats(self) -> list[dict]:
        return [{k: row[k] for k in ("id", "title", "created", "updated")}
                for row in self._rows("SELECT id, title, created, updated FROM chats ORDER BY updated DESC")]

    def delete_chat(self, chat_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM chats WHERE id=?", (chat_id,)).rowcount > 0

    # ---- votes and settings -------------------------------------------------------------------------------
    def add_vote(self, model_a: str, model_b: str, outcome: str, prompt: str = "") -> int:
        return self._run("INSERT INTO votes (created, model_a, model_b, outcome, prompt) VALUES (?,?,?,?,?)",
                         (time.time(), model_a, model_b, outcome, prompt))

    def votes(self) -> list[dict]:
        return self._rows("SELECT * FROM votes ORDER BY id")

    def setting(self, key: str, default=None):
        rows = self._rows("SELECT value FROM settings WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else default

    def set_setting(self, key: str, value):
        self._run("INSERT INTO settings VALUES (?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                  (key, json.dumps(value)))


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _decoded(row: dict, *json_fields) -> dict:
    return {**row, **{name: json.loads(row[name]) for name in json_fields}}
