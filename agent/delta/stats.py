"""Counters every delta role reports, so callers can log how much the delta saved."""

from __future__ import annotations


class Counters:
    """Named integer counters, all 0 unless given: plain attributes, because importing
    dataclasses costs every `migctl-delta` process about 25 ms of start-up."""

    __slots__: tuple[str, ...] = ()

    def __init__(self, **values: int) -> None:
        for name in self.__slots__:
            setattr(self, name, values.pop(name, 0))
        if values:
            raise TypeError(f"{type(self).__name__} has no counter {', '.join(values)}")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(
            getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(
            f"{n}={getattr(self, n)}" for n in self.__slots__) + ")"


class DeltaStats(Counters):
    """Byte counts of one delta.

    ``literal_bytes`` + ``matched_bytes`` == ``new_size``; ``wire_bytes`` is what crossed (or
    would cross) the network, i.e. the length of the delta stream including framing.
    """

    __slots__ = ("literal_bytes", "matched_bytes", "wire_bytes", "new_size")
    literal_bytes: int
    matched_bytes: int
    wire_bytes: int
    new_size: int
