"""The extension points of ``halluguard.decoding``: a toy loop owner and a toy branch-rows method.

* ``GreedyLoop`` owns the decoding loop (a hand-written greedy loop given to ``generate`` as its
  ``custom_generate``): it must give plain greedy's tokens, let attention methods act inside it,
  and refuse to compose with another loop owner.
* ``Echo`` asks for a branch stream whose prompt is the main prompt itself (image inputs
  included, used at the branch's first forward only). Riding along the main forwards as extra
  rows, its next-token logits must equal the main rows' at every step, through left padding,
  beam search's reordering, several sequences per prompt and M-RoPE positions; run as its own
  forwards (a static cache, or ``separate``), too.
"""

import dataclasses

import pytest
import torch
from tiny_models import build_model, make_inputs
from transformers import DynamicCache, LogitsProcessor

import halluguard as hg
from halluguard import compat
from halluguard.decoding import Branch, RowGroupsCache

GEN = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)


# ---- a loop owner ------------------------------------------------------------------------------
@dataclasses.dataclass
class GreedyLoopConfig(hg.MethodConfig):
    name = "greedy-loop"


@dataclasses.dataclass
class OtherLoopConfig(GreedyLoopConfig):
    name = "other-loop"


class GreedyLoop(hg.Method):
    """Owns the loop: prefill, then one token at a time with the cache, argmax of the processed scores."""

    config_cls = GreedyLoopConfig
    capabilities = hg.Capabilities(owns_loop=True)

    def __init__(self, config=None):
        super().__init__(config)
        self.steps = 0

    def generate_loop(self, state):
        def loop(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
            kwargs = {k: v for k, v in model_kwargs.items() if k not in ("synced_gpus", "streamer", "use_cache")}
            mask = kwargs.pop("attention_mask")
            cache = kwargs.pop(compat.CACHE)
            positions = kwargs.pop("position_ids", None)
            step_inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
            while True:
                out = model(**step_inputs, **{compat.CACHE: cache}, use_cache=True)
                scores = logits_processor(input_ids, out.logits[:, -1].float())
                token = scores.argmax(-1, keepdim=True)
                input_ids = torch.cat([input_ids, token], 1)
                self.steps += 1
                if stopping_criteria(input_ids, scores).all():
                    return input_ids
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
                positions = positions[..., -1:] + 1
                step_inputs = dict(input_ids=token, attention_mask=mask, position_ids=positions)

        return loop


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_loop_owner_replaces_the_loop_and_gives_plain_greedy_tokens(family):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    owner = GreedyLoop()
    with torch.no_grad():
        want = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=[owner]):
            got = model.generate(**inputs, **GEN)
        assert owner.steps == GEN["max_new_tokens"]
        # attention edits act inside the owner's loop: VHR with fixed heads, in the loop or not
        vhr = hg.VHRConfig(fixed_heads={1: [0, 2], 2: [1]}, alpha=3.0)
        with hg.wrap(model, methods=vhr):
            want_vhr = model.generate(**inputs, **GEN)
        with hg.wrap(model, methods=[GreedyLoop(), vhr]):
            got_vhr = model.generate(**inputs, **GEN)
    assert torch.equal(got, want)
    assert torch.equal(got_vhr, want_vhr) and not torch.equal(want_vhr, want)


def test_two_loop_owners_do_not_compose():
    model = build_model("llava")
    with pytest.raises(ValueError, match="cannot compose 'greedy-loop' with 'other-loop'.*decoding loop"):
        hg.wrap(model, methods=[GreedyLoop(), GreedyLoop(OtherLoopConfig())])
    assert not hasattr(model, "_halluguard_guard")
    assert GreedyLoop().owns_loop and hg.get_config("vhr") is not None and not _method("vhr").owns_loop


def _method(name):
    from halluguard import registry

    return registry.entry(name).method_cls(hg.get_config(name))


# ---- a branch stream ---------------------------------------------------------------------------
@dataclasses.dataclass
class EchoConfig(hg.MethodConfig):
    name = "echo"


class Echo(hg.Method):
    """A branch whose prompt is the main prompt; records (main scores, branch logits) at every step."""

    config_cls = EchoConfig

    def __init__(self, separate=False):
        super().__init__(EchoConfig())
        self.separate = separate
        self.pairs = []

    def streams(self, state, inputs):
        skip = ("use_cache", "logits_to_keep", "return_dict", "cache_position")
        prompt = {k: v for k, v in compat.without_cache(state.with_2d_mask(inputs)).items() if k not in skip}
        return [Branch(self, prompt, separate=self.separate)]

    def logits_processors(self, state):
        method = self

        class Record(LogitsProcessor):
            def __call__(self, input_ids, scores):
                method.pairs.append((scores.clone(), state.branch_logits(method, input_ids).clone()))
                return scores

        return [Record()]


CASES = [
    ("llava", {}, False),
    ("llava", {"num_beams": 3}, False),
    ("llava", {"num_beams": 2, "num_return_sequences": 2}, False),
    ("qwen2_vl", {"num_beams": 2}, False),
    ("gemma3", {}, False),
    ("paligemma", {}, False),
    ("llava_next", {"num_beams": 2}, True),
    ("llava", {"cache_implementation": "static"}, False),
]


@pytest.mark.parametrize("family,extra,separate", CASES)
def test_branch_rows_see_what_the_main_rows_see(family, extra, separate):
    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    echo = Echo(separate=separate)
    with torch.no_grad():
        want = model.generate(**inputs, **GEN, **extra)
        with hg.wrap(model, methods=[echo]):
            got = model.generate(**inputs, **GEN, **extra)
    assert torch.equal(got, want)  # the branch rows never leak into the caller's rows
    assert len(echo.pairs) == GEN["max_new_tokens"]
    for scores, branch in echo.pairs:
        if extra.get("num_beams"):  # beam search hands processors log-probabilities
            branch = torch.log_softmax(branch, -1)
        kept = torch.isfinite(scores)  # tokens an earlier processor ruled out (min_new_tokens: EOS)
        if extra.get("num_beams"):
            branch = branch - torch.logsumexp(branch.masked_fill(~kept, float("-inf")), -1, keepdim=True)
            scores = scores - torch.logsumexp(scores, -1, keepdim=True)
        torch.testing.assert_close(branch[kept], scores[kept], atol=1e-5, rtol=1e-5)


def test_the_callers_cache_keeps_only_its_rows():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods=[Echo()]), torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True)
    assert compat.cache_of(out).layers[0].keys.shape[0] == inputs["input_ids"].shape[0]


def test_row_groups_cache_applies_batch_operations_to_every_block():
    cache = RowGroupsCache()
    keys = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 1).clone()
    cache.update(keys, keys.clone(), 0)
    branch = DynamicCache()
    short = 10 + torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, 1).clone()
    branch.update(short, short.clone(), 0)
    cache.add_block(branch)
    layer = cache.layers[0]
    assert layer.keys.shape == (6, 1, 2, 1) and layer.keys[3:, 0, 0, 0].tolist() == [0, 0, 0]  # left-padded
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert layer.keys[:, 0, 1, 0].tolist() == [2, 2, 0, 12, 12, 10]
    cache.drop_extra_blocks()
    assert layer.keys[:, 0, 1, 0].tolist() == [2, 2, 0]


# ---- what the streams cost: forwards and rows ---------------------------------------------------
def count_forwards(model):
    """Record (rows, width) of every model forward (registered after the guard's hook: sees the extra rows)."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(tuple(ids.shape))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_vhr_selects_inside_the_prompts_own_forward():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    rows, width = inputs["input_ids"].shape
    with hg.wrap(model, methods="vhr"), torch.no_grad():
        seen, handle = count_forwards(model)
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        handle.remove()
    assert seen == [(2 * rows, width), (rows, 1), (rows, 1)]  # no separate probe forward, no recomputed prompt


def test_a_branch_costs_a_short_prefill_and_then_rides_along_each_step():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    rows, width = inputs["input_ids"].shape
    text_width = int((inputs["input_ids"] != 500).logical_and(inputs["attention_mask"].bool()).sum(1).max())
    with hg.wrap(model, methods="pai"), torch.no_grad():
        seen, handle = count_forwards(model)
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        handle.remove()
    # the prompt, then the image-free prefill at its own length, then one forward of 2 x rows per step
    assert seen == [(rows, width), (rows, text_width), (2 * rows, 1), (2 * rows, 1)]


class BlankImage(hg.Method):
    """A branch that sees the same prompt with a blank image: its own pixel values, at its first forward only."""

    config_cls = EchoConfig

    def __init__(self):
        super().__init__(EchoConfig())
        self.pairs = []

    def streams(self, state, inputs):
        keep = ("input_ids", "attention_mask", "position_ids")
        prompt = {k: inputs[k] for k in keep}
        prompt["pixel_values"] = torch.zeros_like(state.call_inputs["pixel_values"])
        return [Branch(self, prompt)]

    def logits_processors(self, state):
        method = self

        class Record(LogitsProcessor):
            def __call__(self, input_ids, scores):
                method.pairs.append((input_ids.clone(), state.branch_logits(method, input_ids).clone()))
                return scores

        return [Record()]


def test_a_branch_brings_its_own_image_inputs_to_its_first_forward():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    blank = dict(inputs, pixel_values=torch.zeros_like(inputs["pixel_values"]))
    method = BlankImage()
    with torch.no_grad():
        with hg.wrap(model, methods=[method]):
            model.generate(**inputs, **GEN)
        for input_ids, branch in method.pairs:  # the blank-image prompt run in full, every step
            mask = torch.cat([blank["attention_mask"], torch.ones_like(input_ids[:, blank["input_ids"].shape[1] :])], 1)
            want = model(input_ids=input_ids, attention_mask=mask, pixel_values=blank["pixel_values"]).logits[:, -1]
            torch.testing.assert_close(branch, want, atol=1e-5, rtol=1e-5)
        plain_image = model(**inputs).logits[:, -1]
    assert (method.pairs[0][1] - plain_image).abs().max() > 1e-3  # the branch did see another image


def test_a_forward_asked_for_a_tuple_gets_its_own_rows_back():
    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")
    with hg.wrap(model, methods="vhr") as guard, torch.no_grad():
        as_output = guard.forward(**inputs)
        as_tuple = guard.forward(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_output.logits) and as_tuple[0].shape[0] == inputs["input_ids"].shape[0]
    assert compat.cache_of(as_output).layers[0].keys.shape[0] == inputs["input_ids"].shape[0]


def test_contrast_entropy_by_hand():
    from halluguard.decoding import entropy

    uniform = torch.zeros(2, 8)
    one_hot = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert torch.allclose(entropy(uniform), torch.full((2, 1), float(torch.log(torch.tensor(8.0)))))
    assert entropy(one_hot).item() == 0.0 and not entropy(one_hot).isnan().any()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name, config", [("vista", dict(lamda=0.5, logits_alpha=0.5)), ("only", dict(gamma=0.0))])
def test_rows_a_method_projects_join_the_models_own_output_product(family, name, config):
    """VISTA's late-layer mean and ONLY's read-out ride in the model's product with the output embeddings
    (one call of the module per forward) and give what projecting them apart gives."""
    from halluguard import registry

    model = build_model(family)
    inputs, _ = make_inputs(model, family)
    head = model.get_output_embeddings()
    runs = {}
    with torch.no_grad():
        for joined in (True, False):
            method = registry.entry(name).method_cls(hg.get_config(name, **config))
            method.projects_rows = joined  # off: the method projects its rows itself
            with hg.wrap(model, methods=[method]):
                calls = []
                handle = head.register_forward_hook(lambda m, a, o, calls=calls: calls.append(a[0].shape))
                out = model.generate(**inputs, **GEN, output_scores=True, return_dict_in_generate=True)
                handle.remove()
            runs[joined] = (out, calls)
    (joined, calls), (apart, apart_calls) = runs[True], runs[False]
    rows = inputs["input_ids"].shape[0]
    steps = GEN["max_new_tokens"]  # (VISTA's probe forward comes first: the prompt and its image-free rows)
    assert calls[-steps:] == [(2 * rows, 1, calls[-1][-1])] * steps  # one product a forward, the rows joined
    assert [shape[0] for shape in apart_calls[-2 * steps :: 2]] == [rows] * steps  # apart: the model's own ...
    assert len(apart_calls) == len(calls) + steps  # ... and the method's, every step
    assert torch.equal(joined.sequences, apart.sequences)
    torch.testing.assert_close(torch.stack(joined.scores), torch.stack(apart.scores), atol=1e-5, rtol=1e-5)


ATTENTION_KERNELS = ("aten._scaled_dot_product", "aten.bmm", "aten.baddbmm")


@pytest.mark.parametrize(
    "name, config",
    [
        ("vcd", {}),  # a branch riding along, no attention edit
        ("avc", {}),  # its blind-token view edits the branch's input embeddings, not its attention
        ("vhr", {}),  # head scales on the main rows (after choosing them at the prompt)
        ("decore", dict(retrieval_heads={"0-0": [0.9], "1-1": [0.8], "2-2": [0.5]}, num_retrieval_heads=3)),
    ],
)
def test_a_decode_step_runs_one_attention_call_per_layer_for_all_its_streams(name, config):
    """Streams whose attention needs no score edit or statistics share the layer's one attention call: a
    branch's rows and the main rows are not split into calls of their own."""
    from halluguard.bench.ops import AtenCounter

    class Attention(AtenCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += str(func).startswith(ATTENTION_KERNELS)
            return func(*args, **(kwargs or {}))

    model = build_model("llava")
    inputs, _ = make_inputs(model, "llava")

    def per_step() -> float:
        calls = []
        for tokens in (2, 4):
            counter = Attention()
            with counter, torch.no_grad():
                model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            calls.append(counter.count)
        return (calls[1] - calls[0]) / 2

    plain = per_step()  # one attention call per layer (and whatever else of the model's runs a bmm)
    with hg.wrap(model, methods=hg.get_config(name, **config)):
        assert per_step() == plain


@pytest.mark.parametrize(
    "ranges,split",
    [
        ([(0, 2), (2, 3)], True),  # a stream's rows and its branch's, one after the other
        ([(0, 3)], False),  # one stream: its rows are the call's
        ([(1, 3), (0, 1)], False),  # out of order
        ([(0, 1), (2, 3)], False),  # a gap
    ],
)
def test_each_stream_gets_its_rows_of_the_call(ranges, split):
    from halluguard.attention.hook import _row_blocks
    from halluguard.attention.routing import Route, rows_of
    from halluguard.bench.ops import count

    tensor = torch.randn(3, 2, 4)
    routes = [Route(None, slice(start, stop)) for start, stop in ranges]
    blocks = _row_blocks(tensor, routes)
    assert all(torch.equal(block, rows_of(tensor, route)) for block, route in zip(blocks, routes))
    operations = count(lambda: _row_blocks(tensor, routes)).aten
    assert operations == (1 if split else sum(1 for r in ranges if r != (0, 3)))


def test_a_boosted_stream_and_streams_that_ask_nothing_share_one_boost():
    """One stream's per-row key boost, zero on the rows of the streams that ask nothing, in the rows'
    order; anything else keeps each stream's own path (None)."""
    from halluguard.attention import AttentionEdit, Reductions
    from halluguard.attention.derived import Derived
    from halluguard.attention.hook import _merged_boost
    from halluguard.attention.routing import Route

    stream = dataclasses.make_dataclass("Stream", [("derived", Derived)])(Derived())
    boost = torch.rand(2, 5)

    def planned(ranges, asks):
        return [(Route(stream, slice(*r)), None, [(None, e) for e in ask]) for r, ask in zip(ranges, asks)]

    merged = _merged_boost(planned([(0, 1), (1, 3)], [[], [AttentionEdit(key_boost=boost)]]), 3)
    assert torch.equal(merged.key_boost, torch.cat([torch.zeros(1, 5), boost]))
    merged = _merged_boost(planned([(0, 2), (2, 4)], [[AttentionEdit(key_boost=boost)], []]), 4)
    assert torch.equal(merged.key_boost, torch.cat([boost, torch.zeros(2, 5)]))
    refused = {
        "a boost shared by the stream's rows": planned([(0, 2), (2, 3)], [[AttentionEdit(key_boost=boost[:1])], []]),
        "two boosted streams": planned([(0, 2), (2, 4)], [[AttentionEdit(key_boost=boost)]] * 2),
        "rows out of order": planned([(1, 3), (0, 1)], [[AttentionEdit(key_boost=boost)], []]),
        "a boost with statistics": planned(
            [(0, 2), (2, 3)], [[AttentionEdit(key_boost=boost, reductions=Reductions(head_outputs=True))], []]
        ),
        "nothing asked": planned([(0, 2), (2, 3)], [[], []]),
    }
    for name, plan in refused.items():
        assert _merged_boost(plan, 3 if name != "two boosted streams" else 4) is None, name
