"""LoRA on fused 3-D expert parameters (gpt-oss's `mlp.experts.gate_up_proj` / `down_proj`) and on a router's bare 2-D
weight (gpt-oss's `mlp.router.weight`), in PEFT's layout.

A fused-experts module declares the parameters LoRA may adapt in `lora_parameters`, each [E, in, out] (x @ W[e]),
and takes `adapters` (param name -> f(e, rows)) in its forward (models/gpt_oss.py's Experts). `LoraExperts` wraps
such a module, like LoraLinear wraps a linear: `base_layer` is the module, `adapters.<param>` one `ParamLora` per
adapted parameter. A ParamLora holds PEFT's ParamWrapper tensors exactly (peft/tuners/lora/layer.py, 0.21):

    lora_A.weight [R*E, in]   row e*R + k    = rank k of expert e      (expert-major)
    lora_B.weight [out, R*E]  column k*E + e = rank k of expert e      (rank-major)
    W[e] + scaling * (B_e @ A_e)^T,   A_e [R, in], B_e [out, R]

(transformers marks gpt-oss's experts `is_transposed`, so PEFT keeps in = dim 1, out = dim 2 of the parameter, as
here), so the file tensors map one to one. What is special:

- the forward adds scaling * (x_e @ A_e^T) @ B_e^T to each expert's rows inside the grouped expert loop: the
  [E, in, out] delta is never formed (PEFT forms W + delta every forward; the two agree to rounding);
- names in PEFT's files: one ParamWrapper per targeted parameter, nested in the base's parameter order, the first
  innermost, so with both adapted gate_up_proj's tensors are `...experts.base_layer.lora_A.weight` and down_proj's
  `...experts.lora_A.weight` (`file_modules`); adapter_config.json names them in `target_parameters`;
- no dropout and no DoRA: PEFT's ParamWrapper refuses both (dropout cannot be factored out of B A x per expert);
- a router held as a bare 2-D parameter (gpt-oss's `mlp.router.weight` [E, hidden], with a bias: not a Linear) is
  adapted the same way, only when named (targets=["router.weight"]; quantize.router_names keeps it out of
  "all-linear"): PEFT's ParamWrapper on a 2-D parameter is one "expert" with in = dim 1, out = dim 0, so lora_A
  [R, in], lora_B [out, R] and W + scaling * B @ A. The router has no per-expert hook: its module runs with
  W + delta in place of W (torch.func.functional_call), as PEFT's parametrization does; the [E, hidden] delta is
  small. PEFT's file names are `...mlp.router.lora_A.weight`, its config target_parameters ["mlp.router.weight"].
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, UnsupportedError
from .empty_linear import empty_linear


def is_fused_experts(module: nn.Module) -> bool:
    return bool(getattr(module, "lora_parameters", None)) and not isinstance(module, LoraExperts)


def adaptable(module: nn.Module) -> tuple[str, ...]:
    """The parameters of `module` LoRA adapts directly: a fused-experts module's `lora_parameters`, else ("weight",)
    for a module holding a bare 2-D weight (a router that is not a Linear: see the module docstring)."""
    declared = getattr(module, "lora_parameters", None)
    if declared:
        return tuple(declared)
    weight = getattr(module, "weight", None)
    return ("weight",) if isinstance(weight, nn.Parameter) and weight.dim() == 2 else ()


def bare_routers(model: nn.Module) -> set[str]:
    """Module names of the routers held as bare parameters, not Linears (gpt-oss's `mlp.router`)."""
    from ..models.quantize import router_names
    names = router_names(model)
    return {n for n, m in model.named_modules()
            if n in names and not isinstance(m, nn.Linear) and (isinstance(m, LoraExperts) or adaptable(m))}


def fused_param_names(model: nn.Module) -> list[str]:
    """Full names of the parameters LoRA adapts directly, in model order: fused expert parameters
    (`model.layers.0.mlp.experts.gate_up_proj`) and the weights of routers held as bare parameters
    (`model.layers.0.mlp.router.weight`); a wrapped module's under the wrapper's name (the name its parameters have
    without LoRA)."""
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraExperts)}
    routers = bare_routers(model)
    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraExperts):
            out += [f"{name}.{p}" for p in adaptable(module.base_layer)]
        elif (is_fused_experts(module) or name in routers) and name.removesuffix(".base_layer") not in wrapped:
            out += [f"{name}.{p}" for p in adaptable(module)]
    return out


def group_targets(names: list[str]) -> dict[str, list[str]]:
    """Fused parameter names -> {module name: [param names]}."""
    out: dict[str, list[str]] = {}
    for name in names:
        module, _, param = name.rpartition(".")
        out.setdefault(module, []).append(param)
    return out


def file_modules(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Fused parameter names -> the module path PEFT's file keeps their tensors under (our names; see the module
    docstring): each module's targeted parameters nest in its parameter order, the first innermost."""
    out = {}
    for module, params in group_targets(names).items():
        base = model.get_submodule(module)
        base = base.base_layer if isinstance(base, LoraExperts) else base
        order = [p for p in adaptable(base) if p in params]
        out.update({f"{module}.{p}": module + ".base_layer" * (len(order) - 1 - order.index(p)) for p in order})
    return out


def fused_param(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter a full name (as fused_param_names gives it) stands for, wrapped or not, as [experts, in, out]:
    a fused one itself, a router's 2-D [out, in] weight as the [1, in, out] view PEFT's layout reads it as."""
    module, _, param = name.rpartition(".")
    base = model.get_submodule(module)
    weight = getattr(base.base_layer if isinstance(base, LoraExperts) else base, param)
    return weight.T.unsqueeze(0) if len(weight.shape) == 2 else weight   # (a quantized base's has no dim())


def check_settings(names: list[str], dropout: float, dora: bool) -> None:
    """Dropout and DoRA do not exist for parameters adapted directly (fused experts, a router's bare weight; nor in
    PEFT): refused, naming a target."""
    if not names:
        return
    # a router's bare weight ends in ".weight"; fused expert parameters are named by their own leaf
    what = "a router's bare weight" if names[0].endswith(".weight") else "fused expert parameters"
    if dropout:
        raise ConfigError(f"lora dropout {dropout} cannot apply to {what} ({names[0]}): the update is a low-rank "
                          "product of the weight with no place for dropout (PEFT refuses it too); use dropout 0, or "
                          "targets that leave it out (e.g. q_proj, k_proj, v_proj, o_proj)")
    if dora:
        raise ConfigError(f"DoRA cannot apply to {what} ({names[0]}; PEFT has no DoRA for them): use plain LoRA, or "
                          "targets that leave it out (e.g. q_proj, k_proj, v_proj, o_proj)")


# ---- adapter_config.json's target_parameters ---------------------------------------------------------------------
def target_parameters(model: nn.Module, fused: list[str]) -> list[str]:
    """target_parameters for the adapted `fused` names: a layer-relative key (`mlp.experts.gate_up_proj`) where
    every layer's parameter of that name is adapted, else full names (PEFT's names, `model.peft_name`)."""
    everywhere = fused_param_names(model)
    keys = []
    for leaf in dict.fromkeys(n.rsplit(".", 1)[-1] for n in fused):
        mine = [model.peft_name(n) for n in fused if n.endswith("." + leaf)]
        short = {re.sub(r"^.*?\blayers\.\d+\.", "", n) for n in mine}
        if len(short) == 1 and short != set(mine) and len(mine) == sum(n.endswith("." + leaf) for n in everywhere):
            keys.append(short.pop())
        else:
            keys += mine
    return keys


def read_targets(model: nn.Module, config: dict, source) -> set[str]:
    """adapter_config.json's target_parameters -> our full names of the fused parameters they select (a key
    selects the names it equals or ends), each key required to select one. A rank_pattern / alpha_pattern that
    would give one of them its own rank or alpha is refused: an adapter has one rank and alpha here."""
    params = fused_param_names(model)
    wanted = config.get("target_parameters") or []
    if not isinstance(wanted, list) or not all(isinstance(t, str) and t for t in wanted):
        raise CheckpointError(f"{source}: field 'target_parameters' must be a list of names, got {wanted!r}")
    peft = {model.peft_name(n): n for n in params}
    chosen, unknown = set(), []
    for t in wanted:
        hits = {ours for key, ours in peft.items() if key == t or key.endswith("." + t)}
        unknown += [] if hits else [t]
        chosen |= hits
    if unknown:
        known = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in params}))
        raise CheckpointError(f"{source}: target_parameters entr{'y' if len(unknown) == 1 else 'ies'} {unknown} "
                              f"match no fused expert parameter of this model (known: {known})")
    for field, value in (("rank_pattern", config.get("r")), ("alpha_pattern", config.get("lora_alpha"))):
        for key, v in (config.get(field) or {}).items():
            hit = sorted(n for n in chosen if re.match(rf"(.*\.)?({key})$", model.peft_name(n)))
            if hit and v != value:
                raise UnsupportedError(f"{source}: {field} {key!r}: {v!r} gives {model.peft_name(hit[0])} its own "
                                       "rank or alpha; velotune keeps one rank and alpha for an adapter")
    return chosen


# ---- the layers ---------------------------------------------------------------------------------------------------

def expert_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's LoRA layout on a fused expert parameter, A [R*E, in] (row e*R + k: rank k of expert e) and
    B [out, R*E] (column k*E + e), as per-expert factors: (A [E, R, in], B [E, out, R]) views."""
    rank = a.shape[0] // experts
    return a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)


def fused_factors(a_parts: list, b_parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `expert_factors`: each expert's A_e [R, in] and B_e [out, R], in order, in PEFT's layout."""
    b = torch.stack(b_parts, dim=-1)                      # [out, R, E]: column k*E + e once flattened
    return torch.cat(a_parts).contiguous(), b.reshape(b.shape[0], -1).contiguous()


class ParamLora(nn.Module):
    """The adapter of one fused [E, in, out] parameter: PEFT's lora_A / lora_B (see the module docstring)."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, scaling: float,
                 device=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.scaling = r, scaling
        self.lora_A = empty_linear(in_features, r * num_experts, device=device, dtype=dtype)
        self.lora_B = empty_linear(r * num_experts, out_features, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None):
        """A: kaiming-uniform(a=sqrt(5)) over the whole [R*E, in] (as PEFT; drawn on the CPU); B: zeros."""
        a = torch.empty(self.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.zero_()

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [E, R, in], B [E, out, R]) views of the live weights (cast to `dtype`: one cast a forward)."""
        a = self.lora_A.weight if dtype is None else self.lora_A.weight.to(dtype)
        b = self.lora_B.weight if dtype is None else self.lora_B.weight.to(dtype)
        return expert_factors(a, b, self.num_experts)

    def update_fn(self, dtype: torch.dtype):
        """f(e, rows [n, in]) -> scaling * rows @ A_e^T @ B_e^T [n, out], for the base's grouped forward."""
        a, b = self.factors(dtype)
        scaling = self.scaling

        def update(e: int, rows: torch.Tensor) -> torch.Tensor:
            return (rows @ a[e].T) @ b[e].T * scaling
        return update

    def delta(self, e: int) -> torch.Tensor:
        """scaling * (B_e @ A_e)^T in fp32, [in, out]: what merging adds to W[e]."""
        a, b = self.factors()
        return self.scaling * (b[e].detach().float() @ a[e].detach().float()).T

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        """scaling * B @ A [out, in] in `dtype`, with its graph: the update of a 2-D parameter (one "expert")."""
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        return (b @ a) * self.scaling


class LoraExperts(nn.Module):
    """A fused-experts module with LoRA on some of its `lora_parameters`, or a router with LoRA on its bare 2-D
    weight (see the module docstring); the same call as the base."""

    def __init__(self, base_layer: nn.Module, params: list[str], r: int, alpha: float, rslora: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        known = adaptable(base_layer)
        unknown = [p for p in params if p not in known]
        if unknown:
            raise ConfigError(f"{type(base_layer).__name__} has no adaptable parameter {unknown[0]!r} "
                              f"(it has {', '.join(known) or 'none'})")
        self.base_layer = base_layer
        # No per-expert hook (a router's weight): the base runs with W + delta in place of W.
        self.direct = not getattr(base_layer, "lora_parameters", None)
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, rslora, False
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        adapters = {}
        for p in known:   # the base's order: PEFT's nesting order
            if p in params:
                weight = getattr(base_layer, p)
                # PEFT reads a 2-D [out, in] parameter as one expert
                shape = tuple(weight.shape)   # a quantized base's packed weight has a shape, not dim()
                experts, n_in, n_out = shape if len(shape) == 3 else (1, shape[1], shape[0])
                adapters[p] = ParamLora(experts, n_in, n_out, r, self.scaling, weight.device, dtype)
        self.adapters = nn.ModuleDict(adapters)
        self.merged = False
        self.disabled = False   # True: the base alone (lora.adapters_disabled)

    def reset_parameters(self, generator: torch.Generator | None = None):
        for adapter in self.adapters.values():
            adapter.reset_parameters(generator)

    def forward(self, flat, *args, **kwargs):
        if self.disabled and self.merged:
            raise RuntimeError("a merged LoRA layer cannot be switched off: unmerge it first")
        if self.disabled or self.merged:
            return self.base_layer(flat, *args, **kwargs)
        if self.direct:
            replaced = {p: getattr(self.base_layer, p) + a.matrix(getattr(self.base_layer, p).dtype)
                        for p, a in self.adapters.items()}
            return torch.func.functional_call(self.base_layer, replaced, (flat, *args), kwargs)
        # A and B cast to the activations' dtype once a forward, not once per expert
        adapters = {p: a.update_fn(flat.dtype) for p, a in self.adapters.items()}
        return self.base_layer(flat, *args, adapters=adapters, **kwargs)

    # ---- weights -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def merged_params(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The base's parameters with the deltas added (fp32, cast once), for a plain checkpoint; nothing changes."""
        out = {}
        base = self.base_layer
        # An NF4 base (models/quantized_experts.py) gives its weights dequantized in fp32, to its compute dtype.
        quantized = hasattr(base, "plain_parameters")
        params = base.plain_parameters(torch.float32) if quantized else dict(base.named_parameters(recurse=False))
        for pname, p in params.items():
            value = p.detach()
            if pname in self.adapters and not self.merged and value.dim() == 2:   # a router's weight [out, in]
                value = value.float() + self.adapters[pname].delta(0).T
            elif pname in self.adapters and not self.merged:
                value = torch.stack([value[e].float() + self.adapters[pname].delta(e)
                                     for e in range(value.shape[0])])
            out[pname] = value.to(dtype or (base.compute_dtype if quantized else p.dtype))
        return out

    @torch.no_grad()
    def merge(self):
        """Adds each delta into its fused parameter in place, expert by expert (no second [E, in, out] tensor).
        An NF4 base (models/quantized_experts.py) is first replaced by a plain one holding its dequantized weights
        (never re-quantized, as LoraLinear.merge), and kept (outside the module tree) for `unmerge`."""
        if not self.merged:
            if hasattr(self.base_layer, "dequantized"):
                self._quantized_base = (self.base_layer,)   # a tuple: not registered as a submodule
                self.base_layer = self.base_layer.dequantized()
            self._add(1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            quantized = getattr(self, "_quantized_base", None)
            if quantized is not None:   # back to the NF4 base as it was
                self.base_layer, self._quantized_base = quantized[0], None
            else:
                self._add(-1.0)
            self.merged = False

    def _add(self, sign: float):
        for pname, adapter in self.adapters.items():
            weight = getattr(self.base_layer, pname)
            if weight.dim() == 2:   # a router's weight [out, in]: delta(0) is [in, out]
                weight.data = (weight.data.float() + sign * adapter.delta(0).T).to(weight.dtype)
                continue
            for e in range(weight.shape[0]):
                weight.data[e] = (weight.data[e].float() + sign * adapter.delta(e)).to(weight.dtype)

    def extra_repr(self):
        return (f"LoRA on {', '.join(self.adapters)}: experts={next(iter(self.adapters.values())).num_experts}, "
                f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
