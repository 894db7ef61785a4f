"""Both distributed modes against the single-process engine, with gloo on the CPU.

The tests start their own 2-3 worker processes (torch.multiprocessing spawn with a file-store
rendezvous, or torchrun on a free 127.0.0.1 port), all on the loopback interface.

Tolerance (float64): a distributed result differs from the single-process one only in the order
of the floating-point sums over the L = 25 queries (per-rank partial sums, then the all-reduce),
in where the softmax's max is subtracted, and, against the reference backend, in the trigger
split of the first layer. Each of these is a few units of eps = 1.1e-16 relative to the summed
magnitudes, a handful of layers deep, i.e. ~1e-15 (measured: <= 2e-15). Adam normalizes its
update, so after a few steps the relative errors of the gradients stay of that order in the
parameters. RTOL = 1e-12 leaves three orders of headroom while any real error (a wrong slice, a
missing 1/world, a max not shared by the ranks) is of order one.
"""
import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import _dist_workers as W
from apm_fast import TestTimeTrainer, preset
from apm_fast.distributed import query_slice, read_records, run_sharded
from apm_fast.distributed.ranks import input_keys, shard_indices
from apm_fast.distributed.results import RecordWriter, ResultsFileError, part_path, parts_dir

RTOL = 1e-12
STEPS, LR = 4, 1e-2        # a large lr so that the few steps move the parameters a lot


def assert_rel(got, want, what, rtol=RTOL):
    got = torch.as_tensor(got, dtype=torch.float64).detach()
    want = torch.as_tensor(want, dtype=torch.float64).detach()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def make_data(tmp, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = W.CONFIG.image_size
    images = torch.randn(n, 3, s, s, generator=g, dtype=torch.float64)
    targets = torch.randn(n, W.CONFIG.dim, generator=g, dtype=torch.float64)
    names = [f"img-{(7 * i) % n:02d}.png" for i in range(n)]     # listed out of sorted order
    torch.save({"names": names, "images": images, "targets": targets}, os.path.join(tmp, "data.pt"))
    return names, images, targets


# ------------------------------------------------------------------ pieces, in one process
@pytest.mark.parametrize("L,world", [(25, 2), (25, 3), (25, 4), (4, 6), (1, 1)])
def test_query_slices_tile_L_contiguously(L, world):
    slices = [query_slice(L, r, world) for r in range(world)]
    assert slices[0][0] == 0 and slices[-1][1] == L
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1


def test_shard_indices_partition_and_ignore_listing_order():
    keys = [f"k{i}" for i in [5, 3, 9, 0, 7, 1, 8]]
    for world in (1, 2, 3, 4):
        shares = [shard_indices(keys, r, world) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(len(keys)))
        assert all(s == sorted(s) for s in shares)                 # each share in input order
        shuffled = keys[::-1]
        again = [{shuffled[i] for i in shard_indices(shuffled, r, world)} for r in range(world)]
        assert again == [{keys[i] for i in s} for s in shares]     # same keys per rank
    with pytest.raises(ValueError, match="listed twice"):
        input_keys(["a.png", "b.png", "a.png"])
    with pytest.raises(TypeError, match=r"inputs\[0\]"):
        input_keys([3])


def test_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    p = tmp_path / "rank-00000.jsonl"
    p.write_text('{"input": "a", "v": 1}\n{"input": "b", "v": 2}\n{"input": "c", "v"')
    assert [r["input"] for r in read_records(p, "input")] == ["a", "b"]
    with RecordWriter(p) as w:
        w.append({"input": "c", "v": 3})
    assert p.read_text().endswith('{"input": "c", "v": 3}\n')
    assert [r["v"] for r in read_records(p, "input")] == [1, 2, 3]

def test_a_line_that_is_not_a_record_is_refused_naming_it(tmp_path):
    """A results file is rewritten from its records: a complete line that is not one (or a last
    line that cannot be the start of one) makes the file refused, naming the file and the line."""
    p = tmp_path / "out.jsonl"
    for text, bad in (('{"input": "a"}\n\nnot json\n{"input": "b"}\n', 3), ('{"input": "a"}\n{"v": 1}\n', 2),
                      ('{"input": "a"}\n["a"]\n', 2), ('{"input": "a"}\nmy notes', 2)):
        p.write_text(text)
        with pytest.raises(ResultsFileError, match=re.escape(f"{str(p)!r} line {bad}: expected a results "
                                                             f"record (a JSON object with a string 'input' field)")):
            read_records(p, "input")
    with pytest.raises(ResultsFileError):
        run_sharded(["a", "c"], lambda x: {"v": 1}, p)
    assert p.read_text() == '{"input": "a"}\nmy notes', "the file is left as it was"


def test_an_interrupted_process_merges_what_it_finished(tmp_path):
    """KeyboardInterrupt in the middle of a one-process run: the finished records are in the
    results file (no per-rank file left), and the same call again computes the rest."""
    out = tmp_path / "out.jsonl"
    inputs = ["x1", "x2", "x3", "x4"]

    def process(x):
        if x == "x3":
            raise KeyboardInterrupt
        return {"v": int(x[1:])}

    with pytest.raises(KeyboardInterrupt):
        run_sharded(inputs, process, out)
    assert [(r["input"], r["v"]) for r in read_records(out, "input")] == [("x1", 1), ("x2", 2)]
    assert not parts_dir(out).exists()
    run = run_sharded(inputs, lambda x: {"v": int(x[1:])}, out)
    assert run.skipped == 2 and run.computed == 2
    assert [r["v"] for r in read_records(out, "input")] == [1, 2, 3, 4]


def test_single_process_run_resumes_without_recomputing(tmp_path):
    calls = []

    def process(x):
        calls.append(x)
        return {"square": int(x[1:]) ** 2}

    inputs = ["x3", "x1", "x2"]
    out = tmp_path / "out.jsonl"
    parts_dir(out).mkdir()
    part_path(out, 0).write_text('{"input": "x1", "square": 1}\n{"input": "x2", "squ')
    run = run_sharded(inputs, process, out)
    assert calls == ["x3", "x2"] and run.skipped == 1 and run.computed == 2
    assert [(r["input"], r["square"]) for r in read_records(out, "input")] == [("x3", 9), ("x1", 1), ("x2", 4)]
    assert not parts_dir(out).exists()
    calls.clear()
    run_sharded(inputs + ["x4"], process, out)                   # a later run adds one input
    assert calls == ["x4"]
    assert [r["input"] for r in read_records(out, "input")] == inputs + ["x4"]
    with pytest.raises(TypeError, match="expected a dict"):
        run_sharded(["x5"], lambda x: 5, out)


def test_failed_inputs_get_no_record_and_a_stream_may_finish_out_of_order(tmp_path):
    out = tmp_path / "out.jsonl"
    inputs = ["x1", "bad", "x2", "x3"]
    seen = []

    def stream(todo):                 # a batched pipeline: later inputs may finish first
        seen.append(list(todo))
        for j in reversed(range(len(todo))):
            yield j, (None if todo[j] == "bad" else {"input": todo[j], "v": int(todo[j][1:])})

    run = run_sharded(inputs, stream, out, stream=True)
    assert seen == [inputs] and run.failed == ["bad"] and run.failed_total == 1 and run.computed == 3
    assert [r["input"] for r in run.records] == ["x1", "x2", "x3"]
    assert [(r["input"], r["v"]) for r in read_records(out, "input")] == [("x1", 1), ("x2", 2), ("x3", 3)]
    seen.clear()
    run = run_sharded(inputs, stream, out, stream=True)       # only the failed input is tried again
    assert seen == [["bad"]] and run.skipped == 3 and run.computed == 0
    run = run_sharded(["x1", "x2"], stream, out, stream=True)
    assert seen == [["bad"]], "nothing to do: the stream is not started"
    with pytest.raises(RuntimeError, match="reported twice"):
        run_sharded(["y1"], lambda todo: [(0, {"a": 1}), (0, {"a": 1})], tmp_path / "o2.jsonl", stream=True)


# ------------------------------------------------------------------ mode 2: queries over ranks
def _reference_grads(model, image, target):
    model.zero_grad(set_to_none=True)
    z = model(image, backend="reference").cls
    loss = torch.nn.functional.mse_loss(z, target)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("world", [2, 3])      # L = 25 divides by neither
def test_mode2_matches_single_process(tmp_path, world):
    tmp = str(tmp_path)
    _, images, targets = make_data(tmp, 2)
    mp.spawn(W.mode2_worker, args=(world, tmp, STEPS, LR), nprocs=world)
    outs = [torch.load(os.path.join(tmp, f"mode2-rank{r}.pt")) for r in range(world)]

    model = W.make_model()
    ref = model(images, backend="reference")
    loss, grads = _reference_grads(model, images[:1], targets[:1])
    ttt = TestTimeTrainer(model, steps=STEPS, lr=LR, backend="reference").fit(images, targets)

    # the pooled feature, the loss and the trained result are bitwise the same on every rank
    for o in outs[1:]:
        for k in ("cls", "loss", "ttt_cls", "ttt_losses"):
            assert torch.equal(o[k], outs[0][k]), k
    assert_rel(outs[0]["cls"], ref.cls, "forward cls")
    # each rank holds its contiguous slice of the queries; together they tile L
    assert [(o["start"], o["stop"]) for o in outs] == [query_slice(25, r, world) for r in range(world)]
    assert_rel(torch.cat([o["grid"] for o in outs], 1), ref.grid, "forward grid")
    assert_rel(torch.cat([o["rgb"] for o in outs], 1), ref.rgb, "forward rgb")
    # each rank really ran its own slice: its program holds its rows of the queries, and every
    # forward (one step by hand, then 2 images x (STEPS steps + the final forward)) combined one
    # slice per rank
    for r, o in enumerate(outs):
        a, b = query_slice(25, r, world)
        assert o["rows"] == b - a and o["slices"] == 1 + 2 * (STEPS + 1)
    # gradients after the exchange: the single-process gradients, on every rank (Adam would
    # hide a wrong overall scale, so they are compared directly)
    assert_rel(outs[0]["loss"], loss, "loss")
    for o in outs:
        assert set(o["grads"]) <= set(grads) and len(o["grads"]) == 13
        for k in o["grads"]:
            assert_rel(o["grads"][k], grads[k], f"grad of {k}")
    assert_rel(outs[0]["ttt_losses"], ttt.losses, "TTT losses", rtol=1e-6)   # stored in float32
    assert_rel(outs[0]["ttt_cls"], ttt.cls, "TTT cls")
    moved = float((ttt.cls - ref.cls.detach()).abs().max() / ref.cls.detach().abs().max())
    assert moved > 1e-3, "the TTT steps should change the output well above the tolerance"


@pytest.mark.parametrize("case", ["empty", "settings", "nan"])
def test_mode2_at_its_edges(tmp_path, case):
    """One query over two ranks (the second holds an empty slice) trains as one process does;
    ranks built with other settings are refused on every rank, naming the setting (they would
    otherwise wait on each other for ever, or each give other features); a NaN in the same images
    on every rank is named as one process names it, not as different data."""
    tmp = str(tmp_path)
    mp.spawn(W.mode2_edge_worker, args=(2, tmp, case), nprocs=2)
    outs = [torch.load(os.path.join(tmp, f"edge-{case}-rank{r}.pt")) for r in range(2)]
    if case == "empty":
        model = W.make_model(W.APMConfig(grid=1, patch=2, hidden=(24, 16), dim=8, heads=2))
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
        want = TestTimeTrainer(model, steps=2, lr=1e-2, backend="reference").fit(x, y).cls
        for o in outs:
            assert "error" not in o, o
            assert_rel(o["cls"], want, "TTT cls with an empty slice")
    elif case == "settings":
        for r, o in enumerate(outs):
            assert o["error"].startswith("settings: the ranks of the group were given different steps")
            assert f"rank {r} of 2, with steps = {2 + r}" in o["error"]
    else:
        for o in outs:
            assert o["error"].startswith("images: expected finite values"), o


# ------------------------------------------------------------------ mode 1: images over ranks
def _single_process_records(names, images, targets, steps):
    trainer = TestTimeTrainer(W.make_model(), steps=steps, lr=LR)
    res = trainer.fit(images, targets)
    return {n: (res.cls[i], res.losses[i]) for i, n in enumerate(names)}


def _check_results(out_path, names, want):
    recs = read_records(out_path, "input")
    assert [r["input"] for r in recs] == names, "every input exactly once, in input order"
    for r in recs:
        assert_rel(r["cls"], want[r["input"]][0], f"cls of {r['input']}")
        assert_rel(r["losses"], want[r["input"]][1], f"losses of {r['input']}")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mode1_under_torchrun_matches_single_process(tmp_path):
    tmp = str(tmp_path)
    names, images, targets = make_data(tmp, 5)
    out = os.path.join(tmp, "results.jsonl")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if os.path.isdir("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "apm_fast.distributed", "ttt", "--data", os.path.join(tmp, "data.pt"), "--out", out,
           "--grid", "5", "--patch", "2", "--hidden", "24,16", "--dim", "8", "--heads", "2",
           "--steps", "3", "--lr", str(LR), "--dtype", "float64", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = preset("ttt-l14", grid=5, patch=2, hidden=(24, 16), dim=8, heads=2)
    torch.manual_seed(0)
    from apm_fast import APM
    res = TestTimeTrainer(APM(cfg, dtype=torch.float64), steps=3, lr=LR).fit(images, targets)
    _check_results(out, names, {n: (res.cls[i], res.losses[i]) for i, n in enumerate(names)})
    assert not parts_dir(out).exists()


def test_mode1_kill_one_rank_and_restart(tmp_path):
    tmp = str(tmp_path)
    n, steps = 9, 3
    names, images, targets = make_data(tmp, n)
    out = os.path.join(tmp, "results.jsonl")

    # run A, 3 ranks: rank 1 dies while writing its 2nd record; the others are then terminated
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(W.mode1_worker, args=(3, tmp, "A", steps, LR, 1, 1), nprocs=3)
    assert not os.path.exists(out), "no merge after a failed run"
    torn = part_path(out, 1).read_bytes()
    assert torn and not torn.endswith(b"\n"), "rank 1 left a torn last line"
    done_a = [r["input"] for p in sorted(parts_dir(out).iterdir()) for r in read_records(p, "input")]
    assert len(done_a) == len(set(done_a)) and 1 <= len(done_a) < n

    # run B, restarted on 2 ranks (another world size, so another split of the inputs)
    os.remove(os.path.join(tmp, "store"))
    mp.spawn(W.mode1_worker, args=(2, tmp, "B", steps, LR, -1, 0), nprocs=2)
    started_b = []
    for r in range(2):
        p = os.path.join(tmp, f"started-B-rank{r}.txt")
        started_b += open(p).read().split() if os.path.exists(p) else []
    assert not set(started_b) & set(done_a), "an image finished in run A was computed again"
    assert sorted(started_b + done_a) == sorted(names), "every image computed exactly once overall"
    runs = [json.load(open(os.path.join(tmp, f"run-B-rank{r}.json"))) for r in range(2)]
    assert sum(r["computed"] for r in runs) == n - len(done_a)
    assert sum(r["skipped"] for r in runs) == len(done_a)
    _check_results(out, names, _single_process_records(names, images, targets, steps))
    assert not parts_dir(out).exists()


# ------------------------------------------------------------------ on a multi-GPU machine
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_both_modes_on_gpus_with_nccl():
    n = min(torch.cuda.device_count(), 4)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "apm_fast.distributed", "check", "--device", "cuda", "--dtype", "float32",
           "--grid", "16", "--patch", "4", "--hidden", "256,128", "--dim", "64", "--heads", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
