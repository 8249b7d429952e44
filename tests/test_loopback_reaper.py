"""A loopback cluster's nodes die with the process that started them, however it ends."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from metaray.runtime.reaper import alive, cluster_processes, register, release, start_reaper
from tests.conftest import ROOT

# A head node alone, on an address no other test uses; the process prints what the node runs, then waits.
OWNER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tests.loopback import LoopbackCluster, node_env

    cluster = LoopbackCluster(Path(sys.argv[1]), head_ip="127.0.0.30", env=node_env())
    try:
        node = cluster.start_head({"num-cpus": "1", "dashboard-host": cluster.head_ip}, object_store_bytes=80 * 1024**2)
    except BaseException:
        cluster.stop()
        raise
    print(json.dumps({"session": node.proc.pid, "pids": node.pids()}), flush=True)
    for _ in range(1200):
        time.sleep(0.1)
""")


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return None


def _session(sid: int) -> list[int]:
    """Every process in session ``sid`` (a node's `ray start --block` and what it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and alive(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_nodes_die_with_the_process_that_started_them(sig):
    temp_dir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(temp_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, start_new_session=True)
    started: dict[int, str | None] = {}
    session = 0
    try:
        line = owner.stdout.readline()  # the owner exits (EOF) if the head does not start
        assert line, f"the head did not start (exit code {owner.wait(timeout=30)})"
        info = json.loads(line)
        session = info["session"]
        started = {pid: _start_time(pid) for pid in {*info["pids"], *_session(session)}}
        assert len(started) > 3, f"expected gcs_server, raylet, ... under the node: {info}"
        start = time.monotonic()
        owner.send_signal(sig)
        owner.wait(timeout=30)
        deadline = start + 30
        while True:
            left = [p for p, t in started.items() if alive(p) and _start_time(p) == t] + _session(session)
            if not left:
                break
            assert time.monotonic() < deadline, f"node processes outlived their owner by 30s: {sorted(set(left))}"
            time.sleep(0.2)
        print(f"{sig.name}: {len(started)} node processes gone {time.monotonic() - start:.1f}s after the owner")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(timeout=30)
        # Whatever is left (this test failing) is stopped here by PID, not left behind.
        for pid in {*(p for p, t in started.items() if _start_time(p) == t), *(_session(session) if session else [])}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_reaper_stops_its_nodes_and_removes_its_temp_dir(tmp_path):
    """The reaper as LoopbackCluster runs it (``python -I``, a grace period and a temp dir): once its pipe
    closes it stops a registered stand-in node and what it started, says so, and removes the temp dir."""
    marker = f"METARAY_LOOPBACK_CLUSTER={uuid.uuid4().hex}"
    temp_dir = Path(tempfile.mkdtemp(prefix="mr-", dir="/tmp"))
    reaper = start_reaper(marker, tmp_path / "reaper.log", 0.5, temp_dir)
    name, value = marker.split("=", 1)
    # a stand-in for `ray start --block`: the leader of a session of its own, with a child
    node = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300"], start_new_session=True,
                            env={**os.environ, name: value})
    try:
        register(reaper, node.pid)
        deadline = time.monotonic() + 20
        while len(cluster_processes(marker, set(), set())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.pid in cluster_processes(marker, set(), set())
        release(reaper, timeout=30)
        node.wait(timeout=10)
        log = (tmp_path / "reaper.log").read_text()
        summary = rf"reaper \(pipe closed\): stopped [2-9] process\(es\) of nodes \[{node.pid}\]"
        assert reaper.returncode == 0 and re.search(summary, log), log
        assert not cluster_processes(marker, set(), set()) and not alive(reaper.pid), log
        assert not temp_dir.exists(), log
    finally:  # whatever is left (this test failing) is stopped here by PID
        for pid in cluster_processes(marker, set(), set()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if reaper.poll() is None:
            reaper.kill()
            reaper.wait(timeout=10)
        node.wait(timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


# As ray.init does in a driver: SIGTERM becomes sys.exit(SIGTERM).
RAY_LIKE_HANDLER = "signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))"


@pytest.mark.parametrize("other_handler", ["none", "in-fixture", "in-test"])
def test_sigterm_to_pytest_runs_fixture_teardown(tmp_path, other_handler):
    """SIGTERM (a CI timeout) ends a pytest run through its fixtures' teardown, as Ctrl-C does, and ends
    it there (no further tests), even where ray.init has put in a SIGTERM handler of its own."""
    marker = tmp_path / "torn-down"
    (tmp_path / "test_blocks.py").write_text(textwrap.dedent(f"""
        import signal
        import sys
        import time
        from pathlib import Path

        import pytest

        @pytest.fixture(scope="session")
        def resource():
            if {other_handler == "in-fixture"}:
                {RAY_LIKE_HANDLER}
            try:
                yield
            finally:
                Path({str(marker)!r}).write_text("yes")

        def test_blocks(resource):
            if {other_handler == "in-test"}:
                {RAY_LIKE_HANDLER}
            print("READY", flush=True)
            for _ in range(600):
                time.sleep(0.1)

        def test_after(resource):
            print("AFTER", flush=True)
    """))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p", "tests.conftest",
                             "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_blocks.py")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = []
        for line in proc.stdout:  # bounded: the inner test ends by itself within 60 s
            out.append(line)
            if "READY" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out.append(proc.communicate(timeout=60)[0])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode != 0, "".join(out)
    assert marker.exists(), "".join(out)
    assert "AFTER" not in "".join(out), "".join(out)
