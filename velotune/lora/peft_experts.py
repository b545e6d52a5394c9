"""LoRA on mixture-of-experts experts in PEFT's file format (`target_parameters`), both ways.

velotune holds each expert as three linears (gate, up, down), each with its own LoRA (A [r, in], B [out, r]).
transformers 5 holds a layer's experts fused: `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
`mlp.experts.down_proj` [E, H, I], and PEFT adapts them with `ParamWrapper` (`target_parameters`), whose layout
for a parameter of E experts at rank R is:

    lora_A.weight [R*E, in]   row e*R + k   = rank k of expert e        (expert-major)
    lora_B.weight [out, R*E]  column k*E + e = rank k of expert e       (rank-major: B.reshape(out, R, E))
    delta[e] = scaling * B_e @ A_e,  scaling = alpha / R  (alpha / sqrt(R) with rsLoRA)

so gate and up share one A per expert. Exactly ours, written: rank 2r with A_e = [A_gate; A_up] and B_e the
block-diagonal [[B_gate, 0], [0, B_up]], and `rank_pattern` / `alpha_pattern` {"gate_up_proj": 2r / 2*alpha}
keeping alpha / R = alpha / r (rsLoRA: alpha*sqrt(2), the same to one rounding). When every expert's gate and up
share their A (an adapter PEFT wrote, loaded here) it is written at rank r instead: B_e = [B_gate; B_up].
Read: rank r gives gate and up that same A; rank 2r is split back, its off-diagonal blocks required to be zero.

File names: PEFT nests one wrapper per targeted parameter in the experts module's parameter order
(gate_up_proj, then down_proj), the first innermost, so with both targeted gate_up_proj's tensors are
`...mlp.experts.base_layer.lora_A.weight` and down_proj's `...mlp.experts.lora_A.weight`.
ParamWrapper has no dropout: with experts in the file `lora_dropout` is written as 0 (inference is the same).

The router: ours is the `gate` Linear, adapted only when named (targets=["gate"]) and written as a module target
(PEFT maps `gate` onto transformers 5's router parameter itself). PEFT's own router adapter names the parameter,
target_parameters `mlp.gate.weight` (or `gate.weight`), with a plain [r, in] / [out, r] pair under the router's path:
read here as a LoRA on our `gate` (`ROUTER`; nothing to expand).
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedError
from ..models.moe import SparseMoE
from .param_lora import expert_factors, fused_factors

PREFIX = "base_model.model."
PARAMS = ("gate_up_proj", "down_proj")   # transformers' experts parameter order = PEFT's nesting order
ROUTER = "gate.weight"                    # the router's parameter as PEFT targets it on transformers 5
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


@dataclass
class Fused:
    """One fused expert parameter of one layer, as the adapter file holds it."""
    moe: str            # our name of the SparseMoE module, e.g. model.layers.1.block_sparse_moe
    param: str          # "gate_up_proj" or "down_proj", or ROUTER (the router's weight: a plain LoRA pair)
    file_module: str    # PEFT's module path of its tensors (without PREFIX), base_layer segments included
    rank: int
    alpha: float


def moe_modules(model: nn.Module) -> dict[str, SparseMoE]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseMoE)}


def is_expert_linear(name: str) -> bool:
    return _PER_EXPERT.search(name) is not None


def _projections(moe: SparseMoE, param: str) -> tuple[str, ...]:
    gate, up, down = moe.experts[0].names
    return (gate, up) if param == "gate_up_proj" else (down,)


def _file_modules(model, moe_name: str, params: list[str]) -> dict[str, str]:
    """param -> PEFT's module path for its tensors, by PEFT's nesting (see the module docstring)."""
    experts = model.peft_name(f"{moe_name}.experts")
    ordered = [p for p in PARAMS if p in params]
    return {p: experts + ".base_layer" * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}


def _shown(model, moe_name: str) -> str:
    """The MoE block's name as transformers (and the adapter file) spell it."""
    return model.peft_name(moe_name + ".experts").removesuffix(".experts")


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# ---- writing ---------------------------------------------------------------------------------------------------
def saved_layout(model, layers: dict) -> dict[str, list[str]]:
    """moe name -> the fused parameters its LoRA layers make (those whose every expert linear is adapted).

    A layer adapted in part (some experts, or gate without up) cannot be written for PEFT, which adapts a fused
    expert parameter whole: then nothing is fused ({}), the file keeps velotune's per-expert names (velotune loads
    it; PEFT cannot apply it), and a warning says so. A save in the middle of training must not fail over it."""
    out = {}
    for name, moe in moe_modules(model).items():
        params = []
        for param in PARAMS:
            wanted = [f"{name}.experts.{e}.{p}" for e in range(moe.num_experts) for p in _projections(moe, param)]
            have = [w for w in wanted if w in layers]
            if have and len(have) != len(wanted):
                warnings.warn(
                    f"LoRA adapts {len(have)} of the {len(wanted)} expert projections behind {param} in {name}: "
                    "PEFT adapts a fused expert parameter whole, so the adapter is written with velotune's "
                    "per-expert names (velotune loads it, PEFT cannot); adapt gate and up (or down) of every expert "
                    "(targets='all-linear' or the three projection names) for a file PEFT loads", stacklevel=2)
                return {}
            if have:
                params.append(param)
        if params:
            out[name] = params
    return out


def shares_a(model, layers: dict, layout: dict) -> bool:
    """Every adapted expert's gate and up hold the same A (an adapter read from PEFT's shared-A layout)."""
    found = False
    for name, params in layout.items():
        if "gate_up_proj" in params:
            moe = model.get_submodule(name)
            gate, up = _projections(moe, "gate_up_proj")
            for e in range(moe.num_experts):
                found = True
                if not torch.equal(layers[f"{name}.experts.{e}.{gate}"].lora_A.weight,
                                   layers[f"{name}.experts.{e}.{up}"].lora_A.weight):
                    return False
    return found


def config_fields(model, settings, layout: dict, shared: bool) -> dict:
    """target_parameters (short keys when every sparse layer has them), rank_pattern and alpha_pattern."""
    if settings.dora:
        raise UnsupportedError("DoRA on experts cannot be written for PEFT (its ParamWrapper has no DoRA)")
    every = set(moe_modules(model))
    keys = []
    for param in PARAMS:
        names = [n for n, ps in layout.items() if param in ps]
        if not names:
            continue
        if set(names) == every:
            keys.append(f"mlp.experts.{param}")
        else:
            keys += [f"{model.peft_name(n + '.experts')}.{param}" for n in names]
    _warn_remapped(model, settings)
    fields = {"target_parameters": keys, "rank_pattern": {}, "alpha_pattern": {}}
    if not shared and any("gate_up_proj" in ps for ps in layout.values()):
        alpha = settings.alpha * (math.sqrt(2) if settings.rslora else 2)   # alpha' / R' = alpha / r
        fields["rank_pattern"] = {"gate_up_proj": 2 * settings.r}
        fields["alpha_pattern"] = {"gate_up_proj": int(alpha) if float(alpha).is_integer() else alpha}
    return fields


def _warn_remapped(model, settings) -> None:
    """PEFT (0.21) rewrites target_modules naming an expert projection (`gate_proj`, `w1`, ...) into
    target_parameters on a transformers 5 MoE model, so a dense MLP of the same names (Qwen3-MoE's mlp_only_layers)
    cannot be a module target there: PEFT would drop its adapter. The file is right; velotune reads it exactly."""
    names = {n for moe in moe_modules(model).values() for n in moe.experts[0].names}
    hit = [t for t in settings.targets if not is_expert_linear(t) and t.rsplit(".", 1)[-1] in names]
    if hit:
        warnings.warn(f"LoRA on {', '.join(model.peft_name(t) for t in hit[:3])}"
                      f"{' and more' if len(hit) > 3 else ''}: PEFT (with transformers 5) reads these projection "
                      "names as the experts' and would leave these layers unadapted; velotune.load_adapter reads "
                      "the adapter exactly", stacklevel=3)


def fuse_state(model, state: dict[str, torch.Tensor], layers: dict, layout: dict, shared: bool) -> dict:
    """`state` (per-expert names under PREFIX, PEFT's module names) with each adapted layer's per-expert tensors
    replaced by its fused ones."""
    state = dict(state)
    for name, params in layout.items():
        moe = model.get_submodule(name)
        modules = _file_modules(model, name, params)
        for param in params:
            projs = _projections(moe, param)
            a_parts, b_parts = [], []
            for e in range(moe.num_experts):
                pieces = []
                for p in projs:
                    key = f"{PREFIX}{model.peft_name(f'{name}.experts.{e}.{p}')}"
                    pieces.append((state.pop(key + ".lora_A.weight"), state.pop(key + ".lora_B.weight")))
                if len(pieces) == 1:
                    a, b = pieces[0]
                elif shared:
                    a, b = pieces[0][0], torch.cat([pieces[0][1], pieces[1][1]])
                else:
                    a = torch.cat([pieces[0][0], pieces[1][0]])
                    b = torch.block_diag(pieces[0][1], pieces[1][1])
                a_parts.append(a)
                b_parts.append(b)
            a, b = fused_factors(a_parts, b_parts)
            state[f"{PREFIX}{modules[param]}.lora_A.weight"] = a
            state[f"{PREFIX}{modules[param]}.lora_B.weight"] = b
    return state


# ---- reading ---------------------------------------------------------------------------------------------------
def check_patterns(config: dict, source) -> None:
    """rank_pattern / alpha_pattern keys velotune applies: fused expert parameters only (and only with
    target_parameters); anything else stays refused by name."""
    for field in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            raise CheckpointError(f"{source}: field '{field}' must be an object, got {pattern!r}")
        other = [k for k in pattern if not (config.get("target_parameters") and k.rsplit(".", 1)[-1] in PARAMS)]
        if other:
            raise UnsupportedError(f"{source}: uses PEFT option(s) velotune does not implement: {field}="
                                   f"{ {k: pattern[k] for k in other}!r} (a per-module rank or alpha)")


def _pattern(pattern: dict, key: str, default):
    for k, value in pattern.items():   # PEFT's get_pattern_key: the first key matching a suffix of the name
        if re.match(rf"(.*\.)?({k})$", key):
            return value
    return default


def read_targets(model, config: dict, source) -> list[Fused]:
    """adapter_config.json's target_parameters resolved against the model's sparse layers (our MoE names): the
    fused expert parameters, and the routers' weights (ROUTER)."""
    wanted = config.get("target_parameters") or []
    if not wanted:
        return []
    if not isinstance(wanted, list) or not all(isinstance(t, str) and t for t in wanted):
        raise CheckpointError(f"{source}: field 'target_parameters' must be a list of names, got {wanted!r}")
    moes = moe_modules(model)
    candidates = {f"{model.peft_name(n + '.experts')}.{p}": (n, p) for n in moes for p in PARAMS}
    candidates.update({f"{model.peft_name(n + '.gate')}.weight": (n, ROUTER) for n in moes})
    chosen, unknown = {}, []
    for t in wanted:
        hits = [key for key in candidates if key == t or key.endswith("." + t)]
        if not hits:
            unknown.append(t)
        chosen.update({key: candidates[key] for key in hits})
    if unknown:
        known = (", ".join([f"mlp.experts.{p}" for p in PARAMS] + [f"mlp.{ROUTER}"]) if moes
                 else "none: the model has no experts")
        raise CheckpointError(f"{source}: target_parameters entr{'y' if len(unknown) == 1 else 'ies'} "
                              f"{unknown} match no expert parameter of this model (known: {known})")
    out = []
    for moe_name in moes:
        params = [p for p in PARAMS if any(chosen.get(k) == (moe_name, p) for k in chosen)]
        modules = _file_modules(model, moe_name, params)
        for p in params:
            key = f"{model.peft_name(moe_name + '.experts')}.{p}"
            out.append(Fused(moe_name, p, modules[p], _pattern(config.get("rank_pattern") or {}, key, config["r"]),
                             _pattern(config.get("alpha_pattern") or {}, key, config["lora_alpha"])))
        if (moe_name, ROUTER) in chosen.values():   # the adapter's own r and alpha (check_patterns: none of its own)
            out.append(Fused(moe_name, ROUTER, model.peft_name(moe_name + ".gate"), config["r"],
                             config["lora_alpha"]))
    return out


def expert_linears(model, fused: list[Fused]) -> list[str]:
    """Our names of the expert linears the fused targets adapt (and of the routers they name)."""
    out = []
    for f in fused:
        if f.param == ROUTER:
            out.append(f"{f.moe}.gate")
            continue
        moe = model.get_submodule(f.moe)
        out += [f"{f.moe}.experts.{e}.{p}" for e in range(moe.num_experts) for p in _projections(moe, f.param)]
    return out


def check_dense_names(model, names, weights) -> None:
    """A tensor for a dense MLP projection of a layer that is sparse here: an adapter made for a dense model."""
    moes = moe_modules(model)
    for raw in names:
        name = model.name_from_peft(raw.removeprefix(PREFIX))
        match = re.match(r"^(.*layers\.\d+)\.(\w+)\.(\w+)\.lora_", name)
        if match is None:
            continue
        ffn = f"{match[1]}.{match[2]}"
        if ffn in moes and match[3] not in ("gate", "experts"):
            raise CheckpointError(
                f"{weights}: tensor '{raw}' adapts a dense MLP projection ('{match[3]}'), but "
                f"{_shown(model, ffn)} of this model is a mixture of {moes[ffn].num_experts} experts: "
                "the adapter was made for a dense model")


def expand(model, fused: list[Fused], found: dict, settings: dict, weights) -> dict:
    """`found` (file names -> tensors, or meta tensors for a header check) with each fused expert tensor pair
    replaced by per-expert tensors under PEFT-style per-expert names, rescaled to our scaling when the file's
    differs. Shapes, expert counts and ranks that do not fit raise CheckpointError naming the tensor."""
    found = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
             for k, v in found.items()}
    r, rslora = settings["r"], settings["rslora"]
    ours = _scaling(settings["alpha"], r, rslora)
    for f in [f for f in fused if f.param != ROUTER]:   # a router's pair is a plain LoRA pair already
        moe = model.get_submodule(f.moe)
        first = moe.experts[0]
        projs = _projections(moe, f.param)
        n_in = getattr(first, projs[0]).in_features
        n_out = sum(getattr(first, p).out_features for p in projs)
        keys = [f"{PREFIX}{f.file_module}.lora_{x}.weight" for x in "AB"]
        missing = [k for k in keys if k not in found]
        if missing:
            raise CheckpointError(f"{weights}: tensor '{missing[0]}' is missing (target_parameters selects "
                                  f"{model.peft_name(f.moe + '.experts')}.{f.param})")
        a, b = (found.pop(k) for k in keys)
        experts, rank = moe.num_experts, f.rank
        if a.dim() != 2 or a.shape[0] % rank or a.shape[1] != n_in:
            raise CheckpointError(f"{weights}: tensor '{keys[0]}' has shape {list(a.shape)}; {f.param} at rank "
                                  f"{rank} needs [{rank} x experts, {n_in}]")
        if a.shape[0] // rank != experts:
            raise CheckpointError(f"{weights}: tensor '{keys[0]}' holds LoRA weights for {a.shape[0] // rank} "
                                  f"experts (rank {rank}), but {_shown(model, f.moe)} of this model has {experts}")
        if tuple(b.shape) != (n_out, rank * experts):
            raise CheckpointError(f"{weights}: tensor '{keys[1]}' has shape {list(b.shape)} (model needs "
                                  f"[{n_out}, {rank * experts}])")
        if not (rank == r or (rank == 2 * r and len(projs) == 2)):
            raise CheckpointError(f"{weights}: tensor '{keys[0]}' is rank {rank} per expert; velotune reads "
                                  f"{f.param} at the adapter's r ({r})" + (f" or 2r ({2 * r})" if len(projs) == 2
                                                                            else ""))
        a3, b3 = expert_factors(a, b, experts)                            # [E, R, in], [E, out, R]
        ratio = _scaling(f.alpha, rank, rslora) / ours
        ratio = 1.0 if abs(ratio - 1.0) < 1e-12 else ratio   # our own rsLoRA alpha*sqrt(2): one rounding off
        rows = [getattr(first, p).out_features for p in projs]
        for e in range(experts):
            b_parts = b3[e].split(rows)
            if rank == r:
                pieces = [(a3[e], bp) for bp in b_parts]
            else:
                off = (b_parts[0][:, r:], b_parts[1][:, :r])
                if a.device.type != "meta" and any(bool(x.any()) for x in off):
                    raise CheckpointError(
                        f"{weights}: tensor '{keys[1]}' (rank {rank} = 2r) of expert {e} is not block-diagonal "
                        "(gate rows x up ranks or up rows x gate ranks nonzero): not representable at rank r")
                pieces = [(a3[e, :r], b_parts[0][:, :r]), (a3[e, r:], b_parts[1][:, r:])]
            for p, (pa, pb) in zip(projs, pieces):
                key = f"{PREFIX}{model.peft_name(f'{f.moe}.experts.{e}.{p}')}"
                found[key + ".lora_A.weight"] = pa.contiguous()
                found[key + ".lora_B.weight"] = (pb * ratio if ratio != 1.0 else pb).contiguous()
    return found


def has_per_expert_tensors(names) -> bool:
    """An adapter holding per-expert tensors (transformers 4's layout) selects expert linears by module name."""
    return any(is_expert_linear(n) for n in names)
