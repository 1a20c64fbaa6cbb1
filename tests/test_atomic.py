"""nano_orion.atomic: a folder appears complete or not at all, and what killed writers left is removed."""

import subprocess
import sys

import pytest

from nano_orion import atomic
from nano_orion.atomic import HOST, atomic_folder


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_folder_appears_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-") and not out.exists()
        (tmp / "a.txt").write_text("new")
    assert names(tmp_path) == ["out"] and (out / "a.txt").read_text() == "new"


def test_an_error_removes_the_temporary_folder_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_folder(out, replace=True) as tmp:
            (tmp / "a.txt").write_text("new")
            raise OSError("No space left on device")
    assert names(tmp_path) == ["out"] and (out / "a.txt").read_text() == "old"


def test_replace_swaps_an_existing_folder_and_only_then(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError):  # without replace, a folder in the way stops the rename
        with atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["out"] and names(out) == ["old.txt"]
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(tmp_path) == ["out"] and names(out) == ["new.txt"]


def test_dead_writers_leftovers_go_and_live_ones_stay(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        kept = [f".out.partial-{HOST}-{live.pid}", f".out.partial-elsewhere-{dead}", ".out.notes"]
        for name in kept + [f".out.partial-{HOST}-{dead}", f".out.old-{HOST}-{dead}"]:
            (tmp_path / name).mkdir()
            (tmp_path / name / "big.bin").write_bytes(b"x" * 1000)
        (tmp_path / "out").mkdir()  # the dead writer had finished its swap: its old folder is garbage
        with atomic_folder(tmp_path / "out", replace=True):
            pass
    finally:
        live.kill()
        live.wait()
    # a live writer's folder stays, and so does another host's: its process id says nothing here
    assert names(tmp_path) == sorted(kept + ["out"])


def test_a_writer_killed_mid_swap_gets_its_old_folder_back(tmp_path):
    dead = dead_pid()
    old, new = tmp_path / f".out.old-{HOST}-{dead}", tmp_path / f".out.partial-{HOST}-{dead}"
    old.mkdir()  # the dead writer had moved `out` aside...
    (old / "a.txt").write_text("old")
    new.mkdir()  # ...but not yet its new folder in
    with atomic_folder(tmp_path / "out", replace=True) as tmp:
        assert names(tmp_path) == [tmp.name, "out"] and (tmp_path / "out" / "a.txt").read_text() == "old"
        (tmp / "a.txt").write_text("new")
    assert names(tmp_path) == ["out"] and (tmp_path / "out" / "a.txt").read_text() == "new"


def test_without_an_exchange_the_swap_is_two_renames(tmp_path, monkeypatch):
    """Where the system has no one-step exchange, the old folder moves aside, then the new one in."""
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with atomic_folder(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert names(tmp_path) == ["out"] and (out / "a.txt").read_text() == "new"
