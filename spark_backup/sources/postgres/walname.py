"""WAL positions and segment names, as PostgreSQL computes them, in one value type.

A segment name is ``TTTTTTTTLLLLLLLLSSSSSSSS``: the timeline, then the segment's number split
into a "log" (each 4 GiB of WAL) and the segment within it, all in hex. How many segments make a
log depends on the cluster's segment size (16 MiB unless ``initdb --wal-segsize`` said otherwise),
so every conversion takes it.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_LOG_BYTES = 0x100000000


def lsn_value(lsn: str) -> int:
    """A WAL position such as ``0/3000028`` as a number."""
    high, low = (int(part, 16) for part in lsn.split("/"))
    return (high << 32) | low


@dataclass(frozen=True)
class WalSegment:
    """A WAL segment: its timeline and its number from the start of WAL."""

    timeline: int
    # Counted in segments from the start of WAL: position // segment_size.
    number: int
    segment_size: int = DEFAULT_SEGMENT_SIZE

    @classmethod
    def from_name(cls, name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> WalSegment:
        """The segment a WAL file name (or a ``.partial``/``.backup`` name) starts with."""
        timeline, log, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:24], 16)
        return cls(timeline, log * (_LOG_BYTES // segment_size) + seg, segment_size)

    @classmethod
    def from_lsn(
        cls, lsn: str, timeline: int, segment_size: int = DEFAULT_SEGMENT_SIZE
    ) -> WalSegment:
        """The segment holding ``lsn`` (PostgreSQL's ``pg_walfile_name``, without the server)."""
        return cls(timeline, lsn_value(lsn) // segment_size, segment_size)

    @property
    def name(self) -> str:
        per_log = _LOG_BYTES // self.segment_size
        return f"{self.timeline:08X}{self.number // per_log:08X}{self.number % per_log:08X}"

    @property
    def position(self) -> str:
        """The name without its timeline: what orders segments across timelines."""
        return self.name[8:]

    @property
    def start(self) -> int:
        """The WAL position the segment starts at."""
        return self.number * self.segment_size

    def next(self) -> WalSegment:
        return WalSegment(self.timeline, self.number + 1, self.segment_size)

    def previous(self) -> WalSegment:
        return WalSegment(self.timeline, self.number - 1, self.segment_size)
