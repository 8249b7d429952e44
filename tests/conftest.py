"""Shared fixtures: a real embedded Ray on loopback, and a CLI runner in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Ray clusters that live only inside a test: no auth, no usage stats, state in a temp dir.
_TMP = Path(tempfile.mkdtemp(prefix="metaray-tests-"))
os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(_TMP))


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for the in-process tests: 2 CPUs, small object store, loopback."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.2",
        object_store_memory=150 * 1024**2,
        _temp_dir=str(_TMP / "ray"),
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session cluster's GCS address, for CLI subprocesses that join it with --address."""
    return ray_local.get_runtime_context().gcs_address


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metaray.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
    )
