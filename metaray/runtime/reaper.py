"""A loopback cluster's processes die with the process that started them, however it ends.

A node (``ray start --block``, the leader of a session of its own) must not outlive the process
that started it, even one ended by SIGKILL, which runs no teardown. So that process starts a
reaper first, in a session of its own (a signal to the starter's process group does not reach
it), and registers every node with it:

    python -I metaray/runtime/reaper.py MARKER PARENT_PID [GRACE_S [TEMP_DIR]]

It reads lines from stdin, the write end of which only the parent holds: ``node PID`` registers
a node. On end of file (the parent closed the pipe, or died, even by SIGKILL), when PARENT_PID is
no longer its parent, or on SIGTERM, it stops the cluster's processes, prints one line saying
how many, removes TEMP_DIR if given, and exits.

The cluster's processes are those in a registered node's session, those whose environment
holds MARKER (NAME=VALUE: every node runs with it, and Ray passes it on to what it starts), and
their descendants: found by /proc, each held by a pidfd taken while its PID still named the
process found (no PID reuse can redirect a signal), sent SIGTERM, and after GRACE_S seconds
SIGKILL. Nothing else on the machine is signalled.

Standard library only, and no import of this package: it runs as a script in isolated mode
(``-I``), where the package is not importable, so that the reaper loads neither torch nor Ray.
Used by ``metaray bench``'s scaling cluster (metaray/bench/scaling.py) and the tests' loopback
clusters (tests/loopback.py).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GRACE_S = 2.0
"""Seconds between SIGTERM and the first SIGKILL, unless told otherwise."""


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, session id, start time) of a live process; None for a gone or zombie one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]), fields[19])


def alive(pid: int) -> bool:
    return _stat(pid) is not None


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def cluster_processes(marker: str | None, sessions: set[int], spare: set[int]) -> dict[int, str]:
    """PID -> start time of every live process of the cluster: the registered nodes' sessions, what
    carries ``marker`` (NAME=VALUE) in its environment, and their descendants; ``spare`` excepted."""
    encoded = marker.encode() if marker else None
    procs = {pid: s for entry in os.listdir("/proc") if entry.isdigit() and (s := _stat(pid := int(entry)))}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, sid, _) in procs.items()
             if sid in sessions or pid in sessions or (encoded and _has_marker(pid, encoded))}
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid: procs[pid][2] for pid in found - set(spare)}


def _exited(fd: int) -> bool:
    """Whether the process a pidfd holds has exited."""
    return bool(select.select([fd], [], [], 0)[0])


def stop_processes(marker: str | None, sessions: set[int], spare: set[int], grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s``; up to three SIGKILL
    sweeps catch what a process started while it was being stopped. Each signal goes to a
    pidfd taken while the PID still named the process found (no PID reuse can redirect it).
    Returns every PID signalled."""
    held: dict[int, int] = {}
    signalled: set[int] = set()

    def sweep(sig: int) -> None:
        for pid, start in cluster_processes(marker, sessions, spare).items():
            if pid in held:
                continue
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            stat = _stat(pid)
            if stat is None or stat[2] != start:
                os.close(fd)
                continue
            held[pid] = fd
        for pid, fd in held.items():
            if not _exited(fd):
                try:
                    signal.pidfd_send_signal(fd, sig)
                    signalled.add(pid)
                except ProcessLookupError:
                    pass

    def wait(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not all(_exited(fd) for fd in held.values()):
            time.sleep(0.05)

    try:
        sweep(signal.SIGTERM)
        wait(grace_s)
        for _ in range(3):
            sweep(signal.SIGKILL)
            wait(5.0)
            if not cluster_processes(marker, sessions, spare):
                break
    finally:
        for fd in held.values():
            os.close(fd)
    return sorted(signalled)


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Stop


def reap_main(argv: Sequence[str]) -> int:
    """The reaper: ``MARKER PARENT_PID [GRACE_S [TEMP_DIR]]`` (see the module's docstring)."""
    marker, parent = argv[0], int(argv[1])
    grace_s = float(argv[2]) if len(argv) > 2 else GRACE_S
    temp_dir = argv[3] if len(argv) > 3 else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    sessions: set[int] = set()
    pending = b""
    why = "parent gone"
    try:
        while os.getppid() == parent:  # a parent killed with its pipe still open elsewhere (a fork) still counts
            if not select.select([0], [], [], 0.5)[0]:
                continue
            chunk = os.read(0, 4096)
            if not chunk:
                why = "pipe closed"
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for words in (line.split() for line in lines):
                if len(words) == 2 and words[0] == b"node" and words[1].isdigit():
                    sessions.add(int(words[1]))
    except _Stop:
        why = "SIGTERM"
    finally:  # however the loop ended, the sweep is this process's last duty: let it finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        spare = {os.getpid(), parent} if os.getppid() == parent else {os.getpid()}
        count = len(stop_processes(marker, sessions, spare, grace_s))
        print(f"reaper ({why}): stopped {count} process(es) of nodes {sorted(sessions)}", flush=True)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


def start_reaper(marker: str, log: Path, grace_s: float = GRACE_S, temp_dir: Path | None = None) -> subprocess.Popen:
    """The reaper of the nodes this process registers with ``register``: in a session of its own, so
    that a signal to this process's group leaves it to do its work; only this process holds its
    stdin's write end. Its output goes to ``log``; ``temp_dir``, if given, it removes once the
    nodes are gone."""
    with log.open("a") as out:
        return subprocess.Popen(
            # This file alone (standard library only), not the package: no torch in the reaper.
            [sys.executable, "-I", __file__, marker, str(os.getpid()), str(grace_s),
             *([str(temp_dir)] if temp_dir is not None else [])],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def register(reaper: subprocess.Popen, pid: int) -> None:
    """Hand the reaper a node: the leader of a session of its own."""
    assert reaper.stdin is not None
    reaper.stdin.write(f"node {pid}\n".encode())
    reaper.stdin.flush()


def release(reaper: subprocess.Popen, timeout: float = 60) -> None:
    """Close the reaper's pipe: it stops whatever the nodes left, if anything, and exits."""
    assert reaper.stdin is not None
    try:
        reaper.stdin.close()
    except OSError:  # a reaper already gone: nothing was left to write
        pass
    try:
        reaper.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(reap_main(sys.argv[1:]))
