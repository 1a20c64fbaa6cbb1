"""Writing a folder all at once: into a temporary sibling, renamed into place when complete.

    with atomic_folder(out) as tmp:      # tmp: an empty sibling folder, .out.partial-HOST-PID
        write_files_into(tmp)            # an exception here removes tmp and leaves out untouched
    # out now holds exactly what the block wrote

Renaming within one folder is atomic: a reader finds no `out`, or the complete one. With
``replace=True`` an existing `out` is swapped for the new one, then deleted. On Linux the swap
is one system call (renameat2 with RENAME_EXCHANGE), so a reader finds the old folder or the
new one at every instant; elsewhere it is two renames (the old folder moves aside to
.out.old-HOST-PID, the new one moves in), between which `out` is briefly missing.

A process killed outright (SIGKILL, the kernel's out-of-memory killer) cleans up nothing, so
each temporary folder is named after its writer: host name and process id. Every
`atomic_folder` first removes what dead writers on this host left beside its target: their
partial folders are deleted, and an old folder is put back if the target is missing (its
writer died between the two renames of a swap), so a kill changes nothing. Folders of live
writers, and of other hosts sharing the disk, are left alone.
"""

import ctypes
import os
import re
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

HOST = socket.gethostname()


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (another than this one, which is not
    writing the folder it is about to start)."""
    if pid == os.getpid():
        return False  # a process before us had our id
    try:
        os.kill(pid, 0)  # signal 0 delivers nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to another user
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders at paths a and b in one step; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2  # from <fcntl.h> and <linux/fs.h>
    if not hasattr(libc, "renameat2"):  # glibc before 2.28
        return False
    return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_leftovers(target: Path) -> None:
    """Delete the temporary folders that dead writers left beside `target` (see above)."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(partial|old)-(.+)-(\d+)")
    for path in sorted(target.parent.iterdir()):
        m = pattern.fullmatch(path.name)
        if not m or m[2] != HOST or _alive(int(m[3])):
            continue
        if m[1] == "old" and not target.exists():
            path.rename(target)  # its writer died mid-swap: the old folder goes back
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_folder(target, replace: bool = False):
    """Yield an empty temporary folder beside `target`; rename it to `target` when the block
    ends without error, remove it when the block raises. An existing `target` is swapped out
    if `replace`, else the rename fails (unless `target` is an empty folder)."""
    target = Path(target)
    _remove_leftovers(target)
    writer = f"{HOST}-{os.getpid()}"
    tmp = target.with_name(f".{target.name}.partial-{writer}")
    tmp.mkdir()
    try:
        yield tmp
        if replace and target.exists():
            if _exchange(tmp, target):  # target is the new folder, tmp the old one
                shutil.rmtree(tmp)
                return
            old = target.with_name(f".{target.name}.old-{writer}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
