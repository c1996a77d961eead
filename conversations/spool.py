"""The worker's spool: every event it reads from Pinecall, on local disk before anything else.

Pinecall does not acknowledge events, so what a process has read and not made
durable dies with it. The worker therefore appends each event here as soon as
the client hands it over (one buffered write, no fsync: a `kill -9` leaves the
page cache intact, so only a machine crash can lose the tail) and stores from
the spool, in order, as fast as the database allows. Memory stays bounded
whatever the database does: the file is the queue.

Files are segments named `<agent>-<id>.jsonl`, one `[seq, frame, spooled at]`
JSON array per line. How far each segment is stored lives in the database
(`IngestCursor`), written in the same transaction as the events, so a restart
replays exactly what is after it. A process writes only its own new segment;
segments left by an earlier process are replayed first, then deleted. A
segment whose every line is stored is rolled over once it grows large.

This module knows files, not Django: the worker passes in the cursor values.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROLL_OVER_RECORDS = 50_000


class Segment:
    """One spool file: appended by its writer, read in order by the store loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spool_id = path.stem
        self._reader = None
        self.read_seq = 0  # the last seq the store loop has taken from this file

    def read(self, after: int, limit: int) -> list[tuple[int, dict[str, Any], float]]:
        """Up to `limit` records (seq, frame, when it was spooled) with seq > `after`, in
        order; a torn last line is left for later."""
        if self._reader is None:
            self._reader = self.path.open("r", encoding="ascii", errors="replace")
        records: list[tuple[int, dict[str, Any], float]] = []
        while len(records) < limit:
            position = self._reader.tell()
            line = self._reader.readline()
            if not line:
                break
            if not line.endswith("\n"):
                # A writer killed mid-line (or still writing): read it again later.
                self._reader.seek(position)
                break
            try:
                seq, frame, *spooled_at = json.loads(line)
            except (ValueError, TypeError):
                logger.warning("spool %s: skipping a damaged line", self.path.name)
                continue
            if seq > after:
                records.append((seq, frame, spooled_at[0] if spooled_at else 0.0))
        if records:
            self.read_seq = records[-1][0]
        return records

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def delete(self) -> None:
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class Spool:
    """The spool directory of one agent: this process's segment and the ones left before."""

    def __init__(self, directory: Path, agent_id: str) -> None:
        self.directory = Path(directory)
        self.agent_id = agent_id
        self.directory.mkdir(parents=True, exist_ok=True)
        # Left by an earlier process: replayed before anything new, oldest first.
        self.leftovers: list[Segment] = [
            Segment(path)
            for path in sorted(
                self.directory.glob(f"{self._prefix}*.jsonl"), key=lambda p: p.stat().st_mtime
            )
        ]
        self.active: Segment
        self._writer = None
        self.seq = 0
        self._start_segment()

    @property
    def _prefix(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.agent_id)
        return f"{safe}-"

    def _start_segment(self) -> None:
        path = self.directory / f"{self._prefix}{uuid.uuid4().hex}.jsonl"
        self._writer = path.open("a", encoding="ascii", buffering=1024 * 64)
        self.active = Segment(path)
        self.seq = 0

    def append(self, frame: dict[str, Any]) -> int:
        """Write one event; it is on disk (in the page cache) when this returns."""
        self.seq += 1
        # ensure_ascii: NULs, lone surrogates and newlines become escapes; one line per event.
        self._writer.write(json.dumps([self.seq, frame, time.time()], ensure_ascii=True) + "\n")
        self._writer.flush()
        return self.seq

    def segments(self) -> Iterator[Segment]:
        """Leftovers first, then the active segment."""
        yield from list(self.leftovers)
        yield self.active

    def finished(self, segment: Segment) -> None:
        """Every record of a leftover segment is stored: it goes."""
        if segment in self.leftovers:
            self.leftovers.remove(segment)
            segment.delete()

    def roll_over_if_large(self, stored_seq: int) -> str | None:
        """Start a new active segment once the current one is all stored and large.

        Returns the id of the dropped segment (its cursor can go), or None.
        """
        if self.seq < ROLL_OVER_RECORDS or stored_seq < self.seq:
            return None
        old = self.active
        self._writer.close()
        self._start_segment()
        old.delete()
        return old.spool_id

    def close(self, *, all_stored: bool) -> None:
        """On a clean stop, a fully stored segment is removed; otherwise it stays for the next run."""
        self._writer.close()
        for segment in [*self.leftovers, self.active]:
            segment.close()
        if all_stored and not self.leftovers:
            self.active.delete()

    def size_bytes(self) -> int:
        total = 0
        for segment in [*self.leftovers, self.active]:
            try:
                total += os.path.getsize(segment.path)
            except OSError:
                pass
        return total
