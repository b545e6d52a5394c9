"""The LoRA layer: a frozen base linear (plain, NF4 or int8) plus a trainable low-rank update.

    y = base(x) + scaling * B(A(dropout(x)))                  LoRA; scaling = alpha / r (rsLoRA: alpha / sqrt(r))
    y = m / ||W + scaling*BA||_row * (W x + scaling*BAx) + b    DoRA, as PEFT computes it (the norm is detached)

Submodule names are PEFT's (`base_layer`, `lora_A`, `lora_B`, `lora_magnitude_vector`), so the parameter names
map one to one onto PEFT's adapter files. Adapter weights are kept in their own dtype (fp32 by default, like PEFT)
and used in the activation dtype, so a bf16 model trains fp32 adapters at bf16 matmul cost.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.lora_ops import AdaptedLinear, AdapterView, fused_lora_linear
from ..models.quantize import compute_dtype_of, dequantize_weight, is_quantized_linear
from .empty_linear import empty_linear


class LoraLinear(AdaptedLinear):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._adapter_state(base_layer, base_layer.in_features, base_layer.out_features, r, alpha, rslora, dora,
                            dropout)
        device = base_layer.weight.device
        self.lora_A = empty_linear(self.in_features, r, device=device, dtype=dtype)
        self.lora_B = empty_linear(r, self.out_features, device=device, dtype=dtype)
        if dora:
            self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))

    def _adapter_state(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                       rslora: bool, dora: bool, dropout: float) -> None:
        """What every LoRA layer holds besides its A and B (this class's, convolutions' and the embedding's)."""
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, rslora, dora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_parameter("lora_magnitude_vector", None)  # DoRA's, set by the layer that has it
        self.merged = False
        self.disabled = False     # True: the layer is its base alone (lora.adapters_disabled), e.g. a reference
        self._merge_state = None  # (DoRA factor or None, the quantized base or None): what unmerge needs

    def _base_alone(self) -> bool:
        """Whether the base computes the layer by itself: switched off, or the adapter merged into it."""
        if self.disabled and self.merged:
            raise RuntimeError("a merged LoRA layer cannot be switched off: unmerge it first")
        return self.disabled or self.merged

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """A: kaiming-uniform(a=sqrt(5)) as PEFT (drawn on the CPU, so a seed gives the same A on any device);
        B: zeros; DoRA magnitude: the row norms of the base weight."""
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()
        if self.use_dora:
            self.lora_magnitude_vector.copy_(self._row_norm(dequantize_weight(self.base_layer), self.delta_weight()))

    def adapter_view(self) -> AdapterView | None:
        """What the fused kernels compute for this layer; None (plain forward) with DoRA, or with dropout on the
        adapter's input while training."""
        if self.merged or self.disabled:
            return AdapterView(self.base_layer, self.scaling, None, None)
        dropping = not isinstance(self.lora_dropout, nn.Identity) and self.lora_dropout.training
        if self.use_dora or dropping:
            return None
        return AdapterView(self.base_layer, self.scaling, self.lora_A.weight, self.lora_B.weight)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, x):
        if self._base_alone():
            return self.base_layer(x)
        fused = fused_lora_linear(self, x)  # saves x, A, B only; None where it does not apply (dropout, DoRA)
        if fused is not None:
            return fused
        result = self.base_layer(x)
        dx = self.lora_dropout(x)
        lora = F.linear(F.linear(dx, self.lora_A.weight.to(x.dtype)), self.lora_B.weight.to(x.dtype))
        if not self.use_dora:
            return result + lora * self.scaling
        return result + self._dora_update(x, dx, result, lora)

    def _dora_update(self, x, dx, result, lora):
        """What DoRA adds to base(x): (m/n - 1) * W x + (m/n) * scaling * BAx, with n = ||W + scaling*BA||_row."""
        weight = dequantize_weight(self.base_layer, x.dtype)
        lora_weight = (self.lora_B.weight @ self.lora_A.weight).detach().to(x.dtype)
        # DoRA paper 4.3: the norm is a constant for backpropagation.
        norm = torch.linalg.norm(weight + self.scaling * lora_weight, dim=1).detach()
        scale = (self.lora_magnitude_vector.to(x.dtype) / norm).view(1, -1)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base = result - bias.to(result.dtype) if bias is not None else result
        else:  # dropout changed the LoRA input: the base term must see the same dropped-out input
            base = F.linear(dx, weight)
        return (scale - 1) * base + scale * lora * self.scaling

    # ---- weights -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, [out, in]."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    @staticmethod
    def _row_norm(weight, delta):
        return torch.linalg.norm(weight.float() + delta, dim=1)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight of a plain linear equivalent to this layer (computed in fp32, cast once); nothing changes."""
        dtype = dtype or compute_dtype_of(self.base_layer)
        if self.merged:
            return dequantize_weight(self.base_layer, dtype)
        weight, _ = self._fold(dequantize_weight(self.base_layer), self.delta_weight())
        return weight.to(dtype)

    def _fold(self, weight, delta):
        """(W + delta), times m / ||W + delta||_row for DoRA; returns (merged fp32 weight, DoRA factor or None)."""
        merged = weight.float() + delta
        if not self.use_dora:
            return merged, None
        factor = self.lora_magnitude_vector.detach().float() / torch.linalg.norm(merged, dim=1)
        return merged * factor[:, None], factor

    @torch.no_grad()
    def merge(self):
        """Folds the adapter into the base weight. A plain base is updated in place (the same Parameter); a
        quantized base is replaced by a plain Linear in its compute dtype holding the dequantized merged weight
        (never re-quantized: that would add a second rounding), and the quantized layer is kept for `unmerge`."""
        if self.merged:
            return
        base = self.base_layer
        weight, factor = self._fold(dequantize_weight(base), self.delta_weight())
        if is_quantized_linear(base):
            plain = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                              device=weight.device, dtype=compute_dtype_of(base))
            plain.weight.data = weight.to(plain.weight.dtype)
            if base.bias is not None:
                plain.bias.data = base.bias.data.to(plain.weight.dtype)
            plain.requires_grad_(False)
            self._merge_state = (factor, base)
            self.base_layer = plain
        else:
            base.weight.data.copy_(weight.to(base.weight.dtype))
            self._merge_state = (factor, None)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undoes `merge`: a plain base gets the same delta subtracted (exact up to rounding in its dtype); a
        quantized base is restored as it was, bit for bit."""
        if not self.merged:
            return
        factor, quantized = self._merge_state
        if quantized is not None:
            self.base_layer = quantized
        else:
            weight = self.base_layer.weight
            restored = weight.float() / factor[:, None] if factor is not None else weight.float()
            weight.data.copy_((restored - self.delta_weight()).to(weight.dtype))
        self._merge_state = None
        self.merged = False

    def extra_repr(self):
        kind = "DoRA" if self.use_dora else ("rsLoRA" if self.use_rslora else "LoRA")
        return (f"{kind}: in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")
