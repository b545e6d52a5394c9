"""One system of the GRPO benchmark in one process: a few GRPO steps, one JSON line back.

    python -m velotune.bench.grpo_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.load` + `vt.add_lora` + `vt.train` with `objective: grpo` (our KV-cache generation). trl: TRL's
GRPOTrainer (transformers' `generate`) on transformers' model with PEFT LoRA, its defaults (activation checkpointing
on); trl-nogc: checkpointing off. Every system: LoRA r=16, alpha=16 on every linear, `generations` completions of
up to `completion` tokens per prompt, temperature 1, no KL (beta 0, TRL's default), dapo loss, the same reward.
"""
from __future__ import annotations

from .processes import worker_main
from .trl_runs import run_trl_trainer, timed, timed_seconds, velotune_model, velotune_train_section

SYSTEMS = ("velotune", "trl", "trl-nogc")
REWARD = "velotune.bench.grpo_worker:parity_reward"


def parity_reward(prompts, completions, **columns):
    """A cheap reward that differs between completions (so that advantages are not all zero)."""
    return [float(len(str(c)) % 7) / 7 for c in completions]


def run_velotune(spec: dict, meter, on_step) -> list:
    import velotune as vt
    model, tokenizer = velotune_model(spec)
    meter.start()
    lengths = []

    def on_event(event):
        if event.kind == "step":
            lengths.append(event.metrics["completion_length"])
            on_step()
    cfg = {"objective": "grpo", "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "data": {"path": spec["data"], "max_seq_length": spec["prompt"] + spec["completion"], "shuffle": False},
           "grpo": {"num_generations": spec["generations"], "max_completion_length": spec["completion"],
                    "reward_funcs": [REWARD], "temperature": 1.0, "beta": 0.0, "loss_type": "dapo"},
           "train": velotune_train_section(spec, spec["prompts"])}
    vt.train(cfg, model=model, tokenizer=tokenizer, callbacks=[on_event])
    return lengths


def run_trl(spec: dict, meter, on_step) -> list:
    from trl import GRPOConfig, GRPOTrainer

    def make(model, tokenizer, dataset, common, peft_config, callbacks):
        args = GRPOConfig(**common, per_device_train_batch_size=spec["prompts"] * spec["generations"],
                          num_generations=spec["generations"], max_completion_length=spec["completion"], beta=0.0,
                          loss_type="dapo", temperature=1.0, top_k=0, shuffle_dataset=False)
        return GRPOTrainer(model=model, args=args, reward_funcs=parity_reward, train_dataset=dataset,
                           processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    return run_trl_trainer(spec, meter, on_step, make, "completions/mean_length")


def run_system(spec: dict) -> dict:
    times, lengths, memory = timed(spec, {"velotune": run_velotune, "trl": run_trl})
    warm, steps = spec["warmup"], spec["steps"]
    if len(lengths) != warm + steps:
        raise RuntimeError(f"{len(lengths)} completion lengths reported, expected {warm + steps}")
    seconds = timed_seconds(spec, times)
    completions = spec["prompts"] * spec["generations"]
    # Real tokens through the model per step: each completion with its prompt (the reported mean length).
    tokens = sum(completions * (spec["prompt"] + length) for length in lengths[warm:])
    return dict(input_tokens_per_s=round(tokens / seconds, 2), target_tokens_per_s=round(tokens / seconds, 2),
                steps_per_s=round(steps / seconds, 4), timed_seconds=round(seconds, 3),
                completion_lengths=[round(v, 2) for v in lengths], first_loss=None,
                step_target_tokens=[0] * len(times), trainable_params=0, memory=memory, tflops=None)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
