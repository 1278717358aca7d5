"""How a guarded call runs beyond one plain forward per step: streams, contrasts, loop owners.

* ``session``: the streams of one call and the rows each forward gives them (the routing the
  attention hook reads);
* ``layout``: the row layout of a forward that carries several streams, as pure functions (the one
  rule for per-token inputs, rows joined and taken out, text-only rows);
* ``runner``: the forwards a call runs itself (a probe or branch apart, a branch's prefill);
* ``streams``: ``Probe`` (rows riding along the prompt's forward) and ``Branch`` (a contrast
  stream riding along every forward as extra rows);
* ``cache``: the cache whose row blocks follow beam search together;
* ``side_stream``: a branch run as its own forwards, when the cache cannot carry extra rows;
* ``contrast``: the contrast formula shared by guidance and contrastive methods;
* ``loops``: the signature of a decoding loop a method owns, and what every such loop checks.
  The loops themselves live with their methods (``methods.opera.search``, ``methods.lookback.guided``).
"""

from .cache import RowGroupsCache
from .contrast import contrast, cutoff, entropy
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
    "cutoff",
    "entropy",
]
