"""From a validated request to a generation job: which adapter, the prompt's token ids, the resolved sampling
settings, and the context-length check. Everything here runs before the job is queued, so a bad request is
answered at once with a 4xx and never reaches the worker."""
from __future__ import annotations

from ..errors import ConfigError, VelotuneError
from .defaults import SOURCE_REQUEST, resolve_sampling
from .generate import encode_prompt
from .sampling import SamplingParams
from .server_queue import Job
from .server_schema import APIError, ChatRequest, bad_request, chat_messages, sampling_fields


class JobBuilder:
    """What the server knows about the model it serves: names, tokenizer, context length, default settings."""

    def __init__(self, model, tokenizer, base_name: str, adapter_names=(), sampling_config: dict | None = None):
        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.adapter_names = list(adapter_names)
        self.sampling_config = sampling_config or None
        limit = getattr(model, "max_seq_length", None)
        self.context_length = limit if isinstance(limit, int) and limit > 0 else None
        args = getattr(model, "args", None) or getattr(model, "config", None)
        self.vocab_size = getattr(args, "vocab_size", None) or len(tokenizer)

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
        is_chat = isinstance(request, ChatRequest)
        prompt_ids = self.chat_ids(request) if is_chat else self.completion_ids(request.prompt)
        sampling = self.sampling(request, len(prompt_ids), "messages" if is_chat else "prompt")
        return Job(adapter, prompt_ids, sampling, deliver)

    # ---- the prompt --------------------------------------------------------------------------------------
    def chat_ids(self, request) -> list[int]:
        messages = chat_messages(request)
        try:
            ids = encode_prompt(self.tokenizer, messages)
        except VelotuneError as exc:
            raise bad_request(f"{exc}; use /v1/completions with a plain prompt", param="messages") from None
        except Exception as exc:   # the template's own checks (role order, ...) raise from Jinja
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages") from None
        return self._nonempty(ids, "messages")

    def completion_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise bad_request(f"'prompt' holds {len(prompt)} prompts; this server takes one per request",
                                  param="prompt", code="unsupported_parameter")
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._nonempty(encode_prompt(self.tokenizer, prompt), "prompt")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"'prompt': token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                              param="prompt")
        return self._nonempty(list(prompt), "prompt")

    @staticmethod
    def _nonempty(ids, param):
        if not ids:
            raise bad_request(f"'{param}' encodes to no tokens: nothing to continue", param=param)
        return ids

    # ---- the settings ------------------------------------------------------------------------------------
    def sampling(self, request, prompt_tokens: int, prompt_param: str) -> dict:
        """Every SamplingParams field: the request, then the server's settings, generation_config.json, the
        family's and the global defaults. A max_tokens left to the defaults is cut to what the context holds."""
        try:
            resolved = resolve_sampling(sampling_fields(request), self.sampling_config, self.model)
            values = dict(resolved.values)
            SamplingParams(**values)
        except ConfigError as exc:
            raise bad_request(str(exc)) from None
        limit = self.context_length
        if limit is None:
            return values
        asked = values["max_new_tokens"]
        if resolved.sources["max_new_tokens"] != SOURCE_REQUEST:
            # a default, not asked for: as much of it as the context holds (a full context still fails below)
            asked = values["max_new_tokens"] = min(asked, max(limit - prompt_tokens, 1))
        if prompt_tokens + asked > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + asked} tokens ({prompt_tokens} in the {prompt_param}, {asked} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param, code="context_length_exceeded")
        return values
