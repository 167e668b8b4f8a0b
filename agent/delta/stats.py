"""Counters every delta role reports, so callers can log how much the delta saved."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DeltaStats:
    """Byte counts of one delta.

    ``literal_bytes`` + ``matched_bytes`` == ``new_size``; ``wire_bytes`` is what crossed (or
    would cross) the network, i.e. the length of the delta stream including framing.
    """

    literal_bytes: int = 0
    matched_bytes: int = 0
    wire_bytes: int = 0
    new_size: int = 0
