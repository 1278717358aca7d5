"""Model adapters: where the text backbone's attention lives and where the image tokens are.

An adapter knows, for one model family, the text decoder's layers and attention modules, the
head geometry (query heads, key/value heads, head dimension) and how to find each row's image
tokens in ``input_ids``. Image positions always come from the ids of each row (any padding side,
several images, variable-length AnyRes grids), never from constants.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


class Adapter:
    """Base adapter; a family module subclasses it and lists the ``model_type`` values it serves."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    text_config_key: ClassVar[str] = "text_config"      # sub-config key of the text backbone
    visual_token_fields: ClassVar[tuple[str, ...]] = ("image_token_id",)

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        head_dim = getattr(self.text_config, "head_dim", None)
        return int(head_dim or self.text_config.hidden_size // self.num_heads)

    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.decoder_layers()]

    # ---- attention implementation of the text backbone -------------------------------------
    def text_attn_implementation(self) -> str | None:
        return self.text_config._attn_implementation

    def set_text_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation({self.text_config_key: name})

    # ---- image tokens -----------------------------------------------------------------------
    def visual_token_ids(self) -> tuple[int, ...]:
        ids = tuple(int(v) for f in self.visual_token_fields
                    if (v := getattr(self.config, f, None)) is not None)
        if not ids:
            raise ValueError(f"{type(self.model).__name__} config has none of {self.visual_token_fields}; "
                             "set the image token id in the config")
        return ids

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: True where a row holds an image (visual) token."""
        ids = torch.tensor(self.visual_token_ids(), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def image_spans(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row, the half-open ``(start, end)`` ranges of consecutive image tokens."""
        return [mask_to_spans(row) for row in self.image_mask(input_ids)]


def mask_to_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of True in a 1-D boolean tensor, as half-open ranges."""
    padded = torch.cat([mask.new_zeros(1), mask.to(torch.int8), mask.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))
