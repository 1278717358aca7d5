"""The test model's architecture, tokenizer and processor (built offline, from scratch).

A LLaVA (``LlavaForConditionalGeneration``): a 4-layer CLIP vision tower on 108x108 images with
18-pixel patches (36 image tokens; each grid cell is 2x2 patches), a two-layer GELU projector, and
a 6-layer Llama text model (hidden 192, 8 heads of 24, 2 key/value heads, GQA)
with tied embeddings over the world's word vocabulary. Attention dropout (``ATTENTION_DROPOUT``,
training only) keeps the text model's attention from saturating on a few keys.
The tokenizer is a word-level ``tokenizers`` model (lower-cased, punctuation split off); the
processor is a real ``LlavaProcessor`` with the llava-hf chat template
``"USER: <image>\\n{text} ASSISTANT:"``.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..models import tiny_llava_config
from . import world

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
WORDS = [
    ".",
    ",",
    "?",
    ":",
    "!",
    "'",
    "user",
    "assistant",
    "a",
    "an",
    "and",
    "the",
    "this",
    "that",
    "is",
    "are",
    "there",
    "in",
    "on",
    "of",
    "with",
    "image",
    "picture",
    "photo",
    "describe",
    "please",
    "detail",
    "detailed",
    "what",
    "do",
    "you",
    "see",
    "yes",
    "no",
    "not",
    "answer",
    "question",
    "using",
    "single",
    "word",
    "or",
    "phrase",
    "one",
    "help",
    "me",
    "shape",
    "shapes",
    "object",
    "objects",
    "small",
    "large",
    "left",
    "right",
    "top",
    "bottom",
    "middle",
    "at",
]
PROMPT_TEMPLATE = "USER: <image>\n{text} ASSISTANT:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<image>\\n' -}}{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{- ' ' -}}"
    "{%- elif message['role'] == 'system' -%}"  # LLaVA-1.5's: the system text first, then a space
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{{- ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}{%- else -%}"
    "{%- for c in message['content'] -%}{%- if c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}{{- '</s>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)
PATCH_SIZE = 18
ATTENTION_DROPOUT = 0.1
IMAGE_TOKENS = (world.IMAGE_SIZE // PATCH_SIZE) ** 2


def vocabulary() -> list[str]:
    synonyms = [s for syns in world.SYNONYMS.values() for s in syns]
    words = SPECIALS + WORDS + list(world.COLORS) + list(world.CATEGORIES) + synonyms
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    while len(out) % 16:
        out.append(f"<extra_{len(out)}>")
    return out


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=256,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_processor() -> LlavaProcessor:
    # imported here: without torchvision, naming this class warns (it falls back to its PIL twin), and
    # only building the model needs it (loading reads the saved processor)
    from transformers import CLIPImageProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": world.IMAGE_SIZE}, crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config() -> LlavaConfig:
    """The architecture the module docstring describes, with the tokenizer's special ids."""
    text = dict(
        vocab_size=len(vocabulary()),
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        attention_dropout=ATTENTION_DROPOUT,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    vision = dict(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=world.IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = tiny_llava_config(
        text, vision, IMAGE_ID, vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True
    )
    config.pad_token_id = PAD_ID
    return config


def build_model(seed: int = 0) -> LlavaForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config())
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    return model
