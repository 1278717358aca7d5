"""Beam-search bookkeeping for one sample, for a decoding loop that runs its own forwards (OPERA's).

The rules are those of transformers' beam search in the 5.x releases (``generate(num_beams=B)``,
greedy), written out here so a loop can take one step at a time, roll back to an earlier state,
and never call transformers' private helpers. With ``B`` beams, ``V`` tokens, prompt length ``P``
and ``t`` the number of tokens in each running sequence, one step on the log-probabilities
``log p (B, V)`` (after the logits processors) is:

1. continuations: ``s[b, v] = score[b] + log p[b, v]``; the top ``K = max(2, 1 + #eos) * B`` of
   all ``B * V`` (so that ``B`` remain when the best ones end), each a running beam and a token;
2. the stopping criteria are asked about each continuation (the sequence with its token);
3. running beams: the top ``B`` continuations that did not stop (a stopped one gets ``-1e9``);
4. finished hypotheses: a continuation among the top ``B`` of the ``K`` that stopped enters with
   the length-normalised score ``s / (t + 1 - P) ** length_penalty``; the best ``B`` of the old
   and new ones are kept;
5. the heuristic: a running beam can still improve while its best score, normalised by the
   length it has (by the longest it may reach when ``early_stopping="never"`` and the penalty is
   positive), beats the worst finished score of a full set;
6. the search ends when no improvement is possible, every slot is finished under
   ``early_stopping=True``, or every continuation met a stopping criterion.

With ``counted_prompt = P'`` the lengths are those of transformers 4.29's beam scorer, which
OPERA's official search runs: a finished hypothesis is normalised by ``P' + g`` where ``g`` counts
its generated tokens without a final end token (4.29 stores the sequence before it), and the
heuristic compares the worst finished score with the best of this step's ``K`` continuations over
``(P' + t + 1 - P) ** length_penalty`` (``early_stopping=False``; ``True`` as above). ``P'`` is the
prompt as the official code counts it (its text tokens and one placeholder per image).

Scores that mark an impossible entry are *added* ``-1e9`` terms, as transformers adds them, so
ties and orderings come out the same. transformers searches a batch's samples together and also
bars new finished entries for a sample whose search is over while the others go on; here a search
is one sample's, and it ends there. ``tests/test_opera.py`` checks that OPERA with its penalty
off equals ``generate``'s beam search on the installed release.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

IMPOSSIBLE = -1.0e9  # the score added to an entry that must not be chosen


@dataclasses.dataclass(frozen=True)
class Beams:
    """The search of one sample at one step; never changed in place (a rollback keeps old ones).

    ``B`` beams, ``L`` = ``max_length`` (prompt included), ``G = L - P`` generated positions."""

    running: torch.Tensor  # (B, L) token ids: the prompt, each running beam's tokens, then fill
    running_scores: torch.Tensor  # (B,) summed log-probabilities; IMPOSSIBLE for unused beams
    running_parents: torch.Tensor  # (B, G) per generated position, the beam it continued (-1: none yet)
    finished: torch.Tensor  # (B, L) the best finished hypotheses (fill where empty)
    finished_scores: torch.Tensor  # (B,) their length-normalised scores, best first
    finished_parents: torch.Tensor  # (B, G)
    is_finished: torch.Tensor  # (B,) bool: the slot holds a finished hypothesis
    length: int  # t: tokens in each running sequence, prompt included


class BeamSearch:
    """Step-by-step beam search over one sample (see the module docstring)."""

    def __init__(
        self,
        prompt: torch.Tensor,
        num_beams: int,
        max_length: int,
        eos_count: int,
        fill_value: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        counted_prompt: int | None = None,
        eos_ids: tuple[int, ...] = (),
    ):
        if prompt.dim() != 1:
            raise ValueError("a beam search starts from one prompt (a 1-D tensor of token ids)")
        self.num_beams = num_beams
        self.max_length = max_length
        self.prompt_len = prompt.shape[0]
        self.fill_value = fill_value
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.counted_prompt = counted_prompt  # None: transformers 5.x's lengths; else 4.29's (see module)
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long, device=prompt.device)
        self.keep = max(2, 1 + eos_count) * num_beams  # K continuations per step
        self.done = False  # set by each step: the search is over
        device = prompt.device
        sequences = torch.full((num_beams, max_length), fill_value, dtype=torch.long, device=device)
        sequences[:, : self.prompt_len] = prompt
        scores = torch.zeros(num_beams, device=device)
        scores[1:] = IMPOSSIBLE  # only the first beam continues at the first step (no duplicates)
        parents = torch.full((num_beams, max_length - self.prompt_len), -1, dtype=torch.int32, device=device)
        self.beams = Beams(
            running=sequences,
            running_scores=scores,
            running_parents=parents,
            finished=sequences.clone(),
            finished_scores=torch.full((num_beams,), IMPOSSIBLE, device=device),
            finished_parents=parents.clone(),
            is_finished=torch.zeros(num_beams, dtype=torch.bool, device=device),
            length=self.prompt_len,
        )

    @property
    def sequences(self) -> torch.Tensor:
        """``(B, t)``: the running beams' tokens."""
        return self.beams.running[:, : self.beams.length]

    def step(self, log_probs: torch.Tensor, stopping: Any, all_scores: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the next token of every beam from ``log_probs (B, V)``; returns ``(parents, tokens)``
        (each ``(B,)``: running beam ``i`` now continues old beam ``parents[i]`` with ``tokens[i]``).
        ``stopping`` is ``generate``'s stopping criteria, asked with ``all_scores``."""
        b, B = self.beams, self.num_beams
        vocab = log_probs.shape[-1]
        position = b.length - self.prompt_len
        accumulated = (log_probs + b.running_scores[:, None]).view(1, -1)
        top_scores, top_index = accumulated.topk(self.keep)
        top_scores, top_index = top_scores[0], top_index[0]
        parent, token = top_index // vocab, top_index % vocab
        candidates = b.running[parent]
        candidates[:, b.length] = token
        candidate_parents = b.running_parents[parent]
        candidate_parents[:, position] = parent
        stopped = stopping(candidates[:, : b.length + 1], all_scores).view(-1)

        still_running = top_scores + stopped.float() * IMPOSSIBLE
        pick = still_running.topk(B).indices
        new_length = b.length + 1

        just_finished = stopped & (torch.arange(self.keep, device=stopped.device) < B)
        normalised = top_scores / (self._entry_lengths(token, new_length) ** self.length_penalty)
        normalised = normalised + (~just_finished).float() * IMPOSSIBLE
        merged_scores = torch.cat([b.finished_scores, normalised])
        best = merged_scores.topk(B).indices
        finished_scores = merged_scores[best]
        is_finished = torch.cat([b.is_finished, just_finished])[best]

        running_scores = still_running[pick]
        self.beams = Beams(
            running=candidates[pick],
            running_scores=running_scores,
            running_parents=candidate_parents[pick],
            finished=torch.cat([b.finished, candidates])[best],
            finished_scores=finished_scores,
            finished_parents=torch.cat([b.finished_parents, candidate_parents])[best],
            is_finished=is_finished,
            length=new_length,
        )
        leading = top_scores[0] if self.counted_prompt is not None else running_scores[0]
        self.done = not (
            self._can_improve(leading, finished_scores, is_finished, new_length)
            and not (self.early_stopping is True and bool(is_finished.all()))
            and not bool(stopped.all())
        )
        return self.beams.running_parents[:, position].long(), self.beams.running[:, b.length]

    def _entry_lengths(self, tokens: torch.Tensor, new_length: int) -> torch.Tensor:
        """The length each continuation would be normalised by on entering the finished set."""
        generated = new_length - self.prompt_len
        if self.counted_prompt is None:
            return torch.full(tokens.shape, float(generated), device=tokens.device)
        ends = torch.isin(tokens, self.eos_ids.to(tokens.device)).float()  # 4.29 keeps the sequence before EOS
        return self.counted_prompt + generated - ends

    def _can_improve(
        self, best_score: torch.Tensor, finished_scores: torch.Tensor, is_finished: torch.Tensor, length: int
    ) -> bool:
        """Step 5: whether the best score may still beat the worst finished hypothesis (the best
        running beam's; 4.29: the best continuation's, over the length the sequence has)."""
        if self.counted_prompt is not None:
            best_length = self.counted_prompt + length - self.prompt_len
        elif self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_len
        else:
            best_length = length - self.prompt_len
        best_running = best_score / (best_length**self.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(), IMPOSSIBLE)
        return bool((best_running > worst_finished).any())

    def restore(self, beams: Beams) -> None:
        """Go back to an earlier state of this search (a rollback)."""
        self.beams = beams
        self.done = False

    def best(self, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sequences, scores, parents)`` of the best ``count`` finished hypotheses, cut to the
        longest of them (``generate``'s ``sequences``, ``sequences_scores`` and ``beam_indices``)."""
        b = self.beams
        parents = b.finished_parents[:count]
        generated = int((parents + 1).bool().sum(1).max())
        return b.finished[:count, : self.prompt_len + generated], b.finished_scores[:count], parents[:, :generated]
