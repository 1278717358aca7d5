"""``halluguard`` as a launcher's worker script, for the multi-process tests.

    torchrun --nproc_per_node 2 tests/sharded_cli.py eval pope ...

With ``KILL_RANK=r:n`` in the environment, process ``r`` kills itself (SIGKILL, as an out-of-memory
killer would) when it starts its ``n``-th batch, after its earlier batches were written.
"""

import os
import signal
import sys

from halluguard import cli
from halluguard.eval import runner

if os.environ.get("KILL_RANK"):
    rank, batch = (int(x) for x in os.environ["KILL_RANK"].split(":"))
    produce, calls = runner._produce, [0]

    def dying_produce(*args, **kwargs):
        calls[0] += 1
        if int(os.environ["RANK"]) == rank and calls[0] == batch:
            os.kill(os.getpid(), signal.SIGKILL)
        return produce(*args, **kwargs)

    runner._produce = dying_produce

sys.exit(cli.main(sys.argv[1:]))
