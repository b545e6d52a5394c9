"""`prepare_vision_data`: the `data` section of a vision-language run -> encoded train and eval examples with their
images and videos (data/vision_data.py says how one record becomes one example), their counts and the chat
template.

Images and videos are processed once, here, and kept with their examples (the pixel tensors of a data set stay in
memory for the run, up to vision.image_cache_mb). Image and video files are read relative to the data file's
folder."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import ConfigError, DataError
from .dataset import PreparedData, _nothing_left, _source_name, _split, _warn_dropped, choose_chat_template
from .formats import detect_format
from .readers import read_records
from .vision_data import VisionStats, encode_vision, family_of, read_vision_record, video_placeholder_of

log = logging.getLogger("velotune")

DEFAULT_MAX_SEQ_LENGTH = 2048


def prepare_vision_data(data_cfg, tokenizer, processor, *, max_seq_length: int | None = None,
                        seed: int = 42, image_cache_mb: int | None = None) -> PreparedData:
    """`image_cache_mb`: how much processed image (and video) data stays in memory (None: all); the samples past
    it are read and processed again when their batch is made."""
    if not data_cfg.path:
        raise ConfigError("data.path is not set: give a jsonl or json file of conversations with images")
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer files: velotune needs a tokenizer to encode data.path")
    max_len = max_seq_length or data_cfg.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    name = _source_name(data_cfg.path)
    samples, records_read, fmt = _read(data_cfg.path, data_cfg, name, processor)
    if data_cfg.eval_path:
        eval_samples, eval_read, _ = _read(data_cfg.eval_path, data_cfg, _source_name(data_cfg.eval_path), processor)
    else:
        samples, eval_samples = _split(samples, data_cfg.eval_fraction, seed)
        eval_read = len(eval_samples)
        records_read -= eval_read
    template = choose_chat_template(data_cfg.chat_template, tokenizer, required=True)
    train, stats = _encode_all(samples, tokenizer, processor, template.text, data_cfg, max_len)
    stats.records = records_read
    if not train:
        raise DataError(_nothing_left(name, stats, max_len) + _cut_note(stats, max_len))
    eval_examples, eval_stats = _encode_all(eval_samples, tokenizer, processor, template.text, data_cfg, max_len)
    if eval_samples:
        eval_stats.records = eval_read
        stats.eval = eval_stats
    _warn_dropped(name, stats)
    _keep_within(train + eval_examples, image_cache_mb, stats)
    if stats.cut_in_images:
        log.warning("%s: dropped %d sample(s)%s", name, stats.cut_in_images, _cut_note(stats, max_len))
    return PreparedData(train, eval_examples, stats, fmt, data_cfg.format == "auto", template)


def _keep_within(examples, budget_mb: int | None, stats: VisionStats):
    """Processed images stay in memory up to `budget_mb`; the rest keep only their references."""
    if budget_mb is None:
        return
    budget, kept = budget_mb * 2 ** 20, 0
    for example in examples:
        size = example.image_bytes
        if kept + size <= budget or not example.drop_images():
            kept += size
        else:
            stats.reread += example.num_images + example.num_videos
    if stats.reread:
        log.info("%d image(s) / video(s) past vision.image_cache_mb=%d are read and processed again for each batch",
                 stats.reread, budget_mb)


def _cut_note(stats: VisionStats, max_len: int) -> str:
    if not stats.cut_in_images:
        return ""
    return (f" ({stats.cut_in_images} cut inside their image or video tokens by max_seq_length={max_len}: raise "
            "data.max_seq_length, or lower the processor's image size or the videos' frames)")


def _read(path, data_cfg, name: str, processor):
    """[(sample, image refs, folder the refs are relative to)], records read, format."""
    records = read_records(path)
    if data_cfg.max_samples:
        records = records.head(data_cfg.max_samples)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect_format(records, name)
    if fmt not in ("messages", "sharegpt"):
        raise DataError(f"{name}: vision-language data must be conversations ('messages' or sharegpt "
                        f"'conversations' with image or video parts), got the {fmt} format")
    video_placeholder = video_placeholder_of(processor)
    out = []
    for record, where in zip(records, records.origins):
        sample, refs = read_vision_record(record, fmt, where, placeholder=processor.placeholder,
                                          system_prompt=data_cfg.system_prompt, video_placeholder=video_placeholder,
                                          family=family_of(processor))
        out.append((sample, refs, _folder_of(where)))
    return out, len(records), fmt


def _folder_of(origin: str) -> Path | None:
    """The folder of the file a record came from ("data/train.jsonl:3" -> data/)."""
    path = origin.rsplit(":", 1)[0].split("[")[0]
    return Path(path).parent if path else None


def _encode_all(samples, tokenizer, processor, template: str, data_cfg, max_len: int):
    stats = VisionStats()
    examples = []
    for sample, refs, folder in samples:
        example = encode_vision(sample, refs, processor, tokenizer, template, train_on=data_cfg.train_on,
                                max_len=max_len, overflow=data_cfg.overflow, stats=stats, base_dir=folder)
        if example is not None:
            examples.append(example)
    return examples, stats


__all__ = ["prepare_vision_data"]
