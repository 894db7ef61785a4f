"""Mode 1: the test images spread over ranks, each rank running the single-device TTT engine.

Assignment: inputs are keyed by a string (their path by default); the keys are sorted and the
i-th key goes to rank i % world. The assignment depends on the set of inputs only, not on the
order they were listed in, so a restarted run gives every rank the same share again.

Restart safety: every rank first reads what earlier runs left (the merged results file and every
per-rank file, whatever world size wrote them) and skips the inputs already there; it then appends
one record per finished image to its own file (flushed + fsynced). After all ranks are done, rank
0 merges everything into the results file in input order, atomically, and removes the per-rank
files. A rank killed at any point loses at most the image it was computing; rerunning the same
command finishes the rest, and no input is written twice. One process alone, interrupted
(KeyboardInterrupt), merges what it finished into the results file before the exception goes on;
a killed one (or ranks under torchrun) leaves the per-rank files, which the rerun picks up.

Failed inputs: ``process`` may return ``None`` for an input it could not do (an unreadable
file, reported by the caller). Such an input gets no record, is not an error at the merge (every
rank tells rank 0 which inputs failed) and is tried again by a rerun.

The per-rank files live next to the results file, so with several nodes it must be on a
filesystem every node sees.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, List, Optional, Sequence

import torch.distributed as dist

from ..validation import refuse_repeats
from .env import cpu_group, init_distributed, launched_world_size
from .results import (RecordWriter, existing_part_files, part_path, parts_dir, read_records,
                      write_records_atomic)

__all__ = ["ShardedRun", "shard_indices", "input_keys", "run_sharded", "run_sharded_ttt",
           "ttt_record"]

# Ranks wait at the final barrier for the slowest one; a long run can take many hours.
DEFAULT_BARRIER_TIMEOUT = timedelta(days=7)


@dataclass
class ShardedRun:
    """What one rank did. ``records``: the merged results in input order (rank 0 only).
    ``computed`` counts the records this rank wrote; ``failed``: the keys of this rank's inputs
    that ``process`` gave up on (no record); ``failed_total``: their number over all ranks."""

    rank: int
    world_size: int
    assigned: int
    skipped: int
    computed: int
    records: Optional[List[dict]] = None
    failed: List[str] = field(default_factory=list)
    failed_total: int = 0


def input_keys(inputs: Sequence, key: Callable | None = None) -> List[str]:
    """One string key per input (``key(x)``, or the path itself); duplicates are refused, since
    an input listed twice would be computed or written twice."""
    keys = []
    for i, x in enumerate(inputs):
        if key is not None:
            k = key(x)
        elif isinstance(x, (str, os.PathLike)):
            k = os.fspath(x)
        else:
            raise TypeError(f"inputs[{i}]: expected a path (str or os.PathLike) or a key= function "
                            f"giving one string per input, got {type(x).__name__}")
        if not isinstance(k, str):
            raise TypeError(f"key: expected a string for inputs[{i}], got {type(k).__name__}")
        keys.append(k)
    refuse_repeats(keys, lambda k, a, b: f"inputs: {k!r} is listed twice (positions {a} and {b}); each "
                                         f"input must appear once")
    return keys


def shard_indices(keys: Sequence[str], rank: int, world_size: int) -> List[int]:
    """Positions (in input order) of the inputs that ``rank`` computes: sorted keys, i % world."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    by_key = sorted(range(len(keys)), key=lambda i: keys[i])
    return sorted(by_key[rank::world_size])


def _done_keys(out_path, key_field) -> set:
    done = {r[key_field] for r in read_records(out_path, key_field)}
    for p in existing_part_files(out_path):
        done.update(r[key_field] for r in read_records(p, key_field))
    return done


def _merge(out_path, keys, key_field, failed=frozenset(), *, interrupted=False) -> List[dict]:
    """Every record of ``out_path`` and the per-rank files into ``out_path`` (this run's keys in
    input order, then the others), the per-rank files removed; the records of ``keys``.
    ``interrupted``: the run stopped early, its missing inputs are left for a rerun."""
    by_key, order = {}, []
    for src in [out_path] + existing_part_files(out_path):
        for rec in read_records(src, key_field):
            k = rec[key_field]
            if k not in by_key:
                by_key[k] = rec
                order.append(k)
    missing = [k for k in keys if k not in by_key and k not in failed]
    if missing and not interrupted:
        raise RuntimeError(f"results: {len(missing)} input(s) have no record after every rank "
                           f"finished, e.g. {missing[:3]}; rerun the same command to compute them")
    wanted = set(keys)
    # records of inputs not in this run (an earlier run on other images) are kept, after these
    mine = [by_key[k] for k in keys if k in by_key]
    write_records_atomic(out_path, mine + [by_key[k] for k in order if k not in wanted])
    shutil.rmtree(parts_dir(out_path), ignore_errors=True)
    return mine


def run_sharded(inputs: Sequence, process: Callable[[object], dict], out_path, *,
                key: Callable | None = None, key_field: str = "input", resume: bool = True,
                group=None, barrier_timeout: timedelta = DEFAULT_BARRIER_TIMEOUT,
                progress: Callable[[int], None] | None = None, stream: bool = False) -> ShardedRun:
    """Compute ``process(x)`` (a JSON-serializable dict) for every input, spread over the ranks,
    into one JSON Lines file ``out_path`` in input order; see the module docstring.

    Every rank must call it with the same ``inputs``. ``group``: the ranks to spread over (a gloo
    group is best: ranks wait at a barrier for the slowest); ``None``: all ranks, through a gloo
    group made here, with a process group started from torchrun's environment if none exists.
    ``resume=False`` discards earlier results of ``out_path`` first. Each record gets
    ``key_field`` set to its input's key (a record may carry it already, with that value).
    ``process`` returns ``None`` for an input it gives up on (see the module docstring).
    ``stream=True``: ``process(share)`` is called once with the list of this rank's inputs still
    to do and yields ``(position in share, record or None)`` as each finishes, in any order (a
    batched pipeline); it is not called when there is nothing to do.
    """
    keys = input_keys(inputs, key)
    out_path = os.fspath(out_path)
    created = False
    if group is None and not dist.is_initialized() and launched_world_size() > 1:
        created = init_distributed(backend="gloo", timeout=barrier_timeout).created
    if group is not None:
        coord = group
    elif created:
        coord = dist.group.WORLD               # the gloo group just made, with the long timeout
    elif dist.is_initialized():
        coord = cpu_group(barrier_timeout)
    else:
        coord = None
    if coord is not None:
        rank, world = dist.get_rank(coord), dist.get_world_size(coord)
        root = dist.get_global_rank(coord, 0)
    else:
        rank, world, root = 0, 1, 0
    try:
        if not resume:
            if rank == 0:
                if os.path.exists(out_path):
                    os.remove(out_path)
                shutil.rmtree(parts_dir(out_path), ignore_errors=True)
            if coord is not None:
                dist.barrier(group=coord)
        mine = shard_indices(keys, rank, world)
        done = _done_keys(out_path, key_field)
        todo = [i for i in mine if keys[i] not in done]
        failed = []
        if stream:
            results = process([inputs[i] for i in todo]) if todo else ()
        else:
            results = ((j, process(inputs[i])) for j, i in enumerate(todo))
        seen = set()
        try:
            with RecordWriter(part_path(out_path, rank)) as writer:
                for j, rec in results:
                    if j in seen:              # a stream reporting an input twice would write it twice
                        raise RuntimeError(f"process: input {keys[todo[j]]!r} was reported twice")
                    seen.add(j)
                    i = todo[j]
                    if rec is None:
                        failed.append(keys[i])
                        if progress is not None:
                            progress(1)
                        continue
                    if not isinstance(rec, dict):
                        raise TypeError(f"process: expected a dict (one JSON record) for input "
                                        f"{keys[i]!r}, got {type(rec).__name__}")
                    if key_field in rec and rec[key_field] != keys[i]:
                        raise ValueError(f"process: the record for input {keys[i]!r} already has "
                                         f"{key_field!r} = {rec[key_field]!r}; pick another key_field")
                    rec = {key_field: keys[i], **rec}
                    writer.append(rec)
                    if progress is not None:
                        progress(1)
        except KeyboardInterrupt:
            # one process: what is finished goes into out_path now (ranks cannot tell whether the
            # others are still writing: their files stay, and a rerun picks them up)
            if coord is None:
                _merge(out_path, keys, key_field, interrupted=True)
            raise
        run = ShardedRun(rank, world, len(mine), len(mine) - len(todo), len(seen) - len(failed),
                         failed=failed, failed_total=len(failed))
        if coord is None:
            run.records = _merge(out_path, keys, key_field, set(failed))
            return run
        # every rank's file is complete and closed once all have sent their failed keys
        every = [None] * world
        dist.all_gather_object(every, failed, group=coord)
        failed_all = {k for part in every for k in part}
        run.failed_total = len(failed_all)
        status = [None]
        if rank == 0:
            try:
                run.records = _merge(out_path, keys, key_field, failed_all)
            except Exception as exc:           # tell the others instead of leaving them waiting
                status[0] = f"{type(exc).__name__}: {exc}"
                dist.broadcast_object_list(status, src=root, group=coord)
                raise
        dist.broadcast_object_list(status, src=root, group=coord)
        if status[0] is not None:
            raise RuntimeError(f"rank 0 could not merge the results: {status[0]}")
        return run
    finally:
        if created:
            dist.destroy_process_group()


def ttt_record(result) -> dict:
    """The default record of one image's TTT: pooled feature, loss curve, seconds."""
    if result.cls.shape[0] != 1:
        raise ValueError(f"load: expected one image per input, got a batch of {result.cls.shape[0]}")
    # tolist() gives Python floats that hold float32/float64 values exactly; JSON keeps them exact
    return {"cls": result.cls[0].detach().cpu().tolist(),
            "losses": result.losses[0].detach().cpu().tolist(),
            "seconds": result.seconds[0]}


def run_sharded_ttt(inputs: Sequence, out_path, *, trainer=None, load: Callable | None = None,
                    record: Callable | None = None, process: Callable | None = None,
                    **kwargs) -> ShardedRun:
    """Test-time training over ``inputs`` spread over the ranks (see :func:`run_sharded`).

    Either ``process(x) -> dict`` does one input's whole job (load, teacher, TTT, predict, its
    record), or ``trainer`` (a :class:`apm_fast.TestTimeTrainer`) and ``load(x) -> (image,
    target)`` do it with ``record(x, result) -> dict`` (default :func:`ttt_record`).
    Remaining keyword arguments go to :func:`run_sharded`.
    """
    if process is None:
        if trainer is None or load is None:
            raise TypeError("run_sharded_ttt: pass either process=, or both trainer= and load=")

        def process(x):
            image, target = load(x)
            result = trainer.fit(image, target)
            return record(x, result) if record is not None else ttt_record(result)
    elif trainer is not None or load is not None or record is not None:
        raise TypeError("run_sharded_ttt: process= replaces trainer=, load= and record=; pass one way")
    return run_sharded(inputs, process, out_path, **kwargs)

