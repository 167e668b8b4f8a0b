"""rsync-style delta transfer of checkpoint and volume archives between nodes.

The roles mirror rsync so each can run on its own side of a gRPC stream: the receiver makes
a :class:`Signature` of the file it already has (``make_signature``), the sender turns its
new file plus that signature into delta chunks (``delta_stream``), and the receiver rebuilds
and verifies the new file (``patch_stream``).

Only making a signature and the delta's vectorised rolling search load numpy, and nothing here
loads grpc or docker, so ``python -m migctl.agent.delta`` starts about as fast as Python does.
"""

from __future__ import annotations

import os

from migctl.agent.delta.match import delta_stream
from migctl.agent.delta.patch import patch_stream
from migctl.agent.delta.signature import (
    DEFAULT_BLOCK_SIZE,
    Signature,
    make_signature,
    signature_block_cap,
)
from migctl.agent.delta.stats import DeltaStats
from migctl.agent.delta.wire import VERSION as DELTA_FORMAT
from migctl.agent.delta.wire import agreed_format

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DELTA_FORMAT",
    "DeltaStats",
    "Signature",
    "agreed_format",
    "delta_stream",
    "local_delta",
    "make_signature",
    "patch_stream",
    "signature_block_cap",
]


def local_delta(
    basis_path: str | os.PathLike[str] | None,
    new_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> DeltaStats:
    """Run all three roles in one process: rebuild ``new_path`` into ``out_path`` from the basis.

    Returns the sender's statistics (what the delta would have cost on the wire).
    """
    if basis_path is None:
        sig = Signature.empty(block_size)
    else:
        sig = make_signature(basis_path, block_size)
    stats = DeltaStats()
    patch_stream(basis_path, delta_stream(sig, new_path, stats=stats), out_path)
    return stats
