"""LoRA on a convolution (a vision tower's patch embedding, Whisper's front end), the way PEFT builds it, so
adapters PEFT trained on these layers load, and ours load into PEFT:

    lora_A = Conv(in, r, the base's kernel, stride and padding),  lora_B = Conv(r, out, kernel 1)
    y = base(x) + scaling * lora_B(lora_A(dropout(x)))

Since B is a 1x1 (x1) convolution, B after A is one convolution with the base's geometry and the weight
B[:, :, 0...] @ A.flatten(1): merging adds exactly that to the base weight.

Only named targets reach a convolution ("all-linear" leaves them out, as PEFT does). Patch embeddings that velotune
computes as a linear map of flattened patches (Qwen2-VL's Conv3d, called with [patches, C*kT*kH*kW]) get the same
update on the flattened input.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layers import LoraLinear


def check_adaptable(name: str, conv: nn.Module, dora: bool) -> None:
    """ConfigError naming the layer when PEFT's convolution LoRA does not describe it."""
    if dora:
        raise ConfigError(f"LoRA target {name} is a {type(conv).__name__}: DoRA is for linear layers only here")
    if conv.groups != 1 or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        raise ConfigError(f"LoRA target {name} is a {type(conv).__name__} with groups {conv.groups}, dilation "
                          f"{tuple(conv.dilation)}, padding mode {conv.padding_mode!r}: LoRA covers plain "
                          "convolutions only (groups 1, dilation 1, zero padding)")
    if isinstance(conv.padding, str):
        raise ConfigError(f"LoRA target {name}: padding {conv.padding!r} is not supported; give it in numbers")


class LoraConv(LoraLinear):
    """A frozen convolution plus PEFT's low-rank convolution pair. Merging, unmerging, saving and switching off
    are LoraLinear's, on the weight's own shape; no fused kernel (the plain forward below)."""

    def __init__(self, base_layer: nn.modules.conv._ConvNd, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)
        conv = type(base_layer)
        if not issubclass(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            conv = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(base_layer, c))
        self._adapter_state(base_layer, base_layer.in_channels * math.prod(base_layer.kernel_size),
                            base_layer.out_channels, r, alpha, rslora, False, dropout)
        device = base_layer.weight.device
        ones = (1,) * len(base_layer.kernel_size)
        self.lora_A = conv(base_layer.in_channels, r, base_layer.kernel_size, base_layer.stride,
                           base_layer.padding, bias=False, device=device, dtype=dtype)
        self.lora_B = conv(r, self.out_features, ones, ones, bias=False, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The base's weight, as PEFT's layers offer it (code that reads `proj.weight.dtype` keeps working)."""
        return self.base_layer.weight

    def adapter_view(self):
        return None  # the fused linear kernels do not apply: always this layer's own forward

    def forward(self, x):
        result = self.base_layer(x)
        if self._base_alone():
            return result
        dx = self.lora_dropout(x)
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        if x.dim() == 2 and a.dim() > 3:  # flattened patches of a kernel = stride patch embedding
            lora = F.linear(F.linear(dx, a.flatten(1)), b.flatten(1))
        else:
            lora = self.lora_B._conv_forward(self.lora_A._conv_forward(dx, a, None), b, None)
        return result + lora * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """scaling * (B after A) in fp32, in the base weight's shape [out, in, *kernel]."""
        b = self.lora_B.weight.detach().float().flatten(1)
        a = self.lora_A.weight.detach().float().flatten(1)
        return (self.scaling * (b @ a)).reshape(self.base_layer.weight.shape)

    def extra_repr(self):
        kind = "rsLoRA" if self.use_rslora else "LoRA"
        return (f"{kind} on {type(self.base_layer).__name__}: r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")
