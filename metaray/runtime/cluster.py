"""Connecting to Ray: an embedded local instance by default, or a named cluster."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from metaray.runtime.auth import check_token

EMBEDDED_NODE_IP = "127.0.0.1"
"""The embedded instance's node address. Ray 2.60 binds a node's servers (GCS, raylet, workers,
agents, metrics) to loopback only when this is literally 127.0.0.1, and to every interface for
any other address, 127.0.0.2 included."""


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
        _start_embedded(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


class ExposedRayError(RuntimeError):
    """The embedded Ray would accept unauthenticated connections from other hosts."""


def _start_embedded(num_cpus: float) -> None:
    """Start a one-node Ray whose every server listens on loopback only.

    ``ray.init`` replaces 127.0.0.1 with the host's routable address (so that a cluster can
    form) unless Ray believes it runs where clusters are off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
    read by the driver's ``ray_constants`` at import, so set on the module too). Both are
    undone once the node is up: a later connection to a real cluster is unaffected.
    """
    from ray._private import ray_constants

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    saved_env, saved_flag = os.environ.get(_CLUSTER_FLAG), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_FLAG], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        context = ray.init(
            num_cpus=max(int(os.cpu_count() or 1), int(num_cpus + 0.999)),
            include_dashboard=False,
            _node_ip_address=EMBEDDED_NODE_IP,
            object_store_memory=int(os.environ.get("METARAY_OBJECT_STORE_BYTES", 300 * 1024**2)),
            logging_level=logging.WARNING,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTER_FLAG, None)
        else:
            os.environ[_CLUSTER_FLAG] = saved_env
    node_ip = context.address_info["node_ip_address"]
    if node_ip != EMBEDDED_NODE_IP and os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        # A Ray that changed how it binds: with token auth off, refuse to run open.
        ray.shutdown()
        raise ExposedRayError(f"the embedded Ray came up on {node_ip}, not loopback, with RAY_AUTH_MODE=disabled: "
                              "anyone who reaches this host could run code in it; unset RAY_AUTH_MODE "
                              "(token auth) or give --address")


_CLUSTER_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


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
    """Fail within ``timeout_s`` with the address in the message, rather than hang in ray.init:
    an address that does not answer, or a cluster that refuses this process's token
    (metaray.runtime.auth.ClusterAuthError)."""
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
    check_token(address, timeout_s)
