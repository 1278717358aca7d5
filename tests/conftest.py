import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it must be chosen before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: a checkpoint folder of the family (``checkpoints.build_checkpoint``),
    built once per session."""
    from checkpoints import build_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(build_checkpoint(family, root / family))
        return built[family]

    return get
