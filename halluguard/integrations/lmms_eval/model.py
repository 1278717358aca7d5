"""The lmms-eval chat model ``halluguard``: any image-text-to-text model, wrapped with halluguard.

``--model_args`` (values arrive as strings; JSON in braces survives lmms-eval's comma split):

* ``pretrained``: a hub id, a local folder, or ``testbed`` (the shipped test model);
* ``methods``: a method spec, e.g. ``pai`` or ``pai+vhr`` (default: none, the plain model);
* ``config``: JSON of config overrides, ``{"field": v}`` for one method or
  ``{"method": {"field": v}}`` per method (or the path of such a JSON file);
* ``device`` (default: this process's GPU under a launcher, else the GPU if any, else CPU),
  ``dtype`` (``auto``, ``fp32``/``float32``, ``fp16``/``float16``, ``bf16``/``bfloat16``);
* ``max_new_tokens``: overrides each task's own (default: the task's, else 1024);
* ``num_beams``: overrides the task's (default: a beam-search method's own count, e.g. OPERA's 5,
  where the task asks for one beam; else the task's).

The batch size is lmms-eval's ``--batch_size`` (an integer; ``auto`` is not supported). A batch
holds requests with the same generation settings, left-padded in one processor call; answers do
not depend on the batch size (up to floating-point noise). Each task's ``do_sample``,
``temperature`` and ``top_p`` are kept; its ``until`` strings cut the answer. The methods' own
default decoding (e.g. VCD's sampling) applies only where neither the task nor the arguments choose.
Multi-round tasks are answered round by round, each round a fresh prompt of the task's messages.

What ran (halluguard's version, the model, each method's full config) is logged when the model
loads and is :attr:`Halluguard.record`; lmms-eval's results record ``model_args``, and, when a
:class:`Halluguard` instance is passed to ``simple_evaluate``, its name (:attr:`Halluguard.name`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from ..._version import __version__
from ...api import wrap
from ...models import DTYPES, chat_prompt, encode, load_model
from ...registry import configs_from_spec, method_beams

DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", **{d: d for d in DTYPES}}
DEFAULT_MAX_NEW_TOKENS = 1024  # lmms-eval's models' default when a task names none


def _count(value: Any, name: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = None
    if count is None or count < 1 or str(value).strip() not in (str(count), f"{count}.0"):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return count


class Halluguard(lmms):
    """A transformers image-text-to-text model with halluguard methods, for lmms-eval's chat tasks."""

    is_simple = False

    def __init__(
        self,
        pretrained: str = "testbed",
        methods: str | None = None,
        config: str | dict | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str | None = None,
        num_beams: int | str | None = None,
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args {sorted(unknown)}; halluguard takes pretrained, methods, config, device, dtype, "
                "max_new_tokens, num_beams (and lmms-eval's --batch_size)"
            )
        if str(dtype) not in DTYPE_NAMES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {dtype!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size 'auto' is not supported: give --batch_size N")
        self.batch_size_per_gpu = _count(batch_size, "batch_size", allow_none=False)
        self.max_new_tokens = _count(max_new_tokens, "max_new_tokens")
        self.num_beams = _count(num_beams, "num_beams")
        spec = "" if methods in (None, False) else str(methods)
        configs = configs_from_spec(spec, config, method_option="methods", config_option="config")
        self.method_beams = method_beams(configs)

        model, processor, name = load_model(str(pretrained), dtype=DTYPE_NAMES[str(dtype)], device=device)
        processor.tokenizer.padding_side = "left"
        self.model, self.processor = model, processor
        self.guard = wrap(model, processor, configs) if configs else None
        self.record = {
            "halluguard": __version__,
            "pretrained": name,
            "dtype": str(model.dtype),
            "methods": [c.to_dict() for c in configs],
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
        }
        described = "+".join(c.name for c in configs) or "none"
        self.name = f"halluguard {__version__} {described} on {name}"
        self.config = SimpleNamespace(_name_or_path=self.name)  # what lmms-eval names a model instance by
        logger.info(f"halluguard model: {json.dumps(self.record)}")

    # ---- what lmms-eval reads ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def clean(self) -> None:
        """lmms-eval's end of a run: the model is restored, then released."""
        if self.guard is not None and self.guard.wrapped:
            self.guard.unwrap()
        super().clean()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Never called for this model: lmms-eval gives a chat model (``is_simple = False``) its tasks
        as message tasks, which make generation requests only (log-likelihood tasks are refused when
        they are built)."""
        raise NotImplementedError(
            "halluguard answers generation tasks; lmms-eval builds no log-likelihood requests for chat models"
        )

    # ---- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answers in request order (batched as :meth:`_answer_all` says)."""
        items = []
        for request in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            items.append((*self._messages(doc_to_messages(self.task_dict[task][split][doc_id])), gen_kwargs))
        return self._answer_all(items, "halluguard answering")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's answers, round by round: round 0 asks ``doc_to_messages(doc)``, round ``k``
        asks ``doc_to_messages(doc, round_idx=k, previous_output=<answers so far>,
        previous_round_info=...)``, whose ``(messages, terminal, previous_output, round_info)`` ends the
        request when ``terminal`` (or when it is not such a tuple). Every round is a fresh prompt
        (the task's messages carry whatever history it wants); requests still going are answered
        together, round by round."""
        docs, outputs, infos = [], [[] for _ in requests], [None] * len(requests)
        pending = []
        for index, request in enumerate(requests):
            _, doc_to_messages, gen_kwargs, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            docs.append((doc_to_messages, doc, gen_kwargs))
            pending.append((index, self._messages(doc_to_messages(doc))))
        round_idx = 0
        while pending:
            items = [(*messages, docs[index][2]) for index, messages in pending]
            answers = self._answer_all(items, f"halluguard answering, round {round_idx}")
            round_idx += 1
            still = []
            for (index, _), answer in zip(pending, answers):
                outputs[index].append(answer.text)
                doc_to_messages, doc, _ = docs[index]
                payload = doc_to_messages(
                    doc, round_idx=round_idx, previous_output=list(outputs[index]), previous_round_info=infos[index]
                )
                if isinstance(payload, tuple) and len(payload) == 4 and not payload[1]:
                    infos[index] = payload[3]
                    still.append((index, self._messages(payload[0])))
            pending = still
        return outputs

    def _answer_all(self, items: list[tuple[list[dict], list, dict]], desc: str) -> list[GenerationResult]:
        """Answers to ``(messages, images, generation kwargs)`` items, in their order; items with the
        same generation settings and the same presence of images share batches, in their order."""
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (_, images, gen_kwargs) in enumerate(items):
            groups[json.dumps({"gen": gen_kwargs, "images": bool(images)}, sort_keys=True, default=str)].append(index)
        batches = [ids[i : i + self.batch_size] for ids in groups.values() for i in range(0, len(ids), self.batch_size)]
        results: list[GenerationResult | None] = [None] * len(items)
        for batch in tqdm(batches, desc=desc, disable=self.rank != 0):
            for i, answer in zip(batch, self._answer([items[i] for i in batch])):
                results[i] = answer
        return results  # type: ignore[return-value]

    @staticmethod
    def _messages(messages: list[dict]) -> tuple[list[dict], list]:
        """lmms-eval's messages in transformers' chat format, and their images in order."""
        converted, images = [], []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                if part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                elif part["type"] == "image":
                    images.append(part["url"].convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    raise ValueError(f"halluguard answers text and image inputs; this task sends {part['type']!r}")
            converted.append({"role": message["role"], "content": parts})
        return converted, images

    def _decoding(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """``generate`` keyword arguments from a task's generation kwargs, and its stop strings."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        task_beams = int(gen_kwargs.get("num_beams") or 1)
        beams = self.num_beams or (self.method_beams if task_beams == 1 else task_beams)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            "num_beams": beams,
            "do_sample": do_sample,
        }
        if do_sample:
            kwargs["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        tokenizer = self.processor.tokenizer
        kwargs["pad_token_id"] = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        return kwargs, until

    def _answer(self, batch: list[tuple[list[dict], list, dict]]) -> list[GenerationResult]:
        prompts = [chat_prompt(self.processor, messages) for messages, _, _ in batch]
        images = [imgs for _, imgs, _ in batch]
        inputs = encode(self.processor, prompts, images).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        kwargs, until = self._decoding(batch[0][2])
        generate = self.guard.generate if self.guard is not None else self.model.generate
        with torch.inference_mode():
            out = generate(**inputs, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[:, inputs["input_ids"].shape[1] :]
        answers = []
        pad = self.processor.tokenizer.pad_token_id
        for row, text in zip(new, self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)):
            for stop in until:
                text = text.split(stop)[0]
            tokens = int((row != pad).sum()) if pad is not None else len(row)
            answers.append(GenerationResult(text=text.strip(), token_counts=TokenCounts(output_tokens=tokens)))
        return answers
