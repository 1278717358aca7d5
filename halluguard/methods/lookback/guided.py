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

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ... import compat
from ...decoding.loops import check_loop_call, pad_token, select_input_rows

if TYPE_CHECKING:
    from ...state import GuardState
    from .method import Lookback


def guided_search(
    model: nn.Module,
    input_ids: torch.Tensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: Any,
    synced_gpus: bool = False,
    streamer: Any = None,
    *,
    method: Lookback,
    state: GuardState,
    **model_kwargs: Any,
) -> Any:
    """Classifier-guided chunk decoding (see the module docstring)."""
    cfg, lookback = generation_config, method.config
    check_loop_call(
        "Lookback Lens' guided decoding",
        [
            (synced_gpus, "synced_gpus"),
            (cfg.prefill_chunk_size is not None, "prefill_chunk_size"),
        ],
        compat.cache_in(model_kwargs),
        "repeats and selects rows of",
    )
    rows, N = input_ids.shape[0], lookback.num_candidates
    pad = pad_token(cfg)
    data = state.data_of(method)
    out = compat.prefill(model, input_ids, model_kwargs)
    model_kwargs = compat.next_generation_kwargs(model, out, model_kwargs)
    cache = compat.cache_of(out)
    logits = out.logits[:, -1].float()
    ratios = data.steps[-1]  # (rows, L, H): the query producing each row's next token
    sequences, done = input_ids, torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    chosen: list[torch.Tensor] = []  # the kept tokens' ratios, chunk by chunk: (rows, k, L, H)
    scores: list[torch.Tensor] = []
    while not bool(done.all()):
        expand = torch.arange(rows, device=input_ids.device).repeat_interleave(N)
        compat.select_cache_rows(cache, expand)
        state.select_rows(expand)
        kwargs = select_input_rows(model_kwargs, expand)
        seq, stopped, logits_n = sequences[expand], done[expand], logits[expand]
        chunk = [ratios[expand]]
        real = []  # per token of the chunk: the rows where it is a real token, not padding after a stop
        chunk_scores = []
        for k in range(lookback.chunk_size):
            real.append(~stopped)
            processed = logits_processor(seq, logits_n)
            chunk_scores.append(processed)
            tokens = torch.multinomial(nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
            if pad is not None:
                tokens = torch.where(stopped, pad, tokens)
            seq = torch.cat([seq, tokens[:, None]], -1)
            stopped = stopped | stopping_criteria(seq, None)
            step = model(**compat.step_inputs(model, seq, 1, cache, kwargs), return_dict=True)
            kwargs = compat.next_generation_kwargs(model, step, kwargs)
            cache, logits_n = compat.cache_of(step), step.logits[:, -1].float()
            if k + 1 < lookback.chunk_size and not bool(stopped.all()):
                chunk.append(data.steps[-1])
            else:
                break
        next_ratios = data.steps[-1]
        features = torch.stack(chunk, 1)  # (rows * N, k, L, H): the chunk's tokens
        weights = torch.stack(real[: features.shape[1]], 1).to(features.device, torch.float32)  # (rows * N, k)
        means = (features.float() * weights[..., None, None]).sum(1) / weights.sum(1).clamp_min(1)[:, None, None]
        faithful = method.chunk_scores(means).view(rows, N)
        same = (seq.view(rows, N, -1) == seq.view(rows, N, -1)[:, :1]).all(-1).all(-1)
        best = torch.where(same, 0, faithful.argmax(-1))
        keep = torch.arange(rows, device=best.device) * N + best
        if method.on_chunk is not None:
            method.on_chunk(
                {
                    "tokens": seq[:, sequences.shape[1] :].view(rows, N, -1),
                    "features": means.view(rows, N, -1),  # what the classifier scored
                    "faithful": faithful,
                    "kept": best,
                }
            )
        compat.select_cache_rows(cache, keep)
        sequences, done = seq[keep], stopped[keep]
        logits, ratios = logits_n[keep], next_ratios[keep]
        model_kwargs = select_input_rows(kwargs, keep)
        chosen.append(features[keep])
        scores += [s[keep] for s in chunk_scores[: features.shape[1]]]
        state.select_rows(torch.arange(rows, device=input_ids.device))
    data.path = torch.cat(chosen, 1) if chosen else None
    state.select_rows(None)
    if cfg.return_dict_in_generate:
        return GenerateDecoderOnlyOutput(
            sequences=sequences, scores=tuple(scores) if cfg.output_scores else None, **{compat.CACHE: cache}
        )
    return sequences
