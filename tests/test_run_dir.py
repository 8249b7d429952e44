"""The run directory's tables: appended per iteration, crash-safe, truncated on resume, compacted (no Ray)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from metaray.training import run_dir as rd
from metaray.training.run_dir import RunDir, read_rows, write_rows
from tests.conftest import ROOT

TASKS = 4


def metrics_row(it: int) -> dict:
    row = {"iteration": it, "pre_return": -it / 3, "post_return": it / 7, "env_steps": 100 + it,
           "trpo_kl": None if it % 3 else it * 1e-3, "task_indices": "0,1,2,3"}
    return row | {f"m{k}": float(it * k) for k in range(24)}


def task_rows(it: int) -> list[dict]:
    return [{"iteration": it, "task_index": i, "task": f'{{"goal": [{i}, {it}]}}', "task_goal": [float(i), it / 2],
             "worker": f"w{i % 2}", "node": "127.0.0.1", "pre_return": it - i / 2, "rejected": i == 1}
            for i in range(TASKS)]


def write(run: RunDir, iterations: range) -> None:
    for it in iterations:
        run.append_iteration(it, metrics_row(it), task_rows(it))


def expect(run: RunDir, n: int) -> None:
    """The tables hold exactly iterations 0..n-1, in order, with what was written."""
    metrics = run.read_metrics()
    assert [r["iteration"] for r in metrics] == list(range(n))
    assert metrics == [metrics_row(it) for it in range(n)]
    assert read_rows(run.tasks_path) == [r for it in range(n) for r in task_rows(it)]


def part_names(path: Path) -> list[str]:
    return sorted(p.name for p in rd.parts_dir(path).glob("*.parquet"))


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    return run


def test_rows_survive_a_crash_between_iterations(run):
    write(run, range(40))  # never compacted, as when the driver dies
    expect(RunDir(run.path), 40)
    # two merges of 16 single-iteration parts happened; the rest are single parts
    assert part_names(run.metrics_path)[:3] == ["000000-000015.parquet", "000016-000031.parquet",
                                                "000032-000032.parquet"]
    assert not run.metrics_path.exists()


def test_a_merge_or_compaction_killed_midway_leaves_no_duplicates(run):
    write(run, range(16))
    merged = part_names(run.tasks_path)
    assert merged == ["000000-000015.parquet"]
    # A merge killed after writing its output but before deleting its inputs; a killed temporary file.
    for it in (3, 15):
        for path, rows in ((run.metrics_path, [metrics_row(it)]), (run.tasks_path, task_rows(it))):
            pq.write_table(rd._table(rows), rd.parts_dir(path) / f"{it:06d}-{it:06d}.parquet")
    (rd.parts_dir(run.metrics_path) / ".000016-000016.parquet.x.tmp").write_bytes(b"half a file")
    expect(run, 16)
    write(run, range(16, 20))
    expect(run, 20)
    # A compaction killed after writing the base but before removing the parts.
    before = {p.name: p.read_bytes() for p in rd.parts_dir(run.metrics_path).iterdir()}
    task_parts = {p.name: p.read_bytes() for p in rd.parts_dir(run.tasks_path).iterdir()}
    run.compact_tables()
    for path, files in ((run.metrics_path, before), (run.tasks_path, task_parts)):
        rd.parts_dir(path).mkdir()
        for name, data in files.items():
            (rd.parts_dir(path) / name).write_bytes(data)
    expect(run, 20)
    # A resumed run truncates first; appending straight on is fine too, even when the leftover
    # parts 16..19 are merged with new ones into part 16-31.
    write(run, range(20, 40))
    assert "000016-000031.parquet" in part_names(run.metrics_path)
    expect(run, 40)
    run.truncate_tables(18)
    expect(run, 18)
    write(run, range(18, 25))
    run.compact_tables()
    expect(run, 25)


def test_resume_truncation_drops_rows_past_the_checkpoint_in_parts(run):
    write(run, range(40))  # parts 0-15, 16-31, then single ones: truncation at 20 cuts a merged part
    run.truncate_tables(20)
    expect(run, 20)
    assert part_names(run.metrics_path) == ["000000-000015.parquet", "000016-000019.parquet"]
    run.truncate_tables(20)  # idempotent
    write(run, range(20, 45))
    expect(run, 45)
    run.truncate_tables(33)
    expect(run, 33)
    run.truncate_tables(0)  # a fresh start empties the tables
    assert run.read_metrics() == [] and read_rows(run.tasks_path) == []


def test_old_single_file_layout_loads_resumes_and_compacts(run):
    # A run directory from before part files: whole tables, killed after iteration 9 (checkpoint 8).
    write_rows(run.metrics_path, [metrics_row(it) for it in range(10)])
    write_rows(run.tasks_path, [r for it in range(9) for r in task_rows(it)])  # tasks lag by one: also fine
    assert run.read_metrics() == [metrics_row(it) for it in range(10)]
    assert not rd.parts_dir(run.metrics_path).exists()
    run.truncate_tables(8)  # resume at checkpoint 8: the base files lose iterations 8 and 9
    expect(run, 8)
    assert pq.read_table(run.metrics_path).num_rows == 8
    write(run, range(8, 30))
    expect(run, 30)
    run.truncate_tables(5)  # a later resume from an earlier checkpoint cuts the base and drops all parts
    expect(run, 5)
    assert part_names(run.metrics_path) == [] and pq.read_table(run.metrics_path).num_rows == 5
    write(run, range(5, 12))
    run.compact_tables()
    expect(run, 12)
    assert pq.read_table(run.metrics_path).to_pylist() == [metrics_row(it) for it in range(12)]


def test_compaction_keeps_content_identical(run):
    write_rows(run.metrics_path, [metrics_row(it) for it in range(3)])
    write_rows(run.tasks_path, [r for it in range(3) for r in task_rows(it)])
    write(run, range(3, 50))
    # A column that appears late and one missing from some rows read as null where absent.
    run.append_iteration(50, metrics_row(50) | {"late": 1.5}, [r | {"extra": "x"} for r in task_rows(50)][:2])
    metrics, tasks = run.read_metrics(), read_rows(run.tasks_path)
    assert metrics[0]["late"] is None and metrics[50]["late"] == 1.5 and tasks[-1]["extra"] == "x"
    assert list(metrics[0]) == [*metrics_row(0), "late"]  # column order: first appearance
    run.compact_tables()
    assert not rd.parts_dir(run.metrics_path).exists() and not rd.parts_dir(run.tasks_path).exists()
    assert run.read_metrics() == metrics and read_rows(run.tasks_path) == tasks
    assert pq.read_table(run.metrics_path).to_pylist() == metrics  # one plain Parquet file again
    assert pq.read_table(run.tasks_path).to_pylist() == tasks
    run.compact_tables()  # nothing to do
    assert run.read_metrics() == metrics


def test_write_cost_does_not_grow_with_the_iteration_count(run, monkeypatch):
    """Bytes and files written per iteration: the same at iteration 10 as at iteration 500."""
    written: list[tuple[str, int]] = []
    real = rd.atomic_write

    def counting(path, write):
        real(path, write)
        written.append((path.name, path.stat().st_size))

    monkeypatch.setattr(rd, "atomic_write", counting)
    per_iteration = []
    for it in range(512):
        written.clear()
        run.append_iteration(it, metrics_row(it), task_rows(it))
        per_iteration.append((len(written), sum(size for _, size in written)))
    # An iteration writes its two part files; every 16th also merges (amortized below).
    singles = [b for files, b in per_iteration if files == 2]
    assert len(singles) == 512 - 512 // 16
    early, late = singles[5:15], singles[-10:]
    assert max(late) < 1.1 * max(early) and min(late) > 0.9 * min(early)
    # Amortized, merges included: the same bytes for iterations 256..511 as for 0..255.
    first, second = (sum(b for _, b in per_iteration[i: i + 256]) for i in (0, 256))
    assert 0.9 < second / first < 1.1
    assert max(files for files, _ in per_iteration) <= 2 * 3  # a part and at most two merges, per table
    assert len(part_names(run.metrics_path)) <= 3 * (rd.FANOUT - 1)  # readers open few files


def test_a_reader_sees_a_contiguous_prefix_while_the_writer_merges(run):
    done = threading.Event()
    seen: list[int] = []

    def writer():
        write(run, range(300))
        run.compact_tables()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        metrics = run.read_metrics()
        assert [r["iteration"] for r in metrics] == list(range(len(metrics)))
        seen.append(len(metrics))
    thread.join()
    expect(run, 300)
    assert len(seen) > 1


WRITER = """
import sys
from tests.test_run_dir import write
from metaray.training.run_dir import RunDir
write(RunDir(sys.argv[1]), range(10**6))
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_sigkill_at_any_moment_keeps_every_completed_iteration(tmp_path, delay):
    out = tmp_path / "run"
    out.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], cwd=ROOT)
    run = RunDir(out)
    deadline = time.monotonic() + 60
    while not (rd.parts_dir(run.metrics_path).exists() and len(run.read_metrics()) >= 2):
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.02)
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    metrics, tasks = run.read_metrics(), read_rows(run.tasks_path)
    n = len(metrics)
    assert n >= 2 and metrics == [metrics_row(it) for it in range(n)]
    # tasks are written first: they hold every metrics iteration's rows, and at most one iteration more
    kept = len(tasks) // TASKS
    assert tasks == [r for it in range(kept) for r in task_rows(it)] and kept - n in (0, 1)
    run.truncate_tables(n - 1)  # a resume from an earlier checkpoint, then the run goes on
    write(run, range(n - 1, n + 20))
    run.compact_tables()
    expect(run, n + 20)
