"""/api endpoints about what the Studio can see: its info, the file pickers, chat templates, arena votes."""
from fastapi import APIRouter, Request

from .. import __version__
from ..errors import VelotuneError
from .requests import field, json_body

# the page's inputs whose values the Studio remembers across restarts
PAGE_SETTINGS = ("train-model", "train-data", "chat-model", "chat-adapter", "chat-system", "tpl-model", "tpl-adapter")


def router(studio) -> APIRouter:
    api = APIRouter(prefix="/api")

    @api.get("/info")
    async def info():
        from .attachment_fit import FIT_RULE
        from .attachments import allowed_extensions
        s = studio.settings
        return {"version": __version__, "roots": studio.roots.names(), "host": s.host,
                "token_required": bool(s.token), "max_upload_bytes": s.max_upload_bytes,
                "max_loaded_models": s.max_loaded_models, "attachment_rule": FIT_RULE,
                "attachment_types": allowed_extensions()}

    @api.get("/settings")
    async def page_settings():
        return {"values": studio.store.setting("page", {})}

    @api.post("/settings")
    async def save_page_settings(request: Request):
        """The page's remembered choices (last model, data file, adapter...): short strings under known names."""
        given = field(await json_body(request, studio), "values", dict)
        bad = [k for k, v in given.items() if k not in PAGE_SETTINGS or not isinstance(v, str) or len(v) > 1000]
        if bad:
            raise VelotuneError(f"settings: {', '.join(map(repr, bad))} not kept (known: {', '.join(PAGE_SETTINGS)}; "
                                "text values of at most 1000 characters)")
        studio.store.set_setting("page", {**studio.store.setting("page", {}), **given})
        return {"values": studio.store.setting("page", {})}

    @api.get("/files")
    async def files(ref: str):
        return await studio.work(studio.roots.listing, ref)

    # ---- chat templates ------------------------------------------------------------------------------------
    @api.get("/templates")
    async def template(model: str, adapter: str | None = None):
        from .template_lab import SAMPLE_CONVERSATION, template_in_use
        model_dir = studio.roots.resolve(model).path
        adapter_dir = studio.roots.resolve(adapter).path if adapter else None
        info = await studio.work(template_in_use, model_dir, adapter_dir)
        return {**_as_dict(info), "sample": SAMPLE_CONVERSATION}

    @api.post("/templates/preview")
    async def template_preview(request: Request):
        from .template_lab import render_preview
        body = await json_body(request, studio)
        model_dir = studio.roots.resolve(field(body, "model")).path
        tokenizer = await studio.work(_tokenizer, model_dir)
        preview = await studio.work(render_preview, tokenizer, field(body, "template"), field(body, "messages", list),
                                    add_generation_prompt=bool(body.get("add_generation_prompt", False)),
                                    train_on=field(body, "train_on", str, False, "assistant"))
        return _as_dict(preview)

    @api.post("/templates/save")
    async def template_save(request: Request):
        from .paths import PathRefused, describe
        from .template_lab import SAMPLE_CONVERSATION, render_preview, save_template
        body = await json_body(request, studio)
        target = studio.roots.resolve(field(body, "directory"))
        if describe(target.path) not in ("model", "adapter"):
            raise PathRefused(f"path {target.ref!r}: a template is saved with a model or an adapter (a directory "
                              "holding config.json or adapter_config.json)")
        template = field(body, "template")
        # every chat with this model will render it: it must render the sample within the sandbox's limits first
        tried = await studio.work(render_preview, None, template, SAMPLE_CONVERSATION)
        if tried.error:
            line = f"line {tried.error['line']}: " if tried.error.get("line") else ""
            raise VelotuneError(f"not saved: {line}{tried.error['message']} ({tried.error['kind']})")
        path = await studio.work(save_template, target.path, template)
        studio.engines.forget(target.path)   # chat answers with the new template from the next message on
        return {"saved": f"{target.ref}/{path.name}"}

    # ---- arena votes -----------------------------------------------------------------------------------------
    @api.post("/arena/votes")
    async def vote(request: Request):
        from .ratings import leaderboard
        body = await json_body(request, studio)
        a, b, outcome = field(body, "model_a"), field(body, "model_b"), field(body, "outcome")
        leaderboard([(a, b, outcome)])   # the same checks as the table's: refused before it is stored
        vote_id = studio.store.add_vote(a, b, outcome, field(body, "prompt", str, False, ""))
        return {"id": vote_id}

    @api.get("/arena/leaderboard")
    async def board():
        from .ratings import leaderboard, to_json
        votes = [(v["model_a"], v["model_b"], v["outcome"]) for v in studio.store.votes()]
        return {"votes": len(votes), "ratings": to_json(await studio.work(leaderboard, votes))}

    return api


_TOKENIZERS: dict = {}


def _tokenizer(model_dir):
    """The directory's tokenizer, kept while its files are unchanged (previews ask for it on every edit)."""
    from ..errors import ConfigError
    from ..models.tokenizer import load_tokenizer
    stamp = tuple(p.stat().st_mtime_ns for p in sorted(model_dir.glob("tokenizer*")))
    cached = _TOKENIZERS.get(str(model_dir))
    if cached is None or cached[0] != stamp:
        tokenizer = load_tokenizer(model_dir)
        if tokenizer is None:
            raise ConfigError(f"{model_dir}: no tokenizer files")
        cached = _TOKENIZERS[str(model_dir)] = (stamp, tokenizer)
    return cached[1]


def _as_dict(value):
    import dataclasses
    if dataclasses.is_dataclass(value):
        return {k: str(v) if hasattr(v, "is_dir") else v for k, v in dataclasses.asdict(value).items()}
    return value
