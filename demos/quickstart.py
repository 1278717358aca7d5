"""Wrap a model, generate, unwrap: the guard's identities checked, and a method shown.

    python demos/quickstart.py                      # the shipped test model on scenes of its world
    python demos/quickstart.py --model PATH_OR_ID --image FILE   # any supported checkpoint you have

A guard that only measures generates exactly the tokens of the plain model, and after ``unwrap()``
the logits are bit-identical to before. The script reports, from the guard's own attention
reductions (no attention maps), how much of the last prompt token's attention each layer puts on
the image, and prints the captions of plain generation beside PAI's.
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


def shipped_model():
    """The shipped test model and a left-padded batch of three scenes from its misleading split."""
    from halluguard import testbed
    from halluguard.models import build_prompt
    from halluguard.testbed import world

    model, processor = testbed.load()
    scenes = list(world.scenes("misleading", 3))
    prompt = build_prompt(processor, "Describe the image.")
    inputs = dict(processor(images=[s.render() for s in scenes], text=[prompt] * 3, return_tensors="pt", padding=True))
    return model, processor, inputs, [s.caption for s in scenes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        help="a local checkpoint or hub id of a supported LVLM (needs an image and "
        "processor; default: the shipped test model)",
    )
    parser.add_argument("--image", help="image file for --model")
    parser.add_argument("--max-new-tokens", type=int, default=64)
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
        truths = None
    else:
        model, processor, inputs, truths = shipped_model()

    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
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
        with hg.wrap(model, processor, "pai"):
            pai = model.generate(**inputs, **settings)
        after = model(**inputs).logits

    prompt_len = inputs["input_ids"].shape[1]
    for i in range(plain.shape[0]):
        if truths:
            print(f"truth: {truths[i]}")
        print(f"plain: {processor.decode(plain[i, prompt_len:], skip_special_tokens=True)}")
        print(f"pai:   {processor.decode(pai[i, prompt_len:], skip_special_tokens=True)}")
    print(f"guarded tokens identical to plain generate: {torch.equal(plain, guarded)}")
    print(f"logits after unwrap bit-identical:          {torch.equal(before, after)}")
    print(f"time: plain {t_plain:.3f}s, guarded {t_guarded:.3f}s")
    print("image attention mass of the last prompt token, per layer (mean over heads and rows):")
    for layer, mass in sorted(meter.per_layer.items()):
        print(f"  layer {layer:2d}: {mass:.3f}")


if __name__ == "__main__":
    main()
