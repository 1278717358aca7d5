"""Model adapters: where the text backbone's attention lives and where the image tokens are.

An adapter knows, for one model family, the text decoder's layers and attention modules, the
head geometry (query heads, key/value heads, head dimension) and how to find each row's image
tokens in ``input_ids``. Image positions always come from the ids of each row (any padding side,
several images, variable-length AnyRes grids), never from constants.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .. import compat


class Adapter:
    """Base adapter; a family module subclasses it and lists the ``model_type`` values it serves."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    text_config_key: ClassVar[str] = "text_config"  # sub-config key of the text backbone
    visual_token_fields: ClassVar[tuple[str, ...]] = ("image_token_id",)
    # config fields naming the text tokens that delimit an image (dropped with it from a text-only stream)
    image_marker_fields: ClassVar[tuple[str, ...]] = ()
    # inputs indexed by batch row rather than by image (a text-only row gets all-zero "padding" images)
    row_image_inputs: ClassVar[tuple[str, ...]] = ()
    # the model derives its (multimodal) position ids from input_ids when none are given
    positions_from_ids: ClassVar[bool] = False

    def __init__(self, model: nn.Module, processor: Any = None):
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.processor_marker_ids = self.marker_ids_from_processor(processor) if processor is not None else ()

    def marker_ids_from_processor(self, processor: Any) -> tuple[int, ...]:
        """Image-delimiter token ids only the processor knows (none for most families)."""
        return ()

    # ---- geometry -------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def sliding_layers(self) -> set[int]:
        """Indices of the text layers that attend within a sliding window (config ``layer_types``)."""
        types = getattr(self.text_config, "layer_types", None) or ()
        return {i for i, kind in enumerate(types) if kind == "sliding_attention"}

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
        return compat.text_attn_implementation(self.text_config)

    def set_text_attn_implementation(self, name: str) -> None:
        self.model.set_attn_implementation({self.text_config_key: name})

    # ---- image tokens -----------------------------------------------------------------------
    def visual_token_ids(self) -> tuple[int, ...]:
        ids = tuple(int(v) for f in self.visual_token_fields if (v := getattr(self.config, f, None)) is not None)
        if not ids:
            raise ValueError(
                f"{type(self.model).__name__} config has none of {self.visual_token_fields}; "
                "set the image token id in the config"
            )
        return ids

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: True where a row holds an image (visual) token."""
        ids = torch.tensor(self.visual_token_ids(), device=input_ids.device)
        return torch.isin(input_ids, ids)

    def image_spans(self, input_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """Per row, the half-open ``(start, end)`` ranges of consecutive image tokens."""
        return [mask_to_spans(row) for row in self.image_mask(input_ids)]

    def image_slices(self, inputs: dict) -> list[slice]:
        """The slices of ``pixel_values`` (along its first dimension) that hold one image each, in
        order: one index per image here (LLaVA, Gemma 3; LLaVA-NeXT's AnyRes patches and Idefics'
        tiles sit under their image's index)."""
        pixels = inputs.get("pixel_values")
        return [slice(i, i + 1) for i in range(pixels.shape[0])] if isinstance(pixels, torch.Tensor) else []

    def encode_images(self, image_inputs: dict, input_ids: torch.Tensor, rows: int) -> dict:
        """The ``mm_encoder_outputs`` that ``generate`` hands the model's first forward for these image
        inputs (the caller's, one set per prompt of ``input_ids``), for ``rows`` forward rows (prompts
        repeated for beams or several sequences, as ``generate`` repeats them)."""
        encode = self.model.base_model.get_image_features
        names = [n for n in inspect.signature(encode).parameters if n != "kwargs" and n in image_inputs]
        outputs = {"image": encode(**{n: image_inputs[n] for n in names}, return_dict=True)}
        expand = rows // input_ids.shape[0]
        if expand > 1:
            outputs = compat.expand_multimodal_outputs(self.model, input_ids, outputs, expand)
        return outputs

    # ---- text-only stream ---------------------------------------------------------------------
    def image_and_marker_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: image tokens and the image-delimiter tokens the config (or processor) names."""
        markers = [int(v) for f in self.image_marker_fields if (v := getattr(self.config, f, None)) is not None]
        markers += list(self.processor_marker_ids)
        mask = self.image_mask(input_ids)
        if markers:
            mask = mask | torch.isin(input_ids, torch.tensor(markers, device=input_ids.device))
        return mask

    def text_only_rows(self, inputs: dict) -> dict:
        """The prompts of ``inputs`` with their images removed: ``input_ids``, ``attention_mask``,
        ``position_ids`` and the other per-token inputs (``(B, T, ...)``: token types), no image
        tensors. Image tokens and the delimiters the config names are dropped; each row keeps its
        other tokens in order, left-padded to the same length ``T``, with positions ``0..n-1`` as a
        separate text-only prompt would have."""
        if inputs.get("inputs_embeds") is not None:
            raise ValueError("a text-only stream needs input_ids, not inputs_embeds")
        ids = inputs["input_ids"]
        batch, length = ids.shape
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("a text-only stream needs a 2-D attention_mask (or none)")
        valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        keep = valid & ~self.image_and_marker_mask(ids)
        counts = keep.sum(1)
        if bool((counts == 0).any()):
            raise ValueError("a prompt row has no text tokens besides its image; a text-only stream needs some")
        # text-only row r holds its kept tokens, in order, at the last counts[r] positions
        source = torch.zeros_like(ids)
        for r in range(batch):
            source[r, length - int(counts[r]) :] = keep[r].nonzero().flatten()
        text_valid = torch.arange(length, device=ids.device)[None, :] >= (length - counts)[:, None]

        def gathered(value: torch.Tensor) -> torch.Tensor:
            shape = (batch, length) + (1,) * (value.dim() - 2)
            text = value.gather(1, source.reshape(shape).expand_as(value))
            return torch.where(text_valid.reshape(shape), text, torch.zeros((), dtype=value.dtype, device=value.device))

        rows = {}
        for name, value in inputs.items():
            if (
                isinstance(value, torch.Tensor)
                and name not in ("position_ids", "attention_mask")
                and name not in self.row_image_inputs
                and value.dim() >= 2
                and tuple(value.shape[:2]) == (batch, length)
            ):
                rows[name] = gathered(value)
        # padding repeats the row's last text token (never an image id)
        rows["input_ids"] = torch.where(text_valid, rows["input_ids"], rows["input_ids"][:, -1:])
        rows["attention_mask"] = text_valid.to(mask.dtype if mask is not None else torch.long)
        rows["position_ids"] = (text_valid.long().cumsum(-1) - 1).clamp_min(0)
        return rows

    def with_text_only_rows(self, inputs: dict) -> dict:
        """Model inputs of ``2B`` rows: the ``B`` rows of ``inputs`` unchanged, then their
        ``text_only_rows``. Image tensors stay as they are (the text-only rows have no image tokens
        to receive them), except inputs indexed by row, which get all-zero (padding) images."""
        text = self.text_only_rows(inputs)
        ids = inputs["input_ids"]
        batch, length = ids.shape
        paired = dict(inputs)
        for name, value in inputs.items():
            if name in self.row_image_inputs and isinstance(value, torch.Tensor):
                paired[name] = torch.cat([value, torch.zeros_like(value)])
            elif name in text and name not in ("attention_mask", "position_ids"):
                paired[name] = torch.cat([value, text[name]])
        mask = inputs.get("attention_mask")
        main_mask = mask if mask is not None else torch.ones_like(ids)
        paired["attention_mask"] = torch.cat([main_mask, text["attention_mask"].to(main_mask.dtype)])
        positions = inputs.get("position_ids")
        if positions is not None:
            text_positions = text["position_ids"].to(positions.dtype)
            if positions.dim() == 3:  # (K, B, T): multimodal rotary sections; text-only rows are plain text
                text_positions = text_positions[None].expand(positions.shape[0], -1, -1)
                paired["position_ids"] = torch.cat([positions.expand(-1, batch, -1), text_positions], dim=1)
            else:
                paired["position_ids"] = torch.cat([positions.expand(batch, -1), text_positions])
        elif not self.positions_from_ids:
            # the model would number the main rows 0..T-1 (its cache positions); text-only rows count their tokens
            main = torch.arange(length, device=ids.device)[None].expand(batch, -1)
            paired["position_ids"] = torch.cat([main, text["position_ids"]])
        return paired


def mask_to_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of True in a 1-D boolean tensor, as half-open ranges."""
    padded = torch.cat([mask.new_zeros(1), mask.to(torch.int8), mask.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))
