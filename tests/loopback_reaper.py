"""Stops a loopback cluster's nodes when the process that started them goes away, however it ends.

    python tests/loopback_reaper.py MARKER PARENT_PID [GRACE_S [TEMP_DIR]]

Started by ``LoopbackCluster`` in a session of its own (a signal to the test run's process
group does not reach it). It reads lines from stdin, the write end of which only the parent
holds: ``node PID`` registers a node's ``ray start --block``, the leader of a session of its
own. On end of file (the parent closed the pipe, or died, even by SIGKILL), when the parent's
PID is no longer its parent, or on SIGTERM, it stops the cluster's processes and exits.

The cluster's processes are those in a registered node's session, those whose environment
holds MARKER (every node runs with it, and Ray passes it on to what it starts), and their
descendants: found by /proc, each held by a pidfd (no PID reuse can redirect a signal),
sent SIGTERM, and after GRACE_S seconds SIGKILL. Then TEMP_DIR, if given, is removed. Standard
library only; nothing else on the machine is signalled.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time
from pathlib import Path


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop


def _stat(pid: str) -> tuple[int, int, str] | None:
    """(ppid, sid, start time) of a live process, None for a gone or zombie one."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[3]), fields[19])


def _has_marker(pid: str, marker: bytes) -> bool:
    try:
        return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def cluster_processes(marker: bytes, sessions: set[int], spare: set[int]) -> dict[int, str]:
    """PID -> start time of every live process of the cluster (``spare`` excepted)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(entry)) is not None:
            procs[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, sid, _) in procs.items() if sid in sessions or pid in sessions
             or _has_marker(str(pid), marker)}
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return {pid: procs[pid][2] for pid in found - spare}


def _hold(pid: int, start: str) -> int | None:
    """A pidfd for ``pid`` if it is still the process that started at ``start``."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    stat = _stat(str(pid))
    if stat is None or stat[2] != start:
        os.close(fd)
        return None
    return fd


def _exited(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def reap(marker: bytes, sessions: set[int], spare: set[int], grace: float) -> int:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace`` seconds; how many there were."""
    held: dict[int, int] = {}
    signalled: set[int] = set()

    def sweep(sig: int) -> None:
        for pid, start in cluster_processes(marker, sessions, spare).items():
            if pid not in held and (fd := _hold(pid, start)) is not None:
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
        wait(grace)
        # Up to three SIGKILL sweeps: what a process started while it was being stopped is found on the next.
        for _ in range(3):
            sweep(signal.SIGKILL)
            wait(5)
            if not cluster_processes(marker, sessions, spare):
                break
    finally:
        for fd in held.values():
            os.close(fd)
    return len(signalled)


def main(argv: list[str]) -> int:
    marker, parent = argv[1].encode(), int(argv[2])
    grace = float(argv[3]) if len(argv) > 3 else 3.0
    temp_dir = argv[4] if len(argv) > 4 else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop)
    sessions: set[int] = set()
    pending = b""
    stdin = sys.stdin.fileno()
    why = "parent gone"
    try:
        while os.getppid() == parent:  # a parent killed with its pipe still open elsewhere (a fork) still counts
            if not select.select([stdin], [], [], 0.5)[0]:
                continue
            chunk = os.read(stdin, 4096)
            if not chunk:
                why = "pipe closed"
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                match line.split():
                    case [b"node", pid]:
                        sessions.add(int(pid))
    except _Stop:
        why = "SIGTERM"
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the sweep below is this process's last duty: let it finish
    spare = {os.getpid(), parent} if os.getppid() == parent else {os.getpid()}
    count = reap(marker, sessions, spare, grace)
    print(f"loopback reaper ({why}): stopped {count} process(es) of nodes {sorted(sessions)}", flush=True)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
