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


def input_keys(paths):
    """The key of each image (its path as given), before any long work: an image listed twice
    would be computed and written twice."""
    from ..distributed.ranks import input_keys as keys_of

    try:
        return keys_of([os.fspath(p) for p in paths])
    except ValueError as exc:
        raise CLIError(f"IMAGES: {exc}") from None


def check_out(out, inputs, *others, key_field=KEY_FIELD) -> None:
    """Before any long work: ``out`` can be written, is not an input image or another file the
    run reads (``others``: e.g. the classes file), and holds results records only (with the
    per-process files of an interrupted run; ``key_field``: their key), since it is rewritten
    from them at the end."""
    from ..distributed.results import ResultsFileError, existing_part_files, read_records

    if out == "-":
        return
    target = os.path.realpath(out)
    for p in list(inputs) + [o for o in others if o]:
        if os.path.exists(os.fspath(p)) and os.path.realpath(p) == target:
            raise CLIError(f"--out: {out!r} is also an input ({os.fspath(p)!r}); give another results file")
    try:
        open(out, "a", encoding="utf-8").close()
    except OSError as exc:
        raise CLIError(f"--out: cannot open {out!r} for appending ({exc.strerror or exc})") from None
    try:
        for src in [out] + existing_part_files(out):
            read_records(src, key_field)
    except ResultsFileError as exc:
        raise CLIError(f"--out: {exc}; give another --out") from None


# run settings that may differ between a run and its restart (where and how, not what; and the
# code that made each line, which every line states)
_VOLATILE = ("students", "device", "backend", "version", "commit")


def check_settings(out, run_info, *, key_field=KEY_FIELD) -> None:
    """Refuse to add lines to ``out`` (and its per-rank files) made with other settings (each
    line's ``"run"``; ``key_field``: the lines' key)."""
    from ..distributed.results import existing_part_files, read_records

    mine = {k: v for k, v in run_info.items() if k not in _VOLATILE}
    for src in [out] + existing_part_files(out):
        for rec in read_records(src, key_field):
            theirs = {k: v for k, v in (rec.get("run") or {}).items() if k not in _VOLATILE}
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise CLIError(f"--out: {out!r} holds results made with other settings ("
                               + ", ".join(f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now" for k in diff[:4])
                               + "); give another --out, or the same settings to continue that run")
            break                            # one line per file: a file is written by one run


class Shards:
    """This process's place in the run (``rank``, ``world``, ``device``): torchrun's ranks, or one
    process alone (``info`` None) writing through the same restart-safe path."""

    def __init__(self, info, keys, device=None):
        self.rank, self.world = (info.rank, info.world_size) if info is not None else (0, 1)
        self.device = info.device if info is not None else device
        self.keys = keys
        self._created = info is not None and info.created

    def write(self, results, args, run_info) -> int:
        """Run ``results`` (see ``ttt._run``) on this rank's share into --out, skipping what an
        earlier run did; the exit code (1 when an image failed or diverged on any rank) is the
        same on every rank."""
        import torch.distributed as dist

        from ..distributed.ranks import run_sharded
        from .ttt import progress_bar

        check_settings(args.out, run_info)
        diverged = []

        def counted(todo, bar):
            for i, line in results(todo, bar):
                if line is not None and line.get("diverged"):
                    diverged.append(i)
                yield i, line

        # one bar (rank 0's share) rather than N bars overwriting each other on one terminal;
        # sized to the images still to do once they are known (a restart skips the others)
        with progress_bar(args, None, enabled=self.rank == 0) as bar:
            def todo_only(todo):
                bar.reset(total=len(todo))
                return counted(todo, bar)

            try:
                run = run_sharded(self.keys, todo_only, args.out, key_field=KEY_FIELD,
                                  group=dist.group.WORLD if self.world > 1 else None, progress=bar.update,
                                  stream=True)
            except KeyboardInterrupt:
                if self.world == 1:          # run_sharded merged what was finished into --out
                    from ..distributed.results import read_records

                    mine = set(self.keys)
                    n = sum(r[KEY_FIELD] in mine for r in read_records(args.out, KEY_FIELD))
                    bar.close()
                    eprint(f"apm-fast ttt: {n} of {len(self.keys)} result(s) in {args.out}; run the same "
                           f"command again to go on with the other {len(self.keys) - n}")
                raise
        who = "apm-fast ttt" + (f": rank {self.rank}/{self.world}" if self.world > 1 else "")
        eprint(f"{who}: {run.computed} result(s) computed, {run.skipped} already in {args.out} "
               f"(skipped)" + (f", {len(run.failed)} image(s) skipped (see above)" if run.failed else "")
               + (f", {len(diverged)} diverged (\"diverged\": true)" if diverged else ""))
        if self.rank == 0 and self.world > 1:
            eprint(f"apm-fast ttt: {len(run.records)} result(s) in {args.out} (merged from "
                   f"{self.world} ranks)" + (f", {run.failed_total} image(s) skipped" if run.failed_total else ""))
        bad = run.failed_total + len(diverged)
        if self.world > 1:
            # torchrun stops the other ranks as soon as one exits non-zero: let all report first
            flag = [bad]
            every = [None] * self.world
            dist.all_gather_object(every, flag)
            bad = sum(f[0] for f in every)
            dist.barrier()
        return 1 if bad else 0

    def close(self):
        import torch.distributed as dist

        if self._created and dist.is_initialized():
            dist.destroy_process_group()


def start(args, keys):
    """Join torchrun's process group when WORLD_SIZE > 1 (else None: the single-process path);
    ``keys``: the images' keys (:func:`input_keys`), None with ``--out -``."""
    from ..distributed.env import init_distributed, launched_world_size
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
        # gloo only carries barriers and a few small messages; the long timeout lets every rank
        # wait at the end for the slowest one
        info = init_distributed(backend="gloo", device=args.device, timeout=DEFAULT_BARRIER_TIMEOUT)
    except (ValueError, RuntimeError) as exc:
        raise CLIError(f"torch.distributed: {exc}") from None
    return Shards(info, keys)
