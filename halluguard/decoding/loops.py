"""Methods that own the decoding loop.

A method that replaces ``generate``'s loop (OPERA's beam search with rollback, Lookback Lens'
chunk-guided sampling) returns it from ``Method.generate_loop(state)``: a callable with the
signature of transformers' ``generate(custom_generate=...)``,

    loop(model, input_ids, logits_processor, stopping_criteria, generation_config,
         synced_gpus=False, streamer=None, **model_kwargs) -> output

called after ``generate`` has prepared the inputs (expanded rows, attention mask, position ids,
the cache, encoder outputs). The loop runs the model's forwards itself; every forward still goes
through the guard, so attention edits, statistics and streams act inside it. At most one method of
a guard may own the loop, unless the registry lists the pair as composable
(``registry.COMPOSABLE_LOOP_OWNERS``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


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
