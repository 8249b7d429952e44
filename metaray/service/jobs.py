"""Ray Jobs: submit ``metaray train`` to a cluster's job server and follow it."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from metaray.config import Config

from metaray.config import ConfigError

DEFAULT_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def job_client(address: str | None, auth_token_file: Path | None = None) -> JobSubmissionClient:
    """A client for the job server at ``address`` (http://HOST:8265), failing with the address named;
    with the cluster's token from ``auth_token_file`` or Ray's own sources (metaray.runtime.auth)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from metaray.runtime import auth

    auth.use_token_file(auth_token_file)
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no job server: pass --address http://HOST:8265 (or set RAY_API_SERVER_ADDRESS)")
    try:
        return JobSubmissionClient(address)  # asks the server its version: a refused token fails here
    except AuthenticationError:  # 401 (no token sent), 403 (not the cluster's), or no token found here
        raise auth.failure(address, "Ray job server") from None
    except Exception as err:  # ConnectionError, or a RuntimeError wrapping one
        raise ConnectionError(f"cannot reach the Ray job server at {address}: {err}") from None


def build_runtime_env(runtime_env_file: Path | None, working_dir: str | None, pip: list[str]) -> dict[str, Any]:
    """A runtime environment from a YAML file, a working directory to upload, and pip packages."""
    env: dict[str, Any] = {}
    if runtime_env_file is not None:
        try:
            env = yaml.safe_load(runtime_env_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"runtime environment {runtime_env_file}: {err}") from None
        if not isinstance(env, dict):
            raise ConfigError(f"runtime environment {runtime_env_file} must be a mapping")
    if working_dir is not None:
        env["working_dir"] = working_dir
    if "working_dir" in env:
        env.setdefault("excludes", DEFAULT_EXCLUDES)
    if pip:
        env["pip"] = [*env.get("pip", []), *pip]
    env.setdefault("env_vars", {}).setdefault("PYTHONUNBUFFERED", "1")
    if secret := SECRET_ENV_VARS & set(env["env_vars"]):
        raise ConfigError(f"runtime environment: env_vars {sorted(secret)} would put a secret in the job's "
                          "metadata; leave them out: the job's driver runs on the head, which has the cluster's "
                          "token, and takes store credentials from the head's environment or identity")
    return env


SECRET_ENV_VARS = {"RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "METARAY_SERVE_TOKEN"}
"""A runtime environment is job metadata, readable by anyone who can list the cluster's jobs."""


CONFIG_ENV = "METARAY_JOB_CONFIG"
"""The job's resolved config (YAML), in its runtime environment: the job runs exactly what was
validated where it was submitted, and the config is in the job's metadata for the record."""


def train_runtime_env(env: dict[str, Any], config: Config) -> dict[str, Any]:
    """``env`` with the resolved config added to its environment variables."""
    from metaray.config import dump_config

    return {**env, "env_vars": {**env.get("env_vars", {}), CONFIG_ENV: dump_config(config)}}


def train_entrypoint(output: str) -> str:
    """``metaray train`` of the config the runtime environment carries, into ``output``."""
    return shlex.join(["python", "-m", "metaray.cli", "train", "--config-env", CONFIG_ENV, "--output", output])


def submit(client: JobSubmissionClient, entrypoint: str, runtime_env: dict[str, Any],
           patience_s: float = 60.0) -> str:
    """Submit, retrying while the job server says it is not ready yet (a cluster still starting)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def follow(client: JobSubmissionClient, job_id: str, echo: Callable[[str], None], stream_logs: bool) -> str:
    """Wait for the job to end (streaming its logs if asked); return its final status."""
    if stream_logs:
        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                echo(chunk.rstrip("\n"))

        asyncio.run(tail())
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        time.sleep(1.0)
    return status
