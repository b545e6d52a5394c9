"""`velotune transcribe MODEL AUDIO... [--adapter DIR] [--language en] [--task transcribe]`: speech to text with
velotune's own Whisper (models/whisper.py), greedy, one 30-second window after another for longer files.

The decoder's prompt is what the checkpoint's generation_config.json says transformers' generate() would start
with: <|startoftranscript|>, the language and task tokens on a multilingual model, <|notimestamps|>; its
suppressed tokens are suppressed the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError

WINDOW_S = 30
MAX_NEW_TOKENS = 224


def add_transcribe_parser(subparsers):
    p = subparsers.add_parser("transcribe", help="speech to text with a Whisper model (and adapter)")
    p.add_argument("model", help="a Hugging Face Whisper directory")
    p.add_argument("audio", nargs="+", help="wav, flac, ogg, opus or mp3 files")
    p.add_argument("--adapter", help="LoRA adapter directory (PEFT format)")
    p.add_argument("--language", help="language code of a multilingual model (default: its generation config's)")
    p.add_argument("--task", choices=("transcribe", "translate"), default=None)
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--device", default=None)
    p.set_defaults(func=run_transcribe)
    return p


def decoder_prompt(model_dir: Path, tokenizer, language: str | None = None, task: str | None = None) -> dict:
    """{"prompt": ids, "eos": id, "suppress": ids, "begin_suppress": ids} from generation_config.json."""
    path = Path(model_dir) / "generation_config.json"
    gc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    start = gc.get("decoder_start_token_id", tokenizer.convert_tokens_to_ids("<|startoftranscript|>"))
    prompt = [start]
    if gc.get("is_multilingual"):
        language = language or gc.get("language") or "en"
        code = language if language.startswith("<|") else f"<|{language.strip('<|>')}|>"
        lang_to_id = gc.get("lang_to_id") or {}
        if code not in lang_to_id:
            raise ConfigError(f"--language {language}: not a language of this model ({len(lang_to_id)} known)")
        task = task or gc.get("task") or "transcribe"
        prompt += [lang_to_id[code], (gc.get("task_to_id") or {})[task]]
    elif language not in (None, "en") or task == "translate":
        raise ConfigError(f"{model_dir} is an English-only model: no --language or --task translate")
    if gc.get("no_timestamps_token_id") is not None:
        prompt.append(gc["no_timestamps_token_id"])
    return {"prompt": prompt, "eos": gc.get("eos_token_id", tokenizer.eos_token_id),
            "suppress": gc.get("suppress_tokens") or [], "begin_suppress": gc.get("begin_suppress_tokens") or []}


def transcribe_audio(model, tokenizer, model_dir: Path, audio, *, language=None, task=None,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """The text of 16 kHz mono samples, 30-second windows decoded as one batch and joined."""
    import torch

    from ..audio import log_mel_spectrogram
    from ..models.whisper import transcribe_ids
    how = decoder_prompt(model_dir, tokenizer, language, task)
    window = WINDOW_S * 16000
    pieces = [audio[i:i + window] for i in range(0, len(audio), window)]
    features = log_mel_spectrogram(pieces, n_mels=model.args.num_mel_bins)
    with torch.no_grad():
        ids = transcribe_ids(model, features, how["prompt"], max_new_tokens, eos_id=how["eos"],
                             suppress_ids=how["suppress"], begin_suppress_ids=how["begin_suppress"])
    words = tokenizer.batch_decode(ids, skip_special_tokens=True)
    return " ".join(w.strip() for w in words if w.strip())


def transcribe_files(model, tokenizer, model_dir: Path, paths, *, language=None, task=None,
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    from ..audio import load_audio
    return [transcribe_audio(model, tokenizer, model_dir, load_audio(path)[0], language=language, task=task,
                             max_new_tokens=max_new_tokens) for path in paths]


def run_transcribe(ns):
    from ..models.tokenizer import load_tokenizer
    from ..models.whisper import load_whisper
    model = load_whisper(ns.model, device=ns.device)
    if ns.adapter:
        from ..lora import load_adapter
        load_adapter(model, ns.adapter, trainable=False)
    tokenizer = load_tokenizer(Path(ns.model))
    if tokenizer is None:
        raise ConfigError(f"{ns.model}: no tokenizer files; transcription needs the model's tokenizer")
    texts = transcribe_files(model.eval(), tokenizer, Path(ns.model), ns.audio, language=ns.language,
                             task=ns.task, max_new_tokens=ns.max_new_tokens)
    for path, text in zip(ns.audio, texts):
        print(f"{path}\t{text}" if len(ns.audio) > 1 else text)
