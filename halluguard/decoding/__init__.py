"""How a guarded call runs beyond one plain forward per step: streams, contrasts, loop owners.

* ``session``: the streams of one call and the rows each forward gives them;
* ``streams``: ``Probe`` (rows riding along the prompt's forward) and ``Branch`` (a contrast
  stream riding along every forward as extra rows);
* ``cache``: the cache whose row blocks follow beam search together;
* ``side_stream``: a branch run as its own forwards, when the cache cannot carry extra rows;
* ``contrast``: the contrast formula shared by guidance and contrastive methods;
* ``loops``: the signature of a decoding loop a method owns.
"""

from .cache import RowGroupsCache
from .contrast import contrast, entropy
from .loops import DecodingLoop
from .session import Session
from .side_stream import SideStream
from .streams import Branch, Probe

__all__ = [
    "Branch",
    "DecodingLoop",
    "Probe",
    "RowGroupsCache",
    "Session",
    "SideStream",
    "contrast",
    "entropy",
]
