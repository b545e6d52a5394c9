"""Chat models the Studio holds in memory: one engine per (model directory, adapter directory).

An engine is the very server `velotune serve` runs (infer/server.py: job builder, generation worker, OpenAI
answers), so a Studio chat is answered by the same code, with the same limits and the same streaming, and adds
only the hop from the page. Each engine has its own model copy and worker thread: the panes of an arena round
decode at the same time instead of one after another (the price is memory: `max_loaded` engines at most, the
least recently used one is closed first).
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("velotune")

BASE, ADAPTER = "base", "adapter"   # the names an engine serves its base and its adapter under


@dataclass
class Engine:
    key: tuple
    server: object            # infer.server.Server
    model_dir: Path
    adapter_dir: Path | None

    @property
    def served_name(self) -> str:
        return ADAPTER if self.adapter_dir is not None else BASE

    @property
    def model(self):
        return self.server.builder.model

    @property
    def tokenizer(self):
        return self.server.builder.tokenizer

    def template(self) -> str | None:
        adapter = ADAPTER if self.adapter_dir is not None else None
        return self.server.builder.chat.get(adapter, self.server.builder.chat[None])[0]

    @property
    def context_length(self) -> int:
        return self.server.builder.context_length


class Engines:
    def __init__(self, max_loaded: int = 3, dtype: str | None = None, device: str | None = None,
                 max_body_bytes: int | None = None):
        self.max_loaded, self.dtype, self.device = max_loaded, dtype, device
        self.max_body_bytes = max_body_bytes
        self.loaded: OrderedDict[tuple, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple, threading.Lock] = {}

    def get(self, model_dir: Path, adapter_dir: Path | None = None) -> Engine:
        """The engine for this model (+ adapter), loaded on first use (blocking: call it from a worker thread)."""
        key = (str(model_dir), str(adapter_dir) if adapter_dir else None)
        with self._lock:
            engine = self.loaded.get(key)
            if engine is not None:
                self.loaded.move_to_end(key)
                return engine
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:   # two requests for the same model load it once
            with self._lock:
                if key in self.loaded:
                    return self.loaded[key]
            engine = self._load(key, Path(model_dir), Path(adapter_dir) if adapter_dir else None)
            with self._lock:
                self.loaded[key] = engine
                while len(self.loaded) > self.max_loaded:
                    _, old = self.loaded.popitem(last=False)
                    log.info("studio: unloading %s (keeping %d models loaded)", old.model_dir, self.max_loaded)
                    old.server.close()
            return engine

    def _load(self, key, model_dir: Path, adapter_dir: Path | None) -> Engine:
        from ..infer.chat_cli import load_for_inference
        from ..infer.server import build_server
        model, tokenizer = load_for_inference(str(model_dir), None, self.dtype, None, self.device)
        adapters = {ADAPTER: str(adapter_dir)} if adapter_dir is not None else {}
        server = build_server(model, tokenizer, BASE, adapters, max_body_bytes=self.max_body_bytes)
        log.info("studio: loaded %s%s", model_dir, f" with adapter {adapter_dir}" if adapter_dir else "")
        return Engine(key, server, model_dir, adapter_dir)

    def forget(self, directory: Path):
        """Closes the engines that read `directory` (its chat template changed): the next use reloads them."""
        directory = str(directory)
        with self._lock:
            for key in [k for k in self.loaded if directory in k]:
                self.loaded.pop(key).server.close()

    def close(self):
        with self._lock:
            for engine in self.loaded.values():
                engine.server.close()
            self.loaded.clear()
