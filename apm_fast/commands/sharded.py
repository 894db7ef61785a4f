"""``apm-fast ttt`` under ``torchrun --nproc-per-node N``: the images split by rank, one results file.

Each rank computes its share of the images with the single-process pipeline and hands the lines to :func:`apm_fast.distributed.run_sharded`, which
appends them to a per-rank file, skips images already done by an earlier run, and lets rank 0
merge everything into ``--out`` in input order at the end. The image's path as given (the
``image`` field every line already has) is the key, so the lines are those of a single-process
run (``run.device`` and ``run.students`` say where and how each was computed); a restart must name the images the same way (same paths, same folder) to
skip what is done. Unreadable images are reported by the rank that tried them and get no line.

Coordination is gloo (barriers and a few small messages); each rank computes on
``cuda:LOCAL_RANK`` on a GPU machine, on the CPU otherwise.
"""
from __future__ import annotations

import os

from .common import CLIError, eprint

__all__ = ["start", "Shards"]

KEY_FIELD = "image"          # already in every line: Classification.image, the path as given


class Shards:
    """This rank's place in the run: ``rank``, ``world``, ``device``."""

    def __init__(self, info, keys):
        self.rank, self.world, self.device = info.rank, info.world_size, info.device
        self.keys = keys
        self._created = info.created

    def write(self, results, args) -> int:
        """Run ``results`` (see ``ttt._run``) on this rank's share into --out; the
        exit code (1 when an image failed on any rank) is the same on every rank."""
        import torch.distributed as dist

        from ..distributed.ranks import run_sharded, shard_indices
        from .ttt import progress_bar

        share = len(shard_indices(self.keys, self.rank, self.world))
        # one bar (rank 0's share) rather than N bars overwriting each other on one terminal
        with progress_bar(args, share, enabled=self.rank == 0) as bar:
            run = run_sharded(self.keys, lambda todo: results(todo, bar), args.out,
                              key_field=KEY_FIELD, group=dist.group.WORLD, progress=bar.update,
                              stream=True)
        who = f"apm-fast ttt: rank {self.rank}/{self.world}"
        eprint(f"{who}: {run.computed} result(s) computed, {run.skipped} already in {args.out} "
               f"(skipped)" + (f", {len(run.failed)} image(s) skipped (see above)" if run.failed else ""))
        if self.rank == 0:
            eprint(f"apm-fast ttt: {len(run.records)} result(s) in {args.out} (merged from "
                   f"{self.world} ranks)" + (f", {run.failed_total} image(s) skipped" if run.failed_total else ""))
        # torchrun stops the other ranks as soon as one exits non-zero: let all report first
        dist.barrier()
        return 1 if run.failed_total else 0

    def close(self):
        import torch.distributed as dist

        if self._created and dist.is_initialized():
            dist.destroy_process_group()


def start(args, paths):
    """Join torchrun's process group when WORLD_SIZE > 1 (else None: the single-process path)."""
    from ..distributed.env import init_distributed, launched_world_size
    from ..distributed.ranks import input_keys
    from ..distributed.ranks import DEFAULT_BARRIER_TIMEOUT

    try:
        world = launched_world_size()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if world == 1:
        return None
    if args.out == "-":
        raise CLIError(f"--out: {world} ranks (WORLD_SIZE={world}) write one results file; "
                       f"give --out FILE.jsonl (stdout cannot be shared)")
    if args.device not in (None, "cpu", "cuda"):
        raise CLIError(f"--device: with {world} ranks each rank computes on cuda:LOCAL_RANK; "
                       f"give 'cuda' or 'cpu' (or nothing), got {args.device!r}")
    try:
        keys = input_keys([os.fspath(p) for p in paths])
    except ValueError as exc:
        raise CLIError(f"IMAGES: {exc}") from None
    try:                        # fail here, on every rank, rather than after the first image
        open(args.out, "a", encoding="utf-8").close()
    except OSError as exc:
        raise CLIError(f"--out: cannot open {args.out!r} for appending ({exc})") from None
    try:
        # gloo only carries barriers and a few small messages; the long timeout lets every rank
        # wait at the end for the slowest one
        info = init_distributed(backend="gloo", device=args.device, timeout=DEFAULT_BARRIER_TIMEOUT)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"torch.distributed: {exc}") from None
    return Shards(info, keys)
