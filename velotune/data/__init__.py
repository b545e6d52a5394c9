"""The data pipeline: records -> samples -> token ids and labels -> (packed) batches.

    records  = read_records(path)                      # jsonl / json / csv / parquet, lists, datasets.Dataset
    fmt      = detect_format(records, origin)          # alpaca / sharegpt / messages / prompt_completion / text
    sample   = normalise(record, fmt)                  # a conversation or raw text
    template = resolve_chat_template(name, tokenizer)  # the tokenizer's own, or a built-in by name
    example  = encode(sample, tokenizer, template, max_len=...)   # input_ids + labels (-100 = not trained)
    for batch in batch_iterator(examples, ...): ...   # input_ids, labels, position_ids + document_ids | attention_mask

`build_datasets(data_cfg, tokenizer, ...)` runs all of it for the trainer.
"""
from .batches import batch_iterator, collate, count_target_tokens, num_batches, plan_for
from .dataset import build_datasets
from .encode import IGNORE_INDEX, DataStats, Encoded, encode
from .formats import FORMATS, Sample, detect_format, normalise
from .packing import plan_epoch
from .readers import Records, read_records
from .templates import BUILTIN_TEMPLATES, resolve_chat_template, template_names

__all__ = ["BUILTIN_TEMPLATES", "FORMATS", "IGNORE_INDEX", "DataStats", "Encoded", "Records", "Sample",
           "batch_iterator", "build_datasets", "collate", "count_target_tokens", "detect_format", "encode",
           "normalise", "num_batches", "plan_epoch", "plan_for", "read_records", "resolve_chat_template",
           "template_names"]
