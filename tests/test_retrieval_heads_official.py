"""The official retrieval-head protocol (``calibrate retrieval-heads --protocol official``): the
prompt construction against hand-worked cases, the answer steps' attention read with a cache
against one full eager forward, the planted copy head credited in full when it answers greedily, and
the command line's file and errors."""

import json

import numpy as np
import pytest
import torch
from test_retrieval_heads import CODED, planted_model
from tiny_models import BOS, CORE_FAMILIES, build_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from halluguard import cli
from halluguard.calibrate import needle_haystack as nh


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained on the shipped haystacks (periods are tokens, decoding round-trips)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>"], initial_alphabet=alphabet, show_progress=False
    )
    bpe.train_from_iterator([needle.haystack for needle in nh.read_needles()], trainer)
    bpe.post_processor = processors.TemplateProcessing(  # prompts start with BOS, as LLaMA's
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")


def test_the_shipped_needles_each_hide_in_their_own_book():
    needles = nh.read_needles()
    assert [n.question for n in needles] == [
        "What does a new report from WMO shows ?",
        "What is the best thing to do in Beijing ?",
        "Why does everyone dislikes Mr Green ?",
    ]
    assert len({n.haystack for n in needles}) == 3
    assert "Munro" in needles[1].haystack and "Van Helsing" in needles[2].haystack
    assert all(len(n.haystack.split()) > 15000 and "Q: Can you write" not in n.haystack for n in needles)


def test_the_grid_is_the_official_linspace():
    lengths, depths = nh.grid(1000, 50000, 20, 10)
    assert lengths == np.round(np.linspace(1000, 50000, num=20, endpoint=True)).astype(int).tolist()
    assert depths == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]


def test_insert_needle_backs_up_to_a_sentence_end():
    period = lambda t: t == 0
    context = [5, 6, 0, 7, 8, 9, 0, 4, 4, 4]
    assert nh.insert_needle(context, [1, 1], 60, period) == [5, 6, 0, 1, 1, 7, 8, 9, 0, 4, 4, 4]  # int(6) -> 3
    assert nh.insert_needle(context, [1], 70, period) == [5, 6, 0, 7, 8, 9, 0, 1, 4, 4, 4]  # right after a period
    assert nh.insert_needle(context, [1], 20, period) == [1, *context]  # no period before: the start
    assert nh.insert_needle(context, [1], 0, period) == [1, *context]
    assert nh.insert_needle(context, [1], 100, period) == [*context, 1]


def test_answer_span_is_the_first_window_with_over_ninety_percent_of_the_answer():
    answer = list(range(10, 20))  # ten distinct tokens
    prompt = [1, 2, *answer[:9], 3, 4, *answer, 5]
    assert nh.answer_span(prompt, answer) == (13, 23)  # the nine-token window holds exactly 90%: not enough
    prompt[11] = 19  # now the first window holds all ten
    assert nh.answer_span(prompt, answer) == (2, 12)
    assert nh.answer_span([1, 2, 3], answer) == (-1, -1)


def test_rouge1_recall_stems_and_clips_counts():
    reference = "take a walk in Chaoyang Park and have a cup of Espresso in the evening"
    # 15 reference tokens; matched: take, walk (walks), in (once in the response), the, park
    assert nh.rouge1_recall(reference, "The best thing is to take walks in the park.") == pytest.approx(100 * 5 / 15)
    assert nh.rouge1_recall(reference, reference.upper() + "!") == 100


def test_credit_counts_heads_on_the_span_at_the_right_token():
    prompt = [7, 8, 9, 8, 6]
    tops = torch.tensor([[1, 3], [2, 0]])  # (layers, heads): top-1 positions
    got = nh.credit(tops, 8, prompt, (1, 3))  # span: positions 1, 2
    assert got.tolist() == [[0.5, 0.0], [0.0, 0.0]]  # (0, 1) finds an 8 outside the span, (1, 0) a 9
    assert not nh.credit(tops, 8, prompt, (-1, -1)).any()


def test_the_prompt_is_the_haystack_cut_with_the_needle_after_a_sentence(tokenizer):
    prompter = nh.Prompter(tokenizer)
    needle = nh.read_needles()[1]
    needle_ids = prompter.encode(needle.text)
    for depth in (0, 44, 100):
        context = prompter.context_ids(needle, 700, depth)
        assert len(context) == 700 - nh.BUFFER
        at = next(i for i in range(len(context)) if context[i : i + len(needle_ids)] == needle_ids)
        hay = context[:at] + context[at + len(needle_ids) :]
        assert hay == prompter.encode(needle.haystack)[: len(hay)]
        if depth < 100:  # just after a sentence end, at or before the depth
            assert at == 0 or tokenizer.decode([context[at - 1]]).strip() == "."
            assert at <= int(len(hay) * depth / 100)
        else:
            assert at == len(hay)
    trial = prompter.trial(needle, 700, 44)
    assert trial.input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(trial.input_ids).endswith(f"Question: {needle.question}\nAnswer:")
    start, end = trial.span
    assert "Chaoyang Park" in tokenizer.decode(trial.input_ids[start:end])


def test_a_chat_template_puts_the_book_in_the_user_turn(tokenizer):
    class Chat:
        chat_template = "unused"

        @staticmethod
        def apply_chat_template(messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "USER: " + messages[0]["content"][0]["text"] + " ASSISTANT:"

    trial = nh.Prompter(tokenizer, Chat()).trial(nh.read_needles()[0], 500, 0)
    text = tokenizer.decode(trial.input_ids[1:])
    assert trial.input_ids[0] == tokenizer.bos_token_id
    assert text.startswith("USER: <book>A new report from the WMO") and "</book>\nBased on the content" in text
    assert text.endswith("\nAnswer: ASSISTANT:")


def oracle(model, trial, tokens):
    """The answer's next tokens and each step's top-1 attention positions ``(steps, layers, heads)``
    from one eager forward over the prompt and the answer, without a cache."""
    previous = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            output = model(input_ids=torch.tensor([[*trial.input_ids, *tokens]]), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    rows = slice(len(trial.input_ids) - 1, len(trial.input_ids) - 1 + len(tokens))
    tops = torch.stack([a[0, :, rows].argmax(-1) for a in output.attentions]).permute(2, 0, 1)
    return output.logits[0, rows].argmax(-1).tolist(), tops


def summed_credit(trial, tokens, tops):
    return sum(nh.credit(tops[t], tokens[t], trial.input_ids, trial.span) for t in range(len(tokens)))


@pytest.mark.parametrize("family", CORE_FAMILIES)  # Llama, M-RoPE, sliding window + soft-capping
def test_answer_steps_read_the_attention_of_one_full_forward(family):
    torch.manual_seed(0)
    model = build_model(family)
    prompt = (BOS, *torch.randint(10, 60, (40,)).tolist())
    trial = nh.Trial(prompt, (0, len(prompt)), 40, 0)
    tokens, tops, scores = nh.answer_trial(model, trial, 6, stops=lambda token: False)
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # restored
    expected_tokens, expected_tops = oracle(model, trial, tokens)
    assert tokens == expected_tokens and torch.equal(tops, expected_tops)
    assert torch.equal(scores, summed_credit(trial, tokens, tops))
    assert len(set(tops.flatten().tolist())) > 10  # the heads look at many places


@pytest.mark.parametrize("copy_head", [3, 0])
def test_the_planted_copy_head_answers_and_gets_full_credit(copy_head):
    model = planted_model(copy_head)
    hay, needle = [12, 13, 14, 15, 16, 17], [30, 21, 33, 25, 18]
    cue, end = 40, 39
    prompt = (BOS, *hay[:3], cue, *needle, end, *hay[3:], 38, 37, cue)
    start = prompt.index(needle[0])
    trial = nh.Trial(prompt, (start, start + len(needle)), 20, 50)
    tokens, tops, scores = nh.answer_trial(model, trial, 20, stops=lambda token: token == end)
    assert tokens == [*needle, end]  # copied greedily, stopped after the stop token
    expected_tokens, expected_tops = oracle(model, trial, tokens)
    assert tokens == expected_tokens and torch.equal(tops, expected_tops)
    assert torch.equal(scores, summed_credit(trial, tokens, tops))
    assert scores[1, copy_head] == pytest.approx(1.0)  # credited 1/5 at each of the five needle steps
    others = scores.clone()
    others[1, copy_head] = 0
    assert others.max() < 1.0
    assert set(tokens) <= set(CODED)


def test_cli_writes_the_official_format(checkpoint, tmp_path, capsys):
    out = tmp_path / "heads.json"
    argv = ["calibrate", "retrieval-heads", "--model", checkpoint("llava"), "--out", str(out)]
    argv += ["--protocol", "official", "--min-length", "300", "--max-length", "600", "--lengths", "2"]
    assert cli.main(argv + ["--depths", "2", "--min-recall", "0", "--max-new-tokens", "8"]) == 0
    heads = json.loads(out.read_text())
    assert out.read_text().count("\n") == 1
    assert list(heads) == [f"{layer}-{head}" for layer in range(3) for head in range(4)]
    assert all(len(scores) == 12 and all(s >= 0 for s in scores) for scores in heads.values())
    printed = capsys.readouterr().out
    assert "3 needles x 2 context lengths (300-600 tokens) x 2 depths = 12 trials" in printed
    assert "12 of 12 trials recorded" in printed and "chat template" in printed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--trials", "3"], "--trials: not an option of --protocol official"),  # usage errors: exit 2
        (["--seed", "0"], "--seed: not an option of --protocol official"),
        (["--max-length", "5000"], "is above"),
        (["--min-length", "150", "--max-length", "600"], "leaves 200 tokens for the question"),
        (["--needles", "missing.jsonl"], "needles file not found: missing.jsonl"),
        (["--haystack", "nowhere"], "haystack not found: nowhere"),
        (["--max-length", "600", "--lengths", "1", "--depths", "1", "--max-new-tokens", "2"], "no answer recalled"),
    ],
)
def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys, extra, message):
    out = tmp_path / "h.json"
    argv = ["calibrate", "retrieval-heads", "--model", checkpoint("llava"), "--out", str(out), "--protocol", "official"]
    assert cli.main(argv + extra) == (2 if "not an option" in message else 1)
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_official_options_belong_to_their_protocol(checkpoint, tmp_path, capsys):
    argv = ["calibrate", "retrieval-heads", "--model", "testbed", "--out", str(tmp_path / "h.json")]
    assert cli.main(argv + ["--min-recall", "10", "--no-chat-template"]) == 2
    assert "--min-recall, --no-chat-template: not an option of --protocol synthetic" in capsys.readouterr().err


def test_a_needles_file_in_the_official_format_reads(tmp_path):
    (tmp_path / "book.txt").write_text("It was late. The sea was calm.")
    row = {"needle": "N.", "question": "Q?", "real_needle": "A"}
    (tmp_path / "needles.jsonl").write_text(json.dumps(row | {"haystack": "book.txt"}) + "\n\n")
    (needle,) = nh.read_needles(tmp_path / "needles.jsonl")
    assert (needle.answer, needle.haystack) == ("A", "It was late. The sea was calm.")
    (tmp_path / "bare.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="names no 'haystack' file"):
        nh.read_needles(tmp_path / "bare.jsonl")
    assert nh.read_needles(tmp_path / "bare.jsonl", tmp_path)[0].haystack == "It was late. The sea was calm."
    (tmp_path / "bad.jsonl").write_text('{"needle": "N."}\n')
    with pytest.raises(ValueError, match="line 1: needs non-empty"):
        nh.read_needles(tmp_path / "bad.jsonl")
