"""Wrap a model, generate, unwrap: the guard's identities checked on a small LLaVA.

    python demos/quickstart.py                      # a small random-weight LLaVA built in memory
    python demos/quickstart.py --model PATH_OR_ID   # any supported checkpoint you have locally

With no method edits the guarded model generates exactly the tokens of the plain model, and after
``unwrap()`` its logits are bit-identical to before. The script also reports, from the guard's
own attention reductions (no attention maps), how much of the last prompt token's attention each
layer puts on the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import halluguard as hg
from halluguard.attention import AttentionEdit, Reductions


@dataclasses.dataclass
class MeterConfig(hg.MethodConfig):
    name = "image-meter"


class ImageAttentionMeter(hg.Method):
    """Reports the attention mass on image tokens per layer; edits nothing."""

    config_cls = MeterConfig

    def __init__(self):
        super().__init__(MeterConfig())
        self.per_layer: dict[int, float] = {}

    def attention_edit(self, state, call):
        if not call.is_prefill:
            return None
        image = state.group_masks(call)["image"]
        return AttentionEdit(reductions=Reductions({"image": image}))

    def on_stats(self, state, call, stats):
        self.per_layer[call.layer_idx] = float(stats["mass/image"].mean())


def small_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=8),
        text_config=dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, pad_token_id=0),
        image_token_index=999, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    n_image = (64 // 8) ** 2
    rows = [[1, 11, 12] + [999] * n_image + [13, 14, 15, 16], [1, 21] + [999] * n_image + [22, 23]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    inputs = dict(input_ids=ids, attention_mask=(ids != 0).long(), pixel_values=torch.randn(2, 3, 64, 64))
    return model, inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint or hub id of a supported LVLM (needs an image and "
                        "processor; default: a small random LLaVA built in memory)")
    parser.add_argument("--image", help="image file for --model")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    if args.model:
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(args.model)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
        image = Image.open(args.image).convert("RGB") if args.image else Image.new("RGB", (336, 336), "gray")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = dict(processor(images=image, text=prompt, return_tensors="pt"))
    else:
        model, inputs = small_llava()

    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model(**inputs).logits
        t0 = time.perf_counter()
        plain = model.generate(**inputs, **settings)
        t_plain = time.perf_counter() - t0
        meter = ImageAttentionMeter()
        with hg.wrap(model, methods=[meter]) as guard:
            t0 = time.perf_counter()
            guarded = model.generate(**inputs, **settings)
            t_guarded = time.perf_counter() - t0
            print(f"{guard!r}")
        after = model(**inputs).logits

    print(f"guarded tokens identical to plain generate: {torch.equal(plain, guarded)}")
    print(f"logits after unwrap bit-identical:          {torch.equal(before, after)}")
    print(f"time: plain {t_plain:.3f}s, guarded {t_guarded:.3f}s")
    print("image attention mass of the last prompt token, per layer (mean over heads and rows):")
    for layer, mass in sorted(meter.per_layer.items()):
        print(f"  layer {layer:2d}: {mass:.3f}")


if __name__ == "__main__":
    main()
