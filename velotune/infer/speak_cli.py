"""`velotune speak MODEL --text "..." --out out.wav`: text to speech with a model trained by objective tts.

MODEL is what the run wrote: the model directory, or the adapter directory (its base model is the one
adapter_config.json names, or --base). Both hold tts_config.json (the codec and the speech tokens' ids). The
prompt is the training one; generation is velotune's own decoder (KV cache, greedy or sampled), with every token
but the codes of the next frame slot masked out, and <|end_of_speech|> allowed only between frames, so what comes
out always de-interleaves into whole frames. The codes are decoded by the codec (--codec, default: the directory
tts_config.json names) and written as 16-bit PCM WAV.
"""
from __future__ import annotations

import logging
import wave
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from .decoder import FINISH_EOS, Decoder, _EvalMode
from .sampling import SamplingParams

log = logging.getLogger("velotune")

MAX_NEW_TOKENS = 1200   # about 14 s of SNAC 24 kHz audio (7 tokens per 1/11.7 s frame)


# ---- loading ---------------------------------------------------------------------------------------------------

def load_speech_model(path, *, base=None, dtype=None, device=None):
    """(model, tokenizer, tts) of a tts run's output: a model directory, or an adapter directory on its base model
    (`base`, default: the one adapter_config.json names) grown to the adapter's vocabulary first. `tts` is
    read_tts_config's dict (codec spec, speech tokens, vocab size, codec source)."""
    from ..audio.tts_data import speech_tokens
    from ..lora import load_adapter, read_adapter_config
    from ..models.loader import load
    from ..models.tokenizer import load_tokenizer
    from ..training.objectives.tts import read_tts_config, resize_vocabulary
    path = Path(path)
    tts = read_tts_config(path)
    if (path / "adapter_config.json").is_file():
        base = base or read_adapter_config(path).get("base_model_name_or_path")
        if not base:
            raise ConfigError(f"{path}: adapter_config.json names no base model: pass --base")
        model, _ = load(base, dtype=dtype, device=device, load_tokenizer_files=False)
        rows = model.get_input_embeddings().weight.shape[0]
        if tts["vocab_size"] < rows:
            raise CheckpointError(f"{path}: vocab_size {tts['vocab_size']} is smaller than the base model's {rows} "
                                  f"({base}): the adapter belongs to another base")
        resize_vocabulary(model, tts["vocab_size"])   # the adapter's modules_to_save bring the trained rows
        load_adapter(model, path, trainable=False)
    else:
        model, _ = load(path, dtype=dtype, device=device, load_tokenizer_files=False)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise CheckpointError(f"{path}: no tokenizer files (the tts run saves the extended tokenizer there)")
    found = speech_tokens(tokenizer, tts["spec"], where=f"{path}'s tokenizer")
    if found != tts["tokens"]:
        raise CheckpointError(f"{path}: the tokenizer's speech token ids differ from tts_config.json's")
    return model.eval(), tokenizer, tts


# ---- decoding ---------------------------------------------------------------------------------------------------

class SpeechDecoder(Decoder):
    """The decoder with each row's next token restricted to the codes of its next frame slot, and
    <|end_of_speech|> (the EOS here) allowed only after whole frames."""

    def __init__(self, model, input_ids, params, *, tokens, spec, **kwargs):
        super().__init__(model, input_ids, None, params, eos_token_ids=[tokens.end_of_speech], **kwargs)
        self.speech, self.spec = tokens, spec

    def _forward(self, ids, mask):
        logits = super()._forward(ids, mask)
        allowed = torch.full_like(logits, float("-inf"))
        per_frame, size, base = self.spec.codes_per_frame, self.spec.codebook_size, self.speech.code_base
        for pos, row in enumerate(self.rows):
            made = len(self.tokens[row])
            low = base + (made % per_frame) * size
            allowed[pos, low:low + size] = logits[pos, low:low + size]
            if made and made % per_frame == 0:
                allowed[pos, self.speech.end_of_speech] = logits[pos, self.speech.end_of_speech]
        return allowed


@dataclass
class SpokenCodes:
    code_tokens: list        # the generated code token ids (whole frames)
    codes: list              # per level, a LongTensor [frames * n_level]
    frames: int
    finish_reason: str       # "eos" (<|end_of_speech|>) or "length" (max_new_tokens; a partial frame is dropped)


@dataclass
class Speech:
    waveform: torch.Tensor   # float32 [frames * samples_per_frame]
    sample_rate: int
    codes: list
    frames: int
    finish_reason: str


@torch.inference_mode()
def speak_codes(model, tokenizer, text: str, *, tokens, spec, speaker: str | None = None,
                max_new_tokens: int = MAX_NEW_TOKENS, params: SamplingParams | None = None, **sampling) -> SpokenCodes:
    """The codes a tts-trained model speaks `text` with (greedy unless `sampling` says otherwise: temperature,
    top_p, top_k, repetition_penalty, seed ...), without decoding them to audio."""
    from ..audio.tts_data import prompt_ids
    params = (params or SamplingParams()).replace(max_new_tokens=max_new_tokens, **sampling)
    prompt = prompt_ids(tokenizer, tokens, text, speaker)
    decoder = SpeechDecoder(model, prompt, params, tokens=tokens, spec=spec)
    with _EvalMode(model):
        for _ in decoder.steps():
            pass
    out = decoder.output()
    generated, reason = out.tokens[0], out.finish_reasons[0]
    whole = len(generated) - len(generated) % spec.codes_per_frame
    if whole < len(generated):
        log.warning("max_new_tokens (%d) ended the speech within a frame: its %d codes are dropped",
                    max_new_tokens, len(generated) - whole)
    if whole == 0:
        raise ConfigError(f"no whole frame generated (max_new_tokens {max_new_tokens}; a frame is "
                          f"{spec.codes_per_frame} tokens)")
    generated = generated[:whole]
    codes = spec.tokens_to_codes(generated, tokens.code_base, "the generated tokens")
    return SpokenCodes(generated, codes, whole // spec.codes_per_frame, reason if reason == FINISH_EOS else "length")


def speak(model, tokenizer, text: str, codec, *, speaker: str | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
          tokens=None, params: SamplingParams | None = None, **sampling) -> Speech:
    """`text` spoken by a tts-trained model: its codes decoded by `codec` (an AudioCodec) into a waveform of
    frames * codec.samples_per_frame samples at codec.sample_rate. `tokens` (SpeechTokens) default to the
    tokenizer's, checked against the codec (VocabularyMismatch when the model was trained with another)."""
    from ..audio.tts_data import speech_tokens
    if tokens is None:
        tokens = speech_tokens(tokenizer, codec.spec)
    elif tokens.code_count != codec.spec.code_tokens:
        from ..audio.tts_data import VocabularyMismatch
        raise VocabularyMismatch(f"the model has {tokens.code_count} speech code tokens but the codec needs "
                                 f"{codec.spec.code_tokens} ({codec.codes_per_frame} per frame x codebook "
                                 f"{codec.codebook_size}): it was trained with another codec")
    spoken = speak_codes(model, tokenizer, text, tokens=tokens, spec=codec.spec, speaker=speaker,
                         max_new_tokens=max_new_tokens, params=params, **sampling)
    waveform = codec.decode(spoken.codes)
    return Speech(waveform, codec.sample_rate, spoken.codes, spoken.frames, spoken.finish_reason)


def write_wav(path, waveform, sample_rate: int) -> Path:
    """Mono 16-bit PCM WAV (samples clipped to [-1, 1])."""
    path = Path(path)
    path.write_bytes(wav_bytes(waveform, sample_rate))
    return path


def wav_bytes(waveform, sample_rate: int) -> bytes:
    """The bytes of a mono 16-bit PCM WAV file (samples clipped to [-1, 1])."""
    import io
    samples = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1).clamp(-1.0, 1.0)
    pcm = (samples * 32767.0).round().to(torch.int16).numpy().tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes(pcm)
    return buffer.getvalue()


# ---- the command -----------------------------------------------------------------------------------------------

def add_speak_parser(subparsers):
    p = subparsers.add_parser("speak", help="text to speech with a model trained by objective tts")
    p.add_argument("model", help="the model or adapter directory a tts run wrote (with tts_config.json)")
    p.add_argument("--text", required=True, help="what to say")
    p.add_argument("--out", required=True, help="the WAV file to write")
    p.add_argument("--speaker", default=None, help="the speaker name, as in the training rows")
    p.add_argument("--codec", default=None, help="codec directory (default: the one tts_config.json names)")
    p.add_argument("--base", default=None, help="an adapter's base model (default: adapter_config.json's)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--temperature", type=float, default=0.6, help="0: greedy (default 0.6)")
    p.add_argument("--top-p", dest="top_p", type=float, default=0.95)
    p.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.set_defaults(func=run_speak)
    return p


def load_speaker(path, *, base=None, codec=None, dtype=None, device=None):
    """(model, tokenizer, tts, codec) ready to speak: the run's output and its codec (`codec`, default the
    directory tts_config.json names), checked to be the codec the model was trained with."""
    from ..audio.codecs import load_codec
    model, tokenizer, tts = load_speech_model(path, base=base, dtype=dtype, device=device)
    source = codec or tts["codec_source"]
    if not source:
        raise ConfigError(f"{path}: tts_config.json names no codec directory: pass --codec")
    loaded = load_codec(source, device=next(model.parameters()).device)
    trained = tts["spec"]
    if (loaded.spec.level_strides, loaded.codebook_size) != (trained.level_strides, trained.codebook_size):
        from ..audio.tts_data import VocabularyMismatch
        raise VocabularyMismatch(f"codec {source}: levels {list(loaded.spec.level_strides)} x codebook "
                                 f"{loaded.codebook_size}, but {path} was trained on levels "
                                 f"{list(trained.level_strides)} x codebook {trained.codebook_size}")
    return model, tokenizer, tts, loaded


def run_speak(ns):
    model, tokenizer, tts, codec = load_speaker(ns.model, base=ns.base, codec=ns.codec, dtype=ns.dtype,
                                                device=ns.device)
    speech = speak(model, tokenizer, ns.text, codec, speaker=ns.speaker, max_new_tokens=ns.max_new_tokens,
                   tokens=tts["tokens"], temperature=ns.temperature, top_p=ns.top_p,
                   repetition_penalty=ns.repetition_penalty, seed=ns.seed)
    write_wav(ns.out, speech.waveform, speech.sample_rate)
    ended = "" if speech.finish_reason == FINISH_EOS else " (cut at --max-new-tokens)"
    print(f"{ns.out}: {speech.waveform.numel() / speech.sample_rate:.2f} s, {speech.frames} frames{ended}")
