"""Text-to-speech (objective tts): a decoder language model learns to continue a text prompt with an audio codec's
codes, the Orpheus recipe, through the one training loop.

    objective: tts
    model: {path: meta-llama/Llama-3.2-1B}
    data: {path: train.jsonl}            # rows {"text": ..., "audio": "clips/1.wav" or "codes": [...], "speaker"?}
    tts: {codec_dir: codecs/snac_24khz}   # config.json (+ model.safetensors when rows name audio files)

The sequences are described in velotune/audio/tts_data.py. The tokenizer gets the speech tokens (four markers and
codes_per_frame * codebook_size code tokens) before the data is encoded; the model's embeddings and output head
grow by as many rows, each new row set to the mean of the existing ones. The new rows must train, so with LoRA the
embeddings and the head are modules_to_save (trained in full and written whole into the adapter, PEFT's way: a
PEFT user resizes the base to the adapter's tokenizer before loading it, as `load_speech_model` does). The loss is
the next-token cross-entropy on the code tokens and <|end_of_speech|> only, summed; the loop divides by their
count. Each evaluation also measures code_accuracy: the teacher-forced share of those tokens predicted exactly.

A run writes the adapter (with the extended tokenizer) or the whole model, and tts_config.json beside it: the codec
(its directory and layout), the speech tokens' ids and the vocabulary size, what `velotune speak` reads.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, UnsupportedError
from .base import Objective

log = logging.getLogger("velotune")

TTS_CONFIG = "tts_config.json"
TTS_FORMAT = "velotune-tts"
NATIVE_VOCAB_MODULES = ("embed_tokens", "lm_head")   # velotune's own architectures' embeddings and head


class TextToSpeech(Objective):
    name = "tts"
    sample_name = "utterance"

    def __init__(self):
        self.settings = None          # the config's tts section, from prepare
        self.spec = None              # the codec's CodecSpec
        self.tokens = None            # tts_data.SpeechTokens
        self.added = 0                # speech tokens added to the tokenizer by this run (0: it had them)
        self.passed_model = None      # a model given to vt.train(model=...)
        self.seconds = 0.0
        self.eval_examples = []

    # ---- the model ----------------------------------------------------------------------------------------------
    def load_model(self, cfg):
        model = super().load_model(cfg)
        self._fit_model(model, cfg)
        return model

    def check_model(self, model) -> None:
        super().check_model(model)
        self.passed_model = model

    def _fit_model(self, model, cfg, *, passed: bool = False) -> None:
        """The vocabulary grown to the speech tokens (new rows: the mean of the old), and with LoRA the embeddings
        and head made modules_to_save, so that the new rows train. A passed model that already has the rows keeps
        them as they are (it may have been trained with them)."""
        rows, end = model.get_input_embeddings().weight.shape[0], self.tokens.end
        if self.added and not (passed and rows >= end):
            resize_vocabulary(model, max(rows, end), mean_of=end - self.added)
        elif rows < end:
            from ...audio.tts_data import VocabularyMismatch
            raise VocabularyMismatch(f"the tokenizer's speech tokens reach id {end - 1} but the model has {rows} "
                                     "embedding rows: the tokenizer belongs to another model")
        if cfg.finetune.method == "lora" and not getattr(model, "lora_settings", None):
            names = [_module_name(model, module) for module in (model.get_input_embeddings(),
                                                                 model.get_output_embeddings())]
            wanted = list(cfg.lora.modules_to_save or [])
            cfg.lora.modules_to_save = wanted + [n for n in names if n not in wanted]

    # ---- records -> examples --------------------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        from ...audio.codecs import load_codec, read_codec_spec
        from ...audio.tts_data import add_speech_tokens, prepare_tts_data
        self.settings = settings = config.tts
        if not settings.codec_dir:
            raise ConfigError("tts.codec_dir: required (a codec directory: config.json, and model.safetensors when "
                              "rows name audio files; or snac_24khz when every row holds precomputed codes)")
        if config.data.format != "auto":
            raise ConfigError(f"data.format: {config.data.format!r} is an SFT format; objective tts reads rows of "
                              "text and audio (leave data.format auto)")
        if tokenizer is None:
            raise ConfigError("the model has no tokenizer files: text-to-speech needs the model's tokenizer")
        if config.finetune.method == "lora":  # what run.json records; load_model sets the modules' own names
            config.lora.modules_to_save = list(dict.fromkeys([*config.lora.modules_to_save, *NATIVE_VOCAB_MODULES]))
        self.spec = read_codec_spec(settings.codec_dir)
        self.tokens, self.added = add_speech_tokens(tokenizer, self.spec)
        if self.added:
            log.info("added %d speech tokens to the tokenizer (%d codes per frame x codebook %d, and 4 markers)",
                     self.added, self.spec.codes_per_frame, self.spec.codebook_size)
        if self.passed_model is not None:
            self._fit_model(self.passed_model, config, passed=True)  # no load_model for it: fitted here
        data = prepare_tts_data(config.data, settings, tokenizer, self.tokens, self.spec,
                                max_seq_length=max_seq_length, seed=seed,
                                load_codec=lambda: load_codec(settings.codec_dir))
        self.seconds = data.seconds
        return data

    def epoch_line(self, stats) -> str:
        many = "" if stats.samples == 1 else "s"
        return (f"per epoch: {stats.samples} utterance{many} ({self.seconds / 60:.1f} min of audio), "
                f"{stats.total_tokens:,} tokens, {stats.target_tokens:,} trained (codes and end of speech)")

    def sample_view(self, example, tokenizer) -> str:
        from ...data.encode import TRAINED_CLOSE, TRAINED_OPEN
        prompt = tokenizer.decode(example.input_ids[:example.prompt_length].tolist(), skip_special_tokens=False)
        codes = len(example) - example.prompt_length - 1
        seconds = example.frames / self.spec.frame_rate
        return (f"{example.origin}: {prompt}{TRAINED_OPEN}<{codes} code tokens: {example.frames} frames, "
                f"{seconds:.2f} s><|end_of_speech|>{TRAINED_CLOSE}")

    # ---- the run ------------------------------------------------------------------------------------------------
    def start(self, model, run) -> None:
        from ..distributed import unwrap
        inner = unwrap(model)
        frozen = [what for what, module in (("embeddings", inner.get_input_embeddings()),
                                            ("output head", inner.get_output_embeddings()))
                  if not module.weight.requires_grad]
        if frozen:
            raise ConfigError(f"the model's {' and '.join(frozen)} do not train, so the speech tokens' rows would "
                              "stay as initialised: unset finetune.freeze_embeddings; with LoRA on a model passed to "
                              "vt.train(model=...), set lora.modules_to_save: [embed_tokens, lm_head]")
        cap = self.settings.eval_samples
        self.eval_examples = list(run.eval[:cap] if cap else run.eval)

    def loss(self, model, batch):
        out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                    document_ids=batch.get("document_ids"), attention_mask=batch.get("attention_mask"),
                    return_logits=False, reduction="sum")
        return out.loss, out.num_tokens

    def extra_eval(self, model, tokenizer) -> dict:
        if not self.eval_examples:
            return {}
        from ..distributed import unwrap
        return {"code_accuracy": code_accuracy(unwrap(model), self.eval_examples)}

    # ---- outputs ------------------------------------------------------------------------------------------------
    def write_outputs(self, model, tokenizer, out_dir: Path, lora: bool) -> dict:
        """The adapter or the model (with the extended tokenizer), and tts_config.json beside it."""
        from ...models import checkpoint as ckpt
        written = super().write_outputs(model, tokenizer, out_dir, lora)
        target = Path(written.get("adapter_dir") or written["model_dir"])
        vocab = model.get_input_embeddings().weight.shape[0]
        write_tts_config(target, self.spec, self.tokens, vocab, codec_source=self.settings.codec_dir)
        entries = ckpt._read_manifest(target) or set()   # listed as the run's own, for a later run to replace
        ckpt._write_manifest(target / ckpt.MANIFEST_NAME, entries | {TTS_CONFIG})
        return written


# ---- the vocabulary ------------------------------------------------------------------------------------------------

def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise UnsupportedError(f"{type(model).__name__}: its embeddings are not one of its modules")


@torch.no_grad()
def resize_vocabulary(model, size: int, *, mean_of: int | None = None) -> None:
    """Grows (or keeps) the model's embeddings and output head to `size` rows, in place. Rows from `mean_of` on are
    set to the mean of the rows before it (default: the rows added). A tied head stays tied; config.json's
    vocab_size follows (what vt.save writes)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    old = embed.weight.shape[0]
    if size < old:
        raise ValueError(f"resize_vocabulary: {size} rows is fewer than the model's {old}")
    if type(embed) is not nn.Embedding or (head is not None and type(head) is not nn.Linear):
        raise UnsupportedError(f"resizing the vocabulary needs a plain embedding and output head; this model has "
                               f"{type(embed).__name__} and {type(head).__name__} (quantized or adapted?)")
    start = old if mean_of is None else int(mean_of)
    if not 0 < start <= old:
        raise ValueError(f"resize_vocabulary: mean_of={mean_of} is outside 1..{old}")
    tied = head is not None and head.weight is embed.weight
    embed.weight = _grown(embed.weight, size, start)
    embed.num_embeddings = size
    if head is not None:
        head.weight = embed.weight if tied else _grown(head.weight, size, start)
        if head.bias is not None:
            head.bias = _grown(head.bias, size, start)
        head.out_features = size
    args = model.args
    args.vocab_size = size
    raw = getattr(args, "raw", None)
    if isinstance(raw, dict):
        nested = raw.get("text_config")
        (nested if isinstance(nested, dict) and "vocab_size" in nested else raw)["vocab_size"] = size
    hf_config = getattr(getattr(model, "hf_model", None), "config", None)
    if hf_config is not None:
        hf_config.vocab_size = size


def _grown(param: torch.Tensor, size: int, start: int) -> nn.Parameter:
    grown = torch.empty((size, *param.shape[1:]), dtype=param.dtype, device=param.device)
    grown[:param.shape[0]] = param
    grown[start:] = param[:start].float().mean(dim=0).to(param.dtype)
    return nn.Parameter(grown, requires_grad=param.requires_grad)


@torch.no_grad()
def code_accuracy(model, examples) -> float:
    """The share of trained tokens (codes and <|end_of_speech|>) whose teacher-forced argmax is exactly right."""
    device = next(model.parameters()).device
    right = total = 0
    for example in examples:
        ids = example.input_ids.long()[None].to(device)
        logits = model(ids).logits[0, :-1]
        targets = example.labels.long()[1:].to(device)
        trained = targets != -100
        right += int((logits.argmax(-1)[trained] == targets[trained]).sum())
        total += int(trained.sum())
    return right / max(1, total)


# ---- tts_config.json -----------------------------------------------------------------------------------------------

def write_tts_config(directory: Path, spec, tokens, vocab_size: int, *, codec_source: str | None) -> Path:
    """tts_config.json: the codec (where it was read from and its layout), the speech tokens' ids, the vocabulary
    size a base model is resized to before an adapter loads, and the prompt's shape."""
    source = codec_source
    if source and Path(source).expanduser().is_dir():
        source = str(Path(source).expanduser().resolve())
    config = {"format": TTS_FORMAT, "version": 1, "codec": {"source": source, **spec.to_dict()},
              "tokens": tokens.to_dict(), "vocab_size": int(vocab_size),
              "prompt": "[BOS] <|start_of_human|>{speaker}: {text}<|end_of_human|><|start_of_speech|>"}
    path = Path(directory) / TTS_CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def read_tts_config(directory) -> dict:
    """{"spec": CodecSpec, "tokens": SpeechTokens, "vocab_size": int, "codec_source": str | None} of a directory a
    tts run wrote; CheckpointError naming the file when it is missing or not one."""
    from ...audio.codecs import CodecSpec
    from ...audio.tts_data import SpeechTokens
    from ...models.checkpoint import read_json
    path = Path(directory) / TTS_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {TTS_CONFIG}: not the output of a tts run (objective tts)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != TTS_FORMAT:
        raise CheckpointError(f"{path}: not a velotune text-to-speech config (\"format\": \"{TTS_FORMAT}\")")
    codec = data.get("codec") or {}
    return {"spec": CodecSpec.from_dict(codec, str(path)), "tokens": SpeechTokens.from_dict(data.get("tokens") or {},
                                                                                            str(path)),
            "vocab_size": int(data.get("vocab_size") or 0), "codec_source": codec.get("source")}


__all__ = ["TTS_CONFIG", "TextToSpeech", "code_accuracy", "read_tts_config", "resize_vocabulary",
           "write_tts_config"]
