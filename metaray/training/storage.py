"""Run directories on object storage (``s3://``, ``gs://``, any filesystem ``pyarrow.fs`` knows).

A remote run directory is worked on through a private local mirror: it is downloaded when
opened, every write lands in the mirror first (with all the local guarantees of
metaray.training.run_dir), and each write of the run directory is pushed right after it is
made. A push uploads new and changed files in the order they were written, then the
``checkpoints/latest.json`` manifest, then deletes what the mirror no longer holds. An object
PUT is atomic, so no reader ever sees a half-written file; listing is not, so a reader takes
the newest checkpoint the manifest names (a checkpoint uploaded just before a crash and not
yet in the manifest is re-made by the resume). Large, growing files (TensorBoard events) and
plots are pushed at checkpoints and at the end, not at every iteration.

Credentials come from where pyarrow looks (the environment, the instance or pod identity, the
URI's own query) and are never written anywhere: the URI shown in messages has them removed.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from metaray.config import ConfigError

MANIFEST = "checkpoints/latest.json"
LOCK_KEY = ".metaray.lock"
_DEFERRED = re.compile(r"(.*/)?(events\.out\.tfevents\..+|[^/]+\.png)")
"""Pushed at checkpoints and at the end only: they grow or are rewritten whole."""
_SKIPPED = re.compile(r"(.*/)?(\.metaray\.lock|\..+\.tmp)")
_SECRET_QUERY = {"access_key", "secret_key", "session_token"}


class StorageError(ConnectionError):
    """The object store failed (unreachable, denied): one line naming the run directory's URI."""


def is_uri(location: str | Path) -> bool:
    """A URI with a scheme (s3://, gs://, file://, ...), not a local path."""
    return isinstance(location, str) and re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def redact(uri: str) -> str:
    """The URI without credentials (user info, access/secret keys in the query)."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = urlencode([(k, "***" if k in _SECRET_QUERY else v) for k, v in parse_qsl(parts.query)], safe=":/*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def local_path(location: str | Path) -> Path | None:
    """The local path a location names (a plain path or file://), or None for a remote URI."""
    if not is_uri(location):
        return Path(location)
    parts = urlsplit(str(location))
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query:
            raise ConfigError(f"run directory {redact(str(location))}: a file:// URI is file:///absolute/path")
        return Path(parts.path)
    return None


_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]*@")


def _first_line(err: BaseException) -> str:
    """An error's first line, with any credentials in a URI it quotes removed."""
    text = str(err).strip() or type(err).__name__
    return _USERINFO.sub(r"\1", text.splitlines()[0][:300])


def check_uri(uri: str) -> str:
    """Refuse a remote run directory's URI that is unsafe whatever the store says; returns it as shown."""
    shown = redact(uri)
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise ConfigError(f"run directory {shown}: credentials in a URI end up in logs, job metadata and "
                          "Serve's config; give them through the environment (AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) or the machine's identity")
    segments = unquote(parts.path).rstrip("/").split("/")[1:]
    if not segments or any(seg in ("", ".", "..") for seg in segments):
        raise ConfigError(f"run directory {shown}: give a plain prefix inside the bucket "
                          "(s3://BUCKET/PREFIX: no empty, '.' or '..' parts), never a whole bucket")
    return shown


_MIRROR_PREFIX = "metaray-mirror-"


_MIRRORS: list[Path] = []
"""This process's mirrors, removed at exit (a killed process's, by the next one: ``_sweep_mirrors``)."""


def _remove_mirrors() -> None:
    for path in _MIRRORS:
        shutil.rmtree(path, ignore_errors=True)


def _sweep_mirrors() -> None:
    """Remove the mirrors of this user's metaray processes that are gone (SIGKILL, SIGTERM: no exit hooks)."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{_MIRROR_PREFIX}*-*"):
        pid = path.name[len(_MIRROR_PREFIX):].split("-", 1)[0]
        try:
            if not pid.isdigit() or path.stat().st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue  # alive (another user's: EPERM), or vanished meanwhile


def _bounded(fs: Any) -> Any:
    """The same filesystem with bounded waits. pyarrow's defaults give up on an S3 endpoint that
    accepts but never answers after ~90 s, and retry GCS for up to 15 minutes; these fail in ~30 s."""
    import datetime

    import pyarrow.fs as pafs

    make, (options,) = fs.__reduce__()
    if fs.type_name == "s3":
        options = {**options, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        for key, seconds in (("connect_timeout", 5.0), ("request_timeout", 10.0)):
            if options.get(key, -1) < 0:
                options[key] = seconds
        return make(options)
    if fs.type_name == "gcs" and options.get("retry_time_limit") is None:
        return make({**options, "retry_time_limit": datetime.timedelta(seconds=20)})
    return fs


class _Shared:
    """What a run directory and the folders inside it (a pretrained baseline) share."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[int, int, int]] = {}  # object key -> (size, mtime_ns, inode) it was made from
        self.foreign: set[str] = set()  # keys of objects that are not a run's: never written over, never deleted
        self.failure: str | None = None  # once the store failed or the lease was lost, writes fail at once
        self.lease_until: float | None = None  # while a lease is held: when it runs out unless renewed


class Remote:
    """One remote run directory (or a folder inside one), mirrored at ``mirror``."""

    def __init__(self, uri: str, fs: Any, root: str, mirror: Path, shared: _Shared) -> None:
        self.uri, self.fs, self.root, self.mirror, self.shared = uri, fs, root.rstrip("/"), mirror, shared
        self.display = redact(uri)
        """The URI for messages (credentials removed)."""
        self.base = self.display.split("?", 1)[0].rstrip("/")
        """The same without the query: what a file inside is shown under."""

    @classmethod
    def open(cls, uri: str) -> Remote:
        import pyarrow.fs as pafs

        shown = check_uri(uri)
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
            fs = _bounded(fs)
        except Exception as err:  # ArrowInvalid, OSError: an unknown scheme, a bad query option
            raise ConfigError(f"run directory {shown}: {_first_line(err)}") from None
        _sweep_mirrors()
        mirror = Path(tempfile.mkdtemp(prefix=f"{_MIRROR_PREFIX}{os.getpid()}-"))
        if not _MIRRORS:
            atexit.register(_remove_mirrors)
        _MIRRORS.append(mirror)
        remote = cls(uri, fs, root, mirror / "run", _Shared())
        remote.pull()
        return remote

    def child(self, *parts: str) -> Remote:
        """The folder ``parts`` inside this run directory, sharing its mirror and state."""
        split = urlsplit(self.uri)
        uri = urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))
        sub = Remote(uri, self.fs, "/".join([self.root, *parts]), self.mirror.joinpath(*parts), self.shared)
        return sub

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        import pyarrow as pa

        try:
            yield
        except (ConfigError, StorageError):
            raise
        except (OSError, ValueError, pa.ArrowException) as err:
            raise StorageError(f"run directory {self.display}: {what} failed: {_first_line(err)}") from None

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def pull(self) -> None:
        """Make the mirror what the store holds (the newest checkpoint as the manifest says).

        A writer may merge or delete files between the listing and the download: a file that
        vanished means the listing is stale, so it is taken again (its replacement was stored
        before anything was deleted)."""
        for _ in range(20):
            try:
                self._pull_once()
                return
            except FileNotFoundError:
                continue
        raise StorageError(f"run directory {self.display}: kept changing while being read")

    def _pull_once(self) -> None:
        import pyarrow.fs as pafs

        from metaray.training.run_dir import RUN_ENTRIES

        with self._errors("listing"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
        files = {info.path[len(self.root) + 1:] for info in infos if info.type == pafs.FileType.File}
        if self.mirror.exists():
            shutil.rmtree(self.mirror)
        self.mirror.mkdir(parents=True)
        prefix = self._key("")
        for key in [k for k in self.shared.state if k.startswith(prefix)]:
            del self.shared.state[key]
        self.shared.foreign -= {k for k in self.shared.foreign if k.startswith(prefix)}
        newest = {}  # checkpoints folder -> the newest checkpoint its manifest names (a baseline has its own)
        for rel in sorted(r for r in files if r == MANIFEST or r.endswith(f"/{MANIFEST}")):
            try:
                newest[rel.rsplit("/", 1)[0]] = str(json.loads(self._fetch(rel))["checkpoint"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"run directory {self.display}: {rel} is damaged") from None
        for rel in sorted(files):
            folder, _, name = rel.rpartition("/")
            if (name == "latest.json" and folder in newest) or _SKIPPED.fullmatch(rel):
                continue
            if folder in newest and name.startswith("checkpoint_") and name > newest[folder]:
                continue  # uploaded, but not yet in the manifest: as if never written
            foreign = not RUN_ENTRIES.fullmatch(rel.split("/", 1)[0])
            data = b"" if foreign else self._fetch(rel)  # a foreign object's content is not ours to fetch
            local = self.mirror / rel
            try:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(data)  # for a foreign object, a stand-in the run-directory checks refuse
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                raise ConfigError(f"run directory {self.display} is not a run directory: it holds both "
                                  f"{rel.split('/')[0]!r} and objects below {rel.split('/')[0]}/") from None
            except OSError as err:
                raise StorageError(f"run directory {self.display}: copying {rel} to {self.mirror} failed: "
                                   f"{err.strerror or err}") from None
            if foreign:
                self.shared.foreign.add(self._key(rel))
            else:
                self._note(rel, local.stat())

    def _fetch(self, rel: str) -> bytes:
        """An object's bytes; FileNotFoundError passes (the caller lists again), other errors are one line."""
        import pyarrow as pa

        try:
            return self._read(rel)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as err:
            raise StorageError(f"run directory {self.display}: downloading {rel} failed: {_first_line(err)}") from None

    def _note(self, rel: str, stat: os.stat_result) -> None:
        self.shared.state[self._key(rel)] = _stamp(stat)

    def _read(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self._key(rel)) as f:
            return f.read()

    def _write(self, rel: str, data: bytes) -> None:
        """One atomic object write (a PUT); through a temporary name on filesystems that rename."""
        if self.fs.type_name in ("s3", "gcs"):
            with self.fs.open_output_stream(self._key(rel)) as f:
                f.write(data)
            return
        tmp = self._key(f"{rel}.{uuid.uuid4().hex[:8]}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._key(rel))

    def push(self, everything: bool = False) -> None:
        """Upload what changed in the mirror (oldest write first), the manifest, then the deletions."""
        shared = self.shared
        if shared.failure is None and shared.lease_until is not None and time.time() > shared.lease_until:
            shared.failure = (f"run directory {self.display}: this writer's lock lease ran out (paused, or the "
                              "store unreachable, for longer than the lease); stopped so as not to write over "
                              "another writer")
        if shared.failure is not None:  # no minutes of retries per write, no writing after the lease was lost
            raise StorageError(shared.failure)
        try:
            self._push(everything)
        except StorageError as err:
            shared.failure = str(err)
            raise

    def _push(self, everything: bool) -> None:
        state = self.shared.state
        with self._errors("uploading"):
            present: dict[str, tuple[int, int, int]] = {}
            for path in self.mirror.rglob("*"):
                rel = path.relative_to(self.mirror).as_posix()
                if path.is_file() and not _SKIPPED.fullmatch(rel) and self._key(rel) not in self.shared.foreign:
                    present[rel] = _stamp(path.stat())
            # Oldest write first; at equal times a table's task rows before its metrics row.
            changed = sorted((stamp[1], rel.startswith("metrics"), rel) for rel, stamp in present.items()
                             if state.get(self._key(rel)) != stamp
                             and (everything or not _DEFERRED.fullmatch(rel)))
            checkpoints = sorted(r for r in present if re.fullmatch(r"checkpoints/checkpoint_\d+\.pt", r))
            newest, digest = (checkpoints[-1] if checkpoints else None), None
            for _, _, rel in changed:
                data = (self.mirror / rel).read_bytes()
                self._write(rel, data)
                state[self._key(rel)] = present[rel]
                if rel == newest:  # hashed from the bytes just uploaded, not read again
                    digest = hashlib.sha256(data).hexdigest()
            if any(rel.startswith("checkpoints/") for _, _, rel in changed) and newest is not None:
                digest = digest or hashlib.sha256((self.mirror / newest).read_bytes()).hexdigest()
                self._write(MANIFEST, json.dumps({"checkpoint": newest.split("/")[1], "sha256": digest}).encode())
            prefix = self._key("")
            gone = [k for k in state if k.startswith(prefix) and k[len(prefix):] not in present]
            for key in sorted(gone, key=lambda k: "/checkpoints/" not in k):  # old checkpoints first
                self.fs.delete_file(key)
                del state[key]

    def delete_foreign(self) -> None:
        """Delete every object under the prefix that the mirror does not hold (after --overwrite)."""
        import pyarrow.fs as pafs

        with self._errors("emptying"):
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
            for info in infos:
                rel = info.path[len(self.root) + 1:]
                if info.type == pafs.FileType.File and rel != LOCK_KEY and not (self.mirror / rel).is_file():
                    self.fs.delete_file(info.path)
                    self.shared.state.pop(info.path, None)

    @contextmanager
    def lease(self, command: str) -> Iterator[None]:
        """The run directory's writer lock on a store without file locks: a lease object.

        ``.metaray.lock`` holds the owner (id, PID, host, command) and when the lease ends; the
        holder renews it while it runs, so a holder that died loses it after ``lease_seconds()``.
        A store has no compare-and-swap here: two writers starting within a second of each
        other may both take it (the README says so); the check below catches most such races.
        """
        from metaray.training.run_lock import RunDirBusyError

        lease_s = lease_seconds()
        shared = self.shared
        me = {"id": uuid.uuid4().hex, "pid": os.getpid(), "host": os.uname().nodename, "command": command}
        held = self._lock_record()
        if held is not None and held.get("id") != me["id"] and _expires(held) > time.time():
            raise RunDirBusyError(f"run directory {self.display} is in use by {_owner(held)}; its lease ends in "
                                  f"{_expires(held) - time.time():.0f} s unless renewed (a lock of a "
                                  "process that died is taken over then)")
        stop = threading.Event()

        def write() -> None:
            until = time.time() + lease_s
            record = {**me, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "expires": until}
            with self._errors("writing the lock"):
                self._write(LOCK_KEY, json.dumps(record).encode())
            shared.lease_until = until

        write()
        time.sleep(min(1.0, lease_s / 10))
        if (self._lock_record() or {}).get("id") != me["id"]:
            raise RunDirBusyError(f"run directory {self.display}: another process took its lock at the same "
                                  "moment; try again")

        def renew() -> None:
            while not stop.wait(lease_s / 3):
                try:
                    holder = self._lock_record()
                    if (holder or {}).get("id") != me["id"]:  # taken over while this writer was paused
                        shared.failure = (f"run directory {self.display}: this writer lost its lock to "
                                          f"{_owner(holder or {})}; stopped so as not to write over it")
                        return
                    write()
                except StorageError:
                    pass  # the store is down: the run's next write fails and says so; the lease runs out

        thread = threading.Thread(target=renew, name="metaray-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            shared.lease_until = None
            if shared.failure is None:  # else the store is down or the lock is another's: leave it
                thread.join()
                try:
                    if (self._lock_record() or {}).get("id") == me["id"]:
                        self.fs.delete_file(self._key(LOCK_KEY))
                except (OSError, StorageError):
                    pass  # the lease lapses by itself

    def _lock_record(self) -> dict[str, Any] | None:
        import pyarrow.fs as pafs

        with self._errors("reading the lock"):
            if self.fs.get_file_info(self._key(LOCK_KEY)).type != pafs.FileType.File:
                return None
            raw = self._read(LOCK_KEY)
        try:
            record = json.loads(raw)
            return record if isinstance(record, dict) else {}
        except ValueError:
            return {}


def _stamp(stat: os.stat_result) -> tuple[int, int, int]:
    """What tells a rewritten file apart: every write replaces the file (a new inode)."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


def _expires(record: dict[str, Any] | None) -> float:
    """When a lock record's lease ends; a damaged record's has ended."""
    try:
        value = float((record or {}).get("expires", 0))
    except (TypeError, ValueError):
        return 0.0
    return value if value == value else 0.0


def _owner(record: dict[str, Any]) -> str:
    try:
        return (f"PID {int(record['pid'])} on {str(record['host'])[:64]} ({str(record['command'])[:64]}, "
                f"since {str(record['since'])[:32]})")
    except (KeyError, TypeError, ValueError):
        return "another process (its lock record is unreadable)"


def lease_seconds() -> float:
    """How long a lock lease lasts unless renewed: METARAY_LOCK_LEASE_S, 60 by default."""
    raw = os.environ.get("METARAY_LOCK_LEASE_S", "60")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 2 <= value <= 3600:
        raise ConfigError(f"METARAY_LOCK_LEASE_S={raw[:20]!r}: give seconds between 2 and 3600")
    return value
