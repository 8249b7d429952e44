"""One writer per run directory: an exclusive lock held by whoever writes it.

The lock is ``flock`` on ``RUN_DIR/.metaray.lock``. The kernel drops it when its holder exits,
however it exits (SIGKILL, OOM, a lost pod), so a stale lock is simply free: the next writer
takes it and rewrites the owner record. The record (PID, host, command, start time) is only
what the refusal message names; the flock alone decides. On NFS, flock is an NFS lock (v4),
and a dead host's lock lapses with its lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metaray.config import ConfigError

LOCK_NAME = ".metaray.lock"


class RunDirBusyError(ConfigError):
    """Another process is writing the run directory."""


def _holder(fd: int) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return (f"PID {int(owner['pid'])} on {str(owner['host'])[:64]} ({str(owner['command'])[:64]}, "
                f"since {str(owner['since'])[:32]})")
    except (ValueError, KeyError, TypeError, OSError):
        return "another process (its owner record is unreadable)"


@contextmanager
def run_lock(run_dir: Path, command: str) -> Iterator[bool]:
    """Hold the run directory's lock for the block; RunDirBusyError names the holder otherwise.

    Yields True when locked. A directory this process cannot write is read, not written, so
    there is nothing to protect: it yields False (a later write fails and says so) unless a
    writer holds the lock, which is still refused.
    """
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        writable = True
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise ConfigError(f"cannot lock run directory {run_dir}: {err.strerror or err}") from None
        try:
            fd, writable = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), False
        except OSError:
            yield False  # no lock file and no way to make one: nobody can be writing through metaray
            return
    try:
        try:
            # Shared on a read-only descriptor (NFS emulates flock with fcntl locks, which need a
            # writable one for LOCK_EX): it still conflicts with a writer's exclusive lock.
            fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusyError(f"run directory {run_dir} is in use by {_holder(fd)}; wait for it to finish "
                                  "or stop it (a lock of a process that died is taken over)") from None
        except OSError as err:  # ENOLCK: a file system without working locks (NFS without lockd)
            raise ConfigError(f"cannot lock run directory {run_dir}: {err.strerror or err}") from None
        if writable:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        yield writable
    finally:
        os.close(fd)  # releases the flock
