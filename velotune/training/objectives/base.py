"""The seam every training objective plugs into: how records become examples, how examples become batches, and
the loss of a batch. The loop (trainer.py) knows nothing else of the objective.

The loop calls, in this order:
    prepare(config, tokenizer, max_seq_length=, seed=)  once, before any weights load: the examples and their counts
    load_model(config)                                    once, unless a model was passed: the model to train
    epoch_rows(examples, epoch=, **batch_kwargs)         per epoch: the batches, as rows of example indices
    step_closes(batches, grad_accum)                      per epoch: where a step ends before grad_accum batches
    collate(rows_of_examples, pad_id=, max_width=)       per batch: the tensors
    start(model, run)                                     once, after the weights load (and a resume), before step 1
    units(batch)                                          per batch, before the forward: what the loss is normalised by
    loss(model, batch) -> (sum, units[, metrics])         per batch: the summed loss (on the batch's device)
    extra_eval(model, tokenizer)                          at each evaluation (and before step 1 when
                                                          evaluates_before_training): metrics beyond the eval loss
    write_outputs(model, tokenizer, out_dir, lora)        once, at the end: the adapter or model (output_names);
                                                          {"adapter_dir": ..., "model_dir": ...} as written
    state_dict() / load_state_dict(state, source=)       what the objective keeps across steps (GRPO's samples
                                                          of num_iterations), saved in each checkpoint as it was
                                                          at that step boundary and read back on resume
The loss of an optimizer step is sum over micro-batches and ranks of `sum`, divided by the units of the whole
global batch (all its micro-batches on all ranks), so 1 x 8 and 8 x 1 give the same update.

A loss made of terms normalised by different counts (ORPO: a per-token NLL plus a per-pair odds-ratio term) gives
`units` as a dict of counts ({"pair": 4, "token": 310}, the first one the main count) and `sum` as a dict of summed
terms keyed by the count each is divided by; the loop divides each by its global count. `metrics`, when returned,
are sums over the batch of per-unit quantities (per pair, say), logged as their global mean per main unit; a metric
given as (sum, count name) is a mean over that count instead (KTO's rewards of desirable rows only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ...errors import CheckpointError


@dataclass
class RunContext:
    """What `Objective.start` may use of the run."""
    config: object             # the run's Config
    device: torch.device
    autocast: Callable         # autocast() -> the run's autocast context (a no-op context in fp32)
    out_dir: Path
    resumed: bool              # the run continues from a checkpoint
    dist: object               # training.distributed.Distributed: rank, world size, all_sum, on_main
    train: list                # the examples
    eval: list
    pad_id: int


class Objective:
    """Base class of objectives; a subclass overrides what differs (SFT overrides nothing but its name)."""

    name = "objective"
    unit_name = "token"    # what `units` counts (its first unit when it counts several), for the log
    sample_name = "sample"  # what one training example is called in the log ("pair" for preference data)
    row_name = "row"        # what train.batch_size counts
    evaluates_before_training = False  # True: extra_eval runs once before step 1 too (the "before" of before/after)
    # Batch widths rounded up to a few buckets (kernels/shape_buckets.py): the loop turns it off where the matmuls keep
    # nothing per shape (fp32 on the CPU), where the padding would only add work.
    bucket_widths = True
    # Unpacked batches as rows of documents (data.padding_free; set by the loop: padding_free_for). Objectives
    # with their own collate (pairs, groups, clips, embeddings) ignore it.
    padding_free = False

    # ---- the model --------------------------------------------------------------------------------------------
    def load_model(self, config):
        """The model to train, per the config's model section (a causal LM here)."""
        from ..model_setup import load_model
        return load_model(config)

    def check_model(self, model) -> None:
        """Refuses a model passed to vt.train(model=...) that this objective cannot train (named in the error)."""
        from ...models.interface import require_model
        require_model(model, "vt.train(model=...)")

    def adjust_trainable(self, model, config) -> None:
        """Called once LoRA or full fine-tuning is set up, before the optimizer is built: an objective may freeze
        parts of the model here (a vision-language model's tower). Nothing by default."""

    def source_max_length(self, model_dir: Path) -> int | None:
        """The sequence length the model directory asks for beyond config.json's (None: config.json's)."""
        return None

    def output_names(self, lora: bool) -> list[str]:
        """The entries of output_dir that write_outputs writes (run.json lists them; a later run replaces them)."""
        return ["adapter" if lora else "model"]

    def write_outputs(self, model, tokenizer, out_dir: Path, lora: bool) -> dict:
        """The adapter (with the tokenizer) or the whole model: {"adapter_dir" or "model_dir": its directory}."""
        if lora:
            from ...lora import save_adapter
            return {"adapter_dir": Path(save_adapter(model, out_dir / "adapter", overwrite=True, tokenizer=tokenizer))}
        from ...models.loader import save
        return {"model_dir": save(model, tokenizer, out_dir / "model", overwrite=True)}

    def extra_eval(self, model, tokenizer) -> dict:
        """Metrics measured at each evaluation beside the eval split's loss ({name: float}); none by default."""
        return {}

    # ---- records -> examples -----------------------------------------------------------------------------------
    def prepare(self, config, tokenizer, *, max_seq_length: int, seed: int):
        """Reads and encodes the data: a PreparedData (train and eval examples, counts, format, chat template)."""
        from ...data.dataset import prepare_data
        return prepare_data(config.data, tokenizer, max_seq_length=max_seq_length, seed=seed)

    def epoch_line(self, stats) -> str:
        """What one epoch holds, for the plan (the log and the dry run)."""
        many = self.sample_name if stats.samples == 1 else self.sample_name + "s"
        return (f"per epoch: {stats.samples} {many}, {stats.total_tokens:,} tokens (padding excluded), "
                f"{stats.target_tokens:,} trained tokens")

    def sample_view(self, example, tokenizer) -> str:
        """One example as the model reads it, its trained part marked (the dry run prints it)."""
        from ...data.encode import marked_text
        return marked_text(example, tokenizer)

    # ---- examples -> batches ------------------------------------------------------------------------------------
    def epoch_rows(self, examples, *, epoch: int, batch_size: int, max_seq_length: int, packing: bool, seed: int,
                   shuffle: bool = True, rank: int = 0, world_size: int = 1) -> list:
        """This process's batches of `epoch`: each a list of rows, each row a list of example indices."""
        from ...data import plan_for
        return plan_for(examples, epoch=epoch, batch_size=batch_size, max_seq_length=max_seq_length,
                        packing=packing, seed=seed, shuffle=shuffle, rank=rank, world_size=world_size)

    def step_closes(self, batches: int, accum: int) -> set[int]:
        """Where an epoch of `batches` batches (epoch_rows' count) ends an optimizer step before it holds `accum`
        (train.grad_accum) batches: numbers of batches read at which a step closes early. None by default: steps of
        grad_accum batches, the epoch's last one possibly shorter (step_sizes)."""
        return set()

    def collate(self, rows, *, pad_id: int, packing: bool, max_width: int | None = None) -> dict:
        """A batch of tensors from rows of examples."""
        from ...data import collate
        return collate(rows, pad_id=pad_id, packing=packing, max_width=max_width, bucket=self.bucket_widths,
                       padding_free=self.padding_free)

    def padding_free_for(self, setting: bool | None) -> bool:
        """data.padding_free for this objective; null: on when its loss is one of velotune's own (they read the
        document ids of a packed row), off for a loss written elsewhere, which may expect one sample per row."""
        if setting is not None:
            return setting
        return type(self).loss.__module__.startswith("velotune.")

    def input_tokens(self, rows) -> int:
        """Real tokens the batch puts through the model (padding excluded): the throughput the bar shows."""
        return sum(len(example) for row in rows for example in row)

    # ---- the run ------------------------------------------------------------------------------------------------
    def start(self, model, run) -> None:
        """Called once the model is loaded (and resumed), before the first step: `run` is a RunContext (device,
        autocast, output directory, the examples, this process's place in the job). Nothing to do by default;
        a preference objective computes its reference log-probabilities here."""

    def begin_step(self, model, batches: list) -> None:
        """Called before the forwards of each optimizer step (and each evaluation batch) with the step's micro-batches
        on this process (on the CPU): an objective that needs a statistic of the whole global batch first (KTO's
        reference point) computes it here. Nothing by default."""

    def state_dict(self) -> dict:
        """What the objective keeps from one optimizer step to the next, for a checkpoint: nested dicts / lists of
        tensors, ints, floats, str, bool, None (stored as JSON + safetensors, training/state_codec.py). The loop
        takes it at each step boundary; the containers must be new, the tensors must not change in place later.
        Empty by default: nothing kept."""
        return {}

    def load_state_dict(self, state: dict, *, source: str) -> None:
        """Takes back what `state_dict` gave, on resume, before `start`; `source` (the file) goes into the errors,
        a CheckpointError for anything malformed."""
        if state:
            raise CheckpointError(f"{source}: holds kept state ({', '.join(sorted(map(str, state)))}) but objective "
                                  f"{self.name} keeps none: was it written by another objective?")

    # ---- batches -> loss ----------------------------------------------------------------------------------------
    def units(self, batch: dict) -> int | dict:
        """What the batch's loss is normalised by, known before the forward (here: tokens with a target)."""
        from ...data import count_target_tokens
        return count_target_tokens(batch)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """(summed loss, units) of a batch already on the model's device, under the run's autocast."""
        raise NotImplementedError(f"{type(self).__name__}.loss")


def unit_counts(objective: Objective, batch: dict) -> dict:
    """The batch's counts as a dict, the main count first."""
    units = objective.units(batch)
    return dict(units) if isinstance(units, dict) else {objective.unit_name: int(units)}


def loss_terms(objective: Objective, out) -> tuple[dict, dict]:
    """An objective's `loss` result as ({count name: summed term}, {metric name: summed value})."""
    total, metrics = out[0], (out[2] if len(out) > 2 else {}) or {}
    terms = dict(total) if isinstance(total, dict) else {objective.unit_name: total}
    return terms, metrics


def step_sizes(batches: int, accum: int, closes: set[int] = frozenset(), start: int = 0) -> list[int]:
    """The sizes of the optimizer steps of an epoch of `batches` batches from batch `start` on: a step closes when
    it holds `accum` batches, at a batch count in `closes` (Objective.step_closes), or at the end of the epoch. The
    plan counts steps with it and the loop groups batches with it, so both agree."""
    sizes, size = [], 0
    for read in range(start + 1, batches + 1):
        size += 1
        if size == accum or read in closes or read == batches:
            sizes.append(size)
            size = 0
    return sizes
