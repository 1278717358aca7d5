"""OPERA's beam search: a decoding loop (``custom_generate``) with look-ahead and rollback.

The scores are ``halluguard.methods.opera.scores``; this module runs the search. The prompt's forward
runs once for the whole batch; each sample's beams are then searched one sample after another on
their own rows of the cache (a rollback crops one sample's cache, never another's). The beam
bookkeeping (finished hypotheses, length penalty, early stopping, stopping criteria) is
``halluguard.methods.opera.beams``: the rules of transformers' beam search, one step at a time, so with
the penalty off and no rollback the search is ``generate``'s beam search exactly.

One step of a sample with ``B`` beams and ``N`` candidates (the cache holds ``B`` rows)::

    logits (B, V) --top N--> candidates (B, N) --one forward: each beam's row takes its N candidates
        as N new tokens at the same position, under a tree mask (each sees the beam and itself)-->
        per candidate: head-max row of the chosen layer (hook), next-token logits, a cache slot
    penalised candidate scores --log_softmax, processors, beam search--> B winners (parent, candidate)
    one gather per cache layer keeps each winner's parent row and its candidate's slot; the winners'
    logits are the next step's: no forward is repeated, and the beams' cache is never copied per
    candidate

A rollback restores the search as it stood at an earlier position (kept for the last
``window_size`` steps), crops the cache to the longest prefix all restored beams still share,
forwards the rest of their response (one forward of ``B`` rows), and decodes that position again
from the full vocabulary; the tokens chosen there are then fed as in plain beam search.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput

from ... import compat
from ...decoding.layout import PER_TOKEN_INPUTS, select_input_rows, trim_inputs
from ...decoding.loops import check_loop_call, end_tokens, pad_token
from .beams import Beams, BeamSearch
from .scores import rollback_location

if TYPE_CHECKING:
    from ...state import GuardState
    from ..base import Method  # the method this loop belongs to (it imports this module)


def decode_inputs(model_kwargs: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The inputs decode steps need, for rows ``rows``: the per-token tensors and the settings (the
    prompt's image inputs are already in the cache)."""
    kept = {k: v for k, v in model_kwargs.items() if k in PER_TOKEN_INPUTS or not torch.is_tensor(v)}
    return select_input_rows(compat.without_cache(kept), rows)


@dataclasses.dataclass
class Snapshot:
    """The search of one sample at the start of a step (what a rollback restores)."""

    beams: Beams
    columns: torch.Tensor  # (B, step): the beams' column log-products


def counted_prompt(adapter: Any, prompt_ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """The prompt's length as OPERA's official code counts it: its LLaVA passes one placeholder per
    image, so the text tokens plus one per run of image tokens (padding left out)."""
    valid = prompt_ids if mask is None else prompt_ids[mask[: prompt_ids.shape[0]].bool()]
    spans = adapter.image_spans(valid[None])[0]
    return int(valid.shape[0]) - sum(end - start for start, end in spans) + len(spans)


class SampleSearch:
    """OPERA's beam search over one sample's ``B`` beams (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        state: GuardState,
        sample: int,
        prompt_ids: torch.Tensor,
        logits: torch.Tensor,
        cache: DynamicCache,
        inputs: dict[str, Any],
        generation_config: Any,
        logits_processor: Any,
        stopping_criteria: Any,
    ):
        cfg = generation_config
        self.model, self.method, self.state, self.sample = model, method, state, sample
        self.config = method.config
        self.num_beams = cfg.num_beams
        self.candidates = min(self.config.num_attn_candidates, logits.shape[-1])
        self.logits, self.cache, self.inputs = logits, cache, inputs
        self.processor, self.stopping = logits_processor, stopping_criteria
        self.cfg = cfg
        self.prompt_len = prompt_ids.shape[1]
        device = prompt_ids.device
        eos, pad = end_tokens(cfg), pad_token(cfg)
        self.fill_value = (pad or eos[0]) if eos else -1  # transformers' fill (a pad id of 0 gives the end token)
        B = self.num_beams
        counted = None
        if self.config.length_normalisation == "official":
            mask = inputs.get("attention_mask")
            counted = counted_prompt(state.adapter, prompt_ids[0], mask[0] if isinstance(mask, torch.Tensor) else None)
        self.search = BeamSearch(
            prompt_ids[0], B, cfg.max_length, len(eos), self.fill_value, cfg.length_penalty, cfg.early_stopping,
            counted_prompt=counted, eos_ids=tuple(eos),
        )  # fmt: skip
        self.beam_rows = torch.arange(B, device=device)  # the cache row of each beam
        self.columns = torch.zeros((B, 0), device=logits.device)  # per beam: log prod of each column
        self.pending: torch.Tensor | None = None  # parents of tokens chosen but not yet fed (plain steps)
        self.scores: list[torch.Tensor] = []
        self.raw_logits: list[torch.Tensor] = []
        # retrospection: per step the beams' summary locations, snapshots, choices, rejections, rollbacks
        self.locations: list[torch.Tensor] = []
        self.snapshots: collections.deque[tuple[int, Snapshot]] = collections.deque(maxlen=self.config.window_size + 1)
        self.chosen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rejected: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.rollbacks: collections.Counter[int] = collections.Counter()

    # ---- forwards ----------------------------------------------------------------------------------
    def _forward(self, rows: torch.Tensor, ids: torch.Tensor, new: int, inputs: dict[str, Any]) -> Any:
        """Forward the last ``new`` tokens of ``ids`` on cache rows ``rows`` (reordered in one select)."""
        if not torch.equal(rows, torch.arange(compat.cache_rows(self.cache), device=rows.device)):
            compat.select_cache_rows(self.cache, rows)
        prompt_rows = self.sample * self.num_beams + torch.zeros_like(rows)  # a sample's rows share its prompt
        self.state.select_rows(prompt_rows)
        return self.model(**compat.step_inputs(self.model, ids, new, self.cache, inputs), return_dict=True)

    @property
    def cur_len(self) -> int:
        """Tokens in each running beam, prompt included."""
        return self.search.beams.length

    def _sequences(self) -> torch.Tensor:
        return self.search.sequences

    def _feed_pending(self) -> None:
        """Feed the tokens a plain step chose (rollback steps, and every step of plain beam search)."""
        parents = self.pending
        self.pending = None
        collect = not self.method.neutral
        self.method.collect(self.state, self.cur_len - 1 - self.prompt_len if collect else None)
        out = self._forward(self.beam_rows[parents], self._sequences(), 1, self.inputs)
        self.inputs = compat.next_generation_kwargs(self.model, out, self.inputs)
        self.cache = compat.cache_of(out)
        self.beam_rows = torch.arange(self.num_beams, device=self.beam_rows.device)
        self.logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        if collect:
            history = self.columns[parents.to(self.columns.device)]
            _, _, self.columns = self.method.penalties(self.state, history, history.shape[1])

    def _look_ahead(self, candidates: torch.Tensor) -> Any:
        """Forward every beam's ``N`` candidates side by side, as ``N`` tokens of the beam's row that
        each see the beam's tokens and themselves only (a tree mask, all at the next position); the
        cache grows by ``N`` slots per row until ``_keep_winners``. Returns the output."""
        N = self.candidates
        self.method.collect(self.state, self.cur_len - self.prompt_len, rows=N)
        if not torch.equal(self.beam_rows, torch.arange(compat.cache_rows(self.cache), device=self.beam_rows.device)):
            compat.select_cache_rows(self.cache, self.beam_rows)
            self.beam_rows = torch.arange(self.num_beams, device=self.beam_rows.device)
        self.state.select_rows(self.sample * self.num_beams + torch.zeros_like(self.beam_rows))
        mask = self.inputs.get("attention_mask")  # (B, T + 1): the beams' real tokens, then the next one
        padding = (
            mask[:, : self.cur_len].bool()
            if mask is not None
            else candidates.new_ones(candidates.shape[0], self.cur_len, dtype=torch.bool)
        )
        inputs = {
            key: value[..., -1:].expand(*value.shape[:-1], N)  # the next position's values, for every candidate
            for key, value in self.inputs.items()
            if key in PER_TOKEN_INPUTS and key != "attention_mask" and torch.is_tensor(value)
        }
        out = self.model(
            input_ids=candidates,
            attention_mask=self._tree_masks(padding, N),
            **{compat.CACHE: self.cache},
            use_cache=True,
            logits_to_keep=N,
            return_dict=True,
            **inputs,
        )
        return out

    def _tree_masks(self, padding: torch.Tensor, count: int) -> Any:
        """``(B, 1, N, keys)`` boolean masks: candidate ``n`` sees the beam's real tokens and itself. A
        model with sliding-window layers gets one per layer type (those see the last ``window - 1``
        cached tokens, all of them kept while the search may still crop)."""
        eye = torch.eye(count, dtype=torch.bool, device=padding.device)
        full = torch.cat([padding[:, None, :].expand(-1, count, -1), eye.expand(padding.shape[0], -1, -1)], -1)
        full = full[:, None]
        window = getattr(self.state.adapter.text_config, "sliding_window", None)
        if not self.state.adapter.sliding_layers() or not window:
            return full
        visible = min(padding.shape[1], window - 1) + count
        return {"full_attention": full, "sliding_attention": full[..., -visible:]}

    def _keep_winners(self, parents: torch.Tensor, picks: torch.Tensor) -> None:
        """After a look-ahead: beam ``i`` continues parent ``parents[i]`` with its candidate
        ``picks[i]``; every cache layer keeps that row's tokens and that candidate's slot (one gather,
        the copy beam search's reordering makes anyway)."""
        compat.keep_slots(self.cache, parents, picks, self.candidates)
        self.beam_rows = torch.arange(self.num_beams, device=self.beam_rows.device)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> bool:
        """Choose the next token of every beam; returns True when the search is over."""
        if self.pending is not None:
            self._feed_pending()
        step = self.cur_len - self.prompt_len
        if self.method.neutral:
            return self._select(self.logits, None)
        if self.config.retrospection:
            self.snapshots.append((step, Snapshot(self.search.beams, self.columns)))
        logits = self.logits
        candidates = logits.topk(self.candidates, dim=-1).indices  # (B, N): the raw logits' top N
        out = self._look_ahead(candidates)
        self.inputs = compat.next_generation_kwargs(self.model, out, self.inputs)  # one more token
        history = self.columns.repeat_interleave(self.candidates, 0)
        penalty, loc, columns = self.method.penalties(self.state, history, step)
        B, N = self.num_beams, self.candidates
        event: dict[str, Any] = {
            "sample": self.sample,
            "step": step,
            "candidates": candidates,
            "penalty": penalty.view(B, N),
            "location": loc.view(B, N),
            "sequences": self._sequences(),
            **self.method.last_reading(self.state),
            "kept": len(self.snapshots),
        }
        if self.config.retrospection:
            target = self._retrospect(loc.view(B, N), step)
            if target is not None:
                event["rollback"] = target
                self._emit(event)
                return self._roll_back(target)
        scores = logits.gather(1, candidates) - self.config.penalty_weights * penalty.view(B, N).to(logits)
        edited = torch.full_like(logits, float("-inf")).scatter(1, candidates, scores)
        done = self._select(edited, logits, candidates=candidates, lookahead=out, columns=columns)
        event["chosen"] = self.chosen.get(step)
        self._emit(event)
        return done

    def _emit(self, event: dict[str, Any]) -> None:
        if self.method.on_step is not None:
            self.method.on_step(event)

    def _select(
        self,
        edited: torch.Tensor,
        raw: torch.Tensor | None,
        candidates: torch.Tensor | None = None,
        lookahead: Any = None,
        columns: torch.Tensor | None = None,
    ) -> bool:
        """One beam-search step on the scores ``edited`` (B, V); then the chosen beams' cache rows: the
        look-ahead rows of their candidates, or (plain step) fed at the next step."""
        log_probs = nn.functional.log_softmax(edited, dim=-1)
        log_probs = self.processor(self._sequences(), log_probs)
        if self.cfg.return_dict_in_generate and self.cfg.output_scores:
            self.scores.append(log_probs.clone())
        if self.cfg.return_dict_in_generate and self.cfg.output_logits:
            self.raw_logits.append((raw if raw is not None else self.logits).clone())
        step = self.cur_len - self.prompt_len
        all_scores = tuple(self.scores) if self.cfg.output_scores else None
        parents, tokens = self.search.step(log_probs, self.stopping, all_scores)
        self.chosen[step] = (parents, tokens)
        if lookahead is None:
            self.pending = parents
        else:  # the winners' look-ahead slots and logits: parent beam p, candidate n
            N, B = self.candidates, self.num_beams
            picks = (candidates[parents] == tokens[:, None]).int().argmax(-1)  # a dead beam (-inf) may hold any
            self._keep_winners(parents, picks)
            logits = lookahead.logits.view(B, N, -1)[parents.to(lookahead.logits.device), picks]
            self.logits = logits.to(copy=True, dtype=torch.float32)
            self.columns = columns[(parents * N + picks).to(columns.device)]
        return self.search.done

    # ---- retrospection -------------------------------------------------------------------------------
    def _retrospect(self, locs: torch.Tensor, step: int) -> int | None:
        """Record this step's summary locations; the position to roll back to, if any."""
        per_beam, summary = rollback_location(locs)
        self.locations.append(per_beam)
        history = torch.stack(self.locations, -1)  # (B, steps)
        if summary < 10 or not bool(((history == summary).sum(-1) > self.config.threshold).all()):
            return None
        target = summary + 1
        if self.rollbacks[target] >= self.candidates:
            target = summary
            if self.rollbacks[target] >= self.candidates:
                return None
        if step + 1 - target > self.config.window_size + 1:
            target = max(1, step - self.config.window_size)
        if not any(s == target for s, _ in self.snapshots):
            return None  # older than the history kept
        self.rollbacks[target] += 1
        return target

    def _roll_back(self, target: int) -> bool:
        """Restore the search at response position ``target`` and decode it again without the
        penalty, never choosing again what was chosen there."""
        snapshot = next(s for k, s in self.snapshots if k == target)
        while self.snapshots and self.snapshots[-1][0] >= target:
            self.snapshots.pop()
        self.snapshots.append((target, snapshot))
        self.rejected = {k: v for k, v in self.rejected.items() if k <= target}
        self.rejected.setdefault(target, []).append(self.chosen[target])
        self.chosen = {k: v for k, v in self.chosen.items() if k < target}
        del self.locations[target + 1 :]  # the re-decided step keeps its entry (its prefix is unchanged), as officially
        current = self._sequences()[:1]  # cache row 0 holds beam 0's tokens (and a candidate after them)
        self.search.restore(snapshot.beams)
        self.columns = snapshot.columns
        del self.scores[target:]  # one per step chosen, as the beams at ``target`` had
        del self.raw_logits[target:]
        restored = self._sequences()  # (B, prompt + target): the beams as they stood
        # keep the cache prefix every restored beam shares with row 0 (at least the prompt; at least
        # one token is forwarded again, for the logits)
        width = min(current.shape[1], restored.shape[1] - 1)
        same = (restored[:, :width] == current[:, :width]).all(0)
        shared = max(int(same.int().cumprod(0).sum()), self.prompt_len)
        compat.crop_cache(self.cache, shared)
        rows = torch.zeros(self.num_beams, dtype=torch.long, device=self.beam_rows.device)
        self.method.collect(self.state, None)
        inputs = trim_inputs(self.inputs, self.cur_len)
        out = self._forward(rows, restored, self.cur_len - shared, inputs)
        self.inputs = compat.next_generation_kwargs(self.model, out, inputs)
        self.cache = compat.cache_of(out)
        self.beam_rows = torch.arange(self.num_beams, device=rows.device)
        logits = out.logits[:, -1].to(copy=True, dtype=torch.float32)
        raw = logits.clone()
        for parents, tokens in self.rejected[target]:
            logits[parents.to(logits.device), tokens.to(logits.device)] = float("-inf")
        self.logits = raw
        done = self._select(logits, raw)
        self._emit(
            {
                "sample": self.sample,
                "step": target,
                "rejected": list(self.rejected[target]),
                "chosen": self.chosen[target],
            }
        )
        return done

    # ---- output ----------------------------------------------------------------------------------------
    def result(self, num_return: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sequences, scores, beam_indices)`` of the best ``num_return`` finished hypotheses."""
        return self.search.best(num_return)


def opera_search(
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
    """OPERA's beam search as ``generate(custom_generate=...)`` (see the module docstring)."""
    cfg = generation_config
    check_loop_call(
        "OPERA",
        [
            (synced_gpus, "synced_gpus"),
            (cfg.output_attentions or cfg.output_hidden_states,
             "output_attentions/output_hidden_states: the search reads attention from the hook, not the outputs"),
            (cfg.prefill_chunk_size is not None, "prefill_chunk_size"),
        ],
        compat.cache_in(model_kwargs),
        "crops and reorders",
    )  # fmt: skip
    B = cfg.num_beams
    samples = input_ids.shape[0] // B
    method.collect(state, None)
    out = compat.prefill(model, input_ids, model_kwargs)
    model_kwargs = compat.next_generation_kwargs(model, out, model_kwargs)
    cache = compat.cache_of(out)
    results = []
    for sample in range(samples):
        rows = torch.arange(sample * B, (sample + 1) * B, device=input_ids.device)
        own = cache if samples == 1 else copy.deepcopy(cache)
        if samples > 1:
            compat.select_cache_rows(own, rows)
        if method.config.retrospection:  # sliding-window layers keep the states a rollback crops back to
            compat.record_past(own)
        search = SampleSearch(
            model, method, state, sample, input_ids[rows], out.logits[rows.to(out.logits.device), -1].float(),
            own, decode_inputs(model_kwargs, rows), cfg, logits_processor, stopping_criteria,
        )  # fmt: skip
        while not search.step():
            pass
        results.append(search)
        if samples > 1:
            del own, search.cache
    state.select_rows(None)
    method.collect(state, None)
    return _output(results, cfg, samples == 1 and results[0].cache)


def _output(searches: list[SampleSearch], cfg: Any, cache: Any) -> Any:
    """generate's output from every sample's search (sequences right-padded to a common length)."""
    num_return = cfg.num_return_sequences
    parts = [s.result(num_return) for s in searches]
    length = max(p[0].shape[1] for p in parts)
    fill = searches[0].fill_value
    sequences = torch.cat([nn.functional.pad(p[0], (0, length - p[0].shape[1]), value=fill) for p in parts])
    if not cfg.return_dict_in_generate:
        return sequences
    width = max(p[2].shape[1] for p in parts)
    beam_indices = torch.cat(
        [  # each sample's beam indices, offset to the batch's rows as transformers numbers them
            nn.functional.pad(
                torch.where(p[2] >= 0, p[2] + i * cfg.num_beams, p[2]), (0, width - p[2].shape[1]), value=-1
            )
            for i, p in enumerate(parts)
        ]
    )
    steps = max(len(s.scores) for s in searches) if cfg.output_scores else 0
    scores = (
        tuple(torch.cat([_step(s.scores, k) for s in searches]) for k in range(steps)) if cfg.output_scores else None
    )
    logits_steps = max(len(s.raw_logits) for s in searches) if cfg.output_logits else 0
    logits = (
        tuple(torch.cat([_step(s.raw_logits, k) for s in searches]) for k in range(logits_steps))
        if cfg.output_logits
        else None
    )
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences,
        sequences_scores=torch.cat([p[1] for p in parts]) if cfg.output_scores else None,
        scores=scores,
        logits=logits,
        beam_indices=beam_indices,
        **{compat.CACHE: cache or None},
    )


def _step(per_step: list[torch.Tensor], k: int) -> torch.Tensor:
    """Step ``k`` of one sample's per-step tensors; ``-inf`` rows once its search has ended."""
    return per_step[k] if k < len(per_step) else torch.full_like(per_step[-1], float("-inf"))
