"""A test-only method whose attention edits are given as a function, and which records stats."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from halluguard import Method, MethodConfig
from halluguard.attention import AttentionCall, AttentionEdit, Reductions


@dataclasses.dataclass
class ProbeConfig(MethodConfig):
    name = "probe"


class Probe(Method):
    """Applies ``edit(state, call)`` to every attention call and keeps every reported statistic."""

    config_cls = ProbeConfig

    def __init__(self, edit: Callable[..., AttentionEdit | None]):
        super().__init__(ProbeConfig())
        self.edit = edit
        self.records: list[tuple[AttentionCall, dict[str, torch.Tensor]]] = []

    def attention_edit(self, state, call):
        return self.edit(state, call)

    def on_stats(self, state, call, stats):
        self.records.append((call, {k: v.clone() for k, v in stats.items()}))


def reference_everywhere(state, call):
    """A neutral edit that still routes every row of every call through the reference path."""
    masks = state.group_masks(call)
    return AttentionEdit(
        key_bias=torch.zeros(call.batch, call.kv_len),
        reductions=Reductions({"image": masks["image"], "context": masks["context"]}, headmax_from_key=0),
    )


def stats_only(state, call):
    """Reductions only (the last row runs through the reference, the rest through the base)."""
    return AttentionEdit(reductions=Reductions({"image": state.group_masks(call)["image"]}))


def assert_batch_rows_equal_single_rows(model, inputs, family, generate_kwargs):
    """Each row of a left-padded batch generates the same new tokens as that row alone."""
    from tiny_models import row_inputs

    new = generate_kwargs["max_new_tokens"]
    with torch.no_grad():
        batched = model.generate(**inputs, **generate_kwargs)
        for i in range(inputs["input_ids"].shape[0]):
            alone = model.generate(**row_inputs(inputs, i, family), **generate_kwargs)
            assert torch.equal(batched[i, -new:], alone[0, -new:]), f"row {i}"


@contextlib.contextmanager
def text_attention(model, name, function, mask_function):
    """Run the text backbone with a test's own attention function (a brute-force reference)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, mask_function)
    model.set_attn_implementation({"text_config": name})
    try:
        yield model
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def assert_guard_keeps_tokens(model, inputs, methods, generate_kwargs):
    """Greedy and beam-search tokens under ``wrap(model, methods=methods)`` equal plain generate's."""
    import halluguard as hg

    with torch.no_grad():
        want = model.generate(**inputs, **generate_kwargs)
        want_beam = model.generate(**inputs, **generate_kwargs, num_beams=3)
        with hg.wrap(model, methods=methods):
            assert torch.equal(model.generate(**inputs, **generate_kwargs), want)
            assert torch.equal(model.generate(**inputs, **generate_kwargs, num_beams=3), want_beam)
