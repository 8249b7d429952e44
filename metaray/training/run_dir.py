"""The run directory: resolved config, checkpoints, Parquet tables. Every write is atomic.

The per-iteration tables (metrics.parquet, tasks.parquet) grow by appending: each
iteration's rows go into a part file of their own, ``<table>.parts/<first>-<last>.parquet``
(temporary file, fsync, rename), so an iteration costs the same at iteration 10 as at
iteration 100,000, and a run killed at any moment keeps every completed iteration's rows.
Runs of FANOUT consecutive parts of one size are merged into one part (at most up to
MAX_SPAN iterations), so a reader opens few files and each row is rewritten a bounded
number of times. At the end of a run everything is compacted into the single
``<table>.parquet`` file that old run directories have; that file is the table's base.
Readers see base + parts as one table (see ``read_rows``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from metaray.config import Config, ConfigError, dump_config, load_config, validate
from metaray.training.run_lock import LOCK_NAME, run_lock
from metaray.training.storage import Remote, local_path

CHECKPOINT_FORMAT = 1
_MAGIC = b"METARAY-CKPT-1\n"
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files are created as the user's umask says, like open() would
RUN_ENTRIES = re.compile(r"(config\.yaml|checkpoints|(metrics|tasks|eval)\.parquet|(metrics|tasks)\.parts|baselines|"
                         r"(learning|adaptation|success)_curve\.png|events\.out\.tfevents\..+|\..+\.tmp|\.metaray\.lock)")
"""What a metaray run directory holds; --overwrite removes nothing else."""


def atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(file)`` into a temporary file, fsync, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp's 0600 would hide it from a reader under another uid
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class NonFiniteParamsError(ArithmeticError):
    """The meta-parameters went NaN or inf: the run stops rather than checkpoint them."""


class RunDir:
    """A run directory: a local path, or a URI (s3://, gs://, file://) worked on through a local
    mirror that every write is pushed from (see metaray.training.storage)."""

    def __init__(self, location: str | Path, remote: Remote | None = None) -> None:
        local = None if remote is not None else local_path(location)
        self.remote = remote if remote is not None else (Remote.open(str(location)) if local is None else None)
        self.path = self.remote.mirror if self.remote is not None else Path(local)
        self.where = self.remote.display if self.remote is not None else str(self.path)
        """How messages name the run directory (a URI without its credentials)."""

    @property
    def location(self) -> str:
        """What another process opens the same run directory by: the URI, or the absolute path."""
        return self.remote.uri if self.remote is not None else str(self.path.resolve())

    @property
    def name(self) -> str:
        return self.where.split("?")[0].rstrip("/").rsplit("/", 1)[-1]

    def child(self, *parts: str) -> RunDir:
        """A run directory inside this one (the pretrained baseline's)."""
        if self.remote is not None:
            return RunDir("", remote=self.remote.child(*parts))
        return RunDir(self.path.joinpath(*parts))

    def shown(self, text: str) -> str:
        """``text`` with the mirror's path replaced by the run directory's URI."""
        return text.replace(str(self.remote.mirror), self.remote.base) if self.remote is not None else text

    def _sync(self, everything: bool = False) -> None:
        """Push the writes just made to the store (nothing to do for a local directory)."""
        if self.remote is not None:
            self.remote.push(everything)

    def flush(self) -> None:
        """Push everything, TensorBoard events and plots included (at checkpoints and at the end)."""
        self._sync(everything=True)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.parquet"

    def check_target(self, overwrite: bool) -> None:
        """Refuse, touching nothing, a target that ``prepare`` must not use: a symbolic link, a file,
        a non-empty directory without ``overwrite``, or with it one that is not a metaray run directory."""
        if self.path.is_symlink():
            raise ConfigError(f"run directory {self.where} is a symbolic link; give the directory itself")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run directory {self.where} is a file, not a directory")
        entries = sorted(e.name for e in self.path.iterdir() if e.name != LOCK_NAME) if self.path.is_dir() else []
        if entries and not overwrite:
            raise ConfigError(f"run directory {self.where} is not empty; pass --overwrite to replace it")
        why = entries and self._not_a_run(entries)
        if why:
            raise ConfigError(f"--overwrite replaces only a metaray run directory, and {self.where} is not one "
                              f"({why}); nothing was deleted")

    def _not_a_run(self, entries: list[str]) -> str | None:
        """Why the directory is not one metaray wrote (other tools write config.yaml and
        checkpoints/ too), looking into the folders a run has; None if it is one."""
        foreign = [name for name in entries if not RUN_ENTRIES.fullmatch(name)]
        if foreign:
            return f"it holds {foreign[0]!r}"
        if not self.config_path.is_file():
            return "it has no config.yaml"
        try:
            self.load_config()
        except ConfigError:
            return "its config.yaml is not a metaray config"
        inside = {"checkpoints": re.compile(r"checkpoint_\d{6}\.pt|\..+\.tmp"),
                  "metrics.parts": re.compile(r"\d+-\d+\.parquet|\..+\.tmp"),
                  "tasks.parts": re.compile(r"\d+-\d+\.parquet|\..+\.tmp"),
                  "baselines": re.compile(r"pretrained")}
        for folder, allowed in inside.items():
            path = self.path / folder
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                return f"its {folder} is not a directory"
            for entry in path.iterdir() if path.is_dir() else []:
                if not allowed.fullmatch(entry.name) or entry.is_symlink():
                    return f"it holds {folder}/{entry.name!r}"
                if folder == "checkpoints" and entry.suffix == ".pt":
                    with entry.open("rb") as f:
                        if f.read(len(_MAGIC)) != _MAGIC:
                            return f"{folder}/{entry.name} is not a metaray checkpoint"
                if folder == "baselines":
                    sub = RunDir(entry)
                    names = sorted(e.name for e in entry.iterdir() if e.name != LOCK_NAME) if entry.is_dir() else [""]
                    why = names and sub._not_a_run(names)
                    if why:
                        return f"baselines/pretrained is not a run directory: {why}"
        return None

    def prepare(self, config: Config, overwrite: bool) -> None:
        """Empty the directory as ``check_target`` allows (the lock file stays: its holder is the
        caller), then write the config. Call with the run's lock held."""
        self.check_target(overwrite)
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        if self.remote is not None:
            self.remote.delete_foreign()  # what the mirror skipped (a checkpoint past the manifest)
        self.write_config(config)

    @contextmanager
    def lock(self, command: str) -> Iterator[bool]:
        """The run directory's writer lock (see metaray.training.run_lock); the directory must exist.

        On a store, a lease object instead; once it is held the mirror is fetched again, so the
        writer starts from what the previous one left."""
        if self.remote is None:
            with run_lock(self.path, command) as locked:
                yield locked
            return
        with self.remote.lease(command):
            self.remote.pull()
            yield True

    def write_config(self, config: Config) -> None:
        atomic_write(self.config_path, lambda f: f.write(dump_config(config).encode()))
        self._sync()

    def load_config(self) -> Config:
        """config.yaml, read within the same bounds as any config file (it may be hostile too)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{self.where} is not a metaray run directory (no config.yaml)")
        try:
            return load_config(self.config_path)
        except ConfigError as err:
            raise ConfigError(self.shown(str(err))) from None

    def save_checkpoint(self, iteration: int, state: dict[str, Any], config: Config, keep: int) -> Path:
        """Write checkpoint N atomically with a checksum, then delete all but the newest ``keep``.

        Parameters with NaN or inf are refused: nothing broken is ever checkpointed."""
        if not torch.isfinite(state["params"]).all():
            raise NonFiniteParamsError(f"iteration {iteration}: the meta-parameters are not finite (NaN or inf); "
                                       f"nothing was checkpointed in {self.where}")
        payload = {"format": CHECKPOINT_FORMAT, "iteration": iteration,
                   "config": config.model_dump(mode="json"), **state}
        buf = io.BytesIO()
        torch.save(payload, buf)
        raw = buf.getvalue()
        path = self.checkpoints / f"checkpoint_{iteration:06d}.pt"
        atomic_write(path, lambda f: f.write(_MAGIC + hashlib.sha256(raw).digest() + raw))
        for old in self.checkpoint_files()[:-keep]:
            old.unlink()
        self.flush()  # the checkpoint, then the manifest naming it; events and plots too
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
            checkpoint = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"checkpoint {path} cannot be read: {err}") from None
        problem = _contents_problem(checkpoint)
        if problem:  # a valid checksum only says the bytes are what was written
            raise ConfigError(f"checkpoint {path} has bad contents: {problem}")
        return checkpoint

    def latest_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint; a damaged newest one is an error, never silently skipped."""
        files = self.checkpoint_files()
        if not files:
            raise ConfigError(f"run directory {self.where} has no checkpoint")
        try:
            return self.read_checkpoint(files[-1])
        except ConfigError as err:
            hint = f"; delete it to resume from {files[-2].name}" if len(files) > 1 else ""
            raise ConfigError(self.shown(f"{err}{hint}")) from None

    def load_model(self) -> tuple[Config, dict[str, Any]]:
        """config.yaml and the newest checkpoint, refused unless they describe the same run: an
        edited config fails here, before Ray or a replica starts, not as a traceback later."""
        config = self.load_config()
        checkpoint = self.latest_checkpoint()
        source = self.checkpoint_files()[-1]
        try:
            saved = validate(checkpoint["config"], f"the config inside {source}")
        except ConfigError as err:
            raise ConfigError(self.shown(f"checkpoint {source} has bad contents: {err}")) from None
        changed = config_changes(saved, config, may_change=SAFE_TO_CHANGE)
        if changed:
            raise ConfigError(self.shown(
                f"{self.config_path} does not match its checkpoint {source.name} in {', '.join(changed)} "
                "(edited after training?); restore it, or train again"))
        return config, checkpoint

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
        self._sync()

    def write_eval(self, rows: list[dict[str, Any]]) -> None:
        """Replace eval.parquet with ``rows``."""
        write_rows(self.eval_path, rows)
        self._sync()

    def append_iteration(self, iteration: int, metrics_row: dict[str, Any], task_rows: list[dict[str, Any]]) -> None:
        """Add one iteration's rows to tasks.parquet, then to metrics.parquet; constant cost.

        A metrics row therefore always has its task rows (tasks may hold one iteration more).
        """
        append_rows(self.tasks_path, iteration, task_rows)
        append_rows(self.metrics_path, iteration, [metrics_row])
        self._sync()  # in the order written: a metrics row's task rows are stored before it

    def truncate_tables(self, iteration: int) -> None:
        """Drop the rows of iterations >= ``iteration`` (a resume re-runs them; 0 empties the tables)."""
        truncate_rows(self.metrics_path, iteration)
        truncate_rows(self.tasks_path, iteration)
        self._sync()

    def compact_tables(self) -> None:
        """Fold the part files into metrics.parquet and tasks.parquet (end of a run)."""
        compact_rows(self.tasks_path)
        compact_rows(self.metrics_path)
        self._sync()


SAFE_TO_CHANGE = ("outer.iterations", "checkpoint.", "eval.", "resources.")
"""Config fields that do not describe the model or its training arithmetic (but
``resources.torch_threads``, which changes the arithmetic: see ``--resume``)."""


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: Config, new: Config, may_change: tuple[str, ...]) -> list[str]:
    """Dotted names of the fields that differ, but those starting with one of ``may_change``."""
    a, b = _flat(old.model_dump(mode="json")), _flat(new.model_dump(mode="json"))
    return [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(may_change)]


def _contents_problem(checkpoint: Any) -> str | None:
    """What is wrong with a loaded checkpoint's structure, or None."""
    if not isinstance(checkpoint, dict):
        return f"a {type(checkpoint).__name__}, not a mapping"
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        return f"format {str(checkpoint.get('format'))[:20]!r}, this metaray reads format {CHECKPOINT_FORMAT}"
    iteration = checkpoint.get("iteration")
    if type(iteration) is not int or iteration < 0:
        return f"iteration {str(iteration)[:20]!r} is not a non-negative integer"
    params = checkpoint.get("params")
    if (not isinstance(params, torch.Tensor) or params.dim() != 1 or params.requires_grad
            or params.dtype not in (torch.float32, torch.float64)):
        return "no params (a 1-D float32 or float64 tensor)"
    optimizer = checkpoint.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, dict) and {"state", "param_groups"} <= optimizer.keys()):
        return "an optimizer state that is not a torch optimizer's state_dict"
    if not isinstance(checkpoint.get("config"), dict):
        return "no config"
    return None


FANOUT = 16  # parts of one size merged at once
MAX_SPAN = FANOUT**3  # iterations in the largest merged part: each row is rewritten at most 3 times
_PART = re.compile(r"(\d+)-(\d+)\.parquet")


def parts_dir(path: Path) -> Path:
    """Where a table's appended parts live: metrics.parquet -> metrics.parts/."""
    return path.with_suffix(".parts")


def _parts(path: Path) -> list[tuple[int, int, Path]]:
    """(first, last iteration, file) of every part, by first iteration, the widest first among equals."""
    try:
        names = os.listdir(parts_dir(path))
    except FileNotFoundError:
        return []
    found = [(int(m[1]), int(m[2]), parts_dir(path) / name) for name in names if (m := _PART.fullmatch(name))]
    return sorted(found, key=lambda p: (p[0], -p[1]))


def _live(parts: list[tuple[int, int, Path]]) -> tuple[list[tuple[int, int, Path]], list[Path]]:
    """Split parts into the live ones and those inside a wider one (a merge killed before it
    deleted its inputs leaves both; their rows are the same)."""
    live: list[tuple[int, int, Path]] = []
    dead: list[Path] = []
    for part in parts:
        if live and part[1] <= live[-1][1]:
            dead.append(part[2])
        else:
            live.append(part)
    return live, dead


def _base_through(table: pa.Table | None) -> int | None:
    """The last iteration the base file holds. The base holds every row up to it, so parts
    contribute only rows past it (a compaction killed before it removed its parts leaves both)."""
    if table is None or "iteration" not in table.column_names or table.num_rows == 0:
        return None
    return pc.max(table["iteration"]).as_py()


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = list(dict.fromkeys(k for row in rows for k in row))  # pyarrow would take the first row's
    return pa.Table.from_pylist([{k: row.get(k) for k in columns} for row in rows])


def _concat(tables: list[pa.Table]) -> pa.Table:
    """One table; a column missing from some tables is null there, int and float columns unify."""
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def _write(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda f: pq.write_table(table, f))


def _snapshot(path: Path) -> tuple[pa.Table | None, int | None, list[tuple[int, int, Path]], list[Path]]:
    """The base table, the last iteration it holds, the parts with rows past it, and the redundant parts."""
    for _ in range(20):
        # Parts are listed before the base is read: a compaction that lands in between
        # makes them redundant (skipped), one that lands after makes reading them fail (retried).
        live, dead = _live(_parts(path))
        try:
            base = pq.read_table(path) if path.is_file() else None
        except FileNotFoundError:
            continue
        through = _base_through(base)
        if through is not None:
            dead += [p for _, last, p in live if last <= through]
            live = [part for part in live if part[1] > through]
        return base, through, live, dead
    raise FileNotFoundError(f"{path} kept changing while being read")


def read_table(path: Path) -> pa.Table | None:
    """A table: its base file plus its appended parts in iteration order; None when there is nothing."""
    for _ in range(20):
        base, through, live, _ = _snapshot(path)
        tables = [base] if base is not None else []
        try:
            for first, _, p in live:
                part = pq.read_table(p)
                if through is not None and first <= through:  # the base already holds the start
                    part = part.filter(pc.greater(part["iteration"], through))
                tables.append(part)
        except FileNotFoundError:  # merged or compacted by the writer meanwhile: look again
            continue
        return _concat(tables) if tables else None
    raise FileNotFoundError(f"{path} kept changing while being read")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A Parquet table's rows (base file plus appended parts); none when nothing is written yet."""
    table = read_table(path)
    return table.to_pylist() if table is not None else []


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite a Parquet table whole, atomically; a column missing from some rows is null there."""
    _write(path, _table(rows))
    if parts_dir(path).exists():  # the rows replace any appended ones too
        shutil.rmtree(parts_dir(path))


def append_rows(path: Path, iteration: int, rows: list[dict[str, Any]]) -> None:
    """Add one iteration's rows (all with this ``iteration``) as a part file, atomically.

    The cost does not depend on how many iterations came before: one small file, plus now
    and then a merge of FANOUT parts of one size (amortized, each row is rewritten at most
    log_FANOUT(MAX_SPAN) times).
    """
    _write(parts_dir(path) / f"{iteration:06d}-{iteration:06d}.parquet", _table(rows))
    live, _ = _live(_parts(path))
    while len(live) >= FANOUT:
        group = live[-FANOUT:]
        first, last = group[0][0], group[-1][1]
        span = group[0][1] - first + 1
        aligned = [(i, i + span - 1) for i in range(first, last + 1, span)]
        if span >= MAX_SPAN or [(a, b) for a, b, _ in group] != aligned:
            break  # merge only FANOUT adjacent parts of one size, up to MAX_SPAN iterations
        merged = parts_dir(path) / f"{first:06d}-{last:06d}.parquet"
        _write(merged, _concat([pq.read_table(p) for _, _, p in group]))
        for _, _, p in group:  # a kill here leaves parts inside the merged one: readers skip them
            p.unlink(missing_ok=True)
        live = [*live[:-FANOUT], (first, last, merged)]


def truncate_rows(path: Path, iteration: int) -> None:
    """Drop the rows of iterations >= ``iteration`` from the base file and the parts.

    Idempotent: a truncation killed midway leaves stale rows that the next one removes.
    """
    base, through, live, dead = _snapshot(path)
    for p in dead:
        p.unlink(missing_ok=True)
    for first, last, p in reversed(live):  # newest first: what remains is always a prefix
        if first >= iteration:
            p.unlink(missing_ok=True)
        elif last >= iteration:
            table = pq.read_table(p)
            _write(parts_dir(path) / f"{first:06d}-{iteration - 1:06d}.parquet",
                   table.filter(pc.less(table["iteration"], iteration)))
            p.unlink()
    if through is not None and through >= iteration:
        kept = base.filter(pc.less(base["iteration"], iteration))
        if kept.num_rows:
            _write(path, kept)
        else:  # no stale columns either: the table starts again from its first new rows
            path.unlink()


def compact_rows(path: Path) -> None:
    """Rewrite base + parts as the single base file, then remove the parts (content unchanged)."""
    if not parts_dir(path).exists():
        return
    table = read_table(path)
    if table is not None:
        _write(path, table)
    # A kill from here on leaves parts that the new base already holds: readers skip them.
    shutil.rmtree(parts_dir(path))
