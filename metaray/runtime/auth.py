"""Ray token authentication: where this process's cluster token comes from, and a check that fails fast.

A cluster started with ``RAY_AUTH_MODE=token`` refuses every gRPC call and HTTP request that
does not carry its token. Ray's clients send one only when ``RAY_AUTH_MODE=token`` in their own
process, taking it from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``. ``--auth-token-file PATH`` points Ray's loader at PATH and turns token
mode on for this process (and what it starts). The token itself is never read into a message,
a log line or anything metaray writes: Ray reads the file.

Without the right token, ``ray.init(address=HOST:PORT)`` retries for 20 s and then raises a bare
``ConnectionError``, and ``ray.init("ray://...")`` for 30 s; so before connecting, one cheap call
(GCS ``GetClusterId``, Ray Client's ``PING``) is made with the same credentials, and a refusal
becomes :class:`ClusterAuthError` naming the address and the ways to give the token.
"""

from __future__ import annotations

import os
from pathlib import Path

from metaray.config import ConfigError

MAX_TOKEN_FILE_BYTES = 4096
"""Larger is no token (Ray's are 32 hex digits), and would not fit an HTTP header."""

HINT = ("give the cluster's token with --auth-token-file PATH, or set RAY_AUTH_MODE=token with the token in "
        "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")

_flag_file: list[str] = []  # the --auth-token-file in use, to name it in messages


class ClusterAuthError(ConnectionError):
    """The cluster refused this process: no token, or not its token."""


def read_token_file(path: Path) -> None:
    """Check that ``path`` holds one token: a readable regular file, non-empty, at most
    MAX_TOKEN_FILE_BYTES, one line of printable ASCII (surrounding whitespace is ignored, as Ray
    ignores it). A bad file is a ConfigError (a usage error); the message never quotes the file."""
    name = f"--auth-token-file {path}"
    try:
        if not path.is_file():
            raise ConfigError(f"{name}: {'no such file' if not path.exists() else 'not a regular file'}")
        with path.open("rb") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{name}: cannot read it: {err.strerror or err}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_TOKEN_FILE_BYTES} bytes; a token file holds one token")
    token = data.strip()
    if not token:
        raise ConfigError(f"{name}: is empty; it must hold the cluster's token")
    if not all(0x20 <= b < 0x7F for b in token):
        raise ConfigError(f"{name}: must hold one line of printable ASCII (the cluster's token)")


def use_token_file(path: Path | None) -> None:
    """``--auth-token-file``: check the file, then make Ray send its token from this process.

    Sets ``RAY_AUTH_MODE=token`` (over ``disabled`` too: the option is an explicit request) and
    ``RAY_AUTH_TOKEN_PATH`` to the file, and drops ``RAY_AUTH_TOKEN``, which Ray would prefer.
    A cluster without token auth ignores the token. Nothing of the token enters the environment.
    """
    if path is None:
        return
    read_token_file(path)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())
    os.environ.pop("RAY_AUTH_TOKEN", None)
    _flag_file[:] = [str(path)]
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # Ray caches the mode it read from the environment; as Ray's own _enable_token_auth
    AuthenticationTokenLoader.instance().reset_cache()


def token_mode() -> bool:
    """Whether Ray in this process sends a token (RAY_AUTH_MODE=token, as Ray reads it)."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    return is_token_auth_enabled()


def _source() -> str:
    """Where Ray takes this process's token from, named without its content."""
    if _flag_file and os.environ.get("RAY_AUTH_TOKEN_PATH") == str(Path(_flag_file[0]).resolve()):
        return f"--auth-token-file {_flag_file[0]}"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return "~/.ray/auth_token"


def _has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    try:
        return bool(AuthenticationTokenLoader.instance().has_token())
    except AuthenticationError:  # token mode with no token, or an unreadable RAY_AUTH_TOKEN_PATH
        return False


def failure(address: str | None, server: str = "Ray cluster") -> ClusterAuthError:
    """The one-line error for a refusal by the ``server`` at ``address``, from what this process sent."""
    where = f"the {server} at {address}" if address else f"the {server}"
    if not token_mode():
        reason = "it requires a token and this process sent none (RAY_AUTH_MODE is not 'token' here)"
    elif not _has_token():
        reason = "RAY_AUTH_MODE=token but no token was found (" + (
            f"RAY_AUTH_TOKEN_PATH {os.environ['RAY_AUTH_TOKEN_PATH']} cannot be read or is empty"
            if os.environ.get("RAY_AUTH_TOKEN_PATH") and not os.environ.get("RAY_AUTH_TOKEN") else
            "RAY_AUTH_TOKEN and RAY_AUTH_TOKEN_PATH are unset and there is no ~/.ray/auth_token") + ")"
    else:
        reason = f"it rejected the token from {_source()}"
    return ClusterAuthError(f"authentication failed against {where}: {reason}; {HINT}")


def check_token(address: str, timeout_s: float = 5.0) -> None:
    """One authenticated call to the GCS (``HOST:PORT``) or the Ray Client server (``ray://HOST:PORT``),
    raising ClusterAuthError if the cluster refuses this process's token. Any other outcome (the
    call answered, timed out or failed otherwise) is left to ``ray.init``."""
    import grpc
    from ray._private.grpc_utils import init_grpc_channel

    if token_mode() and not _has_token():
        raise failure(address)
    client = address.startswith("ray://")
    channel = init_grpc_channel(address.removeprefix("ray://"))  # Ray's TLS and token interceptors
    try:
        if client:
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=timeout_s)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise failure(address) from None
    finally:
        channel.close()
