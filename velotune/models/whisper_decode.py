"""Greedy decoding for Whisper: a batch of utterances encoded once, the decoder run over the prompt and then one
token a step, with its self-attention keys and values cached and each layer's cross-attention keys and values
projected from the encoder's output once per utterance.

Ids only: turning audio into features and ids into text belongs to the data pipeline and the tokenizer. No
token is forced: the prompt carries whatever start, language and task tokens the caller wants. Tokens are
suppressed only when asked (`suppress_ids` at every step, `begin_suppress_ids` at the first), as a checkpoint's
generation_config.json lists them for transformers' generate().
"""
from __future__ import annotations

import torch

from .interface import VelotuneModel
from .whisper_blocks import DecodingCache
from .whisper_files import SPEECH_SEQ2SEQ


def _prompt_rows(prompt_ids, batch: int, device) -> torch.Tensor:
    """The prompt as [batch, P] ids: one prompt for every utterance ([P] or a list of ints), or one per row."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt.unsqueeze(0).expand(batch, -1)
    if prompt.dim() != 2 or prompt.shape[0] != batch or prompt.shape[1] == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of ids, [P] or [{batch}, P] (one row per utterance), "
                         f"got shape {list(prompt.shape)}")
    return prompt


@torch.no_grad()
def transcribe_ids(model, input_features: torch.Tensor, prompt_ids, max_new_tokens: int,
                   eos_id: int | None = None, pad_id: int | None = None, suppress_ids=(),
                   begin_suppress_ids=()) -> torch.Tensor:
    """Greedy decoding: the new ids [batch, steps] after the prompt, steps <= max_new_tokens.

    input_features: log-mel frames [batch, num_mel_bins, 2 * max_source_positions] (or one utterance without the
    batch dimension); prompt_ids: the decoder's first ids (decoder_start_token_id, then language / task / notimestamps
    tokens as wanted), [P] for all rows or [batch, P]. A row that produced `eos_id` keeps it and is padded after it
    with `pad_id` (default: config.json's pad_token_id, else eos_id); decoding stops when every row has ended.
    The same ids as transformers' greedy generate() (do_sample=False, num_beams=1) with the same decoder_input_ids
    and no forced or suppressed tokens."""
    if not isinstance(model, VelotuneModel) or model.task != SPEECH_SEQ2SEQ:
        raise TypeError(f"transcribe_ids needs a velotune Whisper model (load_whisper), got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    weight = model.model.encoder.conv1.weight
    features = input_features.to(device=weight.device, dtype=weight.dtype)
    if features.dim() == 2:
        features = features.unsqueeze(0)
    prompt = _prompt_rows(prompt_ids, features.shape[0], weight.device)
    limit = model.args.max_target_positions
    if prompt.shape[1] + max_new_tokens > limit:
        raise ValueError(f"a prompt of {prompt.shape[1]} ids plus max_new_tokens={max_new_tokens} passes the "
                         f"{limit} decoder positions of this model (max_target_positions)")
    pad = pad_id if pad_id is not None else (model.args.pad_token_id if model.args.pad_token_id is not None
                                             else eos_id)
    if max_new_tokens == 0:
        return prompt.new_empty(prompt.shape[0], 0)
    was_training = model.training
    model.eval()
    try:
        cache = DecodingCache(prompt.shape[1] + max_new_tokens, len(model.model.decoder.layers))
        hidden = model.decode(prompt, model.encode(features), cache=cache)
        finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        steps = []
        suppress = torch.as_tensor(list(suppress_ids), dtype=torch.long, device=prompt.device)
        begin = torch.as_tensor(list(begin_suppress_ids), dtype=torch.long, device=prompt.device)
        for step in range(max_new_tokens):
            logits = model.logits(hidden[:, -1])
            if suppress.numel() or (step == 0 and begin.numel()):
                logits = logits.clone()
                logits[:, suppress] = float("-inf")
                if step == 0:
                    logits[:, begin] = float("-inf")
            ids = logits.argmax(dim=-1)
            if eos_id is not None:
                ids = torch.where(finished, torch.full_like(ids, pad if pad is not None else eos_id), ids)
                finished |= ids == eos_id
            steps.append(ids)
            if step + 1 == max_new_tokens or (eos_id is not None and bool(finished.all())):
                break
            hidden = model.decode(ids[:, None], None, cache=cache)  # cross-attention reads the cached keys
    finally:
        model.train(was_training)
    return torch.stack(steps, dim=1)


__all__ = ["transcribe_ids"]
