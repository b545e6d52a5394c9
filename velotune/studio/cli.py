"""`velotune studio [--host 127.0.0.1] [--port 7860] [--models-dir DIR] [--datasets-dir DIR] [--home DIR]`."""
from __future__ import annotations

import logging

log = logging.getLogger("velotune")


def add_studio_parser(subparsers):
    from .settings import DEFAULT_LOADED_MODELS, DEFAULT_MAX_JOBS, DEFAULT_PORT, DEFAULT_UPLOAD_BYTES
    p = subparsers.add_parser("studio", help="a local web app to train, chat, compare models and edit chat templates")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; any other needs the token, made if not given)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}")
    p.add_argument("--models-dir", dest="models_dir", default=".",
                   help="the directory the model pickers show (default: the current directory)")
    p.add_argument("--datasets-dir", dest="datasets_dir", default=None,
                   help="the directory the data pickers show (default: the models directory)")
    p.add_argument("--home", default="~/.velotune/studio",
                   help="the Studio's own directory: database, runs, uploads (default: ~/.velotune/studio)")
    p.add_argument("--token", default=None, help="the token every request must carry (off loopback: generated "
                                                 "and printed when not given)")
    p.add_argument("--max-upload-bytes", dest="max_upload_bytes", type=int, default=DEFAULT_UPLOAD_BYTES)
    p.add_argument("--max-loaded-models", dest="max_loaded_models", type=int, default=DEFAULT_LOADED_MODELS,
                   help="chat models kept in memory at once (default: %(default)s)")
    p.add_argument("--max-jobs", dest="max_jobs", type=int, default=DEFAULT_MAX_JOBS,
                   help="training jobs at once (default: %(default)s)")
    p.add_argument("--dtype", default=None, help="dtype chat models load in (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="where chat models run (default: cuda when available)")
    p.add_argument("--log-level", dest="log_level", default="warning")
    p.set_defaults(func=run_studio)
    return p


def run_studio(ns):
    from ..extras import require_extra
    require_extra("studio", "velotune studio")
    from .settings import StudioSettings
    settings = StudioSettings(home=ns.home, roots={"models": ns.models_dir,
                                                   "datasets": ns.datasets_dir or ns.models_dir},
                              host=ns.host, port=ns.port, token=ns.token, max_upload_bytes=ns.max_upload_bytes,
                              max_loaded_models=ns.max_loaded_models, max_jobs=ns.max_jobs, device=ns.device, dtype=ns.dtype)
    token = settings.ensure_token()
    import uvicorn

    from .app import Studio, create_app
    app = create_app(Studio(settings))
    shown = f"[{ns.host}]" if ":" in ns.host else ns.host
    url = f"http://{shown}:{ns.port}/" + (f"?token={token}" if token else "")
    print(f"velotune studio: {url}", flush=True)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, timeout_graceful_shutdown=5)
