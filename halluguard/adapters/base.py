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
        self.processor = processor  # what wrap was given (methods that encode text of their own need it)
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

    def mlp_modules(self) -> list[nn.Module]:
        """Each decoder layer's feed-forward block (its output is added to the residual stream, after
        the family's post-feed-forward norm where it has one)."""
        return [layer.mlp for layer in self.decoder_layers()]

    def vision_tower(self) -> nn.Module:
        """The vision encoder: the module that takes ``pixel_values`` (CLIP and SigLIP towers: with
        ``output_hidden_states``, every layer's output)."""
        base = self.model.model
        for name in ("vision_tower", "vision_model", "visual"):
            tower = getattr(base, name, None)
            if tower is not None:
                return tower
        raise ValueError(f"{type(self.model).__name__}: no vision encoder found")

    def vision_layers(self) -> nn.ModuleList:
        """The vision encoder's transformer layers."""
        tower = self.vision_tower()
        encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
        layers = getattr(encoder, "layers", None) if encoder is not None else getattr(tower, "blocks", None)
        if layers is None:
            raise ValueError(f"{type(tower).__name__}: no encoder layers found")
        return layers

    def vision_mlp_modules(self) -> list[nn.Module]:
        """Each vision encoder layer's feed-forward block."""
        return [layer.mlp for layer in self.vision_layers()]

    def logit_lens(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits read off a residual stream ``(..., d)`` as the model reads its last one:
        the final norm, then the output embeddings (a family's logit soft-capping is not applied)."""
        return self.model.get_output_embeddings()(self.decoder().norm(hidden))

    def unnormed_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output embeddings applied to a residual stream without the final norm."""
        return self.model.get_output_embeddings()(hidden)

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


def mask_to_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of True in a 1-D boolean tensor, as half-open ranges."""
    padded = torch.cat([mask.new_zeros(1), mask.to(torch.int8), mask.new_zeros(1)]).to(torch.int8)
    edges = torch.diff(padded)
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends))
