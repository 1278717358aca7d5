"""Lookback Lens' classifier-guided decoding: a decoding loop (``custom_generate``).

Per chunk, for a batch of ``S`` prompts and ``N`` candidates::

    the S rows' cache, logits and last lookback ratios, each repeated N times (S * N rows)
    chunk_size sampling steps, one forward of S * N rows each (generate's processors and warpers)
    per candidate: the mean lookback ratios of its chunk's tokens (up to a stop) -> p_faithful
    per prompt: the candidate with the highest p_faithful (the first on ties) is kept, with its
    cache rows, logits and ratios; the others are dropped

A candidate's first token is sampled from the logits its prompt's rows share, so its ratios are
those rows' (the query that produced it), as every token's are in detection. A row that meets a
stopping criterion (EOS, ``max_new_tokens``) is padded from there, as in ``generate``'s sampling;
the search ends when every kept row has stopped. With one candidate it is ``generate``'s sampling
exactly (same random draws, same tokens).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ... import compat
from ...decoding.layout import select_input_rows
from ...decoding.loops import check_loop_call, pad_token

if TYPE_CHECKING:
    from ...state import GuardState
    from ..base import Method  # the method this loop belongs to (it imports this module)


@dataclasses.dataclass
class _Kept:
    """What the search keeps per prompt row between chunks."""

    sequences: torch.Tensor  # (rows, length): prompt and kept tokens
    done: torch.Tensor  # (rows,) bool: the row met a stopping criterion
    logits: torch.Tensor  # (rows, vocab): the next token's logits
    ratios: torch.Tensor  # (rows, L, H): the lookback ratios of the query producing the next token
    kwargs: dict  # generate's model inputs for the rows
    cache: Any


@dataclasses.dataclass
class _Chunk:
    """One chunk of ``N`` candidates per row (``rows * N`` rows), as sampled."""

    sequences: torch.Tensor
    stopped: torch.Tensor
    logits: torch.Tensor
    kwargs: dict
    cache: Any
    features: torch.Tensor  # (rows * N, k, L, H): the ratios of the chunk's tokens
    real: torch.Tensor  # (rows * N, k): the tokens that are not padding after a stop
    scores: list  # per token: the processed scores (rows * N, vocab)
    next_ratios: torch.Tensor  # (rows * N, L, H)


def guided_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    *,
    method: Method,
    state: GuardState,
    **model_kwargs: Any,
) -> Any:
    """Classifier-guided chunk decoding (see the module docstring)."""
    cfg = generation_config
    check_loop_call(
        "Lookback Lens' guided decoding",
        [(synced_gpus, "synced_gpus"), (cfg.prefill_chunk_size is not None, "prefill_chunk_size")],
        compat.cache_in(model_kwargs),
        "repeats and selects rows of",
    )
    rows = input_ids.shape[0]
    out = compat.prefill(model, input_ids, model_kwargs)
    kept = _Kept(
        sequences=input_ids,
        done=torch.zeros(rows, dtype=torch.bool, device=input_ids.device),
        logits=out.logits[:, -1].float(),
        ratios=method.last_ratios(state),  # the query producing each row's next token
        kwargs=compat.next_generation_kwargs(model, out, model_kwargs),
        cache=compat.cache_of(out),
    )
    chosen: list[torch.Tensor] = []  # the kept tokens' ratios, chunk by chunk: (rows, k, L, H)
    scores: list[torch.Tensor] = []
    while not bool(kept.done.all()):
        chunk = _sample_chunk(model, kept, logits_processor, stopping_criteria, pad_token(cfg), method, state)
        keep = _choose(chunk, kept.sequences.shape[1], rows, method)
        compat.select_cache_rows(chunk.cache, keep)
        kept = _Kept(
            chunk.sequences[keep], chunk.stopped[keep], chunk.logits[keep], chunk.next_ratios[keep],
            select_input_rows(chunk.kwargs, keep), chunk.cache,
        )  # fmt: skip
        chosen.append(chunk.features[keep])
        scores += [s[keep] for s in chunk.scores[: chunk.features.shape[1]]]
        state.select_rows(torch.arange(rows, device=input_ids.device))
    method.keep_path(state, torch.cat(chosen, 1) if chosen else None)
    state.select_rows(None)
    if cfg.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=kept.sequences,
            scores=tuple(scores) if cfg.output_scores else None,
            **{compat.CACHE: kept.cache},
        )
    return kept.sequences


def _sample_chunk(model, kept: _Kept, logits_processor, stopping_criteria, pad, method: Method, state) -> _Chunk:
    """Each row repeated ``N`` times, then up to ``chunk_size`` sampling steps of all ``rows * N`` rows
    (one forward each); a row that stops is padded from there."""
    rows, n = kept.sequences.shape[0], method.config.num_candidates
    expand = torch.arange(rows, device=kept.sequences.device).repeat_interleave(n)
    compat.select_cache_rows(kept.cache, expand)
    state.select_rows(expand)
    kwargs, cache = select_input_rows(kept.kwargs, expand), kept.cache
    seq, stopped, logits = kept.sequences[expand], kept.done[expand], kept.logits[expand]
    features, real, scores = [kept.ratios[expand]], [], []
    for k in range(method.config.chunk_size):
        real.append(~stopped)
        processed = logits_processor(seq, logits)
        scores.append(processed)
        tokens = torch.multinomial(nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
        if pad is not None:
            tokens = torch.where(stopped, pad, tokens)
        seq = torch.cat([seq, tokens[:, None]], -1)
        stopped = stopped | stopping_criteria(seq, None)
        step = model(**compat.step_inputs(model, seq, 1, cache, kwargs), return_dict=True)
        kwargs = compat.next_generation_kwargs(model, step, kwargs)
        cache, logits = compat.cache_of(step), step.logits[:, -1].float()
        if k + 1 < method.config.chunk_size and not bool(stopped.all()):
            features.append(method.last_ratios(state))
        else:
            break
    features = torch.stack(features, 1)
    real = torch.stack(real[: features.shape[1]], 1).to(features.device, torch.float32)
    return _Chunk(seq, stopped, logits, kwargs, cache, features, real, scores, method.last_ratios(state))


def _choose(chunk: _Chunk, prefix: int, rows: int, method: Method) -> torch.Tensor:
    """The row of the kept candidate of each prompt (``(rows,)`` indices into the chunk's rows): the
    highest ``p_faithful`` of its tokens' mean ratios, the first on ties or when all are the same."""
    n = method.config.num_candidates
    weights = chunk.real
    means = (chunk.features.float() * weights[..., None, None]).sum(1) / weights.sum(1).clamp_min(1)[:, None, None]
    faithful = method.chunk_scores(means).view(rows, n)
    candidates = chunk.sequences.view(rows, n, -1)
    same = (candidates == candidates[:, :1]).all(-1).all(-1)
    best = torch.where(same, 0, faithful.argmax(-1))
    if method.on_chunk is not None:
        method.on_chunk(
            {
                "tokens": chunk.sequences[:, prefix:].view(rows, n, -1),
                "features": means.view(rows, n, -1),  # what the classifier scored
                "faithful": faithful,
                "kept": best,
            }
        )
    return torch.arange(rows, device=best.device) * n + best
