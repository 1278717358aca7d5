"""Streamers with a guarded ``generate``: a thread reading a ``TextIteratorStreamer`` never waits for
tokens that will not come.

* a decoding-loop owner whose tokens are final only late (OPERA's beam search, Lookback Lens' guided
  decoding) refuses a streamer before any work, with the reason, and ends it;
* a guarded call that fails midway ends the streamer too;
* a method that does not own the loop streams every token, then ends it.
"""

import threading

import pytest
import torch
from tiny_models import build_model, make_inputs
from transformers import TextIteratorStreamer

import halluguard as hg
from halluguard.attention.edits import AttentionEdit
from halluguard.methods.base import Method
from halluguard.methods.lookback.classifier import LookbackClassifier


class Digits:
    """The least a streamer needs of a tokenizer: token ids as text."""

    def decode(self, ids, **kwargs):
        return "".join(f"<{int(i)}>" for i in ids)


def reading(streamer):
    """A thread reading ``streamer`` to its end; returns (thread, pieces read)."""
    pieces: list[str] = []
    thread = threading.Thread(target=lambda: pieces.extend(streamer), daemon=True)
    thread.start()
    return thread, pieces


def lookback_guide(model, tmp_path):
    text = model.config.get_text_config()
    layers, heads = text.num_hidden_layers, text.num_attention_heads
    LookbackClassifier(torch.ones(layers * heads), 0.0, layers, heads).save(tmp_path / "c.json")
    return hg.get_config("lookback", mode="guide", classifier=str(tmp_path / "c.json"))


@pytest.mark.parametrize(
    ("owner", "decoding", "reason"),
    [
        ("opera", dict(num_beams=2), "opera cannot stream: its beam search settles the tokens only at the end"),
        ("lookback", dict(do_sample=True), "lookback cannot stream: guided decoding settles a chunk's tokens"),
    ],
)
def test_a_loop_owner_that_settles_tokens_late_refuses_a_streamer_and_ends_it(owner, decoding, reason, tmp_path):
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    config = lookback_guide(model, tmp_path) if owner == "lookback" else hg.get_config(owner)
    streamer = TextIteratorStreamer(Digits(), timeout=30)
    thread, pieces = reading(streamer)
    with hg.wrap(model, methods=config), pytest.raises(ValueError, match=reason):
        model.generate(**inputs, max_new_tokens=4, streamer=streamer, **decoding)
    thread.join(timeout=10)
    assert not thread.is_alive(), "the reader still waits: the streamer was not ended"
    assert "".join(pieces) == ""  # refused before the prompt was put


class FailsAtStep(Method):
    """Test helper: raises inside the forward that feeds the ``step``-th generated token."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.calls = step, 0

    def attention_edit(self, state, call):
        if call.layer_idx == 0 and not call.is_prefill:
            self.calls += 1
            if self.calls == self.step:
                raise RuntimeError("a failure midway")
        return AttentionEdit()


def test_a_guarded_call_that_fails_midway_ends_the_streamer():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    streamer = TextIteratorStreamer(Digits(), skip_prompt=True, timeout=30)
    thread, pieces = reading(streamer)
    with hg.wrap(model, methods=[FailsAtStep(2)]), pytest.raises(RuntimeError, match="a failure midway"):
        model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, streamer=streamer)
    thread.join(timeout=10)
    assert not thread.is_alive(), "the reader still waits: the streamer was not ended"
    assert "".join(pieces).count("<") == 2  # the tokens settled before the failure


def test_a_method_that_does_not_own_the_loop_streams_every_token():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava", batch=1)
    streamer = TextIteratorStreamer(Digits(), skip_prompt=True, timeout=30)
    thread, pieces = reading(streamer)
    with hg.wrap(model, methods="vcd"):
        out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False, streamer=streamer)
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert "".join(pieces) == Digits().decode(out[0, inputs["input_ids"].shape[1] :])
