"""Row layout of a forward that carries several streams, as pure functions of the inputs.

Notation: a forward feeds ``T`` new tokens to ``N`` rows after ``P`` cached ones. *Per-token inputs*
hold one entry per token: ``input_ids`` ``(N, T)``, ``attention_mask`` ``(N, P + T)``, ``position_ids``
``(N, T)`` or, with multimodal rotary positions (M-RoPE), ``(K, N, T)``, and token types ``(N, T)``.
Every other input belongs to the prompt as a whole (image tensors, encoder outputs, flags).

The one rule for which inputs are per token is their name (``PER_TOKEN_INPUTS``): a shape can match
by chance (an image grid of ``N`` images by 3 in a 3-token forward), a name cannot.
"""

from __future__ import annotations

from typing import Any

import torch

# the inputs that hold one entry per token besides input_ids (the last dimension)
PER_TOKEN_INPUTS = ("attention_mask", "position_ids", "token_type_ids", "mm_token_type_ids", "moe_mm_token_type_ids")
# per-token inputs that are neither ids, mask nor positions: they follow their row's tokens
TOKEN_TYPES = tuple(k for k in PER_TOKEN_INPUTS if k not in ("attention_mask", "position_ids"))


def row_dim(key: str, value: torch.Tensor) -> int:
    """The batch-row dimension of a per-token input (M-RoPE positions are ``(K, rows, T)``)."""
    return 1 if key == "position_ids" and value.dim() == 3 else 0


def is_per_token(key: str, value: Any) -> bool:
    """Whether input ``key`` holds one entry per token (``input_ids`` or a ``PER_TOKEN_INPUTS`` name)."""
    return torch.is_tensor(value) and (key == "input_ids" or key in PER_TOKEN_INPUTS)


def token_types(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The per-token tensors of ``inputs`` other than ids, mask and positions (token types)."""
    return {k: v for k, v in inputs.items() if k in TOKEN_TYPES and torch.is_tensor(v)}


def select_input_rows(inputs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """``inputs`` with every per-token tensor taken at batch rows ``rows`` (the rest as it is)."""
    return {
        k: v.index_select(row_dim(k, v), rows.to(v.device)) if k in PER_TOKEN_INPUTS and torch.is_tensor(v) else v
        for k, v in inputs.items()
    }


def trim_inputs(inputs: dict[str, Any], length: int) -> dict[str, Any]:
    """``inputs`` with every per-token tensor cut to the first ``length`` tokens."""
    return {k: v[..., :length] if k in PER_TOKEN_INPUTS and torch.is_tensor(v) else v for k, v in inputs.items()}


def positions_like(positions: torch.Tensor, main: torch.Tensor | None) -> torch.Tensor:
    """2-D positions ``(rows, T)`` in the layout of the main positions (``(K, rows, T)`` for M-RoPE)."""
    if main is not None and main.dim() == 3 and positions.dim() == 2:
        return positions[None].expand(main.shape[0], -1, -1)
    return positions


def split_last_token(prompt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``prompt`` as two forwards: all tokens but the last (with the image inputs), then the last one
    (its attention mask still covers the whole prompt)."""
    if prompt["input_ids"].shape[1] < 2:
        raise ValueError("a prompt of one token cannot be split before its last token")
    prefix, last = {}, {}
    for key, value in prompt.items():
        if key == "attention_mask" and torch.is_tensor(value):
            prefix[key], last[key] = value[:, :-1], value
        elif is_per_token(key, value):
            prefix[key], last[key] = value[..., :-1], value[..., -1:]
        else:  # image inputs and flags: the prefix holds every image token
            prefix[key] = value
    return prefix, last


def drop_padding_columns(prompt: dict[str, Any]) -> dict[str, Any]:
    """The prompt without its leading columns that are padding in every row (an image-free prompt
    built at the main width is mostly padding): its prefill then costs what its length does."""
    mask = prompt.get("attention_mask")
    if not torch.is_tensor(mask) or mask.dim() != 2 or not bool(mask.any()):
        return prompt
    first = int(mask.bool().any(0).nonzero()[0])
    if first == 0:
        return prompt
    return {k: v[..., first:] if is_per_token(k, v) else v for k, v in prompt.items()}


def left_padded(inputs: dict[str, Any], count: int) -> dict[str, Any]:
    """The prompt's forward ``inputs`` with ``count`` padding columns before every row: the mask 0 there
    (a missing one made all ones first), the ids the row's last token's (never an image token, which a
    model places by id whatever the mask), positions and token types 0. What the model computes for
    the real tokens is unchanged (they attend to no padding); their keys sit ``count`` places later."""
    ids = inputs["input_ids"]
    out = dict(inputs)
    if inputs.get("attention_mask") is None:
        out["attention_mask"] = torch.ones_like(ids)
    for key, value in out.items():
        if not is_per_token(key, value):
            continue
        if key == "input_ids":
            out[key] = torch.cat([value[:, -1:].expand(-1, count), value], 1)
        else:
            out[key] = torch.nn.functional.pad(value, (count, 0))
    return out


def merge_rows(
    inputs: dict[str, Any],
    extra: dict[str, Any],
    cache_len: int,
    *,
    positions_from_ids: bool,
    row_image_inputs: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``inputs`` (``N`` rows) with the ``E`` rows of ``extra`` appended: ids, masks, positions and token
    types joined row-wise; an image input indexed by row (``row_image_inputs``) gets all-zero images
    for the extra rows; every other input stays the main rows' (extra rows carry no image tokens or
    bring their own at a forward of their own). Without positions, the main rows get what the model
    would give them (their cache positions), unless the model derives positions from the ids."""
    ids = inputs["input_ids"]
    rows, new = ids.shape
    count = extra["input_ids"].shape[0]
    merged = dict(inputs, input_ids=torch.cat([ids, extra["input_ids"].to(ids.device)]))
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2:
        width = mask.shape[-1] if mask is not None else new + cache_len
        mask = torch.ones(rows, width, dtype=torch.long, device=ids.device)
    merged["attention_mask"] = torch.cat([mask, extra["attention_mask"].to(mask)])
    positions = inputs.get("position_ids")
    if positions is None and not positions_from_ids:
        positions = torch.arange(cache_len, cache_len + new, device=ids.device)[None].expand(rows, -1)
    if positions is not None:
        theirs = positions_like(extra["position_ids"], positions).to(positions)
        if positions.shape[-2] != rows:  # one row of positions for every row
            positions = positions.expand(*positions.shape[:-2], rows, -1)
        merged["position_ids"] = torch.cat([positions, theirs], -2)
    theirs_types = token_types(extra)
    for key, value in token_types(inputs).items():
        other = theirs_types.get(key)
        other = other.to(value) if other is not None else value.new_zeros((count, *value.shape[1:]))
        merged[key] = torch.cat([value, other])
    for key in row_image_inputs:
        value = inputs.get(key)
        if torch.is_tensor(value) and value.shape[0] == rows:
            merged[key] = torch.cat([value, value.new_zeros((count, *value.shape[1:]))])
    return merged


def take_rows(output: Any, rows: int) -> Any:
    """``output`` (a ``ModelOutput``) with only its first ``rows`` rows of logits, hidden states and
    attentions (the caller's rows; the extra streams' rows are taken out)."""
    for key in ("logits", "hidden_states", "attentions"):
        value = getattr(output, key, None)
        if torch.is_tensor(value):
            output[key] = value[:rows]
        elif isinstance(value, tuple):
            output[key] = tuple(v[:rows] if torch.is_tensor(v) else v for v in value)
    return output


def without_leading_columns(output: Any, count: int, width: int) -> Any:
    """``output`` (a ``ModelOutput``) of a forward whose rows were ``left_padded`` by ``count`` columns,
    as the caller's unpadded forward gives it: per-token logits and hidden states of the prompt's
    forward (``width`` tokens, padding included) without the padding's, attention weights without the
    padding keys (and, in the prompt's forward, queries)."""

    def per_token(v: Any) -> Any:
        return v[:, count:] if torch.is_tensor(v) and v.dim() > 2 and v.shape[1] == width else v

    for key in ("logits", "hidden_states"):
        value = getattr(output, key, None)
        if isinstance(value, tuple):
            output[key] = tuple(per_token(v) for v in value)
        elif torch.is_tensor(value):
            output[key] = per_token(value)
    attentions = getattr(output, "attentions", None)
    if isinstance(attentions, tuple):
        output["attentions"] = tuple(
            (a[..., count:, count:] if a.shape[-2] == width else a[..., count:]) if torch.is_tensor(a) else a
            for a in attentions
        )
    return output


def text_only_rows(inputs: dict[str, Any], dropped: torch.Tensor) -> dict[str, Any]:
    """The prompts of ``inputs`` without the tokens ``dropped`` marks (``(N, T)`` bool: a model's image
    tokens and image delimiters): ``input_ids``, ``attention_mask``, ``position_ids`` and token types,
    no image tensors. Each row keeps its other tokens in order, left-padded to the same length ``T``,
    with positions ``0..n-1`` as a separate text-only prompt would have."""
    if inputs.get("inputs_embeds") is not None:
        raise ValueError("a text-only stream needs input_ids, not inputs_embeds")
    ids = inputs["input_ids"]
    batch, length = ids.shape
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError("a text-only stream needs a 2-D attention_mask (or none)")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    keep = valid & ~dropped
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

    rows = {key: gathered(value) for key, value in {"input_ids": ids, **token_types(inputs)}.items()}
    # padding repeats the row's last text token (never an image id)
    rows["input_ids"] = torch.where(text_valid, rows["input_ids"], rows["input_ids"][:, -1:])
    rows["attention_mask"] = text_valid.to(mask.dtype if mask is not None else torch.long)
    rows["position_ids"] = (text_valid.long().cumsum(-1) - 1).clamp_min(0)
    return rows


def prefixed_rows(inputs: dict[str, Any], prefix: torch.Tensor, after_first: torch.Tensor) -> dict[str, Any]:
    """The prompts of ``inputs`` with the tokens ``prefix`` (1-D) put before each row's first token, or
    after it where ``after_first`` (``(N,)`` bool: a BOS that stays first) holds; the rows left-padded
    to the new width ``T + len(prefix)``. Given position ids (2-D or M-RoPE's 3-D) are kept for the old
    tokens, shifted by ``len(prefix)`` after the prefix, which takes the positions from where it sits;
    image inputs and flags stay as they are."""
    ids = inputs["input_ids"]
    rows, length = ids.shape
    added = prefix.numel()
    mask = inputs.get("attention_mask")
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    starts = valid.long().argmax(1)  # left padding: each row's first real token
    out: dict[str, Any] = {k: v for k, v in inputs.items() if not is_per_token(k, v)}
    per_token = {k: v for k, v in inputs.items() if is_per_token(k, v)}
    per_token.setdefault("attention_mask", valid.long())
    for key, value in per_token.items():
        dim = row_dim(key, value)
        parts = []
        for r in range(rows):
            at = int(starts[r]) + int(after_first[r])
            row = value.select(dim, r)
            before, after = row[..., :at], row[..., at:]
            if key == "input_ids":
                middle = prefix.to(row)
            elif key == "attention_mask":
                middle = row.new_ones(added)
            elif key == "position_ids":
                base = row[..., at : at + 1] if at < length else row[..., -1:] + 1
                middle = base + torch.arange(added, device=row.device, dtype=row.dtype)
                after = after + added
            else:  # token types: text
                middle = row.new_zeros(added)
            if middle.dim() < row.dim():
                middle = middle.expand(*row.shape[:-1], added)
            parts.append(torch.cat([before, middle, after], -1))
        out[key] = torch.stack(parts, dim)
    return out
