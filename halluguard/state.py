"""Per-stream state of one guarded call: key groups of every row, positions, and each method's data.

A guarded ``generate`` (or ``Guard.forward``) runs one *main* stream, the rows the caller gave,
and possibly extra streams that methods ask for (see ``halluguard.decoding``). Each stream has a
``GuardState``: made fresh for the call and dropped when it returns, so nothing stays on the model
between calls. Key groups come from the stream's full ``input_ids`` and ``attention_mask``; the
session tells the state where each forward starts (the cache's true length, so chunked prefill,
continued caches and cropped caches are all placed right); the attention hook asks it for the
edits of each call.

Each method keeps its per-call data in a typed object it creates (``Method.new_call_state``); the
state owns these objects (``state.data_of(method)``), so concurrent models and successive calls
never share them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .attention.derived import Derived
from .attention.edits import AttentionCall, AttentionEdit

if TYPE_CHECKING:
    from .adapters import Adapter


class MethodHooks(Protocol):
    """What a stream's state calls on each of its methods (``halluguard.methods.base.Method``
    implements it; the methods depend on the state, not the other way round)."""

    name: str
    reads_layer_inputs: bool
    reads_layer_outputs: bool
    edits_mlp_outputs: bool
    edits_vision_mlp_outputs: bool
    edits_input_embeds: bool
    edits_next_logits: bool
    augments_next_logits: bool
    projects_rows: bool

    def new_call_state(self) -> Any: ...
    def on_prompt(self, state: GuardState) -> None: ...
    def streams(self, state: GuardState, inputs: dict[str, Any]) -> list[Any]: ...
    def attention_edit(self, state: GuardState, call: AttentionCall) -> AttentionEdit | None: ...
    def on_stats(self, state: GuardState, call: AttentionCall, stats: dict[str, torch.Tensor]) -> None: ...
    def head_scale_from_stats(self, state: GuardState, call: AttentionCall) -> torch.Tensor | None: ...
    def edit_input_embeds(self, state: GuardState, embeds: torch.Tensor) -> torch.Tensor | None: ...
    def next_token_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor: ...
    def on_layer_input(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None: ...
    def rows_to_project(self, state: GuardState) -> torch.Tensor | None: ...
    def on_projected_rows(self, state: GuardState, logits: torch.Tensor) -> None: ...
    def on_layer_output(self, state: GuardState, layer_idx: int, hidden_states: torch.Tensor) -> None: ...
    def edit_mlp_output(
        self, state: GuardState, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None: ...
    def edit_vision_mlp_output(
        self, state: GuardState, layer_idx: int, output: torch.Tensor
    ) -> torch.Tensor | None: ...
    def augment_next_logits(self, state: GuardState, logits: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class KeyGroups:
    """Named key sets of every batch row, over absolute token positions.

    ``image``     the image (visual) tokens of the prompt;
    ``context``   every real (non-padding) prompt token, image included (Lookback Lens' context);
    ``text``      prompt tokens that are not image tokens;
    ``generated`` every token after the prompt that exists so far.
    Padding, and cache slots not yet filled (static caches), belong to no group.
    """

    image: torch.Tensor  # (B, P) bool
    valid: torch.Tensor  # (B, P) bool: not padding
    prompt_len: int

    @property
    def batch(self) -> int:
        return self.image.shape[0]

    def repeat_rows(self, factor: int) -> KeyGroups:
        """Rows repeated as ``generate`` expands them for beams or several sequences per prompt."""
        return KeyGroups(
            self.image.repeat_interleave(factor, 0), self.valid.repeat_interleave(factor, 0), self.prompt_len
        )

    def select_rows(self, index: torch.Tensor) -> KeyGroups:
        """The groups of rows ``index`` (a loop that forwards a subset or repeats of the rows)."""
        index = index.to(self.image.device)
        return KeyGroups(self.image[index], self.valid[index], self.prompt_len)

    def masks(self, kv_len: int, key_offset: int, seen: int) -> dict[str, torch.Tensor]:
        """Masks ``(B, kv_len)`` of each group for keys at positions ``key_offset + j``, of which only
        positions below ``seen`` (tokens processed so far) hold a token."""
        end = key_offset + kv_len
        width = max(end, self.prompt_len)
        pos = torch.arange(width, device=self.image.device)
        filled = pos < seen
        pad = width - self.prompt_len
        image = torch.nn.functional.pad(self.image, (0, pad))
        valid = torch.nn.functional.pad(self.valid, (0, pad))
        generated = (pos >= self.prompt_len) & filled
        window = slice(key_offset, end)
        image, context, generated = image[:, window], (valid & filled)[:, window], generated[None, window]
        generated = generated.expand(self.batch, -1)
        return {"image": image, "context": context, "text": context & ~image, "generated": generated}


@dataclasses.dataclass(frozen=True)
class StreamRole:
    """Which stream a state serves: the caller's rows (``main``), rows riding along the prompt's forward
    only (``probe``), or a contrast stream that follows the whole generation (``branch``); ``owner`` is
    the method that asked for a probe or branch."""

    kind: str = "main"  # "main" | "probe" | "branch"
    owner: MethodHooks | None = None

    def is_probe_of(self, method: MethodHooks) -> bool:
        return self.kind == "probe" and self.owner is method


MAIN = StreamRole()


class GuardState:
    """Everything one stream of a guarded call knows and collects."""

    def __init__(
        self,
        adapter: Adapter,
        methods: list[MethodHooks],
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        for_generation: bool = True,
        role: StreamRole = MAIN,
        shared_data: dict[MethodHooks, Any] | None = None,
    ):
        self.adapter = adapter
        self.methods = list(methods)
        self.for_generation = for_generation
        self.role = role
        self.groups: KeyGroups | None = None
        self.image_spans: list[list[tuple[int, int]]] | None = None
        self.past_len = 0  # tokens before the current forward (the cache's length)
        self.seen_tokens = 0  # tokens up to and including the current forward
        self.forwards = 0
        # Absent leading tokens: a stream whose compact prompt is prefilled on its own, then joins a
        # longer cache left-padded, sees its keys at positions shifted by this many (see decoding.session).
        self.position_offset = 0
        # Padding columns the guard put before the caller's prompt (its layout is that much wider than
        # the caller's sequences: ``decoding.session``, a branch prompt longer than the main one).
        self.guard_padding = 0
        # the branch streams of the call, by owner (set on the main stream's state): each gives its
        # next-token logits with ``next_logits(input_ids)`` (``halluguard.decoding.streams.BranchRun``)
        self.branches: dict[MethodHooks, Any] = {}
        # the tensors the caller passed (pixel_values and the like: generate hands the model's forward
        # encoder outputs instead, so a branch with its own image inputs builds them from these)
        self.call_inputs: dict[str, torch.Tensor] = {}
        shared = shared_data or {}
        self._data: dict[MethodHooks, Any] = {m: shared[m] if m in shared else m.new_call_state() for m in self.methods}
        self._mask_cache: tuple[tuple, dict[str, torch.Tensor]] | None = None
        # tensors made once from tensors that many attention calls share (a forward's mask; a method's
        # per-forward edit tensors, made from ``group_masks``): ``derived.get(name, sources, make)``
        self.derived = Derived()
        # rows chosen by a decoding loop (``select_rows``): forward row i is row ``row_index[i]`` of the
        # layout the prompt's forward had (``_prompt_rows``: its groups and image spans)
        self.row_index: torch.Tensor | None = None
        self._prompt_rows: tuple[KeyGroups, list] | None = None
        if input_ids is not None:
            self._set_prompt(input_ids, attention_mask)

    def data_of(self, method: MethodHooks) -> Any:
        """The per-call data object of ``method`` (made by its ``new_call_state``)."""
        return self._data[method]

    def _set_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.to(device=input_ids.device).bool()
            if self.for_generation and bool((~valid[:, -1]).any()):
                raise ValueError(
                    "right-padded batch: generation needs left padding (set processor.tokenizer.padding_side = 'left')"
                )
        else:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        if self.position_offset:
            # the stream's keys sit after position_offset absent (padding) positions
            valid = torch.nn.functional.pad(valid, (self.position_offset, 0))
            input_ids = torch.nn.functional.pad(input_ids, (self.position_offset, 0), value=-1)
        image = self.adapter.image_mask(input_ids) & valid
        self.groups = KeyGroups(image=image, valid=valid, prompt_len=input_ids.shape[1])
        self.image_spans = self.adapter.image_spans(torch.where(valid, input_ids, -1))

    def with_2d_mask(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` of the prompt's forward with its 2-D padding mask: static and compiled caches hand
        the model a prepared (4-D or per-layer) mask instead, which the stream builders cannot read."""
        mask = inputs.get("attention_mask")
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return inputs
        return dict(inputs, attention_mask=self.groups.valid.long().to(inputs["input_ids"].device))

    def require_left_padding(self, who: str) -> None:
        """Refuse a prompt whose last position is padding in some row (``who`` acts on that position)."""
        if self.groups is not None and not bool(self.groups.valid[:, -1].all()):
            raise ValueError(
                f"{who} acts on each row's last prompt position, which is padding in a right-padded "
                "batch: pad on the left (processor.tokenizer.padding_side = 'left')"
            )

    @property
    def in_prefill(self) -> bool:
        """The current forward's tokens start inside the prompt."""
        return self.past_len < self.prompt_len

    @property
    def prompt_len(self) -> int:
        return self.groups.prompt_len if self.groups is not None else 0

    @property
    def caller_prompt_len(self) -> int:
        """The prompt's length in the caller's sequences (``prompt_len`` less the guard's padding)."""
        return self.prompt_len - self.guard_padding

    # ---- fed by the session, once per forward ---------------------------------------------------
    def on_forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache_len: int,
        num_new: int,
        batch: int,
    ) -> None:
        """Record one forward of ``num_new`` tokens after ``cache_len`` cached ones."""
        past_len = cache_len + self.position_offset
        if self.groups is None:
            if input_ids is None or past_len - self.position_offset:
                raise ValueError(
                    "halluguard reads image positions from input_ids: call with the full input_ids "
                    "(inputs_embeds alone, or a cache without its ids, cannot be mapped)"
                )
            self._set_prompt(input_ids, attention_mask)
        if batch != self.groups.batch:
            if batch % self.groups.batch:
                raise ValueError(f"forward batch {batch} does not extend the prompt batch {self.groups.batch}")
            factor = batch // self.groups.batch
            self.groups = self.groups.repeat_rows(factor)
            self.image_spans = [s for s in self.image_spans for _ in range(factor)]
        first = self.forwards == 0
        self.past_len, self.seen_tokens = past_len, past_len + num_new
        self.forwards += 1
        if first:
            for method in self.methods:
                method.on_prompt(self)

    def select_rows(self, index: torch.Tensor | None) -> None:
        """Make the next forwards' rows the rows ``index`` of the prompt forward's layout (a decoding
        loop that runs some rows, or each row several times; ``None``: that layout again). Methods
        map their per-row data with ``rows_of``."""
        if self._prompt_rows is None:
            if self.groups is None:
                raise RuntimeError("select_rows needs the prompt's forward first")
            self._prompt_rows = (self.groups, self.image_spans)
        groups, spans = self._prompt_rows
        self.row_index = None if index is None else index.to(groups.image.device)
        if index is None:
            self.groups, self.image_spans = groups, spans
        else:
            self.groups = groups.select_rows(self.row_index)
            self.image_spans = [spans[i] for i in self.row_index.tolist()]
        self._mask_cache = None

    def rows_of(self, per_row: torch.Tensor) -> torch.Tensor:
        """``per_row`` (made at the prompt's forward, one entry per row) for the current forward's rows."""
        if self.row_index is None:
            return per_row
        return per_row[self.row_index.to(per_row.device)]

    def set_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        """Name the stream's whole prompt before its first forward (a stream whose first forward
        feeds only the prompt's last token, its other tokens already in the cache)."""
        self._set_prompt(input_ids, attention_mask)

    def edit_input_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """The text backbone's input embeddings of this stream's rows, after the methods' edits."""
        for method in self.methods:
            if method.edits_input_embeds:
                edited = method.edit_input_embeds(self, embeds)
                embeds = embeds if edited is None else edited
        return embeds

    def adjust_next_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The next-token logits ``(rows, vocab)`` after the methods that change them: first those that
        mix in logits read inside the forward, then the contrasts, each in order."""
        for method in self.methods:
            if method.augments_next_logits:
                logits = method.augment_next_logits(self, logits)
        for method in self.methods:
            if method.edits_next_logits:
                logits = method.next_token_logits(self, logits)
        return logits

    def requested_streams(self, inputs: dict[str, Any]) -> list[Any]:
        """The extra streams this stream's methods ask for, given its first forward's inputs."""
        return [spec for method in self.methods for spec in method.streams(self, inputs)]

    def layer_input(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Hand the residual stream entering a decoder layer to the methods that read it."""
        for method in self.methods:
            if method.reads_layer_inputs:
                method.on_layer_input(self, layer_idx, hidden)

    def layer_output(self, layer_idx: int, hidden: torch.Tensor) -> None:
        """Hand the residual stream leaving a decoder layer to the methods that read it."""
        for method in self.methods:
            if method.reads_layer_outputs:
                method.on_layer_output(self, layer_idx, hidden)

    def edit_mlp_output(self, layer_idx: int, mlp_input: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A decoder layer's feed-forward output of this stream's rows, after the methods' edits."""
        for method in self.methods:
            if method.edits_mlp_outputs:
                edited = method.edit_mlp_output(self, layer_idx, mlp_input, output)
                output = output if edited is None else edited
        return output

    def edit_vision_mlp_output(self, layer_idx: int, output: torch.Tensor) -> torch.Tensor:
        """A vision encoder layer's feed-forward output, after the methods' edits."""
        for method in self.methods:
            if method.edits_vision_mlp_outputs:
                edited = method.edit_vision_mlp_output(self, layer_idx, output)
                output = output if edited is None else edited
        return output

    def rows_to_project(self) -> list[tuple[MethodHooks, torch.Tensor]]:
        """The rows this stream's methods project with the output embeddings in the current forward."""
        return [(m, rows) for m in self.methods if m.projects_rows and (rows := m.rows_to_project(self)) is not None]

    @property
    def changes_next_logits(self) -> bool:
        """Whether a method of this stream changes its next-token logits (a contrast or a mix)."""
        return any(m.edits_next_logits or m.augments_next_logits for m in self.methods)

    # ---- used by the attention hook -------------------------------------------------------------
    def group_masks(self, call: AttentionCall) -> dict[str, torch.Tensor]:
        """Key-group masks for a call, computed once per forward and shared by its layers."""
        key = (call.kv_len, call.key_offset, self.seen_tokens, call.device)
        if self._mask_cache is None or self._mask_cache[0] != key:
            masks = self.groups.masks(call.kv_len, call.key_offset, self.seen_tokens)
            self._mask_cache = (key, {name: m.to(call.device) for name, m in masks.items()})
        return self._mask_cache[1]

    def describe_call(self, layer_idx: int, rows: int, query: torch.Tensor, key: torch.Tensor) -> AttentionCall:
        """The call on ``rows`` of its rows (``query`` and ``key``: the whole call's) as this stream sees it."""
        q_len, kv_len = query.shape[2], key.shape[2]
        # A sliding-window cache holds fewer keys than tokens seen: key j is then token offset + j.
        # A static cache holds more (empty slots): key j is token j.
        offset = max(self.seen_tokens - kv_len, 0)
        return AttentionCall(
            layer_idx=layer_idx,
            batch=rows,
            num_heads=query.shape[1],
            q_len=q_len,
            kv_len=kv_len,
            key_offset=offset,
            query_start=self.seen_tokens - q_len,
            is_prefill=self.in_prefill,
            device=query.device,
        )

    def edits_for(self, call: AttentionCall) -> list[tuple[MethodHooks, AttentionEdit]]:
        """The edits every method of this stream asks of ``call`` (phase one of the call)."""
        requests = []
        for method in self.methods:
            edit = method.attention_edit(self, call)
            if edit is not None:
                requests.append((method, edit))
        return requests

    def deliver(self, call: AttentionCall, method: MethodHooks, stats: dict[str, torch.Tensor]) -> None:
        """Hand ``method`` the statistics it asked ``call`` for."""
        method.on_stats(self, call, stats)

    def branch_logits(self, owner: MethodHooks, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` of ``owner``'s branch stream: for the main rows
        ``input_ids`` (from a logits processor), or, without them, those of the forward that just
        ran (from ``Method.next_token_logits``)."""
        branch = self.branches.get(owner)
        if branch is None:
            raise RuntimeError(f"{owner.name} has no branch in this call")
        return branch.next_logits(input_ids)

    def late_head_scale(self, call: AttentionCall, method: MethodHooks) -> torch.Tensor | None:
        """Phase two of a call: the head scale ``method`` chose from the call's statistics (``(B, H)``)."""
        return method.head_scale_from_stats(self, call)
