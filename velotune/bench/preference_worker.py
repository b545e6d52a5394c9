"""One system of the DPO benchmark in one process: train a few DPO steps, print one JSON line.

    python -m velotune.bench.preference_worker '{"system": "velotune", "model_dir": ..., "data": ..., ...}'

velotune: `vt.load` + `vt.add_lora` + `vt.train` with `objective: dpo` (reference: the adapters switched off).
trl: TRL's DPOTrainer on transformers' model with PEFT LoRA given as `peft_config` (its reference: the adapter
switched off), with TRL's defaults (activation checkpointing on); trl-nogc: the same with checkpointing off.
Every system: LoRA r=16, alpha=16 on every linear, beta 0.1, AdamW, the same pairs (every pair the same length, so
every step puts the same number of real tokens through the model, whatever the order).
"""
from __future__ import annotations

from .processes import worker_main
from .trl_runs import run_trl_trainer, timed, timed_seconds, velotune_model, velotune_train_section

SYSTEMS = ("velotune", "trl", "trl-nogc")
BETA = 0.1


def run_velotune(spec: dict, meter, on_step) -> list:
    import velotune as vt
    model, tokenizer = velotune_model(spec)
    meter.start()
    losses = []

    def on_event(event):
        if event.kind == "step":
            losses.append(event.metrics["loss"])
            on_step()
    cfg = {"objective": "dpo", "model": {"path": spec["model_dir"], "dtype": spec["dtype"], "device": spec["device"]},
           "data": {"path": spec["data"], "max_seq_length": spec["seq"], "shuffle": False},
           "preference": {"beta": BETA}, "train": velotune_train_section(spec, spec["batch"])}
    vt.train(cfg, model=model, tokenizer=tokenizer, callbacks=[on_event])
    return losses


def run_trl(spec: dict, meter, on_step) -> list:
    from trl import DPOConfig, DPOTrainer

    def make(model, tokenizer, dataset, common, peft_config, callbacks):
        args = DPOConfig(**common, per_device_train_batch_size=spec["batch"], beta=BETA, max_length=spec["seq"])
        return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=callbacks)
    return run_trl_trainer(spec, meter, on_step, make, "loss")


def run_system(spec: dict) -> dict:
    times, losses, memory = timed(spec, {"velotune": run_velotune, "trl": run_trl})
    seconds = timed_seconds(spec, times)
    steps = spec["steps"]
    tokens = spec["tokens_per_step"] * steps  # every pair is as long as every other: real tokens, no padding
    return dict(input_tokens_per_s=round(tokens / seconds, 2), target_tokens_per_s=round(tokens / seconds, 2),
                pairs_per_s=round(spec["batch"] * steps / seconds, 3), timed_seconds=round(seconds, 3),
                losses=[round(v, 6) for v in losses], first_loss=losses[0] if losses else None,
                step_target_tokens=[spec["tokens_per_step"]] * len(times), trainable_params=0, memory=memory,
                tflops=None)


def main(argv=None):
    worker_main(run_system, argv)


if __name__ == "__main__":
    main()
