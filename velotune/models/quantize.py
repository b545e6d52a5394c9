"""4-bit (NF4) and 8-bit (LLM.int8) bases through bitsandbytes.

`quantize_model` swaps the linear layers of the decoder blocks (never the embeddings, never the output head) for
bitsandbytes `Linear4bit` / `Linear8bitLt` in place, one layer at a time, keeping the module names, so the
parameter stays `...q_proj.weight`. `dequantize_weight` reads any of them back in high precision (DoRA norms,
merging, export). bitsandbytes is imported only here and only when asked for: it is an optional extra.
gpt-oss's fused experts are not linears: models/quantized_experts.py quantizes them, expert by expert (NF4, or
int8 as weight-only row-wise absmax: LLM.int8's activation scheme has no per-expert form).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import UnsupportedError
from .bitsandbytes_import import require_bitsandbytes
from .interface import LanguageModel, VelotuneModel

log = logging.getLogger("velotune")

METHODS = ("nf4", "int8")


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a bitsandbytes linear (checked by class, so bitsandbytes is not imported to find out)."""
    return isinstance(module, nn.Linear) and type(module).__module__.startswith("bitsandbytes")


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head (`lm_head`), which neither quantization nor "all-linear" LoRA touches."""
    if isinstance(model, LanguageModel):
        head = model.get_output_embeddings()
    else:  # a plain transformers model (its own method, which may refuse), or a bare layer stack (no head)
        getter = getattr(model, "get_output_embeddings", None)
        try:
            head = getter() if callable(getter) else None
        except (AttributeError, NotImplementedError):
            head = None
    return {name for name, m in model.named_modules() if head is not None and m is head}


def router_names(model: nn.Module) -> set[str]:
    """Module names of mixture-of-experts routers: kept exact (not quantized) and out of "all-linear" LoRA; LoRA
    takes one only when named (PEFT 0.21's "all-linear" differs on transformers 5 Mixtral / Qwen-MoE: its v4-to-v5
    conversion adds the router; gpt-oss's it leaves). Mixtral / Qwen3-MoE: the `gate` Linear. gpt-oss: the
    `router` module, and its weight's full name too, by which LoRA targets a router held as a bare parameter
    (lora/param_lora.py)."""
    from .gpt_oss import SparseFeedForward
    from .moe import SparseMoE
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, SparseMoE):
            out.add(f"{name}.gate")
        elif isinstance(m, SparseFeedForward):
            out |= {f"{name}.router", f"{name}.router.weight"}
    return out


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every linear layer except the output head and the routers: for a decoder-only LM, the linears of the
    decoder blocks."""
    kept = output_head_names(model) | router_names(model)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in kept]


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: the bitsandbytes compute dtype, else the weight's own dtype."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if is_quantized_linear(module):
        state = getattr(module.weight, "quant_state", None)
        return getattr(state, "dtype", None) or (module.bias.dtype if module.bias is not None else torch.float16)
    return module.weight.dtype


def quantize_model(model: nn.Module, method: str, compute_dtype=None, device=None, *, double_quant: bool = True,
                   blocksize: int = 64, threshold: float = 6.0) -> nn.Module:
    """Replaces the decoder-block linears with bitsandbytes layers, in place; returns the model.

    nf4: `Linear4bit` (NF4 weights, blockwise absmax, double quantization of the absmax by default), computing in
    `compute_dtype`. int8: `Linear8bitLt` (row-wise int8, LLM.int8 outlier threshold). Works on the CPU and CUDA.
    gpt-oss's fused experts get the same method expert by expert (int8 weight-only; models/quantized_experts.py).
    """
    if method not in METHODS:
        raise ValueError(f"quantize={method!r}: expected one of {', '.join(METHODS)}")
    if any(".lora_" in name for name, _ in model.named_parameters()):
        raise UnsupportedError("quantize the base model before adding LoRA adapters, not after")
    bnb = require_bitsandbytes()
    if compute_dtype is None:
        compute_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    elif not isinstance(compute_dtype, torch.dtype):
        from .dtypes import parse_dtype
        compute_dtype = parse_dtype(compute_dtype)
    from .quantized_experts import quantize_fused_experts
    kept = []
    for name, linear in decoder_linears(model):
        if is_quantized_linear(linear):
            continue
        new = quantize_linear(bnb, linear, method, compute_dtype, device, double_quant=double_quant,
                              blocksize=blocksize, threshold=threshold)
        if new is None:
            kept.append(name)
            continue
        model.set_submodule(name, new)
    warn_kept(kept, compute_dtype, blocksize)
    # gpt-oss's fused experts the stream left (or a model built in memory), one module at a time, by the same
    # method (int8: weight-only there, models/quantized_experts.py)
    quantize_fused_experts(model, compute_dtype, device, blocksize, double_quant, codec=method)
    if isinstance(model, VelotuneModel):  # a bare layer stack (kernel tests) has no such record
        model.quantization = method
    return model


def quantize_linear(bnb, linear: nn.Linear, method: str, compute_dtype: torch.dtype, device=None, *,
                    double_quant: bool = True, blocksize: int = 64, threshold: float = 6.0) -> nn.Module | None:
    """The bitsandbytes layer for one linear (on `device`, default the weight's), or None when NF4 would compute
    it wrong on this device (`nf4_supported`): the caller keeps the linear as it is."""
    target = torch.device(device) if device is not None else linear.weight.device
    if method == "nf4":
        if not nf4_supported(linear.in_features, blocksize, target):
            return None
        new = _to_nf4(bnb, linear, compute_dtype, target, double_quant, blocksize)
    else:
        new = _to_int8(bnb, linear, compute_dtype, target, threshold)
    # The layer it replaces decides the mode: int8 quantizes activations too at inference (eval), not in training.
    return new.train(linear.training)


def warn_kept(kept: list[str], compute_dtype: torch.dtype, blocksize: int = 64) -> None:
    if kept:
        log.warning("nf4: %d linear layer(s) kept in %s because bitsandbytes' CPU 4-bit kernel mis-reads "
                    "blocks that straddle rows (in_features not a multiple of %d): %s", len(kept),
                    str(compute_dtype).replace("torch.", ""), blocksize, ", ".join(kept))


class StreamingQuantizer:
    """Quantizes each decoder linear as soon as the loader has read its tensors, so that a checkpoint loads into
    NF4 / int8 holding one linear at a time in full precision, never the whole model (a mixture-of-experts
    model's experts are most of its weights). `offer` after each tensor the loader keeps; `quantize_model` after
    loading then finds these layers done (and handles any the stream left, with its warnings)."""

    def __init__(self, model: nn.Module, method: str, compute_dtype: torch.dtype, device=None, blocksize: int = 64):
        if method not in METHODS:
            raise ValueError(f"quantize={method!r}: expected one of {', '.join(METHODS)}")
        self.bnb = require_bitsandbytes()
        self.model, self.method, self.compute_dtype, self.blocksize = model, method, compute_dtype, blocksize
        self.device = torch.device(device) if device is not None else None
        self.params: dict[str, list[str]] = {}   # linear name -> its parameters' names
        self.owner: dict[str, str] = {}          # parameter name -> linear name
        for name, linear in decoder_linears(model):
            names = [f"{name}.{p}" for p, _ in linear.named_parameters(recurse=False)]
            self.params[name] = names
            self.owner.update(dict.fromkeys(names, name))
        # gpt-oss's fused expert weights, each quantized (NF4 / int8) as it is read (models/quantized_experts.py)
        from .quantized_experts import ExpertStream
        self.experts = ExpertStream(model, compute_dtype, self.device, blocksize, codec=method)

    def offer(self, name: str, loaded: dict[str, torch.Tensor]) -> None:
        """Quantizes the linear `name` belongs to once all its tensors are in `loaded` (taking them out of it)."""
        if self.experts.offer(name, loaded):
            return
        owner = self.owner.get(name)
        if owner is None or not all(p in loaded for p in self.params[owner]):
            return
        linear = self.model.get_submodule(owner)
        target = self.device or loaded[f"{owner}.weight"].device
        if self.method == "nf4" and not nf4_supported(linear.in_features, self.blocksize, target):
            return  # left to quantize_model, which keeps it and says so
        real = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        real.weight = nn.Parameter(loaded.pop(f"{owner}.weight"), requires_grad=False)
        if linear.bias is not None:
            real.bias = nn.Parameter(loaded.pop(f"{owner}.bias"), requires_grad=False)
        new = quantize_linear(self.bnb, real, self.method, self.compute_dtype, target, blocksize=self.blocksize)
        self.model.set_submodule(owner, new)


def nf4_supported(in_features: int, blocksize: int, device) -> bool:
    """Whether bitsandbytes computes this layer right. Measured with 0.50.2: on the CPU, dequantize_4bit (which
    Linear4bit's forward uses too) returns wrong values (~28% error instead of NF4's ~9%) when a row's length is
    even but not a multiple of the blocksize; odd lengths take a correct fallback. Real models' widths are
    multiples of 64; small test models often are not."""
    return torch.device(device).type != "cpu" or in_features % blocksize == 0 or in_features % 2 == 1


def _to_nf4(bnb, linear: nn.Linear, compute_dtype, device, double_quant: bool, blocksize: int):
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, blocksize=blocksize,
                                 compress_statistics=double_quant, quant_type="nf4", module=q)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place at the first no-grad eval forward,
    # and that repacking asserts out_features % 32 == 0: keep the standard layout (same state dict, any shape).
    q.support_avx512bf16_for_cpu = False
    return q.to(device)  # Params4bit quantizes on its first move to a real device, the CPU included


def _to_int8(bnb, linear: nn.Linear, compute_dtype, device, threshold: float):
    q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            has_fp16_weights=False, threshold=threshold, device="meta")
    # Int8Params quantizes only when it moves *from* the CPU: start there whatever device the weight is on.
    q.weight = bnb.nn.Int8Params(linear.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    q = q.to(device)
    q.compute_dtype = compute_dtype  # Linear8bitLt has none of its own; merging dequantizes into this dtype
    return q


@torch.no_grad()
def dequantize_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The layer's weight [out, in] in `dtype`: dequantized for bitsandbytes layers, a detached copy otherwise."""
    if not is_quantized_linear(module):
        return module.weight.detach().to(dtype)
    bnb = require_bitsandbytes()
    weight = module.weight
    if isinstance(weight, bnb.nn.Params4bit):
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            # Undo bitsandbytes' CPU repacking the way its own state-dict saving does (in place, standard layout).
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state)
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB  # moved into the layer's state at its first forward
    if scb is None:
        raise UnsupportedError(f"{type(module).__name__}: weight is not quantized yet (no row scales)")
    return (weight.data.float() * (scb.float() / 127.0)[:, None]).to(dtype)


__all__ = ["quantize_model", "dequantize_weight", "is_quantized_linear", "decoder_linears", "output_head_names",
           "compute_dtype_of", "require_bitsandbytes", "quantize_linear", "warn_kept", "StreamingQuantizer",
           "METHODS"]
