"""VTI's directions from demonstrations, as the official ``obtain_textual_vti`` and
``obtain_visual_vti`` compute them (``vti_utils/utils.py``, ``vti_utils/pca.py``).

For a set of differences ``X`` (``n`` demonstrations by ``D``), the official one-component PCA
returns ``components_ + mean_``: the mean difference plus the first principal direction of the
centred differences (a unit vector, its sign flipped so that the largest-magnitude entry of the
first left singular vector is positive, as scikit-learn's ``svd_flip``). That sum is the direction.

* Text: ``X[i]`` is the decoder's last-token hidden states, every layer's output stacked
  (``hidden_states[1:]``, the last one after the final norm), for the demonstration's prompt
  followed by its faithful caption minus the same with its hallucinated caption; ``D = L d``.
* Vision: ``X[i]`` is the vision encoder's hidden states (every layer's output, every token) for
  the image with most patches masked (averaged over trials) minus for the clean image. The
  official code lays each ``(L, T, d)`` difference out as ``T`` rows of ``L d`` consecutive values
  (``reshape(n_tokens, -1)``, which mixes layers and tokens in a row) and fits one PCA per row
  across the demonstrations; this does the same, so the directions are the official ones.
"""

from __future__ import annotations

import torch


def principal_shift(differences: torch.Tensor) -> torch.Tensor:
    """``mean + PC1`` of ``differences`` ``(..., n, D)`` (batched over leading dimensions): ``(..., D)``."""
    x = differences.float()
    mean = x.mean(-2, keepdim=True)
    u, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    first = u[..., 0]  # (..., n)
    sign = torch.sign(first.gather(-1, first.abs().argmax(-1, keepdim=True)))  # (..., 1)
    return mean.squeeze(-2) + sign * vh[..., 0, :]


def text_directions(faithful: torch.Tensor, hallucinated: torch.Tensor) -> torch.Tensor:
    """``(L, d)`` from the last-token hidden states ``(n, L, d)`` with each demonstration's faithful
    and hallucinated caption."""
    n, layers, dim = faithful.shape
    return principal_shift((faithful - hallucinated).reshape(n, layers * dim)).view(layers, dim)


def vision_directions(masked: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """``(L, T, d)`` from the vision encoder's hidden states ``(n, L, T, d)`` of each demonstration's
    masked (trial-averaged) and clean image, with the official row layout (module docstring)."""
    n, layers, tokens, dim = masked.shape
    rows = (masked - clean).reshape(n, tokens, layers * dim).transpose(0, 1)  # (T, n, L d)
    return principal_shift(rows).reshape(layers, tokens, dim)
