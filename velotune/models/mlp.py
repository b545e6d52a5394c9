"""Gated feed-forward block (SwiGLU / GeGLU) with Hugging Face submodule names."""
from torch import nn

from ..errors import UnsupportedError
from ..kernels import geglu, swiglu
from ..kernels.lora_ops import lora_mlp

# hidden_act value in config.json -> (kind, gelu approximation)
ACTIVATIONS = {
    "silu": ("swiglu", None), "swish": ("swiglu", None),
    "gelu_pytorch_tanh": ("geglu", "tanh"), "gelu_new": ("geglu", "tanh"), "gelu_fast": ("geglu", "tanh"),
    "gelu": ("geglu", "none"),
}


def gated_activation(name: str):
    if name not in ACTIVATIONS:
        raise UnsupportedError(f"hidden activation '{name}' is not supported; supported: {', '.join(ACTIVATIONS)}")
    kind, approx = ACTIVATIONS[name]
    if kind == "swiglu":
        return swiglu
    return lambda gate, up: geglu(gate, up, approx)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); `fused=True` holds gate and up in one `gate_up_proj` (Phi-3)."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False, fused: bool = False):
        super().__init__()
        self.fused, self.intermediate = fused, intermediate
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
            self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = gated_activation(act)
        self.act_kind = ACTIVATIONS[act]

    def forward(self, x):
        # One autograd op for the block when its linears allow (frozen bases, LoRA without dropout / DoRA):
        # it saves x, gate and up, and recomputes the activation in backward.
        gate_up = [self.gate_up_proj] if self.fused else [self.gate_proj, self.up_proj]
        out = lora_mlp(gate_up, self.down_proj, self.act, self.act_kind, x)
        if out is not None:
            return out
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate, up))
