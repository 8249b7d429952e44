"""The run directory: resolved config, checkpoints, Parquet tables. Every write is atomic.

Tables are rewritten whole after each iteration (temporary file, fsync, rename), so a
run killed at any moment leaves every completed iteration's rows in a readable file.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metaray.config import Config, ConfigError, dump_config, validate

CHECKPOINT_FORMAT = 1
_MAGIC = b"METARAY-CKPT-1\n"


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(file)`` into a temporary file, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def prepare(self, config: Config, overwrite: bool) -> None:
        """Create the run directory; refuse a non-empty one unless told to overwrite."""
        if self.path.exists() and any(self.path.iterdir()):
            if not overwrite:
                raise ConfigError(f"run directory {self.path} is not empty; pass --overwrite to replace it")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    def write_config(self, config: Config) -> None:
        atomic_write(self.config_path, lambda f: f.write(dump_config(config).encode()))

    def load_config(self) -> Config:
        import yaml

        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a metaray run directory (no config.yaml)")
        return validate(yaml.safe_load(self.config_path.read_text()) or {}, str(self.config_path))

    def save_checkpoint(self, iteration: int, state: dict[str, Any], config: Config, keep: int) -> Path:
        """Write checkpoint N atomically with a checksum, then delete all but the newest ``keep``."""
        payload = {"format": CHECKPOINT_FORMAT, "iteration": iteration,
                   "config": config.model_dump(mode="json"), **state}
        buf = io.BytesIO()
        torch.save(payload, buf)
        raw = buf.getvalue()
        path = self.checkpoints / f"checkpoint_{iteration:06d}.pt"
        atomic_write(path, lambda f: f.write(_MAGIC + hashlib.sha256(raw).digest() + raw))
        for old in self.checkpoint_files()[:-keep]:
            old.unlink()
        return path

    def checkpoint_files(self) -> list[Path]:
        """Complete checkpoints, oldest first (a write killed midway leaves only a hidden .tmp file)."""
        return sorted(self.checkpoints.glob("checkpoint_*.pt"))

    @staticmethod
    def read_checkpoint(path: Path) -> dict[str, Any]:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            raise ConfigError(f"checkpoint {path} is not a metaray checkpoint (bad header)")
        digest, raw = data[len(_MAGIC): len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
        if len(digest) < 32 or hashlib.sha256(raw).digest() != digest:
            raise ConfigError(f"checkpoint {path} is corrupt: its checksum does not match "
                              f"(truncated or damaged, {len(data)} bytes)")
        try:
            return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"checkpoint {path} cannot be read: {err}") from None

    def latest_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint; a damaged newest one is an error, never silently skipped."""
        files = self.checkpoint_files()
        if not files:
            raise ConfigError(f"run directory {self.path} has no checkpoint")
        try:
            return self.read_checkpoint(files[-1])
        except ConfigError as err:
            hint = f"; delete it to resume from {files[-2].name}" if len(files) > 1 else ""
            raise ConfigError(f"{err}{hint}") from None

    @property
    def tasks_path(self) -> Path:
        return self.path / "tasks.parquet"

    @property
    def eval_path(self) -> Path:
        return self.path / "eval.parquet"

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_rows(self.metrics_path)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        write_rows(self.metrics_path, rows)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet table's rows; none when the file does not exist yet."""
    return pq.read_table(path).to_pylist() if path.is_file() else []


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite a Parquet table whole, atomically; a column missing from some rows is null there."""
    columns = list(dict.fromkeys(k for row in rows for k in row))  # pyarrow would take the first row's
    table = pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])
    atomic_write(path, lambda f: pq.write_table(table, f))
