"""The config sections of the objectives beyond SFT: `preference` (dpo, orpo, simpo, kto), `grpo`, `embedding`
(contrastive, triplet, cosent), `speech` (asr), `tts` and `vision` (sft of a vision-language model)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .config_fields import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bound, setting


@dataclass
class PreferenceConfig:
    beta: float | None = setting(
        None, "strength: dpo and kto 0.1 (how far from the reference), orpo 0.1 (the odds-ratio term's weight), "
              "simpo 2.0 (reward scale); null: those", POSITIVE)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = setting(
        "sigmoid", "dpo's loss: sigmoid (DPO), ipo, hinge (SLiC), robust (rDPO, with label_smoothing)")
    label_smoothing: float = setting(0.0, "robust dpo and simpo: the assumed share of pairs labelled the wrong way",
                                     Bound(0, 0.5, high_open=True))
    gamma: float = setting(0.5, "simpo: the target reward margin", NON_NEGATIVE)
    desirable_weight: float = setting(1.0, "kto: the weight of desirable rows' losses", POSITIVE)
    undesirable_weight: float = setting(1.0, "kto: the weight of undesirable rows' losses", POSITIVE)
    reference: Literal["auto", "adapter_off", "precomputed", "model"] = setting(
        "auto", "the reference model of dpo, kto and grpo (beta > 0): adapter_off (the base with the adapters switched "
                "off, every step), precomputed (once before step 1, kept in output_dir; not grpo), model (a frozen "
                "copy read from model.path); auto: adapter_off for LoRA, else precomputed (grpo: model)")


@dataclass
class GRPOConfig:
    num_generations: int = setting(8, "completions sampled per prompt (a group)", Bound(2))
    max_completion_length: int = setting(256, "tokens per completion at most", AT_LEAST_ONE)
    max_prompt_length: int | None = setting(None, "prompts longer than this many tokens: see prompt_overflow; "
                                                  "null: data.max_seq_length - max_completion_length", AT_LEAST_ONE)
    prompt_overflow: Literal["truncate_left", "drop"] = setting(
        "truncate_left", "a prompt over max_prompt_length keeps its last tokens, or is left out (counted)")
    temperature: float = setting(1.0, "sampling temperature of the completions", POSITIVE)
    top_p: float = setting(1.0, "nucleus sampling", Bound(0, 1, low_open=True))
    top_k: int = setting(0, "sample among the k likeliest tokens; 0: all", NON_NEGATIVE)
    reward_funcs: list = setting(
        ["exact_match"], "rewards, summed: built-ins exact_match (the completion's final answer equals the row's "
                         "answer column), format (grpo.format_regex matches), length (shorter is better), or "
                         "module:function called with prompts, completions and the data's other columns",
        comma_list=True)
    reward_weights: list | None = setting(None, "a weight per reward function; null: 1 each")
    answer_column: str = setting("answer", "exact_match: the column holding the reference answer")
    format_regex: str = setting(r"\S", "format: the pattern a completion must match (re.search)")
    scale_rewards: Literal["group", "batch", "none"] = setting(
        "group", "advantages: (reward - its group's mean) divided by the group's std, the batch's std, or nothing")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = setting(
        "dapo", "normalisation: dapo (over the global batch's completion tokens), grpo (per completion, then over "
                "completions), dr_grpo (over completions x max_completion_length)")
    epsilon: float = setting(0.2, "the ratio's clip below 1", Bound(0, 1, low_open=True))
    epsilon_high: float | None = setting(None, "the ratio's clip above 1 (DAPO: 0.28); null: epsilon", POSITIVE)
    beta: float = setting(0.0, "weight of the KL to the reference (k3 estimator); 0: no reference pass",
                          NON_NEGATIVE)
    num_iterations: int = setting(1, "optimizer steps on each batch of samples (the ratio to the sampling policy and "
                                     "its clip matter from the second on)", AT_LEAST_ONE)


@dataclass
class EmbeddingConfig:
    scale: float = setting(20.0, "contrastive and cosent: the similarity scale (1 / temperature)", POSITIVE)
    symmetric: bool = setting(False, "contrastive: also rank the anchors for each positive (both directions, averaged)")
    mini_batch_size: int = setting(0, "contrastive: embed in mini-batches of this many texts and cache the "
                                      "embeddings' gradients (GradCache): a large batch in small memory, the same "
                                      "loss and gradients; 0: off", NON_NEGATIVE)
    margin: float = setting(5.0, "triplet: how much nearer the positive must be than the negative", NON_NEGATIVE)
    distance: Literal["euclidean", "cosine", "manhattan"] = setting("euclidean", "triplet: the distance")
    query_prefix: str | None = setting(None, "put before each anchor (query); null: the model's 'query' prompt, if any")
    document_prefix: str | None = setting(None, "put before each positive and negative; null: the model's "
                                                "'document' (or 'passage') prompt, if any")
    score_min: float = setting(0.0, "cosent: the lowest score a scored pair may have")
    score_max: float = setting(1.0, "cosent: the highest score a scored pair may have")
    pooling: str | None = setting(None, "override the model's pooling: mean, cls, max, lasttoken, ...; null: the "
                                        "model directory's (mean for a plain encoder, lasttoken for a decoder)")
    retrieval_eval: str | None = setting(None, "a retrieval set (a directory with queries.jsonl, corpus.jsonl and "
                                               "qrels.tsv): NDCG@10, MRR@10, recall@k measured before training and "
                                               "at each evaluation")
    eval_batch_size: int = setting(64, "texts per batch when embedding the retrieval set", AT_LEAST_ONE)


@dataclass
class SpeechConfig:
    audio_column: str = setting("audio", "the manifest column holding each clip's audio file (relative to the "
                                         "manifest's folder)")
    text_column: str = setting("text", "the manifest column holding each clip's transcript")
    language: str | None = setting("en", "the language token of the transcripts (a code: en, de, fr ...); null for "
                                         "an English-only (.en) model, which takes no language or task token")
    task: Literal["transcribe", "translate"] = setting(
        "transcribe", "transcribe (text in the spoken language) or translate (English text from other speech)")
    timestamps: bool = setting(False, "train with timestamp tokens; only false is supported: transcripts are "
                                      "trained after <|notimestamps|>")
    long_clips: Literal["refuse", "skip"] = setting(
        "refuse", "a clip over 30 s (or a transcript over the decoder's length): an error naming its row, or left "
                  "out and counted")
    skip_silent: bool = setting(True, "leave out (and count) clips whose loudest 25 ms is below -60 dBFS")
    freeze_encoder: bool = setting(False, "the audio encoder runs without gradients and keeps its weights: only "
                                          "the decoder trains (faster, less memory)")
    lora_targets: Union[str, list] = setting(
        ["q_proj", "v_proj"], "LoRA targets of the Whisper model while lora.targets is left at all-linear (the "
                              "language models' default); all-linear: every linear layer but the output head")
    eval_samples: int | None = setting(200, "clips of the eval split transcribed for WER / CER (the first ones); "
                                            "null: all", AT_LEAST_ONE)
    eval_max_new_tokens: int = setting(128, "tokens generated per clip at most when transcribing for WER / CER",
                                       AT_LEAST_ONE)
    eval_batch_size: int = setting(16, "clips per batch when transcribing for WER / CER", AT_LEAST_ONE)


@dataclass
class TTSConfig:
    codec_dir: str | None = setting(None, "the audio codec (objective tts): a directory with its config.json, "
                                          "and model.safetensors when rows name audio files; snac_24khz when every "
                                          "row holds precomputed codes")
    text_column: str = setting("text", "the column holding each row's text")
    audio_column: str = setting("audio", "the column holding each row's audio file (relative to the data file)")
    codes_column: str = setting("codes", "the column holding a row's precomputed codes, one list per codec level")
    speaker_column: str = setting("speaker", "the column holding a row's speaker name (optional), prompted as "
                                             "'speaker: text'")
    long_clips: Literal["refuse", "skip"] = setting(
        "refuse", "a row whose text and codes exceed max_seq_length: an error naming its row, or left out and "
                  "counted")
    eval_samples: int | None = setting(64, "eval rows whose code accuracy is measured (the first ones); null: all",
                                       AT_LEAST_ONE)


@dataclass
class VisionConfig:
    vision_layers: bool = setting(True, "train the vision tower (LoRA on its layers, or its weights in full "
                                        "fine-tuning)")
    language_layers: bool = setting(True, "train the language model's layers")
    attention_modules: bool = setting(True, "LoRA on the attention projections of the chosen layers")
    mlp_modules: bool = setting(True, "LoRA on the MLP projections of the chosen layers")
    projector: Literal["lora", "full", "frozen"] = setting(
        "lora", "the projector between the vision tower and the language model: LoRA on its linears, trained in "
                "full (saved with the adapter), or kept as it is")
    image_cache_mb: int = setting(2048, "processed images kept in memory for the run, in MB; past it, images are "
                                        "read and processed again for each batch (a large data set fits any "
                                        "memory)", NON_NEGATIVE)
