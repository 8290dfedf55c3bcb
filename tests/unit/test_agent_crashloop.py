"""Crash-loop detection (pure) and the tail of a worker's output file."""

from __future__ import annotations

from pathlib import Path

from tdist.agent.crashloop import CrashWatch, tail


def test_backoff_and_fatal_fail_at_once() -> None:
    watch = CrashWatch(exits=3, window=60.0)
    assert not watch.failing("w-0", "RUNNING", 0.0)
    assert not watch.failing("w-0", "STARTING", 0.0)
    assert watch.failing("w-0", "BACKOFF", 0.0)
    assert watch.failing("w-0", "FATAL", 0.0)


def test_repeated_exits_within_the_window_fail() -> None:
    watch = CrashWatch(exits=3, window=60.0)
    watch.exited("w-0", 0.0)
    watch.exited("w-0", 20.0)
    assert not watch.failing("w-0", "RUNNING", 21.0)  # two exits: a kill and a crash happen
    watch.exited("w-0", 40.0)
    assert watch.failing("w-0", "RUNNING", 41.0)
    assert not watch.failing("w-1", "RUNNING", 41.0)  # per program
    assert watch.recent_exits("w-0", 41.0) == 3
    assert not watch.failing("w-0", "RUNNING", 61.0)  # the first exit left the window
    assert watch.recent_exits("w-0", 61.0) == 2
    watch.forget("w-0")
    assert watch.recent_exits("w-0", 61.0) == 0


def test_tail_returns_the_last_lines(tmp_path: Path) -> None:
    out = tmp_path / "w-0.out"
    assert tail(str(out)) == []  # not written yet
    out.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail(str(out), lines=3) == ["line 97", "line 98", "line 99"]
    assert tail(str(out), lines=0) == []


def test_tail_of_a_big_file_reads_only_its_end_and_drops_the_cut_line(tmp_path: Path) -> None:
    out = tmp_path / "w-0.out"
    with open(out, "wb") as fh:
        fh.write(b"x" * 10_000 + b"\n")
        fh.write(b"\xff\xfe not utf-8\n")
        fh.write(b"Traceback (most recent call last):\nRuntimeError: boom\n")
    lines = tail(str(out), lines=20, max_bytes=1000)
    assert lines == ["\ufffd\ufffd not utf-8", "Traceback (most recent call last):", "RuntimeError: boom"]
