"""Exit codes and one-line errors of the command line: I/O failures, broken pipes, crashes, and
arguments refused at parse time."""
import errno
import os
import subprocess
import sys
import textwrap
import types

import pytest

from apm_fast import cli
from apm_fast.cli import build_parser, main


@pytest.fixture
def stub(monkeypatch):
    """A subcommand ``stub`` whose run() raises what the test puts in ``stub.raises``."""
    mod = types.ModuleType("apm_fast_stub_command")
    mod.raises = None

    def add_parser(subparsers):
        return subparsers.add_parser("stub", help="test stub")

    def run(args):
        if mod.raises is not None:
            raise mod.raises
        print("ok")
        return 0

    mod.add_parser, mod.run = add_parser, run
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(cli.SUBCOMMANDS, "stub", mod.__name__)
    monkeypatch.delenv("APM_FAST_DEBUG", raising=False)
    return mod


@pytest.mark.parametrize("exc, words", [
    (OSError(errno.ENOSPC, "No space left on device", "results.jsonl"),
     ["No space left on device", "'results.jsonl'"]),
    (PermissionError(errno.EACCES, "Permission denied", "classes.txt"), ["Permission denied", "'classes.txt'"]),
    (OSError(errno.ENOSPC, "No space left on device"), ["No space left on device"]),
])
def test_io_failures_are_one_line_and_exit_2(stub, capsys, exc, words):
    stub.raises = exc
    assert main(["stub"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apm-fast stub: error: ") and err.count("\n") == 1 and "Traceback" not in err
    for w in words:
        assert w in err


def test_unexpected_exceptions_exit_3_naming_the_exception(stub, capsys):
    stub.raises = RuntimeError("kernel exploded (test)")
    assert main(["stub"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "RuntimeError: kernel exploded (test)" in err and "APM_FAST_DEBUG=1" in err


def test_debug_shows_the_traceback(stub, monkeypatch):
    monkeypatch.setenv("APM_FAST_DEBUG", "1")
    stub.raises = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        main(["stub"])
    stub.raises = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError):
        main(["stub"])


def test_broken_pipe_exits_quietly(stub, capsys):
    stub.raises = BrokenPipeError(errno.EPIPE, "Broken pipe")
    assert main(["stub"]) == 141
    assert capsys.readouterr().err == ""


def test_output_piped_to_head_has_no_traceback():
    """The real thing: a command printing many lines into `head -1`."""
    code = textwrap.dedent("""
        import sys, types
        from apm_fast import cli
        mod = types.ModuleType("flood")
        mod.add_parser = lambda sub: sub.add_parser("flood")
        def run(args):
            for i in range(200000):
                print("line", i)
            return 0
        mod.run = run
        sys.modules["flood"] = mod
        cli.SUBCOMMANDS["flood"] = "flood"
        sys.exit(cli.main(["flood"]))
    """)
    r = subprocess.run(f'{sys.executable} -c "$CODE" | head -1', shell=True, capture_output=True, text=True,
                       env={**os.environ, "CODE": code}, timeout=120)
    assert r.stdout == "line 0\n"
    assert r.stderr == "", r.stderr


@pytest.mark.parametrize("args, message", [
    (["--lr", "1e308"], "--lr: expected a learning rate in (0, 1], got '1e308'"),
    (["--lr", "inf"], "--lr: expected a learning rate in (0, 1], got 'inf'"),
    (["--lr", "nan"], "--lr: expected a learning rate in (0, 1], got 'nan'"),
    (["--lr=-1e-4"], "--lr: expected a learning rate in (0, 1], got '-1e-4'"),
    (["--lr", "fast"], "--lr: expected a learning rate in (0, 1], got 'fast'"),
    (["--seed", str(2 ** 63)], f"--seed: expected an integer in [0, 2**63 - 1], got '{2 ** 63}'"),
    (["--seed", "-1"], "--seed: expected an integer in [0, 2**63 - 1], got '-1'"),
    (["--seed", "1.5"], "--seed: expected an integer in [0, 2**63 - 1], got '1.5'"),
])
def test_bad_numbers_are_refused_at_parse_time(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["ttt", "x.png", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_good_numbers_and_the_simple_templates_parse():
    args = build_parser().parse_args(["ttt", "x.png", "--lr", "1e-3", "--seed", str(2 ** 63 - 1),
                                      "--templates", "simple"])
    assert args.lr == 1e-3 and args.seed == 2 ** 63 - 1 and args.templates == "simple"


def test_the_exit_codes_are_documented():
    from pathlib import Path

    doc = " ".join(cli.__doc__.split())
    for word in ("0 success", "1 some", "2 bad arguments", "3 ", "APM_FAST_DEBUG=1", "141"):
        assert word in doc, word
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("## Command line")
    section = " ".join(readme[start:readme.index("\n## ", start + 1)].split())
    for word in ("0 success", "1 some images skipped", "2 bad arguments", "3 ", "141"):
        assert word in section, word


def test_offline_message_gives_the_python_and_the_cli_spelling(monkeypatch, tmp_path):
    from apm_fast.teachers import OpenCLIPTeacher, WeightsUnavailable, openclip

    monkeypatch.setattr(openclip, "_reachable", lambda url, timeout: "no route (test)")
    with pytest.raises(WeightsUnavailable) as info:
        OpenCLIPTeacher("ViT-B-16", "openai", cache_dir=str(tmp_path))
    msg = str(info.value)
    assert "pretrained=None" in msg and "--pretrained none" in msg
    assert "pretrained=PATH" in msg and "--pretrained PATH" in msg


def test_ttt_prints_the_folder_entries_it_skips(tmp_path, capsys):
    """A FIFO in a searched folder is one warning line, the run goes on (and does not hang)."""
    from tiny_clip import photo, write_config

    photos = tmp_path / "photos"
    photos.mkdir()
    photo(1).save(photos / "a.png")
    os.mkfifo(photos / "pipe.jpg")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n")
    rc = main(["ttt", str(photos), "--teacher", str(write_config(tmp_path)), "--pretrained", "none",
               "--classes", str(classes), "--grid", "2", "--patch", "4", "--hidden", "8", "--heads", "4",
               "--steps", "1", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0 and len(cap.out.splitlines()) == 1
    warning = [l for l in cap.err.splitlines() if l.startswith("apm-fast ttt: warning: ")]
    assert len(warning) == 1 and "pipe.jpg" in warning[0] and "FIFO" in warning[0], cap.err
