"""/api endpoints of the Train page: the config form, the data preview, and the runs (start, watch, stop, resume,
export)."""
import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .jobs import RUNNING, EventTail, JobError
from .requests import field, json_body

EVENT_POLL_S = 0.2     # how often a live event stream looks for new lines in events.jsonl
KEEPALIVE_S = 15.0     # a comment line that keeps proxies and the browser from closing an idle stream


def router(studio) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/config/schema")
    async def schema():
        from .train_forms import form_schema
        return form_schema()

    @api.post("/config/check")
    async def check(request: Request):
        """The form's values checked as the YAML would be, and by the Studio's own rules (run_policy.py), with
        every bad field named; and the YAML itself."""
        from .train_forms import form_to_yaml
        values = field(await json_body(request, studio), "values", dict)
        clean, errors = await studio.work(_checked_form, studio, values)
        return {"errors": errors, "yaml": form_to_yaml(values) if not errors else None}

    @api.post("/config/from-yaml")
    async def from_yaml(request: Request):
        from .train_forms import yaml_to_form
        return {"values": yaml_to_form(field(await json_body(request, studio), "yaml"))}

    @api.post("/data/preview")
    async def preview(request: Request):
        from .data_preview import preview_data
        from .run_policy import audio_inside, data_inside
        body = await json_body(request, studio)
        model = studio.roots.resolve(field(body, "model"))
        data = studio.roots.resolve(field(body, "data"))
        data_inside(data, studio.roots)
        await studio.work(audio_inside, data, studio.roots, field(body, "values", dict, False, {}))
        values, errors = await studio.work(_checked_form, studio, field(body, "values", dict, False, {}))
        if errors:
            return _refused(errors)
        return await studio.work(preview_data, model.path, data.path, values,
                                 samples=min(int(field(body, "samples", int, False, 3)), 10))

    # ---- runs ------------------------------------------------------------------------------------------------
    @api.get("/runs")
    async def runs():
        return {"runs": [_run_view(studio, run) for run in studio.store.runs()]}

    @api.post("/runs")
    async def start_run(request: Request):
        """Creates a run from the form's values (model and data picked inside the roots; the output directory
        is the run's own) and starts its job."""
        from .run_policy import audio_inside, check_built_config, data_inside
        from .train_forms import form_to_yaml
        body = await json_body(request, studio)
        model = studio.roots.resolve(field(body, "model"))
        data = studio.roots.resolve(field(body, "data"))
        data_inside(data, studio.roots)
        await studio.work(audio_inside, data, studio.roots, field(body, "values", dict, False, {}))
        values, errors = await studio.work(_checked_form, studio, field(body, "values", dict, False, {}),
                                           model.path, data.path)
        if errors:
            return _refused(errors)
        # the config the job will run still reads and writes where the Studio said
        check_built_config(_built(values), str(model.path), str(data.path))
        name = field(body, "name", str, False, None) or f"{model.path.name} on {data.path.name}"
        # "out" is relative to the run directory, where the job runs: the YAML works as it is from the CLI too
        yaml_text = form_to_yaml(values)
        run_id = await studio.work(studio.jobs.create, name, model.ref, data.ref, yaml_text)
        studio.jobs.start(run_id)
        return _run_view(studio, studio.store.run(run_id))

    @api.get("/runs/{run_id}")
    async def run(run_id: str):
        studio.jobs.run_dir(run_id)
        return _run_view(studio, studio.store.run(run_id), with_config=True)

    @api.post("/runs/{run_id}/stop")
    async def stop(run_id: str):
        studio.jobs.stop(run_id)
        return {"stopping": run_id}

    @api.post("/runs/{run_id}/resume")
    async def resume(run_id: str):
        studio.jobs.start(run_id, resume=True)
        return _run_view(studio, studio.store.run(run_id))

    @api.get("/runs/{run_id}/events")
    async def events(run_id: str, request: Request, after: int = 0):
        """Server-sent events: every event of the run from line `after` (or the browser's Last-Event-ID) on,
        then the new ones as the job writes them, and `end` once the job is over. A page that reloads or
        reconnects gets the whole curve again."""
        run_dir = studio.jobs.run_dir(run_id)
        last = request.headers.get("last-event-id")
        start = int(last) + 1 if last is not None and last.isdigit() else max(0, after)
        return StreamingResponse(_event_stream(studio, run_id, run_dir, start, request),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @api.get("/runs/{run_id}/exports")
    async def exports(run_id: str):
        from .exports import list_exports
        run_dir = studio.jobs.run_dir(run_id)
        return {"exports": [{**e, "ref": f"runs:{run_id}/{e['output']}"} for e in list_exports(run_dir)]}

    @api.post("/runs/{run_id}/exports")
    async def export(run_id: str, request: Request):
        """Exports a finished run: merged, adapter, or gguf (with `quant`)."""
        from .exports import start_export
        body = await json_body(request, studio)
        run_dir = studio.jobs.run_dir(run_id)
        run = _run_view(studio, studio.store.run(run_id))
        if run["status"] != "finished":
            raise JobError(f"run {run_id} is {run['status']}: only a finished run is exported")
        if run["adapter"]:
            base, adapter = studio.roots.resolve(run["model"]).path, studio.roots.resolve(run["adapter"]).path
        else:
            base, adapter = studio.roots.resolve(run["trained_model"]).path, None
        state = start_export(run_dir, base, adapter, field(body, "format"), field(body, "quant", str, False, None))
        return {**state, "ref": f"runs:{run_id}/{state['output']}"}

    @api.get("/runs/{run_id}/log")
    async def run_log(run_id: str, tail: int = 200):
        path = studio.jobs.run_dir(run_id) / "job.log"
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []
        return {"lines": lines[-max(1, min(tail, 2000)):]}

    return api


def _run_view(studio, run: dict, with_config: bool = False) -> dict:
    status = studio.jobs.status(run["id"])
    summary = run["summary"] if status != RUNNING and run["summary"] else studio.jobs.summary(run["id"])
    view = {"id": run["id"], "name": run["name"], "created": run["created"], "status": status,
            "model": run["model"], "data": run["data"], "summary": summary,
            "resumable": studio.jobs.resumable(run["id"]),
            # what the run wrote, as picker refs: chat with the adapter over the base, or with the whole model
            "adapter": _output_ref(studio, run["id"], summary.get("adapter_dir")),
            "trained_model": _output_ref(studio, run["id"], summary.get("model_dir"))}
    if with_config:
        view["config_yaml"] = run["config_yaml"]
    return view


def _checked_form(studio, values: dict, model_path=None, data_path=None) -> tuple[dict, list]:
    """The form's values after the Studio's rules (run_policy.py) and the schema's checks, with the model, data and
    output set by the Studio when given: (values, [{"field", "message"}])."""
    from .run_policy import RUN_OUTPUT, form_policy_errors
    from .train_forms import validate_form
    clean, errors = form_policy_errors(values, studio.roots)
    if model_path is not None:
        clean.update({"model.path": str(model_path), "data.path": str(data_path), "train.output_dir": RUN_OUTPUT})
    checked = validate_form(clean)
    return clean, errors + checked.errors


def _built(values: dict):
    from .train_forms import validate_form
    return validate_form(values).config


def _refused(errors: list) -> JSONResponse:
    """A 400 naming every bad field (the messages name their fields, as the YAML loader's do)."""
    return JSONResponse({"error": {"message": "; ".join(e["message"] for e in errors),
                                   "field": errors[0].get("field") or None, "errors": errors}}, status_code=400)


def _output_ref(studio, run_id: str, written) -> str | None:
    """A directory the job wrote (relative to its run directory, or absolute) as a ref under the runs root."""
    if not written:
        return None
    run_dir = studio.settings.runs_dir / run_id
    path = (run_dir / written).resolve()
    if run_dir.resolve() not in path.parents:
        return None
    return f"runs:{run_id}/{path.relative_to(run_dir.resolve()).as_posix()}"


async def _event_stream(studio, run_id: str, run_dir, start: int, request):
    tail, quiet = EventTail(run_dir, start), 0.0

    def sse(event: dict) -> str:
        return f"id: {event['id']}\nevent: {event['kind']}\ndata: {json.dumps(event, default=str)}\n\n"
    while True:
        events = await studio.work(tail.read)
        for event in events:
            yield sse(event)
        if events:
            quiet = 0.0
        if studio.jobs.status(run_id) != RUNNING:
            for event in await studio.work(tail.read):   # what was written just before the end
                yield sse(event)
            yield f"event: end\ndata: {json.dumps({'status': studio.jobs.status(run_id)})}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S
        if quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield ": keep-alive\n\n"


__all__ = ["router", "JobError"]
