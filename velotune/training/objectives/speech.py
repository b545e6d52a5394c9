"""Speech recognition (objective asr, alias speech-recognition): fine-tuning Whisper on a manifest of clips and
their transcripts, through the one training loop.

    objective: asr
    model: {path: openai/whisper-small}
    data: {path: train.jsonl, eval_fraction: 0.05}     # rows {"audio": "clips/1.wav", "text": "..."}
    speech: {language: en, task: transcribe}

Each batch holds the clips' raw samples (30 s windows); their log-mel features are computed on the model's device
in fp32 and the loss is the decoder's cross-entropy summed over the trained label tokens (the loop divides by the
global count). The sequences, labels and padding are described in speech_data.py. LoRA goes on q_proj and v_proj
by default (speech.lora_targets); with speech.freeze_encoder the encoder runs without gradients.

Before the first step and at each evaluation the eval split's clips (the first speech.eval_samples) are transcribed
greedily after the same prompt and scored against their transcripts: eval_wer and eval_cer, normalised as
velotune.audio.wer describes. A run writes the adapter (LoRA, PEFT format) or the whole model, with the tokenizer,
preprocessor_config.json and a generation_config.json whose language and task make transformers' generate() use
the prompt the model was trained with.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ...errors import ConfigError
from .base import Objective
from .speech_data import TASK_TOKENS, language_tokens, model_is_multilingual

log = logging.getLogger("velotune")

ENCODER = "model.encoder."
# What WhisperFeatureExtractor reads from preprocessor_config.json; velotune's log_mel_spectrogram is the same recipe.
FEATURE_EXTRACTOR = {"feature_extractor_type": "WhisperFeatureExtractor", "sampling_rate": 16000, "hop_length": 160,
                     "chunk_length": 30, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
                     "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
                     "processor_class": "WhisperProcessor"}


class SpeechRecognition(Objective):
    name = "asr"
    unit_name = "token"
    sample_name = "clip"
    row_name = "clip"
    evaluates_before_training = True

    def __init__(self, *, confine_to_dir: bool = False):
        # True: a manifest may name audio files only inside its own folder (for callers that must not let a
        # manifest read any file it names, such as a web app); the CLI and vt.train read what it names.
        self.confine_to_dir = confine_to_dir
        self.settings = None            # the config's speech section, from prepare
        self.prompt = None              # speech_data.WhisperPrompt
        self.passed_model_dir = None    # the directory of a model given to vt.train(model=...)
        self.model_passed = False
        self.seconds = 0.0              # of the train split's audio
        self.eval_examples = []         # the eval clips transcribed for WER / CER
        self.n_mels, self.float_dtype = 80, torch.float32

    # ---- the model ----------------------------------------------------------------------------------------------
    def load_model(self, cfg):
        from ...models.whisper import load_whisper
        if cfg.model.quantize:
            raise ConfigError("model.quantize: Whisper trains unquantized here; remove model.quantize")
        dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
        model = load_whisper(cfg.model.path, dtype=dtype, device=cfg.model.device)
        if cfg.finetune.method == "lora":
            cfg.lora.targets = self._resolved_lora_targets(model, cfg)
        else:
            _keep_encoder_positions_fixed(model)
        return model

    def check_model(self, model) -> None:
        from ...models.interface import VelotuneModel
        from ...models.registry import SPEECH_SEQ2SEQ
        if not isinstance(model, VelotuneModel) or model.task != SPEECH_SEQ2SEQ:
            what = f"{model.model_type} model" if isinstance(model, VelotuneModel) else type(model).__name__
            raise ConfigError(f"objective {self.name} trains a Whisper model; vt.train(model=...) got a {what}: "
                              "load one with velotune.models.whisper.load_whisper(dir)")
        self.model_passed, self.passed_model_dir = True, model.source_dir

    def source_max_length(self, model_dir: Path) -> int | None:
        """The decoder's positions (config.json's max_target_positions), the longest training sequence."""
        from ...models.checkpoint import read_config
        return read_config(model_dir).get("max_target_positions", 448)

    def lora_targets(self, cfg):
        """lora.targets when written (anything but the language models' default all-linear), else
        speech.lora_targets."""
        from ...lora import ALL_LINEAR
        targets = cfg.lora.targets if cfg.lora.targets != ALL_LINEAR else cfg.speech.lora_targets
        return ALL_LINEAR if targets == [ALL_LINEAR] else targets

    def _resolved_lora_targets(self, model, cfg) -> list[str]:
        """The module names LoRA wraps; with speech.freeze_encoder the encoder's are left out (they would not train)."""
        from ...lora import resolve_targets
        names = resolve_targets(model, self.lora_targets(cfg))
        if cfg.speech.freeze_encoder:
            names = [n for n in names if not n.startswith(ENCODER)]
            if not names:
                raise ConfigError("speech.freeze_encoder: the LoRA targets are all in the encoder, which does not "
                                  "train: choose targets in the decoder (e.g. q_proj, v_proj)")
        return names

    # ---- records -> examples -> batches ----------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...models.checkpoint import read_config, resolve_model_dir
        from .speech_data import prepare_speech_data, whisper_prompt
        self.settings = settings = config.speech
        if settings.timestamps:
            raise ConfigError("speech.timestamps: training with timestamp tokens is not supported; set it to false "
                              "(transcripts are trained after <|notimestamps|>)")
        if config.data.format != "auto":
            raise ConfigError(f"data.format: {config.data.format!r} is an SFT format; objective {self.name} reads "
                              "a manifest of audio files and transcripts (leave data.format auto)")
        if tokenizer is None:
            raise ConfigError("the model has no tokenizer files: Whisper's tokenizer is needed for the transcripts")
        model_dir = resolve_model_dir(config.model.path) if config.model.path else self.passed_model_dir
        self.prompt = whisper_prompt(tokenizer, settings.language, settings.task,
                                     multilingual=model_is_multilingual(model_dir),
                                     model_name=str(model_dir) if model_dir else "the model")
        limit = max_seq_length
        if model_dir is not None and (model_dir / "config.json").is_file():
            limit = min(limit, read_config(model_dir).get("max_target_positions", 448))
        # What the plan and run.json report: the LoRA targets used, and no packing (a row is one clip).
        if config.finetune.method == "lora" and not self.model_passed:
            targets = self.lora_targets(config)
            if config.lora.targets != targets:
                log.info("LoRA targets: %s (speech.lora_targets, while lora.targets is left at all-linear)",
                         targets if isinstance(targets, str) else ", ".join(targets))
            config.lora.targets = targets
        config.data.packing = False
        data = prepare_speech_data(config.data, settings, tokenizer, self.prompt, max_positions=limit, seed=seed,
                                   confine_to_dir=self.confine_to_dir)
        self.seconds = data.seconds
        if not data.eval:
            log.warning("no eval split: WER and CER are not measured; set data.eval_path or data.eval_fraction")
        return data

    def epoch_line(self, stats) -> str:
        return (f"per epoch: {stats.samples} clip{'' if stats.samples == 1 else 's'} "
                f"({self.seconds / 60:.1f} min of audio), {stats.target_tokens:,} trained tokens")

    def sample_view(self, example, tokenizer) -> str:
        from ...data.encode import TRAINED_CLOSE, TRAINED_OPEN
        start = tokenizer.decode(example.tokens[:1].tolist())
        trained = tokenizer.decode(example.tokens[1:].tolist(), skip_special_tokens=False)
        return (f"{example.clip.origin} ({example.clip.duration_s:.1f} s of audio): "
                f"{start}{TRAINED_OPEN}{trained}{TRAINED_CLOSE}")

    def epoch_rows(self, examples, *, packing: bool, **kwargs) -> list:
        return super().epoch_rows(examples, packing=False, **kwargs)  # one clip per row: nothing to pack

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        from .speech_data import collate_clips
        return collate_clips([row[0] for row in rows], pad_id=pad_id)

    # ---- the run ------------------------------------------------------------------------------------------------
    def start(self, model, run) -> None:
        from ..distributed import unwrap
        whisper = unwrap(model)
        args = whisper.args
        if args.num_mel_bins not in (80, 128):
            raise ConfigError(f"config.json: num_mel_bins is {args.num_mel_bins}; Whisper's features have 80 or 128")
        if args.decoder_start_token_id is not None and args.decoder_start_token_id != self.prompt.start:
            raise ConfigError(f"the tokenizer's <|startoftranscript|> is id {self.prompt.start} but config.json's "
                              f"decoder_start_token_id is {args.decoder_start_token_id}: the tokenizer belongs to "
                              "another model")
        if max(self.prompt.ids + [self.prompt.end]) >= args.vocab_size:
            raise ConfigError(f"the tokenizer's special tokens pass the model's vocab_size ({args.vocab_size}): "
                              "the tokenizer belongs to another model")
        if self.settings.freeze_encoder and run.dist.active:
            encoder_trains = any(p.requires_grad for p in whisper.model.encoder.parameters())
            if run.config.train.distributed == "fsdp2" or encoder_trains:
                raise ConfigError("speech.freeze_encoder under torchrun works with LoRA under ddp only (full "
                                  "fine-tuning would leave the encoder's parameters without gradients)")
        self.n_mels = args.num_mel_bins
        self.float_dtype = whisper.model.encoder.conv1.weight.dtype
        cap = self.settings.eval_samples
        self.eval_examples = list(run.eval[:cap] if cap else run.eval)

    def units(self, batch: dict) -> int:
        return int(batch["target_tokens"])

    def features(self, audio: torch.Tensor) -> torch.Tensor:
        """Log-mel features of a batch of samples, computed in fp32 (outside any autocast: the mel matmul in bf16
        would round the features) and handed to the model in its weights' dtype."""
        from ...audio import log_mel_spectrogram
        with torch.autocast(audio.device.type, enabled=False):
            mel = log_mel_spectrogram(audio.float(), n_mels=self.n_mels)
        return mel.to(self.float_dtype)

    def loss(self, model, batch: dict):
        from ..distributed import unwrap
        features = self.features(batch["audio"])
        ids, labels = batch["decoder_input_ids"], batch["labels"]
        if self.settings.freeze_encoder:
            with torch.no_grad():
                encoded = unwrap(model).encode(features)
            out = model(decoder_input_ids=ids, labels=labels, encoder_hidden_states=encoded, reduction="sum")
        else:
            out = model(features, ids, labels=labels, reduction="sum")
        return out.loss, int(batch["target_tokens"])

    def input_tokens(self, rows) -> int:
        return sum(len(row[0]) for row in rows)

    # ---- evaluation ---------------------------------------------------------------------------------------------
    def extra_eval(self, model, tokenizer) -> dict:
        """WER and CER of greedy transcripts of the eval clips ({} without an eval split)."""
        if not self.eval_examples:
            return {}
        from ..distributed import unwrap
        return transcription_scores(unwrap(model), tokenizer, self.eval_examples, self.prompt,
                                    max_new_tokens=self.settings.eval_max_new_tokens,
                                    batch_size=self.settings.eval_batch_size)

    # ---- outputs ------------------------------------------------------------------------------------------------
    def write_outputs(self, model, tokenizer, out_dir: Path, lora: bool) -> dict:
        """The adapter (PEFT format) or the whole model (transformers' WhisperForConditionalGeneration), each with
        the tokenizer, preprocessor_config.json and a generation_config.json of the trained language and task."""
        from ...models import checkpoint as ckpt
        if lora:
            from ...lora import save_adapter
            target, key = save_adapter(model, out_dir / "adapter", overwrite=True, tokenizer=tokenizer), "adapter_dir"
            written = []
        else:
            from ...models.whisper import save_whisper
            target, key = save_whisper(model, out_dir / "model", overwrite=True), "model_dir"
            written = [Path(p).name for p in tokenizer.save_pretrained(str(target))]
        source = model.source_dir
        if source is not None and (source / "preprocessor_config.json").is_file():
            shutil.copy2(source / "preprocessor_config.json", target / "preprocessor_config.json")
        else:
            _write_json(target / "preprocessor_config.json",
                        {**FEATURE_EXTRACTOR, "feature_size": model.args.num_mel_bins})
        _write_json(target / "generation_config.json",
                    generation_config(self.prompt, tokenizer, source, model.args.max_target_positions))
        written += ["preprocessor_config.json", "generation_config.json"]
        # Listed with what save_adapter / save_whisper wrote, so that a later run replaces them as its own files.
        entries = ckpt._read_manifest(target) or set()
        ckpt._write_manifest(target / ckpt.MANIFEST_NAME, entries | {n for n in written if (target / n).exists()})
        return {key: Path(target)}


def transcribe(model, tokenizer, examples, prompt, *, max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy transcripts of speech examples (each with `.clip`, an audio.AudioExample) by a velotune Whisper model,
    after `prompt` (a WhisperPrompt), decoded without special tokens and stripped."""
    from ...audio import log_mel_spectrogram
    from ...models.whisper import transcribe_ids
    from .speech_data import clip_audio
    weight = model.model.encoder.conv1.weight
    steps = min(max_new_tokens, model.args.max_target_positions - len(prompt.ids))
    texts = []
    for i in range(0, len(examples), batch_size):
        audio = clip_audio(examples[i:i + batch_size]).to(weight.device)
        features = log_mel_spectrogram(audio, n_mels=model.args.num_mel_bins).to(weight.dtype)
        ids = transcribe_ids(model, features, prompt.ids, steps, eos_id=prompt.end, pad_id=prompt.end)
        texts += [t.strip() for t in tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)]
    return texts


def transcription_scores(model, tokenizer, examples, prompt, *, max_new_tokens: int, batch_size: int = 16) -> dict:
    """{"wer": ..., "cer": ...} of the examples' greedy transcripts against their own (normalised); a rate whose
    references normalise to nothing is left out."""
    from ...audio.wer import char_errors, word_errors
    hypotheses = transcribe(model, tokenizer, examples, prompt, max_new_tokens=max_new_tokens, batch_size=batch_size)
    references = [e.clip.text for e in examples]
    scores = {}
    for name, counts in (("wer", word_errors(references, hypotheses)), ("cer", char_errors(references, hypotheses))):
        if counts.reference_length:
            scores[name] = counts.rate
    return scores


def generation_config(prompt, tokenizer, source_dir: Path | None, max_target_positions: int) -> dict:
    """generation_config.json for the trained prompt: the source model's (suppressed tokens, alignment heads ...)
    with the start, end and no-timestamps ids, and the language and task transformers' Whisper generate() reads
    (plus the older forced_decoder_ids, the same prompt, for tools that read those instead)."""
    config = {}
    if source_dir is not None and (source_dir / "generation_config.json").is_file():
        config = json.loads((source_dir / "generation_config.json").read_text(encoding="utf-8"))
    # A config marked as derived from config.json is read back by transformers with every other key dropped.
    config.pop("_from_model_config", None)
    vocab = tokenizer.get_vocab()
    config.update(decoder_start_token_id=prompt.start, eos_token_id=prompt.end, pad_token_id=prompt.end,
                  no_timestamps_token_id=prompt.no_timestamps, is_multilingual=prompt.language is not None,
                  return_timestamps=False)
    config.setdefault("bos_token_id", prompt.end)
    config.setdefault("max_length", max_target_positions)
    if "<|startofprev|>" in vocab:
        config.setdefault("prev_sot_token_id", vocab["<|startofprev|>"])
    if prompt.language is None:  # English-only: the prompt is forced, no language is detected
        config.update(language=None, task=None, forced_decoder_ids=[[1, prompt.no_timestamps]])
        return config
    config["lang_to_id"] = {**config.get("lang_to_id", {}), **language_tokens(vocab)}
    config["task_to_id"] = {task: vocab[token] for task, token in TASK_TOKENS.items() if token in vocab}
    config.update(language=_language_name(prompt.language_code), task=prompt.task_name,
                  forced_decoder_ids=[[1, prompt.language], [2, prompt.task], [3, prompt.no_timestamps]])
    return config


def _language_name(code: str) -> str:
    """The code when transformers knows it (generate() takes "en"), else the token itself ("<|xx|>")."""
    try:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE
    except ImportError:
        return f"<|{code}|>"
    return code if code in TO_LANGUAGE_CODE.values() else f"<|{code}|>"


def _keep_encoder_positions_fixed(model):
    """The encoder's sinusoidal positions are fixed in Whisper (transformers never trains them), but full fine-tuning
    turns on every parameter's gradient: as a buffer (same name in the state dict) it stays fixed."""
    embedding = model.model.encoder.embed_positions
    if "weight" in embedding._parameters:
        weight = embedding.weight.detach()
        del embedding.weight
        embedding.register_buffer("weight", weight)


def _write_json(path: Path, value: dict):
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


__all__ = ["SpeechRecognition", "generation_config", "transcribe", "transcription_scores"]
