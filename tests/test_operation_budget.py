"""Aten operations a method adds to each layer of a decode step: counted, so a change that adds them back fails.

The cost of one more layer is measured directly: the extra operations over plain ``generate`` of a
model with 4 text layers less those of the same model with 2, over 2 (the per-step work that does
not grow with depth, such as a contrast of logits, cancels), each counted over decode steps after
the first (``steady``: what a method sets up once, at its first step, is left out). The bounds are
the targets of the reference path (``benchmarks/RESULTS.md``, "Operations per decode step"), and
for VAR the count of an edited layer: its target of 10 is an average over the 146M model's 12 layers,
of which it edits 10, while here it edits every layer (12 more than plain's 3, 13 on transformers
5.18). PAI's image-free rows share the amplified rows' edited call (a zero boost), so with guidance
a layer costs what amplification alone does.
"""

import pytest
from tiny_models import build_model, make_inputs

import halluguard as hg
from halluguard.bench.ops import count


def retrieval_heads(layers):
    return {f"{layer}-{head}": [0.9] for layer in range(layers) for head in range(2)}


# method -> (its settings for a model of ``layers`` text layers, every layer edited; the bound)
BUDGETS = {
    "vhr": (lambda layers: dict(alpha=3.0, layers=tuple(range(layers))), 3),
    "vcd": (lambda layers: dict(alpha=1.0), 5),
    "avc": (lambda layers: dict(alpha=1.0), 5),
    "decore": (lambda layers: dict(retrieval_heads=retrieval_heads(layers), num_retrieval_heads=2 * layers), 5),
    "pai amplification": (lambda layers: dict(alpha=1.0, start_layer=0, use_cfg=False), 8),
    "lookback": (lambda layers: dict(context="prompt"), 8),
    "var": (lambda layers: dict(sink_dims=(5, 9), tau=1.8, rho=0.9, p=0.3, first_layer=0, skip_last_layer=False), 13),
    "pai": (lambda layers: dict(alpha=1.0, start_layer=0, gamma=2.0), 10),
}


def steady_ops_per_step(model, inputs, method=None, settings=None, steps=3) -> float:
    """Aten operations per decode step after the first ``1 + steps`` tokens."""

    def generate(tokens):
        def run():
            if method is None:
                model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                return
            with hg.wrap(model, methods=hg.get_config(method, **settings)):
                model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        return count(run).aten

    return (generate(1 + 2 * steps) - generate(1 + steps)) / steps


@pytest.fixture(scope="module")
def plain_runs():
    """``(model, inputs, plain's steady operations per step)`` by ``(layers, batch)``, made once."""
    made = {}

    def get(layers, batch):
        if (layers, batch) not in made:
            model = build_model("llava", text_overrides={"num_hidden_layers": layers})
            inputs, _ = make_inputs(model, "llava", batch=batch)  # batch 2: left-padded rows of two lengths
            made[layers, batch] = (model, inputs, steady_ops_per_step(model, inputs))
        return made[layers, batch]

    return get


def extra_per_layer(plain_runs, method, settings, batch) -> float:
    extra = {}
    for layers in (2, 4):
        model, inputs, plain = plain_runs(layers, batch)
        extra[layers] = steady_ops_per_step(model, inputs, method, settings(layers)) - plain
    return (extra[4] - extra[2]) / 2


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", list(BUDGETS))
def test_each_layer_of_a_decode_step_costs_a_method_few_operations(plain_runs, name, batch):
    settings, bound = BUDGETS[name]
    per_layer = extra_per_layer(plain_runs, name.split()[0], settings, batch)
    assert per_layer <= bound, f"{name} adds {per_layer} aten operations per layer per decode step (bound {bound})"


def test_the_budget_counts_what_a_method_adds(plain_runs):
    """(Else a bound would hold for a method that added nothing to count.) Each edited layer of VAR
    computes its attention in a dozen operations or more where plain decoding calls one."""
    assert extra_per_layer(plain_runs, "var", BUDGETS["var"][0], 1) >= 10


@pytest.mark.parametrize("name", ["var", "pai"])
def test_what_the_decode_steps_keep_is_made_at_the_prompt(plain_runs, name):
    """VAR's sinks are final once the prompt is read: its decode steps' edit, and what the decode step
    derives from it, are made then. PAI with guidance leaves the prompt's forward unamplified, and
    makes then the boost its decode steps slice. So the first decode step costs what the next ones do."""
    model, inputs, _ = plain_runs(4, 1)
    settings = BUDGETS[name][0](4)

    def ops(tokens):
        with hg.wrap(model, methods=hg.get_config(name, **settings)):
            return count(
                lambda: model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            ).aten

    first, second, third = (ops(n) for n in (1, 2, 3))
    assert second - first == third - second
