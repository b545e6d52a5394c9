"""From a validated request to a generation job: which adapter, the prompt's token ids, the resolved sampling
settings, and the context-length check. Everything here runs before the job is queued, so a bad request is
answered at once with a 4xx and never reaches the worker.

Chat requests are rendered with the chat template of the model they name: `--chat-template` for all of them
when given, else an adapter's own saved template (the one it was trained with), else the base's. They stop
at the end-of-turn token that template writes, as well as at the model's EOS ids."""
from __future__ import annotations

import logging

from ..errors import ConfigError, VelotuneError
from .defaults import DEFAULT_CONTEXT_LENGTH, SOURCE_REQUEST, resolve_sampling
from .generation import chat_text, end_of_turn_ids
from .sampling import SamplingParams
from .server_queue import Job
from .server_schema import APIError, ChatRequest, bad_request, chat_messages, sampling_fields

log = logging.getLogger("velotune")

# A prompt text longer than this many characters per context token is first measured on a prefix of that
# length: when the prefix alone is over twice the context, the text cannot fit, and it is refused without
# tokenizing all of it (a few MB of text take seconds and hundreds of MB to tokenize).
PREFIX_CHARS_PER_TOKEN = 16


def chat_templates_for(tokenizer, adapters: dict, override: str | None = None) -> dict:
    """Served adapter name, or None for the base -> the chat template its chat requests are rendered with
    (None: there is none). `override` (--chat-template: a name, a file or Jinja text) serves every model."""
    from ..data.templates import default_template, load_chat_template, saved_chat_template
    if override:
        template = load_chat_template(override, tokenizer, source="--chat-template")
        return dict.fromkeys([None, *adapters], template)
    templates = {None: default_template(getattr(tokenizer, "chat_template", None))}
    for name, path in adapters.items():
        saved = saved_chat_template(path)
        templates[name] = saved or templates[None]
        log.info("adapter %s: %s chat template", name, "its own saved" if saved else "the base model's")
    return templates


class JobBuilder:
    """What the server knows about the model it serves: names, tokenizer, limits, default settings.

    Every request is bounded: prompt + max_tokens by the context length (the model's `max_seq_length`, else
    DEFAULT_CONTEXT_LENGTH), and max_tokens by `max_tokens_limit` when given."""

    def __init__(self, model, tokenizer, base_name: str, adapter_names=(), sampling_config: dict | None = None,
                 max_tokens_limit: int | None = None, chat_templates: dict | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapter_names = list(adapter_names)
        # adapter name or None (the base) -> (chat template, its end-of-turn ids); see chat_templates_for.
        # Without templates: the tokenizer's own for every model.
        templates = chat_templates or {None: None}
        self.chat = {name: (template, end_of_turn_ids(tokenizer, template)) for name, template in templates.items()}
        self.sampling_config = sampling_config or None
        self.max_tokens_limit = max_tokens_limit
        limit = model.max_seq_length
        if limit is not None and limit > 0:
            self.context_length = limit
        else:
            self.context_length = DEFAULT_CONTEXT_LENGTH
            log.warning("the model states no context length: each request is held to %d tokens (prompt + "
                        "max_tokens); set --max-seq-length to change it", DEFAULT_CONTEXT_LENGTH)
        self.vocab_size = model.args.vocab_size or len(tokenizer)

    def model_ids(self) -> list[str]:
        return [self.base_name] + self.adapter_names

    def adapter_for(self, model_id: str) -> str | None:
        """The adapter a `model` field names (None: the base), or a 404."""
        if model_id == self.base_name:
            return None
        if model_id in self.adapter_names:
            return model_id
        raise APIError(404, f"The model `{model_id}` does not exist. Served models: "
                       + ", ".join(self.model_ids()), "invalid_request_error", "model", "model_not_found")

    def build(self, request, deliver) -> Job:
        adapter = self.adapter_for(request.model)
        if not isinstance(request, ChatRequest):
            prompt_ids = self.completion_ids(request.prompt)
            return Job(adapter, prompt_ids, self.sampling(request, len(prompt_ids), "prompt"), deliver)
        template, end_ids = self.chat.get(adapter, self.chat[None])
        prompt_ids, images = self.chat_ids(request, template)
        sampling = self.sampling(request, len(prompt_ids), "messages")
        if end_ids:   # an engine option (generate.ENGINE_OPTIONS): more ids that end the reply
            sampling["eos_token_ids"] = end_ids
        return Job(adapter, prompt_ids, sampling, deliver, images=images)

    # ---- the prompt --------------------------------------------------------------------------------------
    def chat_ids(self, request, template: str | None = None) -> tuple[list[int], dict | None]:
        """The prompt's token ids, and its images' pixel tensors (None without images)."""
        from .vision_prompt import encode_image_prompt, has_images, is_vision_model
        messages = chat_messages(request, images=is_vision_model(self.model))
        if has_images(messages):
            try:
                ids, images = encode_image_prompt(self.model, self.tokenizer, messages, chat_template=template,
                                                  where="messages", allow_files=False)
            except VelotuneError as exc:   # an unreadable image, a template that drops image tokens
                raise bad_request(str(exc), param="messages") from None
            self.check_length(len(ids))
            return ids, images
        try:
            text = chat_text(self.tokenizer, messages, template)
        except VelotuneError as exc:
            raise bad_request(f"{exc}; use /v1/completions with a plain prompt", param="messages") from None
        except Exception as exc:   # the template's own checks (role order, ...) raise from Jinja
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages") from None
        return self._encode(text, "messages", special_tokens=False), None

    def check_length(self, tokens: int):
        if tokens > self.context_length:
            raise bad_request(f"This model's maximum context length is {self.context_length} tokens. However, the "
                              f"messages (with their images' tokens) hold {tokens}. Please send fewer or smaller "
                              "images, or shorter messages.", param="messages", code="context_length_exceeded")

    def completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(f"'prompt' holds {len(prompt)} prompts; this server takes one per request",
                                  param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):   # as generate.encode_prompt encodes it: with the tokenizer's special tokens
            return self._encode(prompt, "prompt", special_tokens=True)
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"'prompt': token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                              param="prompt")
        return self._nonempty(list(prompt), "prompt")

    def _encode(self, text: str, param: str, special_tokens: bool) -> list[int]:
        """The text's token ids; a text far longer than the context is refused from a prefix (see
        PREFIX_CHARS_PER_TOKEN)."""
        limit = self.context_length
        head = limit * PREFIX_CHARS_PER_TOKEN
        if len(text) > head:
            counted = len(self.tokenizer(text[:head], add_special_tokens=False).input_ids)
            if counted > 2 * limit:
                raise bad_request(
                    f"This model's maximum context length is {limit} tokens. However, the {param} holds far more: "
                    f"its first {head} characters alone are {counted} tokens. Please reduce the length of the "
                    f"{param}.", param=param, code="context_length_exceeded")
        return self._nonempty(list(self.tokenizer(text, add_special_tokens=special_tokens).input_ids), param)

    @staticmethod
    def _nonempty(ids, param):
        if not ids:
            raise bad_request(f"'{param}' encodes to no tokens: nothing to continue", param=param)
        return ids

    # ---- the settings ------------------------------------------------------------------------------------
    def sampling(self, request, prompt_tokens: int, prompt_param: str) -> dict:
        """Every SamplingParams field: the request, then the server's settings, generation_config.json, the
        family's and the global defaults. A max_tokens left to the defaults is cut to what the limits allow."""
        try:
            resolved = resolve_sampling(sampling_fields(request), self.sampling_config, self.model)
            values = dict(resolved.values)
            SamplingParams(**values)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        limit, cap = self.context_length, self.max_tokens_limit
        asked = values["max_new_tokens"]
        if resolved.sources["max_new_tokens"] != SOURCE_REQUEST:
            # a default, not asked for: as much of it as the limits allow (a full context still fails below)
            asked = values["max_new_tokens"] = min(asked, max(limit - prompt_tokens, 1), cap or asked)
        elif cap is not None and asked > cap:
            raise bad_request(f"max_tokens is too large: {asked}. This server gives at most {cap} completion "
                              "tokens per request.", param="max_tokens", code="invalid_value")
        if prompt_tokens + asked > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {prompt_param}, {asked} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param, code="context_length_exceeded")
        return values
