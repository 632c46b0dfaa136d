"""Finding the decoder layers and their feed-forward blocks (private helpers shared by the offload modules).

Two FFN shapes are supported:

* ``gated`` (Llama, Mistral, Qwen2, ...): ``layer.mlp`` has ``gate_proj``/``up_proj``/``down_proj`` and ``act_fn``;
  neuron ``i`` is row ``i`` of gate/up and column ``i`` of down.
* ``plain`` (OPT-like): the decoder layer itself owns ``fc1``/``fc2`` and ``activation_fn``; neuron ``i`` is row
  ``i`` of fc1 and column ``i`` of fc2.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GATED = "gated"
PLAIN = "plain"


@dataclass(frozen=True)
class FFNSite:
    """One decoder layer's feed-forward block."""

    index: int
    layer: nn.Module
    kind: str  # GATED or PLAIN
    module: nn.Module  # the MLP module (gated) or the decoder layer that owns fc1/fc2 (plain)

    @property
    def in_proj(self) -> nn.Linear:
        """The projection whose activation decides whether a neuron fires (gate for SwiGLU, fc1 for ReLU)."""
        return self.module.gate_proj if self.kind == GATED else self.module.fc1

    @property
    def out_proj(self) -> nn.Linear:
        return self.module.down_proj if self.kind == GATED else self.module.fc2

    @property
    def act_fn(self) -> nn.Module:
        return self.module.act_fn if self.kind == GATED else self.module.activation_fn

    @property
    def n_neurons(self) -> int:
        return self.in_proj.out_features

    @property
    def hidden_size(self) -> int:
        return self.in_proj.in_features


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the first ``ModuleList`` whose name ends in ``layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) > 0:
            return module
    raise ValueError(f"model={type(model).__name__}: no decoder layer list (a ModuleList named '*.layers') found")


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """One :class:`FFNSite` per decoder layer, in order."""
    sites = []
    for i, layer in enumerate(decoder_layers(model)):
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            sites.append(FFNSite(i, layer, GATED, mlp))
        elif all(hasattr(layer, a) for a in ("fc1", "fc2", "activation_fn")):
            sites.append(FFNSite(i, layer, PLAIN, layer))
        elif mlp is not None and type(mlp).__name__ == "HotColdMLP":
            raise ValueError("the model already has hot/cold MLPs; call h2o_cache.offload.restore(model) first")
        else:
            raise ValueError(
                f"layer {i} ({type(layer).__name__}) has no supported FFN: expected mlp.gate_proj/up_proj/down_proj "
                "(Llama-like) or fc1/fc2 (OPT-like)"
            )
    return sites


def neuron_bytes(site: FFNSite) -> int:
    """Bytes one FFN neuron's weights take (its rows/columns in every projection, plus its biases)."""
    item = site.in_proj.weight.element_size()
    d = site.hidden_size
    if site.kind == GATED:
        n = 3 * d + sum(p.bias is not None for p in (site.module.gate_proj, site.module.up_proj))
    else:
        n = 2 * d + (site.module.fc1.bias is not None)
    return n * item


def fixed_bytes(site: FFNSite) -> int:
    """Bytes of the FFN that belong to no neuron (the output bias); they always go with the hot part."""
    b = site.out_proj.bias
    return 0 if b is None else b.numel() * b.element_size()
