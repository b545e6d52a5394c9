"""velotune Studio: a local web app (one FastAPI process) to train, chat, compare models and edit chat templates.

`velotune studio` serves the prebuilt page in `static/` and the JSON/SSE API under /api. Training jobs run in
their own processes (jobs.py); chat models are held by engines that own one generation worker each (engines.py).
Runs, chats, votes and settings live in one SQLite file under the Studio's data directory (store.py).
"""
