"""/api endpoints of the Chat and Arena pages: generation settings with their sources, the exact prompt, streaming
answers, file uploads as context, and saved chats.

A chat message is answered by the model's engine: the same server `velotune serve` runs, given an OpenAI chat
body the Studio builds (system prompt, files placed in the last user message, the settings the user changed).
The stream is OpenAI's (`data: {...chat.completion.chunk...}` lines, usage at the end), so the page reads the
Studio and `velotune serve` alike. What was done to the files (kept, cut, left out) comes back in the
`X-Velotune-Notices` header before the first token.
"""
import json
import os
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..errors import VelotuneError
from .requests import field, json_body

SETTING_NAMES = {   # the page's names (SamplingParams') -> the OpenAI request's
    "max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "seed": "seed"}
MAX_ATTACHMENTS = 16
MAX_TITLE = 200
ATTACHMENT_STATUS = {"too_large": 413, "unsupported": 415, "invalid": 422}


def router(studio) -> APIRouter:
    api = APIRouter(prefix="/api")

    def engine_for(body_or_query: dict):
        model = studio.roots.resolve(field(body_or_query, "model")).path
        adapter = body_or_query.get("adapter")
        adapter_dir = studio.roots.resolve(adapter).path if adapter else None
        return studio.work(studio.engines.get, model, adapter_dir)

    @api.get("/chat/settings")
    async def settings(model: str, adapter: str | None = None):
        """Every generation setting the model would use, and where each value comes from."""
        from ..infer.defaults import resolve_sampling
        engine = await engine_for({"model": model, "adapter": adapter})
        resolved = resolve_sampling(None, None, engine.model)
        shown = [name for name in SETTING_NAMES]
        return {"values": {k: resolved.values[k] for k in shown}, "sources": {k: resolved.sources[k] for k in shown},
                "context_length": engine.context_length, "served": engine.served_name}

    @api.post("/chat/prompt")
    async def prompt(request: Request):
        """The exact text the model will receive for this chat, its token count, and the files' fitting."""
        body = await json_body(request, studio)
        engine = await engine_for(body)
        built = await studio.work(_build, studio, engine, body)
        return {k: built[k] for k in ("prompt", "prompt_tokens", "files", "context_length", "max_new_tokens",
                                      "rule")}

    @api.post("/chat")
    async def chat(request: Request):
        from ..infer.server import _ChatShape
        from ..infer.server_schema import ChatRequest
        body = await json_body(request, studio)
        engine = await engine_for(body)
        built = await studio.work(_build, studio, engine, body)
        openai_body = {"model": engine.served_name, "messages": built["messages"], "stream": True,
                       "stream_options": {"include_usage": True}, **built["request_settings"]}
        response = await engine.server.answer(request, json.dumps(openai_body).encode(), ChatRequest, _ChatShape)
        notices = [f["notice"] for f in built["files"] if f.get("notice")]
        response.headers["X-Velotune-Notices"] = json.dumps(notices, ensure_ascii=True)
        response.headers["X-Velotune-Prompt-Tokens"] = str(built["prompt_tokens"])
        return response

    # ---- files as context ------------------------------------------------------------------------------------
    @api.post("/uploads")
    async def upload(request: Request, name: str):
        """One file, sent as the raw request body (`?name=` gives its name); parsed now, kept as text."""
        from .attachments import AttachmentError, read_attachment
        limit = studio.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large(name, int(declared), limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return _too_large(name, size, limit)
            chunks.append(chunk)
        try:
            attachment = await studio.work(read_attachment, name, b"".join(chunks), max_bytes=limit)
        except AttachmentError as exc:
            return JSONResponse({"error": {"message": str(exc), "field": "file", "code": exc.code}},
                                status_code=ATTACHMENT_STATUS.get(exc.code, 422))
        upload_id = secrets.token_hex(8)
        record = {"id": upload_id, "name": attachment.name, "kind": attachment.kind, "text": attachment.text,
                  "bytes": size, "image": attachment.image}
        path = studio.uploads / f"{upload_id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
        return {k: record[k] for k in ("id", "name", "kind", "bytes")} | {"chars": len(attachment.text)}

    # ---- saved chats -----------------------------------------------------------------------------------------
    @api.get("/chats")
    async def chats():
        return {"chats": studio.store.chats()}

    @api.get("/chats/{chat_id}")
    async def chat_get(chat_id: str):
        found = studio.store.chat(chat_id)
        if found is None:
            return JSONResponse({"error": {"message": f"no chat {chat_id!r}"}}, status_code=404)
        return found

    @api.post("/chats")
    async def chat_save(request: Request):
        body = await json_body(request, studio)
        title = field(body, "title", str, False, "chat")[:MAX_TITLE]
        chat_id = field(body, "id", str, False, None)
        if chat_id is not None and studio.store.chat(chat_id) is None:
            return JSONResponse({"error": {"message": f"no chat {chat_id!r} to update (leave 'id' out to save a new "
                                                      "one)", "field": "id"}}, status_code=404)
        chat_id = studio.store.save_chat(chat_id, title,
                                         field(body, "model", dict, False, {}), field(body, "messages", list),
                                         field(body, "settings", dict, False, {}))
        return {"id": chat_id}

    @api.delete("/chats/{chat_id}")
    async def chat_delete(chat_id: str):
        return {"deleted": studio.store.delete_chat(chat_id)}

    return api


def _too_large(name: str, size: int, limit: int):
    return JSONResponse({"error": {"message": f"{os.path.basename(name)}: {size} bytes is more than the upload limit "
                                              f"of {limit} bytes", "field": "file"}}, status_code=413)


def _uploaded(studio, upload_id: str) -> dict:
    if not isinstance(upload_id, str) or not upload_id.isalnum():
        raise VelotuneError(f"attachments: {upload_id!r} is not an upload id")
    path = studio.uploads / f"{upload_id}.json"
    if not path.is_file():
        raise VelotuneError(f"attachments: no upload {upload_id!r} (uploads are kept until the Studio's home is "
                            "cleaned; upload the file again)")
    return json.loads(path.read_text(encoding="utf-8"))


def _notice(fitted, controls_changed: int) -> str | None:
    notes = [fitted.notice] if fitted.notice else []
    if controls_changed:
        notes.append(f'"{fitted.name}": {controls_changed} control string(s) (special tokens, </file>) were made plain '
                     "text so that the file cannot act as markup in the prompt")
    return " ".join(notes) or None


def _bounded_render(template, messages: list):
    """Renders the conversation in the template sandbox first (time and size bounded): a template that loops
    for hours is refused here, before the unbounded render that builds the prompt."""
    if not template:
        return
    from .template_lab import render_preview
    tried = render_preview(None, template, messages, add_generation_prompt=True)
    if tried.error:
        line = f"line {tried.error['line']}: " if tried.error.get("line") else ""
        raise VelotuneError(f"the chat template cannot render this chat: {line}{tried.error['message']} "
                            f"({tried.error['kind']})")


def _with_images(engine, messages: list, images: list, template):
    """The last user message with the uploaded images before its text (OpenAI image_url parts: the engine's server
    reads them as `velotune serve` does); returns the prompt as the model reads it and its token count."""
    from ..infer.vision_prompt import encode_image_prompt, is_vision_model
    if not is_vision_model(engine.model):
        names = ", ".join(r["name"] for r in images)
        raise VelotuneError(f"attachments: {names}: images need a vision-language model (LLaVA, Qwen2-VL, "
                            "Idefics3 / SmolVLM); this model reads text only")
    parts = [{"type": "image_url", "image_url": {"url": r["image"]}} for r in images]
    messages[-1] = {"role": "user", "content": parts + [{"type": "text", "text": messages[-1]["content"]}]}
    ids, _ = encode_image_prompt(engine.model, engine.tokenizer, messages, chat_template=template,
                                 where="the chat", allow_files=False)
    return engine.tokenizer.decode(ids), len(ids)


def _build(studio, engine, body: dict) -> dict:
    """The chat body -> the messages the model gets (system prompt, files in the last user message), the
    settings the user changed, and what the page shows about them."""
    from ..infer.defaults import resolve_sampling
    from ..infer.generation import chat_text
    from .attachment_fit import FIT_RULE, attachment_budget, attachments_prompt, fit_attachments, inert_text
    from .attachments import Attachment
    messages = [dict(m) for m in field(body, "messages", list)]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise VelotuneError(f"messages[{i}]: expected {{'role': str, 'content': str}}")
    system = field(body, "system", str, False, None)
    if system:
        messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
    settings = field(body, "settings", dict, False, {})
    unknown = [k for k in settings if k not in SETTING_NAMES]
    if unknown:
        raise VelotuneError(f"settings: unknown {', '.join(unknown)} (known: {', '.join(SETTING_NAMES)})")
    given = {k: v for k, v in settings.items() if v is not None}
    resolved = resolve_sampling(given, None, engine.model)
    max_new = int(resolved.values["max_new_tokens"])
    upload_ids = field(body, "attachments", list, False, [])
    if len(upload_ids) > MAX_ATTACHMENTS:
        raise VelotuneError(f"attachments: at most {MAX_ATTACHMENTS} files per message, got {len(upload_ids)}")
    tokenizer, template = engine.tokenizer, engine.template()
    _bounded_render(template or getattr(tokenizer, "chat_template", None), messages)
    files = []
    records = [_uploaded(studio, u) for u in upload_ids]
    images = [r for r in records if r.get("kind") == "image"]
    records = [r for r in records if r.get("kind") != "image"]
    if upload_ids and (not messages or messages[-1]["role"] != "user"):
        raise VelotuneError("attachments: the last message must be the user's (the files go with it)")
    if records:
        question = messages[-1]["content"]
        bare = chat_text(tokenizer, messages, template)
        used = len(tokenizer(bare, add_special_tokens=False).input_ids)
        max_new = min(max_new, max(1, engine.context_length - used - 1))
        budget = attachment_budget(engine.context_length, used, max_new)
        made_plain = [inert_text(r["text"], tokenizer) for r in records]
        attachments = [Attachment(name=r["name"], kind=r["kind"], text=text, details={})
                       for r, (text, _) in zip(records, made_plain)]
        fitted = fit_attachments(attachments, tokenizer, budget)
        messages[-1] = {"role": "user", "content": attachments_prompt(fitted, question)}
        files = [{"id": r["id"], "name": f.name, "tokens": f.tokens, "original_tokens": f.original_tokens,
                  "truncated": f.truncated, "dropped": f.dropped, "notice": _notice(f, changed)}
                 for r, f, (_, changed) in zip(records, fitted, made_plain)]
    if images:
        text, prompt_tokens = _with_images(engine, messages, images, template)
        files += [{"id": r["id"], "name": r["name"], "kind": "image", "tokens": None, "notice": None}
                  for r in images]
        order = {upload_id: i for i, upload_id in enumerate(upload_ids)}   # the page lists them as uploaded
        files.sort(key=lambda f: order[f["id"]])
    else:
        text = chat_text(tokenizer, messages, template)
        prompt_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    request_settings = {SETTING_NAMES[k]: v for k, v in given.items()}
    if records and "max_new_tokens" not in given:
        request_settings["max_tokens"] = max(1, min(max_new, engine.context_length - prompt_tokens))
    return {"messages": messages, "prompt": text, "prompt_tokens": prompt_tokens, "files": files,
            "context_length": engine.context_length, "max_new_tokens": max_new, "rule": FIT_RULE,
            "request_settings": request_settings}
