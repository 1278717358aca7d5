"""Retrieval heads by the official detection protocol (Wu et al., 2024), for DeCoRe on real checkpoints.

This follows ``retrieval_head_detection.py`` of the official Retrieval_Head code. A *trial* hides a
natural-language needle sentence in book text and asks the model a question whose answer is in the
needle. The model answers greedily, and every answer step is checked against every head:

* the prompt: the haystack is cut to ``L - 200`` tokens (``L`` the context length of the trial, 200
  left for the question and the answer) minus the needle, the needle goes in at ``depth`` percent of
  it, moved back to just after the nearest earlier sentence end (a ``.`` token), and the question
  follows: ``{context}Based on the content of the book, Question: {question}\\nAnswer:``. With a chat
  template, as the official script does for its chat models, the user turn is
  ``<book>{context}</book>\\nBased on the content of the book, Question: {question}\\nAnswer:``;
* the answer: the prompt without its last token is prefilled, then the model decodes greedily from
  that last token, at most 50 new tokens, and stops after the first token that holds a newline;
* the credit: at each answer step the query is the token just fed, and ``y`` is the token the model
  picks next. Head ``(l, h)`` is credited ``1 / |span|`` when its top-1 attention position ``i``
  (over everything the query sees) lies in the answer's span of the prompt and the prompt's token
  there equals ``y``. The span is the first window of ``|answer|`` prompt tokens holding more than
  90% of the answer's distinct tokens (none found: nothing is credited);
* the filter: a trial is recorded when the answer's ROUGE-1 recall of the reference answer, with
  stemming (``rouge-score``), is above 50 (percent). A head's scores are its credits in the
  recorded trials: ``{"layer-head": [score per recorded trial]}``, the official file format;
* the grid: 3 needles, each with its own haystack, x 20 context lengths (``round(linspace(min, max,
  20))``) x 10 depths (``round(linspace(0, 100, 10))``): 600 trials.

The shipped haystacks are the book text of the official detection's three haystack files:
chapters of *The Last of the Mohicans* (J. F. Cooper, 1826; two excerpts) and of *Dracula* (B.
Stoker, 1897), both in the public domain. The official files are JSON pages of a book-summary
dataset; their JSON syntax, summaries and prompt scaffolding are left out here. The three needles,
questions and answers are the official ones. A haystack shorter than a trial needs is repeated,
as the official script repeats its files.

Where this differs from the official script, and why:

* the official script encodes the haystack and the needle with special tokens (LLaMA's tokenizer
  puts BOS before each) and decodes them into the prompt's text; here both are encoded without
  special tokens, so the prompt holds no stray BOS;
* the official script stops at LLaMA's ``<0x0A>`` token or Qwen's id 144 (its newline tokens) and
  moves the needle after LLaMA's two period ids; here any token whose text holds a newline stops the
  answer and any token that decodes to ``.`` is a sentence end, so every tokenizer works;
* attention weights come from the text backbone's eager attention for the answer steps (switched
  on for them and restored afterwards), in the model's own dtype; the prefill runs with the model's
  attention implementation (the official code uses flash attention for both).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .. import compat
from ..adapters import adapter_for
from ..attention import EAGER_HOOK_NAME, HOOK_NAME

HAYSTACK_DIR = Path(__file__).with_name("haystack")
QUESTION = "Based on the content of the book, Question: {question}\nAnswer:"
BUFFER = 200  # tokens of each context length left for the question and the answer
DEFAULT_MIN_LENGTH = 1000
DEFAULT_MAX_LENGTH = 50000
LENGTHS = 20
DEPTHS = 10
MAX_NEW_TOKENS = 50
MIN_RECALL = 50.0  # percent


@dataclasses.dataclass(frozen=True)
class Needle:
    """A needle sentence, the question it answers, the reference answer and the haystack it hides in."""

    text: str
    question: str
    answer: str
    haystack: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One prompt: its token ids and the answer's span ``[start, end)`` in them (``(-1, -1)``: not found)."""

    input_ids: tuple[int, ...]
    span: tuple[int, int]
    length: int
    depth: int


@dataclasses.dataclass(frozen=True)
class Answer:
    """What one trial gave: the answer, its ROUGE-1 recall (percent) and the heads' credits ``(layers, heads)``."""

    text: str
    recall: float
    scores: torch.Tensor


# ---- needles and haystacks --------------------------------------------------------------------------------


def read_needles(path: str | os.PathLike | None = None, haystack: str | os.PathLike | None = None) -> list[Needle]:
    """The needles of a JSON-lines file (``needle``, ``question`` and ``answer``, or the official
    ``real_needle``; ``haystack``: a text file or folder beside it), the shipped ones by default.
    ``haystack`` (a text file, or a folder whose ``.txt`` files are read in name order) replaces every
    needle's own haystack. Raises ``ValueError`` naming what is missing or malformed."""
    path = Path(path) if path is not None else HAYSTACK_DIR / "needles.jsonl"
    if not path.is_file():
        raise ValueError(f"needles file not found: {path}")
    shared = read_haystack(haystack) if haystack is not None else None
    needles = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not JSON ({err})") from None
        answer = row.get("answer", row.get("real_needle")) if isinstance(row, dict) else None
        fields = (row.get("needle"), row.get("question"), answer) if isinstance(row, dict) else (None,)
        if not all(isinstance(v, str) and v.strip() for v in fields):
            raise ValueError(f"{where}: needs non-empty 'needle', 'question' and 'answer' (or 'real_needle') strings")
        if shared is None:
            if not isinstance(row.get("haystack"), str):
                raise ValueError(f"{where}: names no 'haystack' file; give one, or pass --haystack")
            text = read_haystack(path.parent / row["haystack"])
        else:
            text = shared
        needles.append(Needle(row["needle"], row["question"], answer, text))
    if not needles:
        raise ValueError(f"{path}: no needles")
    return needles


def read_haystack(path: str | os.PathLike) -> str:
    """The text of a file, or of a folder's ``.txt`` files in name order."""
    path = Path(path)
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"haystack not found: {path} (a text file, or a folder of .txt files)")
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    if not text.split():
        raise ValueError(f"haystack {path} holds no text")
    return text


def grid(minimum: int, maximum: int, lengths: int = LENGTHS, depths: int = DEPTHS) -> tuple[list[int], list[int]]:
    """The official grid: ``round(linspace(minimum, maximum, lengths))`` context lengths and
    ``round(linspace(0, 100, depths))`` depth percents (duplicates kept, as there)."""
    spread = lambda low, high, n: [round(v) for v in torch.linspace(low, high, n, dtype=torch.float64).tolist()]
    return spread(minimum, maximum, lengths), spread(0, 100, depths)


# ---- prompts ----------------------------------------------------------------------------------------------


class Prompter:
    """Builds each trial's prompt for one tokenizer (and chat template, when one is given)."""

    def __init__(self, tokenizer, chat_template_owner=None):
        self.tokenizer = tokenizer
        self.chat = chat_template_owner if getattr(chat_template_owner, "chat_template", None) else None
        self._periods: dict[int, bool] = {}
        self._haystacks: dict[int, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def is_period(self, token: int) -> bool:
        if token not in self._periods:
            self._periods[token] = self.tokenizer.decode([token]).strip() == "."
        return self._periods[token]

    def haystack_ids(self, text: str, length: int) -> list[int]:
        """At least ``length`` tokens of ``text``, repeated as often as needed (kept for the next trial)."""
        ids = self._haystacks.get(id(text), [])
        repeats = max(1, -(-length // max(len(text.split()), 1)))
        while len(ids) < length:
            ids = self.encode("\n".join([text] * repeats))
            repeats += 1
        self._haystacks[id(text)] = ids
        return ids

    def context_ids(self, needle: Needle, length: int, depth: int) -> list[int]:
        """The haystack cut for a context length of ``length`` with the needle at ``depth`` percent."""
        needle_ids = self.encode(needle.text)
        room = length - BUFFER
        if room <= len(needle_ids):
            raise ValueError(
                f"a context length of {length} leaves {room} tokens after the {BUFFER}-token buffer, "
                f"no room for the {len(needle_ids)}-token needle; use a larger --min-length"
            )
        context = self.haystack_ids(needle.haystack, room)[: room - len(needle_ids)]
        return insert_needle(context, needle_ids, depth, self.is_period)

    def prompt_ids(self, context: str, question: str) -> list[int]:
        """The prompt around the decoded context: plain text with the tokenizer's own special tokens, or
        the chat template's user turn (BOS first when the tokenizer has one and the template does not)."""
        asked = QUESTION.format(question=question)
        if self.chat is None:
            return list(self.tokenizer(context + asked, verbose=False)["input_ids"])
        messages = [{"role": "user", "content": [{"type": "text", "text": f"<book>{context}</book>\n{asked}"}]}]
        text = self.chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.encode(text[0] if isinstance(text, list) else text)
        bos = self.tokenizer.bos_token_id
        return [bos, *ids] if bos is not None and (not ids or ids[0] != bos) else ids

    def trial(self, needle: Needle, length: int, depth: int) -> Trial:
        context = self.tokenizer.decode(self.context_ids(needle, length, depth))
        ids = self.prompt_ids(context, needle.question)
        return Trial(tuple(ids), answer_span(ids, self.encode(needle.answer)), length, depth)


def insert_needle(
    context: Sequence[int], needle: Sequence[int], depth: int, is_period: Callable[[int], bool]
) -> list[int]:
    """``context`` with ``needle`` inserted at ``depth`` percent of it, moved back to just after the
    nearest earlier sentence end (the start when there is none); at 100 it goes at the end."""
    context = list(context)
    if depth >= 100:
        return context + list(needle)
    point = int(len(context) * depth / 100)
    while point > 0 and not is_period(context[point - 1]):
        point -= 1
    return context[:point] + list(needle) + context[point:]


def answer_span(prompt: Sequence[int], answer: Sequence[int]) -> tuple[int, int]:
    """The first window ``[i, i + len(answer))`` of ``prompt`` that holds more than 90% of the
    answer's distinct tokens, ``(-1, -1)`` when there is none (the official ``find_needle_idx``)."""
    wanted = set(answer)
    for i in range(len(prompt)):
        if len(set(prompt[i : i + len(answer)]) & wanted) / len(wanted) > 0.9:
            return i, i + len(answer)
    return -1, -1


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of ``reference`` by ``response`` in percent, with stemming (``rouge-score``)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError(
            "the official protocol scores answers with rouge-score: pip install 'halluguard[calibrate]'"
        ) from None
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return 100 * scorer.score(reference, response)["rouge1"].recall


# ---- answering and crediting ------------------------------------------------------------------------------


def credit(tops: torch.Tensor, token: int, prompt: Sequence[int], span: tuple[int, int]) -> torch.Tensor:
    """One answer step's credit per head: ``1 / |span|`` where the head's top-1 position ``tops[l, h]``
    lies in ``span`` and the prompt's token there is ``token``, else 0."""
    start, end = span
    if start < 0:
        return torch.zeros(tops.shape, dtype=torch.float64)
    inside = (tops >= start) & (tops < end)
    ids = torch.tensor(prompt)
    hit = inside & (ids[tops.clamp(0, len(prompt) - 1)] == token)
    return hit.double() / (end - start)


@torch.no_grad()
def answer_trial(
    model: nn.Module, trial: Trial, max_new_tokens: int, stops: Callable[[int], bool]
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """``(tokens, tops, scores)``: the greedy answer, each step's top-1 attention position per head
    ``(steps, layers, heads)`` and the heads' summed credits ``(layers, heads)``.

    The prompt without its last token is prefilled with the model's attention implementation; the
    answer steps run with eager attention (weights read by forward hooks), starting from that last
    token; the answer stops after a token for which ``stops`` holds."""
    adapter = adapter_for(model)
    previous = adapter.text_attn_implementation()
    device = next(model.parameters()).device
    prompt = torch.tensor([trial.input_ids], device=device)
    cache, fed = compat.cache_of(model(input_ids=prompt[:, :-1], use_cache=True)), prompt[:, -1:]
    rows: list[torch.Tensor | None] = [None] * adapter.num_layers

    def read(index, output):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the attention module returned no weights; the text backbone must use eager attention")
        rows[index] = weights[0, :, -1, :].argmax(-1).cpu()

    handles = [
        module.register_forward_hook(lambda m, a, o, i=i: read(i, o))
        for i, module in enumerate(adapter.attention_modules())
    ]
    tokens, tops, scores = [], [], None
    adapter.set_text_attn_implementation("eager")
    try:
        for _ in range(max_new_tokens):
            output = model(input_ids=fed, use_cache=True, **{compat.CACHE: cache})
            cache, token = compat.cache_of(output), int(output.logits[0, -1].argmax())
            step = torch.stack(rows)  # (layers, heads)
            tokens.append(token)
            tops.append(step)
            gained = credit(step, token, trial.input_ids, trial.span)
            scores = gained if scores is None else scores + gained
            if stops(token):
                break
            fed = torch.tensor([[token]], device=device)
    finally:
        for handle in handles:
            handle.remove()
        adapter.set_text_attn_implementation(previous or "sdpa")
    return tokens, torch.stack(tops), scores


def detect(
    model: nn.Module,
    prompter: Prompter,
    needles: Sequence[Needle],
    lengths: Sequence[int],
    depths: Sequence[int],
    max_new_tokens: int = MAX_NEW_TOKENS,
    min_recall: float = MIN_RECALL,
    progress: bool = True,
) -> tuple[dict[str, list[float]], list[Answer]]:
    """``(heads, answers)``: the official ``{"layer-head": [score per recorded trial]}`` and every
    trial's answer, needle by needle, then length by length, then depth by depth (the official order).
    A trial is recorded when its recall is above ``min_recall`` (every trial when it is 0). Raises
    ``ValueError`` when no trial is recorded."""
    from tqdm import tqdm

    adapter = adapter_for(model)
    if adapter.text_attn_implementation() in (HOOK_NAME, EAGER_HOOK_NAME):
        raise ValueError("the text attention is halluguard's (a wrapped model?); calibrate the unwrapped model")
    tokenizer = prompter.tokenizer
    stops = lambda token: "\n" in tokenizer.decode([token])
    answers: list[Answer] = []
    recorded: list[torch.Tensor] = []
    trials = [(needle, length, depth) for needle in needles for length in lengths for depth in depths]
    for needle, length, depth in tqdm(trials, desc="retrieval heads", unit="trial", disable=not progress):
        trial = prompter.trial(needle, length, depth)
        tokens, _, scores = answer_trial(model, trial, max_new_tokens, stops)
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        answer = Answer(text, rouge1_recall(needle.answer, text), scores)
        answers.append(answer)
        if answer.recall > min_recall or min_recall == 0:
            recorded.append(scores)
    if not recorded:
        best = max(a.recall for a in answers)
        raise ValueError(
            f"no answer recalled the needle in {len(answers)} trials (best ROUGE-1 recall {best:.1f}, needed > "
            f"{min_recall:g}); the model cannot answer from this context. Use shorter contexts (--max-length), "
            "or --min-recall 0 to record every trial"
        )
    table = torch.stack(recorded, -1)  # (layers, heads, recorded trials)
    heads = {
        f"{layer}-{head}": [float(v) for v in table[layer, head]]
        for layer in range(table.shape[0])
        for head in range(table.shape[1])
    }
    return heads, answers


# ---- command line -----------------------------------------------------------------------------------------


def main(
    model_spec: str,
    out: str,
    needles_file: str | None = None,
    haystack: str | None = None,
    min_length: int | None = None,
    max_length: int | None = None,
    lengths: int = LENGTHS,
    depths: int = DEPTHS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    min_recall: float = MIN_RECALL,
    chat_template: bool = True,
    show: int = 10,
) -> int:
    from ..models import load_model
    from ..outputs import output_file, write_atomic
    from .retrieval_heads import max_positions, ranked_heads

    target = output_file(out)  # checked before the model loads
    needles = read_needles(needles_file, haystack)
    rouge1_recall("a", "a")  # rouge-score installed?
    model, processor, name = load_model(model_spec)
    tokenizer = getattr(processor, "tokenizer", processor)
    limit = max_positions(model)
    low, high = context_range(name, limit, min_length, max_length)
    length_grid, depth_grid = grid(low, high, lengths, depths)
    prompter = Prompter(tokenizer, processor if chat_template else None)
    adapter = adapter_for(model, processor)
    print(
        f"{name}: {len(needles)} needles x {lengths} context lengths ({low}-{high} tokens) x {depths} depths = "
        f"{len(needles) * lengths * depths} trials; {adapter.num_layers} layers x {adapter.num_heads} heads; "
        f"{'chat template' if prompter.chat is not None else 'plain prompt'}"
    )
    heads, answers = detect(model, prompter, needles, length_grid, depth_grid, max_new_tokens, min_recall)
    kept = len(next(iter(heads.values())))
    mean_recall = sum(a.recall for a in answers) / len(answers)
    print(f"ROUGE-1 recall {mean_recall:.1f} on average; {kept} of {len(answers)} trials recorded (> {min_recall:g})")
    for needle, answer in zip(needles, answers[:: lengths * depths]):
        shown = answer.text if len(answer.text) <= 80 else answer.text[:77] + "..."
        print(f"  {needle.question!r} at {low} tokens, depth 0: {shown!r} (recall {answer.recall:.0f})")
    top = ranked_heads(heads)[:show]
    print(
        "top heads (layer-head: mean score): " + ", ".join(f"{layer}-{head}: {score:.3f}" for layer, head, score in top)
    )
    write_atomic(target, json.dumps(heads) + "\n")  # one line, as the official files (read with readline)
    print(f"saved: {out}")
    return 0


def context_range(name: str, limit: int | None, minimum: int | None, maximum: int | None) -> tuple[int, int]:
    """The context lengths' range: the given bounds, else 1000 up to 50000 or the model's context."""
    if maximum is None:
        maximum = DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    minimum = minimum if minimum is not None else min(DEFAULT_MIN_LENGTH, maximum)
    if minimum > maximum:
        raise ValueError(f"--min-length {minimum} is above --max-length {maximum}")
    if minimum <= BUFFER:
        raise ValueError(f"--min-length {minimum}: each context leaves {BUFFER} tokens for the question; use more")
    if limit is not None and maximum > limit:
        raise ValueError(f"--max-length {maximum} is above {name}'s {limit}-token context; use at most {limit}")
    return minimum, maximum
