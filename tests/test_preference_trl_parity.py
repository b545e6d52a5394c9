"""One DPO step equals TRL's DPOTrainer step: same tiny model, same LoRA weights, same batch (TRL's own collated
token rows), the reference being the base with the adapter off on both sides. Loss and every adapter gradient
agree (measured: loss equal to the last bit, gradients <= 1.2e-6 relative; the bound is the issue's 1e-5)."""
import pytest
import torch

import velotune as vt
from train_fixtures import FACTS, make_model_dir
from velotune.bench.baselines import trainer_checkpointing
from velotune.config import load_config
from velotune.training.objectives import make_objective
from velotune.training.objectives.reference import Reference

trl = pytest.importorskip("trl")
GRAD_RTOL = 1e-5


def test_a_dpo_step_equals_trl(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model_dir = make_model_dir(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    wrong = [a for _, a in FACTS][1:] + [FACTS[0][1]]
    rows = [{"prompt": q, "chosen": " " + a, "rejected": " " + w} for (q, a), w in zip(FACTS, wrong)][:4]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], beta=0.1,
                         max_length=128, use_cpu=True, bf16=False, **trainer_checkpointing(True))  # TRL's default
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0: the policy differs from the reference, and every adapter weight gets a gradient
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    want = trainer.compute_loss(trainer.model, batch)
    want.backward()
    want_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad.clone()
                  for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.save_pretrained(str(tmp_path / "adapter"))

    model, _ = vt.load(model_dir, dtype="float32", device="cpu")
    vt.load_adapter(model, str(tmp_path / "adapter"))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours = {"input_ids": batch["input_ids"], "labels": labels, "attention_mask": batch["attention_mask"],
            "pairs": len(rows)}
    objective = make_objective("dpo")
    objective.settings = load_config({"preference": {"beta": 0.1}}).preference
    objective.reference = Reference("adapter_off", model, run=None)
    terms, _, _ = objective.loss(model, ours)
    got = terms["pair"] / len(rows)  # what the loop divides by: the pairs of the (here: one-batch) step
    got.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    assert grads.keys() == want_grads.keys() and len(grads) == 28
    worst = max(float((grads[k] - want_grads[k]).abs().max() / want_grads[k].abs().max()) for k in grads)
    assert worst <= GRAD_RTOL, worst
