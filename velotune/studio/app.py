"""The Studio's FastAPI app: the page (static/), the JSON and SSE API under /api, and the objects the handlers
share (`Studio`). Slow work never runs on the event loop: model loading, tokenizing and parsing go to a thread
pool, generation to each engine's worker thread, training to its own process.

(No `from __future__ import annotations` here or in the api_* files: FastAPI reads handlers' annotations at run
time.)
"""
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import VelotuneError
from .engines import Engines
from .jobs import JobBusy, JobError, Jobs, NoSuchRun
from .paths import PathRefused, Roots
from .settings import StudioSettings
from .store import Store

log = logging.getLogger("velotune")

STATIC = Path(__file__).parent / "static"
WORK_THREADS = 4


class Studio:
    """What the handlers share: settings, roots, store, jobs, engines and the thread pool for slow work."""

    def __init__(self, settings: StudioSettings):
        settings.prepare()
        settings.ensure_token()   # off loopback a Studio never runs open, however it was built
        self.settings = settings
        self.roots = Roots(settings.roots, private=[settings.home], private_except="runs")
        self.store = Store(settings.database)
        self.jobs = Jobs(settings.runs_dir, self.store, max_running=settings.max_jobs)
        self.engines = Engines(settings.max_loaded_models, settings.dtype, settings.device,
                               max_body_bytes=settings.max_body_bytes)
        self.pool = ThreadPoolExecutor(WORK_THREADS, thread_name_prefix="studio-work")
        self.uploads = settings.home / "uploads"

    async def work(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` on the thread pool, awaited (the event loop stays free)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, lambda: fn(*args, **kwargs))

    def close(self):
        self.engines.close()
        self.jobs.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()


def error_body(message: str, field: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "field": field, **extra}}


def create_app(studio: Studio):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException

    from ..infer.server_guards import allowed_hosts
    from ..infer.server_schema import APIError
    from . import api_chat, api_models, api_train
    from .guard import StudioGuard

    @asynccontextmanager
    async def lifespan(app):
        yield
        studio.close()

    app = FastAPI(title="velotune studio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    settings = studio.settings
    hosts = None if settings.token else allowed_hosts(settings.host, settings.port)
    app.add_middleware(StudioGuard, token=settings.token, allowed_hosts=hosts)

    @app.exception_handler(PathRefused)
    async def refused(request, exc):
        return JSONResponse(error_body(str(exc), "path"), status_code=403)

    @app.exception_handler(JobError)
    async def job_error(request, exc):
        status = 404 if isinstance(exc, NoSuchRun) else 409 if isinstance(exc, JobBusy) else 400
        return JSONResponse(error_body(str(exc)), status_code=status)

    @app.exception_handler(VelotuneError)
    async def user_error(request, exc):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.exception_handler(APIError)
    async def api_error(request, exc):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):
        log.exception("studio request failed")
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}"), status_code=500)

    app.include_router(api_models.router(studio))
    app.include_router(api_train.router(studio))
    app.include_router(api_chat.router(studio))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app

