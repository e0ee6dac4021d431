"""The Llama layer layout (q/k/v/o attention projections, a SiLU gate/up/down MLP, RMSNorms) that the plain decode
step (generation/lean.py) computes, and the projections it computes as one call, which the calibration measures
as one unit (models/calibrate.py)."""

from __future__ import annotations

from typing import Any

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def supports(model: Any) -> bool:
    """Whether the model has the Llama layer shape this module computes."""
    inner: Any = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not layers or not hasattr(inner, "rotary_emb") or not hasattr(inner, "embed_tokens"):
        return False
    if getattr(model.config, "hidden_act", None) != "silu" or not hasattr(inner.norm, "variance_epsilon"):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in ATTENTION):
            return False
        if not all(hasattr(mlp, n) for n in MLP) or not hasattr(layer.input_layernorm, "variance_epsilon"):
            return False
    return True


def projection_groups(model: Any) -> list[tuple[str, ...]]:
    """The names of the projections a decode step computes as one call (generation/lean.py fuses them): each
    layer's q/k/v and its gate/up; none for a model without this layout."""
    if not supports(model):
        return []
    groups: list[tuple[str, ...]] = []
    for i in range(len(model.model.layers)):
        groups.append(tuple(f"model.layers.{i}.self_attn.{n}" for n in ATTENTION[:3]))
        groups.append(tuple(f"model.layers.{i}.mlp.{n}" for n in MLP[:2]))
    return groups
