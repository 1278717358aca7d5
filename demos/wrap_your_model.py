"""Guard a model of your own: wrap, generate, unwrap.

    python demos/wrap_your_model.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg
    python demos/wrap_your_model.py                      # the shipped test model and one of its scenes

Any supported vision-language checkpoint works (``halluguard models`` lists the families); the
methods are named as on the command line ("vhr", "pai+vhr", ...) or given as configs.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import halluguard as hg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="hub id or local path (default: the shipped test model)")
    parser.add_argument("--image", help="image file (default: a scene of the test model's world)")
    parser.add_argument("--method", default="vcd")
    args = parser.parse_args()

    if args.model:
        from PIL import Image

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto").eval()
        processor = AutoProcessor.from_pretrained(args.model)
        image = Image.open(args.image).convert("RGB")
    else:
        from halluguard import testbed
        from halluguard.testbed import world

        model, processor = testbed.load()
        image = world.sample_scene("misleading", 1).render()
    processor.tokenizer.padding_side = "left"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(model.device)
    settings = dict(max_new_tokens=64, do_sample=False)

    def caption(out):
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()

    with torch.no_grad():
        print("plain:  ", caption(model.generate(**inputs, **settings)))
        with hg.wrap(model, processor, args.method):  # patched in place, restored on exit
            print(f"{args.method}:", caption(model.generate(**inputs, **settings)))


if __name__ == "__main__":
    main()
