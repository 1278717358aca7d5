"""Find a text backbone's retrieval heads (Wu et al., 2024), for DeCoRe: the synthetic protocol.

(The official protocol, natural-language needles in book text, is ``needle_haystack``; this one runs
offline for any tokenizer and finds copy heads even in models that cannot answer questions.)
A trial is a needle-in-a-haystack copy task built from the model's own vocabulary (no data is
downloaded). ``N`` distinct ordinary tokens form the needle; ``H`` random ordinary tokens (none of
them a needle token) form the haystack; the needle goes in at a random depth ``d`` behind a cue,
and the prompt ends with a question and the same cue, so the answer is the needle::

    [chat prefix] hay[:d] CUE needle END hay[d:] QUESTION [chat suffix] CUE | needle

(``CUE`` is "The answer is:", ``QUESTION`` "What is the answer?"; the chat prefix/suffix come from
the processor's chat template when it has one). Write ``a_t`` for the ``t``-th needle token and
``[s, s + N)`` for the needle's span in the prompt. At answer step ``t`` the query is the position
whose next-token prediction is ``a_t`` (the last prompt token for ``t = 0``, then ``a_{t-1}``). Head
``(l, h)`` *retrieves* at step ``t`` when its top-1 attention position ``i`` (over everything the
query sees) satisfies ``s <= i < s + N`` and ``token[i] == a_t``. Its score for the trial is::

    score(l, h) = #{t : head (l, h) retrieves at step t} / N          (in [0, 1])

The output is the official Retrieval_Head format: one JSON object mapping ``"layer-head"`` to the
list of its per-trial scores; DeCoRe ranks heads by the mean of that list.

How this follows the official detection script (``retrieval_head_detection.py``):

* same criterion per step: top-1 (``topk=1``) of the attention row of the current query, inside
  the needle span, and the token there equal to the token of this step; credit ``1 / N``;
* same trial filter: the official script records a trial only when the model's answer recalls
  more than half of the needle (ROUGE-1 recall > 50); here a trial is recorded only when the
  model's greedy prediction equals ``a_t`` at more than ``min_copy_accuracy`` (default 0.5) of the
  steps. ``min_copy_accuracy = 0`` records every trial (for models that cannot copy at all).

Where it differs, and why:

* teacher forcing: the official script *generates* the answer greedily, token by token, and
  compares each top-1 token with the token just generated. Here one forward over prompt + needle
  reads every step at once, and the comparison is with the needle token ``a_t``. For a model that
  copies the needle correctly the two are the same computation. Where it does not, the official
  context continues from the model's own (wrong) tokens and its comparison is with the wrong token;
  here the context stays the true needle and a head is credited only for finding the right token
  (so the copy accuracy is also measured without compounding errors);
* the official script keeps decoding after the needle (up to 50 tokens, until a newline) and can
  credit those steps too; here only the ``N`` needle steps count, so scores stay in ``[0, 1]``;
* the haystack is random vocabulary rather than book text (the official detection reads chapters
  of *The Last of the Mohicans* and *Dracula*, with three natural-language needles and questions,
  trials kept when the answer's ROUGE-1 recall is above 50 percent; ``needle_haystack``), the
  needle a random token span rather than a sentence, and the depth random rather than a grid: a
  calibration that runs offline for any tokenizer. The needle's tokens occur nowhere else in the
  prompt (the haystack and the prompt's fixed text avoid them), so "the token there equals a_t"
  singles out one position.

Attention weights are read from the text backbone's attention modules with eager attention
(switched on for the calibration and restored afterwards), which handles grouped-query heads,
sliding windows and soft-capping the way the model does. Only the ``N`` answer rows are kept.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..adapters import adapter_for
from ..attention import EAGER_HOOK_NAME, HOOK_NAME
from ..outputs import write_atomic

CUE = "The answer is:"
END = "."
QUESTION = "What is the answer?"
DEFAULT_HAYSTACK = 1000  # tokens; capped by the model's context when not given
_PLACEHOLDER = "\x00HAYSTACK\x00"
_KEY = re.compile(r"^(\d+)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    """The fixed token ids around a trial's haystack and needle (see the module docstring)."""

    head: tuple[int, ...]  # BOS and the chat prefix, before the haystack
    cue: tuple[int, ...]  # before the needle, and again before the answer
    end: tuple[int, ...]  # after the needle
    question: tuple[int, ...]  # after the haystack: the question and the chat suffix

    def tokens(self) -> set[int]:
        return set(self.head) | set(self.cue) | set(self.end) | set(self.question)

    def overhead(self, needle_length: int) -> int:
        """Fed tokens besides the haystack: prompt text, the needle and the answer (minus its last token)."""
        return len(self.head) + 2 * len(self.cue) + len(self.end) + len(self.question) + 2 * needle_length - 1


@dataclasses.dataclass(frozen=True)
class Trial:
    """One copy task: ``input_ids`` is the prompt plus the answer without its last token."""

    input_ids: tuple[int, ...]
    needle_start: int  # needle span in the prompt: [needle_start, needle_start + len(needle))
    needle: tuple[int, ...]

    @property
    def prompt_length(self) -> int:
        return len(self.input_ids) - len(self.needle) + 1


# ---- prompts ----------------------------------------------------------------------------------------------


def layout_from_tokenizer(tokenizer, chat_template_owner=None) -> Layout:
    """The prompt layout for ``tokenizer``: wrapped in ``chat_template_owner``'s chat template (a
    processor or tokenizer) when it has one, BOS first when the tokenizer has one."""
    encode = lambda text: tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix, suffix = "", "\n"
    owner = chat_template_owner if chat_template_owner is not None else tokenizer
    if getattr(owner, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "text", "text": _PLACEHOLDER}]}]
        text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if isinstance(text, list):
            text = text[0]
        if text.count(_PLACEHOLDER) == 1:
            prefix, suffix = text.split(_PLACEHOLDER)
    head = encode(prefix) if prefix else ()
    bos = tokenizer.bos_token_id
    if bos is not None and (not head or head[0] != bos):
        head = (bos, *head)
    return Layout(head=head, cue=encode(" " + CUE), end=encode(END), question=encode("\n" + QUESTION) + encode(suffix))


def ordinary_tokens(tokenizer, vocab_size: int, exclude: Iterable[int] = ()) -> list[int]:
    """Token ids that are neither special nor added (control, image, chat tokens), below ``vocab_size``."""
    skip = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {}) | set(exclude)
    return [i for i in range(min(len(tokenizer), vocab_size)) if i not in skip]


def make_trial(
    rng: random.Random, layout: Layout, vocabulary: Sequence[int], haystack_length: int, needle_length: int
) -> Trial:
    """A random trial: ``needle_length`` distinct needle tokens, a haystack of the other tokens, a random depth."""
    pool = sorted(set(vocabulary) - layout.tokens())
    if needle_length >= len(pool):
        raise ValueError(
            f"the vocabulary has {len(pool)} usable tokens, too few for a needle of {needle_length} "
            "plus a haystack; use a shorter needle"
        )
    needle = tuple(rng.sample(pool, needle_length))
    rest = sorted(set(pool) - set(needle))
    haystack = [rng.choice(rest) for _ in range(haystack_length)]
    depth = rng.randint(0, haystack_length)
    before = [*layout.head, *haystack[:depth], *layout.cue]
    prompt = [*before, *needle, *layout.end, *haystack[depth:], *layout.question, *layout.cue]
    return Trial(input_ids=tuple(prompt + list(needle[:-1])), needle_start=len(before), needle=needle)


# ---- scoring ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_trial(model: nn.Module, trial: Trial) -> tuple[torch.Tensor, float]:
    """``(scores, copy_accuracy)``: per-head scores ``(layers, heads)`` for one trial and the share of
    needle tokens the model's greedy prediction gets right. The model must already use eager attention."""
    adapter = adapter_for(model)
    n = len(trial.needle)
    tops: list[torch.Tensor | None] = [None] * adapter.num_layers

    def read(index, module, args, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no weights; the text backbone must use eager attention")
        tops[index] = weights[0, :, -n:, :].argmax(-1).cpu()  # (heads, n): top-1 key per answer step

    handles = [
        module.register_forward_hook(lambda m, a, o, i=i: read(i, m, a, o))
        for i, module in enumerate(adapter.attention_modules())
    ]
    device = next(model.parameters()).device
    try:
        output = model(input_ids=torch.tensor([trial.input_ids], device=device), logits_to_keep=n, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    if any(top is None for top in tops):
        raise RuntimeError("some attention modules did not run; is this the model's text backbone?")
    ids = torch.tensor(trial.input_ids)
    answer = torch.tensor(trial.needle)
    top = torch.stack(tops)  # (layers, heads, n)
    inside = (top >= trial.needle_start) & (top < trial.needle_start + n)
    hits = inside & (ids[top] == answer)
    predicted = output.logits[0, -n:].argmax(-1).cpu()
    return hits.sum(-1).double() / n, float((predicted == answer).double().mean())


def retrieval_scores(
    model: nn.Module,
    layout: Layout,
    vocabulary: Sequence[int],
    trials: int = 20,
    haystack_length: int = 200,
    needle_length: int = 16,
    seed: int = 0,
    min_copy_accuracy: float = 0.5,
    progress: bool = True,
) -> tuple[dict[str, list[float]], list[float]]:
    """``(heads, accuracies)``: the official ``{"layer-head": [score per recorded trial]}`` and every
    trial's copy accuracy. A trial is recorded when its accuracy exceeds ``min_copy_accuracy``
    (every trial when it is 0). Raises ``ValueError`` when no trial is recorded."""
    from tqdm import tqdm

    adapter = adapter_for(model)
    previous = adapter.text_attn_implementation()
    if previous in (HOOK_NAME, EAGER_HOOK_NAME):
        raise ValueError(f"the text attention is {previous!r} (a wrapped model?); calibrate the unwrapped model")
    rng = random.Random(seed)
    recorded: list[torch.Tensor] = []
    accuracies: list[float] = []
    adapter.set_text_attn_implementation("eager")
    try:
        for _ in tqdm(range(trials), desc="retrieval heads", unit="trial", disable=not progress):
            scores, accuracy = score_trial(model, make_trial(rng, layout, vocabulary, haystack_length, needle_length))
            accuracies.append(accuracy)
            if accuracy > min_copy_accuracy or min_copy_accuracy == 0:
                recorded.append(scores)
    finally:
        adapter.set_text_attn_implementation(previous or "sdpa")
    if not recorded:
        raise ValueError(
            f"the model copied the needle in none of {trials} trials (best copy accuracy {max(accuracies):.2f}, "
            f"needed > {min_copy_accuracy}); lower min_copy_accuracy (--min-copy-accuracy; 0 records every trial)"
        )
    table = torch.stack(recorded, -1)  # (layers, heads, recorded trials)
    heads = {
        f"{layer}-{head}": [float(v) for v in table[layer, head]]
        for layer in range(table.shape[0])
        for head in range(table.shape[1])
    }
    return heads, accuracies


# ---- reading a heads file ---------------------------------------------------------------------------------


def ranked_heads(path_or_dict: str | os.PathLike | dict) -> list[tuple[int, int, float]]:
    """Every ``(layer, head, mean score)`` of a heads file (or its parsed object), best first; ties by
    layer, then head. Raises ``ValueError`` naming the first thing that is not the official format."""
    if isinstance(path_or_dict, dict):
        data, where = path_or_dict, "retrieval heads"
    else:
        where = str(path_or_dict)
        try:
            data = json.loads(Path(path_or_dict).read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: expected a non-empty JSON object of 'layer-head': [scores]")
    ranked: dict[tuple[int, int], float] = {}
    for key, scores in data.items():
        match = _KEY.match(key) if isinstance(key, str) else None
        if match is None:
            raise ValueError(f"{where}: key {key!r} is not 'layer-head' (two whole numbers, e.g. '3-5')")
        position = (int(match[1]), int(match[2]))
        if position in ranked:
            raise ValueError(f"{where}: head {key!r} appears twice")
        if not isinstance(scores, list) or not scores:
            raise ValueError(f"{where}: head {key!r} needs a non-empty list of scores, got {scores!r}")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise ValueError(f"{where}: head {key!r} has a score that is not a finite number")
        ranked[position] = sum(scores) / len(scores)
    order = sorted(ranked, key=lambda p: (-ranked[p], p))
    return [(layer, head, ranked[(layer, head)]) for layer, head in order]


def load_retrieval_heads(path_or_dict: str | os.PathLike | dict, k: int) -> list[tuple[int, int]]:
    """The top ``k`` ``(layer, head)`` by mean score (ties by layer, then head).

    A ``k`` above the number of heads in the file gives them all, as the official DeCoRe code's
    slice ``heads[:k]`` does (the default K = 50 then works on small models). Whether the heads
    exist in a given model is the caller's check: ``check_heads``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    return [(layer, head) for layer, head, _ in ranked_heads(path_or_dict)[:k]]


def check_heads(heads: Iterable[tuple[int, int]], num_layers: int, num_heads: int) -> None:
    """Raise ``ValueError`` for the first ``(layer, head)`` outside a model of that shape."""
    for layer, head in heads:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(
                f"retrieval head {layer}-{head} is outside this model ({num_layers} layers x {num_heads} "
                "heads); the heads file was computed for another model"
            )


# ---- command line -----------------------------------------------------------------------------------------


def max_positions(model: nn.Module) -> int | None:
    value = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return int(value) if value else None


def main(
    model_spec: str,
    out: str,
    trials: int = 20,
    haystack_length: int | None = None,
    needle_length: int = 16,
    seed: int = 0,
    min_copy_accuracy: float = 0.5,
    show: int = 10,
) -> int:
    from ..models import load_model
    from ..outputs import output_file

    target = output_file(out)  # checked before the model loads
    model, processor, name = load_model(model_spec)
    tokenizer = getattr(processor, "tokenizer", processor)
    layout = layout_from_tokenizer(tokenizer, processor)
    adapter = adapter_for(model, processor)
    try:
        image_ids = adapter.visual_token_ids()
    except ValueError:
        image_ids = ()
    vocab_size = int(model.config.get_text_config().vocab_size)
    vocabulary = ordinary_tokens(tokenizer, vocab_size, exclude=image_ids)
    limit, overhead = max_positions(model), layout.overhead(needle_length)
    if haystack_length is None:
        haystack_length = DEFAULT_HAYSTACK if limit is None else min(DEFAULT_HAYSTACK, limit - overhead)
        if haystack_length < 1:
            raise ValueError(f"{name}: a needle of {needle_length} leaves no room in its {limit}-token context")
    elif limit is not None and haystack_length + overhead > limit:
        raise ValueError(
            f"--haystack-length {haystack_length}: the trial would be {haystack_length + overhead} tokens, "
            f"above {name}'s {limit}-token context; use at most {limit - overhead}"
        )
    print(
        f"{name}: {trials} trials, haystack {haystack_length} tokens, needle {needle_length} tokens, "
        f"{adapter.num_layers} layers x {adapter.num_heads} heads"
    )
    heads, accuracies = retrieval_scores(
        model, layout, vocabulary, trials, haystack_length, needle_length, seed, min_copy_accuracy
    )
    kept = len(next(iter(heads.values())))
    mean_accuracy = sum(accuracies) / len(accuracies)
    print(f"copy accuracy (teacher-forced) {mean_accuracy:.2f} on average; {kept} of {trials} trials recorded")
    top = ranked_heads(heads)[:show]
    print(
        "top heads (layer-head: mean score): " + ", ".join(f"{layer}-{head}: {score:.3f}" for layer, head, score in top)
    )
    write_atomic(target, json.dumps(heads) + "\n")  # one line, as the official files (read with readline)
    print(f"saved: {out}")
    return 0
