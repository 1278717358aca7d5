"""Find a text backbone's massive-activation ("sink") dimensions, for VAR.

Attention-sink tokens (BOS first of all) carry a few hidden dimensions with values far above the
rest. For each decoder layer ``l >= first_layer`` we read the residual stream entering the layer at
the first token of a short prompt, normalise it by its RMS (no learned weight), and score each
dimension by ``max_l |x_l[d]| / RMS(x_l)``. Dimensions scoring above ``tau`` (VAR's sink threshold)
are the sink dimensions; the ``top`` highest are returned. A model with none has no attention sinks
of this kind, and VAR does not apply to it.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from ..adapters import adapter_for


@torch.no_grad()
def dimension_scores(model: nn.Module, input_ids: torch.Tensor, first_layer: int = 2) -> torch.Tensor:
    """``max over layers >= first_layer of |x[d]| / RMS(x)`` at the first token, per hidden dimension."""
    adapter = adapter_for(model)
    layers = adapter.decoder_layers()
    if first_layer >= len(layers):
        raise ValueError(f"first_layer {first_layer} >= the model's {len(layers)} layers")
    scores: list[torch.Tensor] = []

    def read(module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"])[0, 0].float()
        scores.append(x.abs() / x.pow(2).mean().sqrt().clamp_min(1e-12))

    handles = [layer.register_forward_pre_hook(read, with_kwargs=True) for layer in list(layers)[first_layer:]]
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(scores).amax(0)


def find_sink_dims(
    model: nn.Module, input_ids: torch.Tensor, tau: float = 20.0, top: int = 2, first_layer: int = 2
) -> dict:
    """The sink dimensions (possibly none) with their scores."""
    scores = dimension_scores(model, input_ids, first_layer)
    order = torch.argsort(scores, descending=True)
    dims = [int(d) for d in order[:top] if scores[d] > tau]
    return {
        "sink_dims": dims,
        "scores": [round(float(scores[d]), 2) for d in order[: max(top, 4)]],
        "top_dims": [int(d) for d in order[: max(top, 4)]],
        "tau": tau,
        "first_layer": first_layer,
    }


def calibration_ids(processor, model: nn.Module) -> torch.Tensor:
    """A short text prompt (BOS first) for the calibration forward."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer is not None:
        ids = tokenizer("Describe the image in detail.", return_tensors="pt")["input_ids"]
        bos = tokenizer.bos_token_id
        if bos is not None and int(ids[0, 0]) != bos:
            ids = torch.cat([torch.tensor([[bos]]), ids], 1)
        return ids
    config = model.config.get_text_config()
    return torch.tensor([[config.bos_token_id or 1] + list(range(10, 20))])


def main(model_spec: str, out: str | None, tau: float, top: int) -> int:
    """Print the model's sink dimensions and save them to ``out``; 1 (and nothing saved) when it has none."""
    from ..models import load_model
    from ..outputs import output_file

    target = output_file(out) if out else None  # checked before the model loads
    model, processor, name = load_model(model_spec)
    result = find_sink_dims(model, calibration_ids(processor, model), tau=tau, top=top)
    result["model"] = name
    if not result["sink_dims"]:
        print(
            f"{name}: no massive-activation dimensions (highest score {result['scores'][0]} <= tau {tau}); "
            "this model has no attention sinks of that kind, so VAR does not apply"
        )
    else:
        print(
            f"{name}: sink dimensions {result['sink_dims']} (scores {result['scores'][: len(result['sink_dims'])]}); "
            f"use VARConfig(sink_dims={tuple(result['sink_dims'])})"
            + (f" or VARConfig(sink_dims={str(out)!r})" if out else "")
        )
    if not result["sink_dims"]:
        return 1
    if target is not None:
        target.write_text(json.dumps(result, indent=2) + "\n")
        print(f"saved: {target}")
    return 0
