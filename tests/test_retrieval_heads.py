"""Retrieval-head calibration: a copy head planted by hand is found and ranked first, the heads file
round-trips through the loader, format mistakes are named, and the CLI writes the official format.

The planted model is a tiny LLaVA whose text backbone is set by hand (all other attention outputs
and MLPs zeroed) into a two-layer induction circuit over 32 token ids with one-hot codes:

* embeddings: token code in residual dims ``A`` (0-31) plus a constant dim ``CONST`` (64);
* layer 0, head 0: a previous-token head. Its query and key come from ``CONST`` only, in the
  high-frequency rotary pairs, with the key rotated one position ahead, so position ``n`` attends to
  ``n - 1``; it writes the code of the previous token into dims ``B`` (32-63);
* layer 1, head ``h``: the copy head. Query = code of the current token (``A``), key = code of the
  previous token (``B``), in the rotary pairs whose frequency is ~0 (RoPE theta 1e9), so position
  ``n`` attends to the position right after the earlier occurrence of its token: while the answer
  copies the needle, that is the needle token to produce next. It writes that token's code into dims
  ``C`` (65-96), which the output embedding reads, so the model also copies the needle.
"""

import json
import math
import random

import pytest
import torch
from tiny_models import BOS, CORE_FAMILIES, build_model

from halluguard import cli, testbed
from halluguard.calibrate import retrieval_heads as rh

CODED = list(range(10, 42))  # token ids with a one-hot code
A, B, CONST, C = 0, 32, 64, 65  # residual-stream subspaces
HEAD_DIM = 64
POSITIONAL = 7  # rotary pairs 0..6 (frequency 1 .. 0.02) carry the previous-token head
CONTENT = list(range(14, 32)) + list(range(46, 64))  # rotary dims of frequency < 1.2e-4
LAYOUT = rh.Layout(head=(BOS,), cue=(40, 41), end=(39,), question=(38, 37))
TEXT = dict(
    hidden_size=128,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=HEAD_DIM,
    rope_parameters=dict(rope_type="default", rope_theta=1e9),
    tie_word_embeddings=False,
)


def rows(head: int) -> slice:
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)


@torch.no_grad()
def planted_model(copy_head: int | None):
    """The tiny LLaVA above with its copy head at layer 1, query head ``copy_head`` (None: no circuit,
    random attention everywhere)."""
    model = build_model("llava", text_overrides=TEXT)
    text = model.model.language_model
    if copy_head is None:
        return model
    embed = model.get_input_embeddings().weight
    embed.zero_()
    embed[:, CONST] = 1
    for j, token in enumerate(CODED):
        embed[token, A + j] = 1
    for layer in text.layers:
        layer.mlp.down_proj.weight.zero_()
        layer.self_attn.o_proj.weight.zero_()
    norm = math.sqrt(TEXT["hidden_size"] / 2)  # RMS-normalised value of a unit entry at layer 0

    # Layer 0, query head 0 (KV head 0): previous-token head.
    attn = text.layers[0].self_attn
    query = torch.zeros(HEAD_DIM)
    query[:POSITIONAL] = 12.0
    angle = text.rotary_emb.inv_freq.float()  # rotation of one position, per pair
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    key = query * cos + torch.cat([-query[HEAD_DIM // 2 :], query[: HEAD_DIM // 2]]) * sin
    for proj, vector in ((attn.q_proj, query), (attn.k_proj, key)):
        proj.weight[rows(0)] = 0
        proj.weight[rows(0), CONST] = vector / norm
    attn.v_proj.weight[rows(0)] = 0
    for j in range(len(CODED)):
        attn.v_proj.weight[j, A + j] = 1 / norm
        attn.o_proj.weight[B + j, j] = 1

    # Layer 1, query head copy_head (KV head copy_head // 2): the copy head.
    attn = text.layers[1].self_attn
    kv = copy_head // (TEXT["num_attention_heads"] // TEXT["num_key_value_heads"])
    attn.q_proj.weight[rows(copy_head)] = 0
    attn.k_proj.weight[rows(kv)] = 0
    attn.v_proj.weight[rows(kv)] = 0
    for j in range(len(CODED)):
        attn.q_proj.weight[copy_head * HEAD_DIM + CONTENT[j], A + j] = 2.0
        attn.k_proj.weight[kv * HEAD_DIM + CONTENT[j], B + j] = 2.0
        attn.v_proj.weight[kv * HEAD_DIM + j, A + j] = 1.0
        attn.o_proj.weight[C + j, copy_head * HEAD_DIM + j] = 1.0
    lm_head = model.get_output_embeddings().weight
    assert lm_head.data_ptr() != embed.data_ptr()
    lm_head.zero_()
    for j, token in enumerate(CODED):
        lm_head[token, C + j] = 10.0
    return model


def calibrate(model, **kwargs):
    settings = dict(trials=4, haystack_length=60, needle_length=8, seed=0, progress=False) | kwargs
    return rh.retrieval_scores(model, LAYOUT, CODED, **settings)


@pytest.mark.parametrize("copy_head", [3, 0])  # one per KV group
def test_the_planted_copy_head_ranks_first(copy_head):
    model = planted_model(copy_head)
    heads, accuracies = calibrate(model)
    assert min(accuracies) == 1.0  # the circuit copies every needle token
    assert sorted(heads) == sorted(f"{layer}-{head}" for layer in range(2) for head in range(4))
    assert all(len(scores) == 4 for scores in heads.values())
    ranked = rh.ranked_heads(heads)
    assert ranked[0][:2] == (1, copy_head) and ranked[0][2] == 1.0
    assert max(score for _, _, score in ranked[1:]) <= 0.25, ranked
    assert rh.load_retrieval_heads(heads, 1) == [(1, copy_head)]
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored


def test_without_the_circuit_no_head_retrieves_and_no_trial_passes():
    model = planted_model(None)
    heads, accuracies = calibrate(model, min_copy_accuracy=0)
    assert max(score for _, _, score in rh.ranked_heads(heads)) <= 0.25
    assert max(accuracies) <= 0.25
    with pytest.raises(ValueError, match=r"copied the needle in none of 4 trials .*min-copy-accuracy"):
        calibrate(model)


def test_trials_are_seeded_and_the_needle_is_unique_in_the_prompt():
    make = lambda seed: rh.make_trial(random.Random(seed), LAYOUT, CODED, haystack_length=50, needle_length=8)
    trial = make(1)
    assert trial == make(1) and trial != make(2)
    ids, start, needle = list(trial.input_ids), trial.needle_start, list(trial.needle)
    prompt = ids[: trial.prompt_length]
    assert len(set(needle)) == 8 and not set(needle) & LAYOUT.tokens()
    assert prompt[start : start + 8] == needle and ids[trial.prompt_length :] == needle[:-1]
    assert all(prompt.count(token) == 1 for token in needle)
    assert prompt[start - 2 : start] == list(LAYOUT.cue) and prompt[-2:] == list(LAYOUT.cue)
    assert len(ids) == 50 + LAYOUT.overhead(8)
    with pytest.raises(ValueError, match="27 usable tokens, too few for a needle of 27"):
        rh.make_trial(random.Random(0), LAYOUT, CODED, haystack_length=5, needle_length=27)


def test_layout_and_vocabulary_from_the_testbed_tokenizer():
    from transformers import AutoProcessor

    from halluguard.testbed import path

    processor = AutoProcessor.from_pretrained(path(), local_files_only=True)
    tokenizer = processor.tokenizer
    layout = rh.layout_from_tokenizer(tokenizer, processor)
    words = lambda ids: tokenizer.convert_ids_to_tokens(list(ids))
    assert words(layout.head) == ["<s>", "user", ":"]  # BOS, then the chat template's prefix
    assert words(layout.cue) == ["the", "answer", "is", ":"]
    assert words(layout.question)[-2:] == ["assistant", ":"]
    vocabulary = rh.ordinary_tokens(tokenizer, 96)
    assert not set(vocabulary) & set(tokenizer.all_special_ids) and len(vocabulary) == 91


# ---- the heads file ---------------------------------------------------------------------------------------


def test_loader_ranks_by_mean_with_ties_by_layer_then_head(tmp_path):
    data = {"0-1": [0.5, 0.5], "2-0": [1.0, 0.0], "1-3": [0.9], "0-0": [0.0, 0.1], "10-2": [0.95, 0.95]}
    assert rh.load_retrieval_heads(data, 3) == [(10, 2), (1, 3), (0, 1)]
    assert rh.load_retrieval_heads(data, 4) == [(10, 2), (1, 3), (0, 1), (2, 0)]  # 0-1 ties 2-0: layer first
    assert rh.load_retrieval_heads(data, 50) == [(10, 2), (1, 3), (0, 1), (2, 0), (0, 0)]  # K above: all
    file = tmp_path / "heads.json"
    file.write_text(json.dumps(data))
    assert rh.load_retrieval_heads(file, 2) == rh.load_retrieval_heads(str(file), 2) == [(10, 2), (1, 3)]


BAD_FILES = [
    ("not an object", [1, 2], "expected a non-empty JSON object"),
    ("empty", {}, "expected a non-empty JSON object"),
    ("underscore key", {"3_5": [1.0]}, "key '3_5' is not 'layer-head'"),
    ("word key", {"a-b": [1.0]}, "key 'a-b' is not 'layer-head'"),
    ("negative layer", {"-1-2": [1.0]}, "key '-1-2' is not 'layer-head'"),
    ("three parts", {"1-2-3": [1.0]}, "key '1-2-3' is not 'layer-head'"),
    ("same head twice", {"3-5": [1.0], "03-5": [0.5]}, "head '03-5' appears twice"),
    ("empty list", {"3-5": []}, "head '3-5' needs a non-empty list of scores"),
    ("a number, not a list", {"3-5": 0.5}, "head '3-5' needs a non-empty list of scores"),
    ("a string score", {"3-5": ["0.5"]}, "head '3-5' has a score that is not a finite number"),
    ("NaN", {"3-5": [float("nan")]}, "head '3-5' has a score that is not a finite number"),
    ("a boolean", {"3-5": [True]}, "head '3-5' has a score that is not a finite number"),
]


@pytest.mark.parametrize("case, data, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_loader_names_format_mistakes(tmp_path, case, data, message):
    file = tmp_path / "heads.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"^{file}: .*" + message.replace("(", r"\(")):
        rh.load_retrieval_heads(file, 5)
    if isinstance(data, dict):
        with pytest.raises(ValueError, match=message):
            rh.load_retrieval_heads(data, 5)


def test_loader_rejects_a_bad_k_and_a_non_json_file(tmp_path):
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a whole number >= 1"):
            rh.load_retrieval_heads({"0-0": [1.0]}, k)
    (tmp_path / "bad.json").write_text("{'0-0': [1]}")
    with pytest.raises(ValueError, match="bad.json: not JSON"):
        rh.load_retrieval_heads(tmp_path / "bad.json", 1)


def test_check_heads():
    rh.check_heads([(0, 0), (3, 7)], num_layers=4, num_heads=8)
    for heads in ([(4, 0)], [(0, 8)], [(0, 0), (-1, 2)]):
        with pytest.raises(ValueError, match=r"outside this model \(4 layers x 8 heads\)"):
            rh.check_heads(heads, num_layers=4, num_heads=8)


RERUN = (
    "rerun `halluguard calibrate retrieval-heads --model testbed --min-copy-accuracy 0 "
    "--out halluguard/testbed/model/retrieval_heads.json`"
)


def test_the_test_model_ships_a_heads_file_of_its_shape():
    from halluguard.testbed import path

    text = json.loads((path() / "config.json").read_text())["text_config"]
    layers, heads = text["num_hidden_layers"], text["num_attention_heads"]
    data = json.loads((path() / "retrieval_heads.json").read_text())
    assert len(data) == layers * heads, RERUN
    rh.check_heads(rh.load_retrieval_heads(data, 50), layers, heads)


# ---- command line -----------------------------------------------------------------------------------------


def test_cli_writes_the_official_format_for_the_testbed(tmp_path, capsys):
    out = tmp_path / "heads.json"
    argv = ["calibrate", "retrieval-heads", "--model", "testbed", "--out", str(out), "--trials", "2"]
    argv += ["--haystack-length", "30", "--needle-length", "4", "--min-copy-accuracy", "0"]
    assert cli.main(argv) == 0
    text = out.read_text()
    assert text.count("\n") == 1  # one line, as the official files
    heads = json.loads(text)
    config = json.loads((testbed.path() / "config.json").read_text())["text_config"]
    layers, per_layer = config["num_hidden_layers"], config["num_attention_heads"]
    assert list(heads) == [f"{layer}-{head}" for layer in range(layers) for head in range(per_layer)]
    assert all(len(scores) == 2 and all(s in (0, 0.25, 0.5, 0.75, 1) for s in scores) for scores in heads.values())
    assert [p.name for p in tmp_path.iterdir()] == ["heads.json"]  # no temporary file left
    printed = capsys.readouterr().out
    assert "2 of 2 trials recorded" in printed and f"saved: {out}" in printed
    top = rh.ranked_heads(heads)[0]
    assert f"top heads (layer-head: mean score): {top[0]}-{top[1]}: {top[2]:.3f}" in printed
    assert cli.main(argv) == 0 and out.read_text() == text  # seeded: the same file again


def test_cli_failures_give_one_line(tmp_path, capsys):
    base = ["calibrate", "retrieval-heads", "--model", "testbed", "--out", str(tmp_path / "h.json")]
    assert cli.main(base + ["--trials", "1", "--haystack-length", "20", "--needle-length", "4"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("halluguard: error: the model copied the needle in none of 1 trials")
    assert cli.main(base + ["--haystack-length", "5000"]) == 1
    assert "above testbed's 256-token context; use at most" in capsys.readouterr().err
    assert not (tmp_path / "h.json").exists()


@pytest.mark.parametrize("family", CORE_FAMILIES)  # Llama, M-RoPE, sliding window + soft-capping
def test_every_core_family_gives_a_score_per_head(family):
    model = build_model(family)
    layout = rh.Layout(head=(BOS,), cue=(11, 12), end=(13,), question=(14, 15))
    heads, accuracies = rh.retrieval_scores(
        model, layout, range(10, 60), trials=2, haystack_length=20, needle_length=4, min_copy_accuracy=0, progress=False
    )
    config = model.config.get_text_config()
    keys = [
        f"{layer}-{head}" for layer in range(config.num_hidden_layers) for head in range(config.num_attention_heads)
    ]
    assert list(heads) == keys and len(accuracies) == 2
    assert all(len(scores) == 2 and all(0 <= s <= 1 for s in scores) for scores in heads.values())
    assert config._attn_implementation == "sdpa"
