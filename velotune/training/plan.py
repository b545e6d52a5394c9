"""`plan_run`: what a run will do, found before any weights load (the tokenizer is the only part of the model it
reads): the config checked, the output directory checked, the data read and encoded (counts, format, chat template
and why), and the optimizer steps counted. `velotune train --dry-run` prints the plan; the trainer runs it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, load_config
from ..data.dataset import DEFAULT_MAX_SEQ_LENGTH, PreparedData
from ..data.encode import TRAINED_CLOSE, TRAINED_OPEN
from ..errors import ConfigError, DataError
from .objectives import Objective, for_model_dir, make_objective
from .objectives.base import step_sizes
from .outputs import OutputDir, check_not_input_model, inspect_output_dir, output_names, probe_writable
from .model_setup import check_settings

FEW_STEPS = 10          # fewer optimizer steps than this from train.epochs: warned about
SAMPLE_CHARS = 2000     # the dry run's sample is cut after this many characters


@dataclass
class RunPlan:
    config: Config
    objective: Objective
    model_source: str                 # model.path, or the directory of the model passed to train()
    output: OutputDir
    tokenizer: object
    data: PreparedData
    max_seq_length: int
    batches_per_epoch: list[int]      # this process's batches in each epoch the run reads (epoch 0 with max_steps)
    steps_per_epoch: list[int]        # optimizer steps of those epochs: an epoch's last step may be shorter
    total_steps: int
    data_kwargs: dict = field(default_factory=dict)   # this process's share of the data (rank, world_size)
    warnings: list[str] = field(default_factory=list)

    def batch_kwargs(self) -> dict:
        """Keyword arguments of data.batch_iterator / num_batches for this run (pad_id aside)."""
        data, train = self.config.data, self.config.train
        return dict(batch_size=train.batch_size, max_seq_length=self.max_seq_length, packing=data.packing,
                    seed=train.seed, shuffle=data.shuffle, **self.data_kwargs)

    def summary_lines(self) -> list[str]:
        """What the run reads and does, one fact a line: the log's and the dry run's."""
        stats, data, train = self.data.stats, self.data, self.config.train
        sample = self.objective.sample_name
        lines = [f"objective: {self.objective.name}",
                 f"data: {_source(self.config.data.path)}: {_counts(stats, self.max_seq_length, sample)}"]
        if stats.eval is not None:
            lines.append(f"eval data: {_counts(stats.eval, self.max_seq_length, sample)}")
        lines.append(f"data format: {data.format} ({'detected' if data.format_detected else 'data.format'})")
        lines.append(f"chat template: {data.template.describe()}" if data.template is not None
                     else "chat template: none (the data is not chat and the tokenizer has none)")
        source = "train.max_steps" if train.max_steps else f"train.epochs={train.epochs:g}"
        lines.append(f"steps: {_count(self.total_steps, 'optimizer step')} ({source}); an epoch: "
                     f"{_count(_span(self.steps_per_epoch), 'step')} of up to "
                     f"{_count(train.grad_accum, 'batch', 'batches')} of up to "
                     f"{_count(train.batch_size, self.objective.row_name)} "
                     f"({_count(_span(self.batches_per_epoch), 'batch', 'batches')})")
        lines.append(self.objective.epoch_line(stats))
        return lines

    def sample_view(self) -> str:
        """The first training sample as the model reads it, its trained text between [[ and ]]."""
        text = self.objective.sample_view(self.data.train[0], self.tokenizer)
        if len(text) > SAMPLE_CHARS:
            text = text[:SAMPLE_CHARS] + f" ... ({len(text) - SAMPLE_CHARS} more characters)"
        return text

    def describe(self) -> str:
        """The dry run's report."""
        lines = ["velotune train --dry-run: the tokenizer is the only part of the model read; nothing is written",
                 f"model: {self.model_source}", f"output: {self.output.describe()}", *self.summary_lines()]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"sample 1 (the text between {TRAINED_OPEN} and {TRAINED_CLOSE} is trained):", self.sample_view()]
        return "\n".join(lines)

    def run_info(self) -> dict:
        """run.json: what the run is, and the outputs it writes (so that a later run replaces only those)."""
        template = self.data.template
        return {"config": self.config.to_dict(), "objective": self.objective.name, "outputs": self.output.outputs,
                "data": {**self.data.stats.as_dict(), "format": self.data.format},
                "chat_template": {"name": template.name, "source": template.source} if template else None,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "batches_per_epoch": self.batches_per_epoch[0],
                "processes": self.data_kwargs.get("world_size", 1)}


def plan_run(config, overrides=None, *, model=None, tokenizer=None, dist=None, objective=None) -> RunPlan:
    """The plan of `vt.train(config, overrides, model=, tokenizer=, objective=)`, made without loading weights
    and without writing anything. Bad config, output directory, data or template raise here, in that order."""
    from .distributed import Distributed
    cfg = load_config(config, overrides)
    dist = dist or Distributed()
    objective = make_objective(objective if objective is not None else cfg.objective)
    if model is not None:
        objective.check_model(model)
    check_settings(cfg)
    model_dirs = _input_model_dirs(cfg, model)
    chosen = for_model_dir(objective, model_dirs[0] if model_dirs else None)
    if chosen is not objective and model is not None:
        chosen.check_model(model)
    objective = chosen
    out_dir, outputs = Path(cfg.train.output_dir), output_names(cfg, objective)
    for model_dir in model_dirs:
        check_not_input_model(model_dir, out_dir, outputs)
    output = dist.on_main(_check_output_dir, out_dir, cfg.train, outputs)
    if tokenizer is None:
        tokenizer = _load_tokenizer(model_dirs)
    max_len = _max_seq_length(cfg, model, model_dirs, objective)
    data = objective.prepare(cfg, tokenizer, max_seq_length=max_len, seed=cfg.train.seed)
    plan = RunPlan(cfg, objective, str(model_dirs[0]) if model_dirs else "the model passed to train()", output,
                   tokenizer, data, max_len, [], [], 0, dist.data_kwargs())
    _count_steps(plan)
    return plan


def _check_output_dir(out_dir: Path, tcfg, outputs: list[str]) -> OutputDir:
    plan = inspect_output_dir(out_dir, tcfg, outputs)
    probe_writable(out_dir)
    return plan


def _input_model_dirs(cfg, model) -> list[Path]:
    """The local directories the run reads its model from: model.path (resolved), or the directory a passed
    model was loaded from."""
    from ..models.checkpoint import resolve_model_dir
    if model is None:
        if not cfg.model.path:
            raise ConfigError("model.path: required (a Hugging Face model directory or hub id)")
        return [resolve_model_dir(cfg.model.path)]
    dirs = [Path(cfg.model.path).expanduser()] if cfg.model.path else []
    dirs += [model.source_dir] if model.source_dir is not None else []
    return [d for d in dirs if d.is_dir()]


def _load_tokenizer(model_dirs: list[Path]):
    from ..models.tokenizer import load_tokenizer
    if not model_dirs:
        raise ConfigError("training needs a tokenizer: pass tokenizer= with the model (it was not loaded from a "
                          "directory), or set model.path")
    tokenizer = load_tokenizer(model_dirs[0])
    if tokenizer is None:
        raise ConfigError(f"training needs a tokenizer: {model_dirs[0]} has no tokenizer files")
    return tokenizer


def _max_seq_length(cfg, model, model_dirs: list[Path], objective: Objective) -> int:
    """data.max_seq_length, else the model's (model.max_seq_length, else what the objective reads in the model
    directory, else config.json's max_position_embeddings)."""
    if cfg.data.max_seq_length:
        return cfg.data.max_seq_length
    if model is not None:
        return model.max_seq_length or DEFAULT_MAX_SEQ_LENGTH
    if cfg.model.max_seq_length:
        return cfg.model.max_seq_length
    from ..models.checkpoint import read_config
    return (objective.source_max_length(model_dirs[0]) or read_config(model_dirs[0]).get("max_position_embeddings")
            or DEFAULT_MAX_SEQ_LENGTH)


def _count_steps(plan: RunPlan):
    """Optimizer steps: an epoch's batches in groups of grad_accum, the last group of an epoch possibly smaller,
    so that one epoch reads each sample once. Packing plans each epoch (its batch count depends on the order)."""
    train, examples = plan.config.train, plan.data.train
    epochs_read = 1 if train.max_steps else max(1, math.ceil(train.epochs))
    kwargs = plan.batch_kwargs()
    planned = epochs_read if plan.config.data.packing else 1  # unpacked epochs all hold the same number of batches
    batches = [len(plan.objective.epoch_rows(examples, epoch=e, **kwargs)) for e in range(planned)]
    batches += batches[-1:] * (epochs_read - planned)
    if min(batches) == 0:
        raise DataError(f"{_source(plan.config.data.path)}: {len(examples)} samples make no batch for "
                        f"{kwargs.get('world_size', 1)} processes; use fewer processes or more data")
    plan.batches_per_epoch = batches
    # Groups of grad_accum batches, closed early where the objective says (GRPO's repeated short last step).
    accum = train.grad_accum
    plan.steps_per_epoch = [len(step_sizes(b, accum, plan.objective.step_closes(b, accum))) for b in batches]
    if train.max_steps:
        plan.total_steps = train.max_steps
        return
    whole = int(train.epochs)
    steps = sum(plan.steps_per_epoch[:whole])
    if train.epochs > whole:
        steps += math.ceil((train.epochs - whole) * plan.steps_per_epoch[whole])
    plan.total_steps = max(1, steps)
    if plan.total_steps < FEW_STEPS:
        plan.warnings.append(_few_steps_warning(plan))


def _few_steps_warning(plan: RunPlan) -> str:
    train, data = plan.config.train, plan.config.data
    lower = [f"train.{key} ({value})" for key, value in (("batch_size", train.batch_size),
                                                          ("grad_accum", train.grad_accum)) if value > 1]
    more = (f"lower {' or '.join(lower)}, or raise train.epochs ({train.epochs:g})" if lower
            else f"raise train.epochs ({train.epochs:g})")
    packed = "; data.packing puts several samples in each row" if data.packing else ""
    return (f"this run makes only {_count(plan.total_steps, 'optimizer step')} ({plan.data.stats.samples} samples "
            f"in {_count(_span(plan.batches_per_epoch), 'batch', 'batches')} of up to "
            f"{_count(train.batch_size, 'row')} per epoch, {_count(train.grad_accum, 'batch', 'batches')} per "
            f"step{packed}): too few to learn much. For more steps {more}")


def _counts(stats, max_len: int, sample: str = "sample") -> str:
    bad = "".join(f", {n} dropped: {reason}" for reason, n in stats.dropped_bad.items())
    return (f"{stats.records} records -> {_count(stats.samples, sample)} ({stats.truncated} truncated to {max_len} "
            f"tokens, {stats.dropped_too_long} dropped as too long, {stats.dropped_fully_masked} dropped with no "
            f"trained tokens{bad})")


def _count(n, word: str, plural: str | None = None) -> str:
    return f"{n} {word if str(n) == '1' else plural or word + 's'}"


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"


def _source(path) -> str:
    return ", ".join(str(p) for p in path) if isinstance(path, (list, tuple)) else str(path)
