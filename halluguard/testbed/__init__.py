"""The shipped test model and the synthetic world it was trained on.

    model, processor = halluguard.testbed.load()     # offline, from the package's files

The model is a small LLaVA trained from scratch on the shapes world of ``world`` (see
``model/REPORT.md`` for its measured behaviour); it is the default model of the demo and of the
end-to-end tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_DIR = Path(__file__).parent / "model"


def path() -> Path:
    """Folder of the shipped model (HF format: config, fp16 safetensors, processor files)."""
    if not (MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the test model is missing from {MODEL_DIR}; train it with `python -m halluguard.testbed.train`"
        )
    return MODEL_DIR


def load(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, processor)`` of the shipped test model, loaded offline, in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = path()
    model = LlavaForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor
