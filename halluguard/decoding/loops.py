"""Methods that own the decoding loop.

A method that replaces ``generate``'s loop (OPERA's beam search with rollback, Lookback Lens'
chunk-guided sampling) returns it from ``Method.generate_loop(state)``: a callable with the
signature of transformers' ``generate(custom_generate=...)``,

    loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
         synced_gpus=False, streamer=None, **model_kwargs) -> output

called after ``generate`` has prepared the inputs (expanded rows, attention mask, position ids,
the cache, encoder outputs). The loop runs the model's forwards itself; every forward still goes
through the guard, so attention edits, statistics and streams act inside it. A method that owns the
loop declares it (``Capabilities(owns_loop=True)``); at most one method of a guard may, and the
methods that act inside its forwards declare that they run inside it (``Capabilities.runs_inside``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import DynamicCache


class DecodingLoop(Protocol):
    """What ``Method.generate_loop`` returns (transformers' ``custom_generate`` signature)."""

    def __call__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        logits_processor: Any,
        stopping_criteria: Any,
        generation_config: Any,
        synced_gpus: bool = False,
        streamer: Any = None,
        **model_kwargs: Any,
    ) -> Any: ...


def check_loop_call(who: str, refused: list[tuple[bool, str]], cache: Any, cache_use: str) -> None:
    """Refuse a call a loop cannot run: the first ``(condition, what)`` that holds, or a cache other
    than an empty dynamic one (``cache_use``: what the loop does with it)."""
    for condition, what in refused:
        if condition:
            raise ValueError(f"{who} does not support {what}")
    if cache is not None and not isinstance(cache, DynamicCache):
        raise ValueError(
            f"{who} {cache_use} a dynamic cache; got {type(cache).__name__} "
            "(drop cache_implementation and the cache argument)"
        )
    if cache is not None and cache.get_seq_length():
        raise ValueError(f"{who} starts from the prompt: a filled cache cannot be continued")


def end_tokens(generation_config: Any) -> list[int]:
    """The end-of-sequence token ids ``generate`` stops at (none: an empty list)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else [int(t) for t in torch.as_tensor(eos).view(-1).tolist()]


def pad_token(generation_config: Any) -> int | None:
    """The token ``generate`` pads finished rows with: the pad token, else the first end token."""
    pad = generation_config.pad_token_id
    if pad is not None:
        return int(torch.as_tensor(pad).view(-1)[0])
    eos = end_tokens(generation_config)
    return eos[0] if eos else None
