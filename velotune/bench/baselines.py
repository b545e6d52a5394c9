"""The baselines as their users write them: transformers (SDPA attention) + peft (+ bitsandbytes NF4 for QLoRA,
+ Liger-Kernel's patches on CUDA)."""
from __future__ import annotations

LORA_RANK = 16  # every system: r=16, alpha=16, every linear but the head, no dropout


def load_hf_model(model_dir: str, dtype: str, device: str, quantize_4bit: bool = False):
    import torch
    from transformers import AutoModelForCausalLM
    torch_dtype = getattr(torch, dtype)
    kwargs = dict(dtype=torch_dtype, attn_implementation="sdpa")
    if quantize_4bit:  # as velotune's nf4: NF4, blocks of 64, double-quantized absmax
        from transformers import BitsAndBytesConfig
        kwargs.update(device_map={"": device}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype))
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)


def trainer_checkpointing(on: bool) -> dict:
    """transformers' TrainingArguments switch for activation checkpointing, under the name this release takes:
    `activation_checkpointing` from 5.2x, where `gradient_checkpointing` is a deprecated alias (gone in v6). Set
    either way, so TRL's configs (whose default is on) do what the benchmark says."""
    import dataclasses
    from transformers import TrainingArguments
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


def with_peft_lora(model):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(model, LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
                                            target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))


def prepare_hf_model(model, method: str, gc: bool):
    """What a transformers + peft user writes: (k-bit preparation,) checkpointing, LoRA on every linear."""
    ckpt_kwargs = {"use_reentrant": False}
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
    elif gc and hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if method == "full":
        model.requires_grad_(True)
        return model
    return with_peft_lora(model)


def apply_liger():
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("Liger-Kernel needs a CUDA GPU: skipped on the CPU")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_llama
    except ImportError:
        raise RuntimeError("liger-kernel is not installed (pip install liger-kernel): skipped") from None
    apply_liger_kernel_to_llama()
