"""gpt-oss's fused experts with quantized weights, NF4 (a QLoRA base) or int8: `QuantizedExperts` replaces a
`gpt_oss.Experts`.

Mixtral-style experts are separate linears, which quantize.py swaps for bitsandbytes layers. gpt-oss holds each
layer's experts as fused [E, in, out] parameters (models/gpt_oss.py), so here each of the two weights becomes a
`PackedExperts`: every expert's [in, out] matrix quantized on its own by one of two codecs, the biases kept in the
compute dtype. One class serves both codecs (only packing and unpacking differ):

- nf4: bitsandbytes NF4 (blocks of 64 values, double quantization of the block scales, as quantize._to_nf4). Layout:
  an expert's matrix is flattened (row-major [in, out], the checkpoint's) and quantized as rows of exactly one
  block. bitsandbytes 0.50's CPU kernel mis-reads blocks that straddle rows (quantize.nf4_supported); with one block
  a row no block can, whatever the model's widths. On CUDA blocks run over the flattened tensor anyway;
- int8: weight-only row-wise absmax int8, the weight half of bitsandbytes' vectorwise quantization: for each output
  row (a column of [in, out]) absmax = max |w|, codes = round(w * 127 / absmax), w ~ codes * absmax / 127, so each
  element is off by at most absmax / 254. The activations stay in the compute dtype: LLM.int8's outlier scheme
  (int8 activations with outlier columns kept in 16 bits) multiplies one activation matrix by one weight and has no
  per-expert form here. The model's other linears keep bitsandbytes' Linear8bitLt (quantize.py), LLM.int8 proper.

What is special, for both codecs:

- one expert is dequantized at a time, inside gpt_oss.Experts' grouped loop (its `forward` and `activation` are
  used here unchanged, so the routing and the clamped SwiGLU cannot drift apart); the backward dequantizes the
  expert again instead of keeping it (`_DequantMatmul`), so training never holds all experts in full precision;
- the quantization state is plain buffers (NF4: `packed`, `absmax`, `absmax2`, `offset`, two code books; int8:
  `codes`, `absmax`), one row per expert; the float32 ones are stored bit-cast to int32 so that
  `model.to(torch.bfloat16)` cannot round them;
- `gate_up_proj` / `down_proj` are `PackedExperts` modules under the parameters' names with the parameter's
  `shape` and `device`, so LoRA (lora/param_lora.py) wraps this module as it wraps the plain one; merging and merged
  export read the weights back with `plain_parameters` / `dequantized`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedError
from .gpt_oss import Experts

WEIGHTS = ("gate_up_proj", "down_proj")
CODECS = ("nf4", "int8")   # quantize.METHODS: the same names (quantize.py imports this module)


def fused_experts(model: nn.Module) -> list[tuple[str, Experts]]:
    """The full-precision gpt-oss expert modules of a model (already quantized ones are not `Experts`)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is Experts]


def check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise UnsupportedError(f"quantize={codec!r}: gpt-oss's fused experts quantize to {' or '.join(CODECS)}")


def _f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float32)


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.float().contiguous().view(torch.int32)


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise absmax int8 of one expert's [in, out] weight, a row being an output (a column here): (codes int8
    [in, out], absmax float32 [out]). The arithmetic is bitsandbytes' int8_vectorwise_quant's (in float32), with an
    all-zero row giving zero codes rather than 0 * inf."""
    w = weight.float()
    absmax = w.abs().amax(dim=0)
    factor = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    return torch.round(w * factor).clamp(-127, 127).to(torch.int8), absmax


class PackedExperts(nn.Module):
    """One fused [E, in, out] weight, each expert quantized by `codec` (see the module docstring for the layouts)."""

    def __init__(self, shape: tuple[int, int, int], compute_dtype: torch.dtype, codec: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        check_codec(codec)
        self.shape = torch.Size(shape)
        self.compute_dtype, self.codec = compute_dtype, codec
        self.blocksize, self.double_quant = blocksize, double_quant and codec == "nf4"
        self.numel = shape[1] * shape[2]
        self.rows = -(-self.numel // blocksize)   # NF4 blocks an expert has, the last zero-padded if partial

    @property
    def device(self) -> torch.device:
        return next(self.buffers()).device

    @classmethod
    @torch.no_grad()
    def quantize(cls, weight: torch.Tensor, compute_dtype: torch.dtype, device=None, blocksize: int = 64,
                 double_quant: bool = True, codec: str = "nf4") -> PackedExperts:
        """Quantizes `weight` [E, in, out] expert by expert on `device` (default the weight's): one expert is ever
        held there in full precision beside the packed ones."""
        device = torch.device(device) if device is not None else weight.device
        self = cls(tuple(weight.shape), compute_dtype, codec, blocksize, double_quant)
        experts = (weight[e].to(device) for e in range(weight.shape[0]))
        buffers = self._pack_nf4(experts) if codec == "nf4" else self._pack_int8(experts)
        for name, value in buffers.items():
            self.register_buffer(name, value)
        return self

    def _pack_int8(self, experts) -> dict[str, torch.Tensor]:
        codes, absmax = zip(*(int8_rows(w) for w in experts))
        return {"codes": torch.stack(codes), "absmax": _bits(torch.stack(absmax))}

    def _pack_nf4(self, experts) -> dict[str, torch.Tensor]:
        from .bitsandbytes_import import require_bitsandbytes
        F = require_bitsandbytes().functional
        blocksize, double_quant = self.blocksize, self.double_quant
        parts: dict[str, list[torch.Tensor]] = {"packed": [], "absmax": [], "absmax2": [], "offset": []}
        for weight in experts:
            flat = weight.reshape(-1)
            if self.rows * blocksize != self.numel:
                flat = torch.cat([flat, flat.new_zeros(self.rows * blocksize - self.numel)])
            packed, state = F.quantize_4bit(flat.reshape(self.rows, blocksize), blocksize=blocksize,
                                            compress_statistics=double_quant, quant_type="nf4")
            parts["packed"].append(packed.reshape(-1))
            if double_quant:
                parts["absmax"].append(state.absmax)
                parts["absmax2"].append(_bits(state.state2.absmax))
                parts["offset"].append(_bits(state.offset.reshape(1)))
                code2 = state.state2.code
            else:
                parts["absmax"].append(_bits(state.absmax))
            code = state.code
        out = {name: torch.stack(values) for name, values in parts.items() if values}
        out["code"] = _bits(code)
        if double_quant:
            out["code2"] = _bits(code2)
        return out

    def dequantize(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's weight [in, out] in `dtype` (default the compute dtype)."""
        dtype = dtype or self.compute_dtype
        if self.codec == "int8":   # as quantize.dequantize_weight reads a Linear8bitLt: codes * absmax / 127
            return (self.codes[e].float() * (_f32(self.absmax[e]) / 127.0)).to(dtype)
        from .bitsandbytes_import import require_bitsandbytes
        F = require_bitsandbytes().functional
        out_dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        if self.double_quant:
            nested = F.QuantState(absmax=_f32(self.absmax2[e]), code=_f32(self.code2), blocksize=256,
                                  dtype=torch.float32)
            state = F.QuantState(absmax=self.absmax[e], shape=torch.Size((self.rows, self.blocksize)),
                                 code=_f32(self.code), blocksize=self.blocksize, quant_type="nf4", dtype=out_dtype,
                                 offset=_f32(self.offset[e])[0], state2=nested)
        else:
            state = F.QuantState(absmax=_f32(self.absmax[e]), shape=torch.Size((self.rows, self.blocksize)),
                                 code=_f32(self.code), blocksize=self.blocksize, quant_type="nf4", dtype=out_dtype)
        flat = F.dequantize_4bit(self.packed[e].reshape(-1, 1), state).reshape(-1)[: self.numel]
        return flat.view(self.shape[1], self.shape[2]).to(dtype)

    def dequantize_all(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole [E, in, out] weight (for export and merging only: the forward never forms it)."""
        return torch.stack([self.dequantize(e, dtype) for e in range(self.shape[0])])

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        codec = (f"nf4, blocksize={self.blocksize}, double_quant={self.double_quant}" if self.codec == "nf4"
                 else "int8 (row-wise absmax, weight-only)")
        return (f"experts={self.shape[0]}, in={self.shape[1]}, out={self.shape[2]}, {codec}, "
                f"compute_dtype={str(self.compute_dtype).replace('torch.', '')}")


class _DequantMatmul(torch.autograd.Function):
    """x @ W[e] with W[e] dequantized in the forward and again in the backward, never saved: the gradient reaches x
    (and, through the caller's separate LoRA term, the adapters); the frozen base gets none."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: PackedExperts, e: int) -> torch.Tensor:
        ctx.weight, ctx.e = weight, e
        return x @ weight.dequantize(e, x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ ctx.weight.dequantize(ctx.e, grad.dtype).T, None, None


class QuantizedExperts(nn.Module):
    """gpt_oss.Experts with NF4 or int8 weights: the same call, the same parameter names for LoRA, frozen."""

    lora_parameters = Experts.lora_parameters
    # The grouping over experts and the clamped SwiGLU are gpt_oss.Experts' own (they only call self.expert).
    forward = Experts.forward
    activation = Experts.activation

    def __init__(self, gate_up_proj: PackedExperts, gate_up_proj_bias: torch.Tensor, down_proj: PackedExperts,
                 down_proj_bias: torch.Tensor, alpha: float, limit: float):
        super().__init__()
        self.num_experts, self.alpha, self.limit = gate_up_proj.shape[0], alpha, limit
        self.compute_dtype = gate_up_proj.compute_dtype
        # Registration order = gpt_oss.Experts' parameter order (state dicts and merged exports keep it).
        self.gate_up_proj = gate_up_proj
        self.gate_up_proj_bias = nn.Parameter(gate_up_proj_bias.to(self.compute_dtype), requires_grad=False)
        self.down_proj = down_proj
        self.down_proj_bias = nn.Parameter(down_proj_bias.to(self.compute_dtype), requires_grad=False)

    @classmethod
    def from_experts(cls, experts: Experts, compute_dtype: torch.dtype, device=None, blocksize: int = 64,
                     double_quant: bool = True, codec: str = "nf4") -> QuantizedExperts:
        packed = {w: PackedExperts.quantize(getattr(experts, w).detach(), compute_dtype, device, blocksize,
                                            double_quant, codec) for w in WEIGHTS}
        target = packed["gate_up_proj"].device
        return cls(packed["gate_up_proj"], experts.gate_up_proj_bias.detach().to(target), packed["down_proj"],
                   experts.down_proj_bias.detach().to(target), experts.alpha, experts.limit)

    def expert(self, e: int, x, adapters: dict | None = None):
        """gpt_oss.Experts.expert with the two products through `_DequantMatmul`."""
        gate_up = _DequantMatmul.apply(x, self.gate_up_proj, e) + self.gate_up_proj_bias[e].to(x.dtype)
        if adapters and "gate_up_proj" in adapters:
            gate_up = gate_up + adapters["gate_up_proj"](e, x)
        hidden = self.activation(gate_up)
        out = _DequantMatmul.apply(hidden, self.down_proj, e) + self.down_proj_bias[e].to(x.dtype)
        if adapters and "down_proj" in adapters:
            out = out + adapters["down_proj"](e, hidden)
        return out

    @torch.no_grad()
    def plain_parameters(self, weight_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """gpt_oss.Experts' four parameters, in its order: the weights dequantized (to `weight_dtype`, default
        the compute dtype), the biases as held."""
        return {"gate_up_proj": self.gate_up_proj.dequantize_all(weight_dtype),
                "gate_up_proj_bias": self.gate_up_proj_bias.detach(),
                "down_proj": self.down_proj.dequantize_all(weight_dtype),
                "down_proj_bias": self.down_proj_bias.detach()}

    @torch.no_grad()
    def dequantized(self) -> Experts:
        """A plain gpt_oss.Experts in the compute dtype holding exactly the dequantized weights (frozen)."""
        E, hidden, two_i = self.gate_up_proj.shape
        plain = Experts(hidden, two_i // 2, E, self.alpha, self.limit).to(device=self.gate_up_proj.device,
                                                                          dtype=self.compute_dtype)
        for name, value in self.plain_parameters().items():
            getattr(plain, name).data = value.to(self.compute_dtype)
        return plain.requires_grad_(False)

    def storage_bytes(self) -> int:
        """Bytes the experts take: packed weights, their quantization state and the biases."""
        return (self.gate_up_proj.storage_bytes() + self.down_proj.storage_bytes()
                + sum(p.numel() * p.element_size() for p in (self.gate_up_proj_bias, self.down_proj_bias)))


def is_quantized_experts(module: nn.Module) -> bool:
    return isinstance(module, QuantizedExperts)


def quantize_fused_experts(model: nn.Module, compute_dtype: torch.dtype, device=None, blocksize: int = 64,
                           double_quant: bool = True, codec: str = "nf4") -> int:
    """Replaces every full-precision gpt-oss Experts of `model` by a QuantizedExperts (`codec` "nf4" or "int8"),
    in place, one module at a time; returns how many it replaced."""
    check_codec(codec)
    found = fused_experts(model)
    for name, experts in found:
        new = QuantizedExperts.from_experts(experts, compute_dtype, device, blocksize, double_quant, codec)
        model.set_submodule(name, new.train(experts.training))
    return len(found)


class ExpertStream:
    """StreamingQuantizer's part for fused experts: each fused weight is quantized as soon as the loader has read
    it (one [E, in, out] tensor in full precision at a time), and the module replaced once both weights are in; the
    biases stay in `loaded` for the loader's load_state_dict (the new module has them under the same names)."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype, device=None, blocksize: int = 64,
                 codec: str = "nf4"):
        check_codec(codec)
        self.model, self.compute_dtype, self.device, self.blocksize = model, compute_dtype, device, blocksize
        self.codec = codec
        self.owner = {f"{name}.{w}": (name, w) for name, _ in fused_experts(model) for w in WEIGHTS}
        self.done: dict[str, dict[str, PackedExperts]] = {}

    def offer(self, name: str, loaded: dict[str, torch.Tensor]) -> bool:
        """True when `name` was an expert weight (quantized and taken out of `loaded`)."""
        if name not in self.owner:
            return False
        module_name, weight = self.owner[name]
        packed = PackedExperts.quantize(loaded.pop(name), self.compute_dtype, self.device, self.blocksize,
                                        codec=self.codec)
        parts = self.done.setdefault(module_name, {})
        parts[weight] = packed
        if len(parts) == len(WEIGHTS):
            old = self.model.get_submodule(module_name)
            E = packed.shape[0]
            # Meta placeholders for the biases: the loader's load_state_dict(assign=True) puts the read ones in.
            new = QuantizedExperts(parts["gate_up_proj"], torch.empty(E, parts["gate_up_proj"].shape[2], device="meta"),
                                   parts["down_proj"], torch.empty(E, parts["down_proj"].shape[2], device="meta"),
                                   old.alpha, old.limit)
            self.model.set_submodule(module_name, new.train(old.training))
            del self.done[module_name]
        return True


__all__ = ["QuantizedExperts", "PackedExperts", "quantize_fused_experts", "is_quantized_experts",
           "check_codec", "int8_rows", "ExpertStream", "fused_experts", "CODECS"]
