"""Connecting to Ray: an embedded local instance by default, or a named cluster."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

EMBEDDED_NODE_IP = os.environ.get("METARAY_NODE_IP", "127.0.0.2")
"""Loopback address for the embedded instance (127.0.0.1 is rewritten by Ray)."""


@contextmanager
def ray_session(address: str | None, num_cpus: float) -> Iterator[None]:
    """Connect for the duration of a command; shut down only what we started.

    ``address`` (or ``RAY_ADDRESS``) names a cluster: ``auto``, ``HOST:PORT`` or
    ``ray://HOST:PORT``. Without one, an embedded instance on loopback is started with
    enough CPUs for every worker to be placed.
    """
    address = resolve_address(address)
    if ray.is_initialized():  # a caller (a test, a notebook) already connected
        yield
        return
    if address:
        check_reachable(address)
        _connect(address)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=max(int(os.cpu_count() or 1), int(num_cpus + 0.999)),
            include_dashboard=False,
            _node_ip_address=EMBEDDED_NODE_IP,
            object_store_memory=int(os.environ.get("METARAY_OBJECT_STORE_BYTES", 300 * 1024**2)),
            logging_level=logging.WARNING,
        )
    try:
        yield
    finally:
        ray.shutdown()


def _connect(address: str, attempts: int = 3) -> None:
    """ray.init to a cluster; a Ray Client server that fails to start (a busy head) is retried."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
            return
        except (ConnectionError, RuntimeError) as err:
            if not address.startswith("ray://") or attempt == attempts:
                raise
            logging.getLogger(__name__).warning("Ray Client connection to %s failed (%s); retrying",
                                                address, str(err).splitlines()[-1] if str(err) else err)
            time.sleep(2.0 * attempt)


def resolve_address(address: str | None) -> str | None:
    """The cluster to join: ``--address``, else ``RAY_ADDRESS``, else None (embedded)."""
    return address or os.environ.get("RAY_ADDRESS") or None


class UnreachableClusterError(ConnectionError):
    pass


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within ``timeout_s`` with the address in the message, rather than hang in ray.init."""
    if address == "auto":
        return  # ray.init itself fails fast when no local cluster is found
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UnreachableClusterError(f"Ray address {address!r} is not auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UnreachableClusterError(f"cannot reach the Ray cluster at {address}: {err}") from None
