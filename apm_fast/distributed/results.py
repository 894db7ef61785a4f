"""Results files that survive a killed process: per-rank JSON Lines, merged atomically.

Each rank appends one JSON object per line to its own file and flushes + fsyncs after every line,
so a rank killed at any instant loses at most the record it was writing. Only lines that end in a
newline count: a partial last line is ignored by readers and cut off by the owning rank before
it appends again, so a new record never gets glued onto a torn one. Any other line that is not a
record makes the file refused (:class:`ResultsFileError`): it is not a results file. The merged file is written
to a temporary name, fsynced and renamed over the target, so it is either the old file or the
complete new one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List

__all__ = ["parts_dir", "part_path", "existing_part_files", "read_records", "ResultsFileError",
           "drop_partial_tail", "RecordWriter", "write_records_atomic"]


def parts_dir(out_path) -> Path:
    """The folder beside ``out_path`` that holds the per-rank files while a run is under way."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".parts")


def part_path(out_path, rank: int) -> Path:
    """The per-rank file of ``rank`` for results file ``out_path``."""
    return parts_dir(out_path) / f"rank-{int(rank):05d}.jsonl"


def existing_part_files(out_path) -> List[Path]:
    """Every per-rank file present, whatever world size wrote it (a restart may use another)."""
    d = parts_dir(out_path)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("rank-") and p.suffix == ".jsonl")


class ResultsFileError(ValueError):
    """A results file holding a complete line that is not a record (notes, another tool's output):
    refused, since a results file is rewritten from its records."""


def read_records(path, key_field: str) -> List[dict]:
    """The complete records of a JSON Lines file, in file order (missing file: none).

    A last line without its newline that starts like a record (``{``) is a write cut short by a
    kill and is dropped. Any other line that is not a JSON object carrying a string ``key_field``
    (blank lines aside) raises :class:`ResultsFileError` naming the file and the line: the file is
    not a results file, and merging would rewrite it from its records alone, losing that line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    end = data.rfind(b"\n") + 1               # after the last newline: a torn write, or no record
    lines = data[:end].split(b"\n")[:-1]
    tail = data[end:]
    if tail.strip() and not tail.lstrip().startswith(b"{"):
        lines.append(tail)                    # not the start of a record: checked (and refused) below
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get(key_field), str):
            text = line.decode("utf-8", "replace").strip()
            raise ResultsFileError(
                f"{str(path)!r} line {lineno}: expected a results record (a JSON object with a string "
                f"{key_field!r} field), got {text[:60] + ('...' if len(text) > 60 else '')!r}; a results "
                f"file is rewritten from its records, so one holding other lines is refused (only a "
                f"last line cut short by an interrupted write is ignored)")
        out.append(rec)
    return out


def drop_partial_tail(path) -> int:
    """Cut a torn last line (no newline) off ``path``; returns the number of bytes removed."""
    path = Path(path)
    try:
        f = open(path, "r+b")
    except FileNotFoundError:
        return 0
    with f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        # scan backwards in blocks for the last newline; records are small, so this is short
        pos, keep = size, 0
        while pos > 0:
            step = min(65536, pos)
            f.seek(pos - step)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = pos - step + i + 1
                break
            pos -= step
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


class RecordWriter:
    """Appends records to one rank's file, each flushed and fsynced before ``append`` returns."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_partial_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def append(self, record: dict):
        # one write of the whole line: a kill leaves either nothing or a torn line without "\n"
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        if not self._f.closed:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fsync_dir(d: Path):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:                            # some platforms cannot open folders; best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_records_atomic(path, records: Iterable[dict]):
    """Replace ``path`` by a JSON Lines file of ``records`` in one atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
