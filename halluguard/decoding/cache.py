"""The KV cache of a guarded ``generate`` whose forwards carry extra stream rows.

``RowGroupsCache`` is a ``DynamicCache`` whose rows are blocks of equal size: the main rows first,
then the rows of each branch stream (see ``halluguard.decoding.session``), block ``g`` row ``i``
following main row ``i``. ``generate`` only knows the main rows, so its batch operations (beam
search's reordering, row expansion, selection) name main rows; here each is applied to every
block alike, and the branch rows follow their main rows through beam search at the cost of one
``index_select`` per layer, with no token matching and no recomputation. Whatever else follows the
main rows (the tokens fed to them, which a branch run apart matches its rows by) registers in
``followers`` and is told each main-row selection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from ..compat import append_rows, cache_device, cache_rows, select_cache_rows


class RowGroupsCache(DynamicCache):
    """A ``DynamicCache`` of ``blocks`` row blocks; batch operations address the main (first) block."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocks = 1
        self.followers: list[Callable[[torch.Tensor], None]] = []  # told every main-row selection

    def _rows(self) -> int:
        return cache_rows(self)

    def _every_block(self, index: torch.Tensor) -> torch.Tensor:
        """``index`` (main rows) for every block; the followers are told it."""
        for follow in self.followers:
            follow(index)
        main = self._rows() // self.blocks
        return torch.cat([index + b * main for b in range(self.blocks)])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(self._every_block(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(self._every_block(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        main = self._rows() // self.blocks
        index = torch.arange(main).repeat_interleave(repeats)
        super().batch_select_indices(self._every_block(index.to(self._device())))

    def _device(self) -> torch.device:
        return cache_device(self)

    # ---- stream rows -------------------------------------------------------------------------------
    def keep_first_rows(self, rows: int) -> None:
        """Drop every row after the first ``rows`` (a probe's rows, after the prompt's forward)."""
        select_cache_rows(self, torch.arange(rows))

    def add_block(self, other: DynamicCache) -> None:
        """Append ``other``'s rows as a new block, left-padded (with zeros) to this cache's length.

        The padded slots are never attended to: the rows' attention mask marks them as padding."""
        append_rows(self, other)
        self.blocks += 1

    def drop_extra_blocks(self) -> None:
        """Keep the main rows only (what ``generate``'s caller gets back)."""
        if self.blocks > 1:
            self.keep_first_rows(self._rows() // self.blocks)
            self.blocks = 1
