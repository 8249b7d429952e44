"""Hostile or careless config input: one line and exit 2, fast, in bounded memory, nothing written.

Covers what a config can ask of the machine before anything runs: YAML that expands (a
"billion laughs"), nests or encodes its way past the reader; integers too long to print; sizes
without bounds; a run that cannot fit in the memory there is. And a user's ``module:Class``
found from the working directory by the installed ``metaray`` command, on Ray's workers too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from metaray.config import ConfigError, load_config, preset_names
from metaray.limits import (
    MAX_YAML_DEPTH,
    MAX_YAML_NODES,
    GiB,
    check_cluster,
    check_embedded,
    estimate_memory,
    load_yaml,
    short_repr,
)
from tests.conftest import ROOT, run_cli

QUICK = ["--set", "outer.iterations=1", "--set", "outer.meta_batch_size=2", "--set", "inner.episodes=2",
         "--set", "rollout.horizon=5", "--set", "eval.tasks=1"]

# Within every field's bounds, but needing hundreds of terabytes: the memory estimate's case.
HUGE = ["-s", "inner.episodes=10000", "-s", "rollout.horizon=10000", "-s", "outer.meta_batch_size=10000",
        "-s", "resources.num_workers=1"]


def _billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nseed: *a{levels - 1}\n"


# -- a CLI run in bounded time and memory ----------------------------------------------------------

_BOUNDED = ("import atexit, resource, runpy, sys\n"
            "limit, report = int(sys.argv.pop(1)), sys.argv.pop(1)\n"
            "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
            "def peak():\n"
            "    with open('/proc/self/status') as status, open(report, 'w') as out:\n"
            "        out.write(next(line for line in status if line.startswith('VmHWM:')).split()[1])\n"
            "atexit.register(peak)\n"
            "sys.argv[0] = 'metaray'\n"
            "runpy.run_module('metaray.cli', run_name='__main__', alter_sys=True)\n")


@dataclass
class Bounded:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    max_rss: int  # bytes: the CLI process's peak resident set (VmHWM), -1 if it could not say


def run_bounded(*args: str, cwd: Path, timeout: float = 60, address_space: int = 4 * GiB) -> Bounded:
    """The CLI (``python -m metaray.cli`` semantics) under RLIMIT_AS and a wall-clock timeout.

    Its peak RSS is the VmHWM of its own address space, which it reports as it exits: the
    rusage of a child also counts the high-water mark of the parent it was forked from."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "vmhwm"
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-c", _BOUNDED, str(address_space), str(report), *args],
                                  cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"the CLI ran past {timeout}s: {args[:4]}") from err
        wall = time.monotonic() - start
        peak = int(report.read_text()) * 1024 if report.is_file() else -1
    return Bounded(proc.returncode, proc.stdout, proc.stderr, wall, peak)


def _one_line_usage_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr


def _refused_fast(proc: Bounded) -> str:
    err = _one_line_usage_error(proc)
    assert proc.wall_s < 45, f"took {proc.wall_s:.1f}s"
    assert 0 < proc.max_rss < 1 * GiB, f"peak RSS {proc.max_rss / 2**20:.0f} MiB"
    assert len(err) < 1000, err
    return err


# -- config files ---------------------------------------------------------------------------------

def _write(path: Path, kind: str) -> None:
    if kind == "billion_laughs":
        path.write_text(_billion_laughs())
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "binary_no_nul":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)) * 16)
    elif kind == "utf16":
        path.write_text("algorithm: maml\nseed: 3\n", encoding="utf-16")
    elif kind == "nested_flow":
        path.write_text("seed: " + "[" * 5000 + "]" * 5000 + "\n")
    elif kind == "nested_block":
        path.write_text("task:\n  options:\n    x:\n      " + "- " * 5000 + "1\n")
    elif kind == "int_5000":
        path.write_text("seed: " + "7" * 5000 + "\n")
    elif kind == "hex_5000":
        path.write_text("seed: 0x" + "f" * 5000 + "\n")
    elif kind == "int_options":
        path.write_text("task:\n  options:\n    goal: " + "7" * 5000 + "\n")
    elif kind == "recursive":
        path.write_text("task: {family: navigation2d, options: &o {x: *o}}\n")
    elif kind == "oversize":
        path.write_text("# padding\n" * 120_000)
    elif kind == "bad_date":
        path.write_text("seed: 2001-13-45\n")


@pytest.mark.parametrize("kind,expected", [
    ("billion_laughs", f"YAML expands to more than {MAX_YAML_NODES:,} values"),
    ("binary", "holds NUL bytes: a binary file"),
    ("binary_no_nul", "is not UTF-8 text (byte 0x89 at offset 0)"),
    ("utf16", "is UTF-16 (or UTF-32) text; save it as UTF-8"),
    ("nested_flow", f"YAML nests deeper than {MAX_YAML_DEPTH} levels"),
    ("nested_block", f"YAML nests deeper than {MAX_YAML_DEPTH} levels"),
    ("int_5000", "an integer of 5,000 digits at line 1, column 7; at most 100 are allowed"),
    ("hex_5000", "an integer of 5,002 digits"),
    ("int_options", "an integer of 5,000 digits at line 3"),
    ("recursive", "refers to a collection that contains it"),
    ("oversize", "is larger than 1 MiB"),
    ("bad_date", "is not valid YAML: month must be in 1..12"),
])
def test_hostile_config_file_is_refused_in_one_line(tmp_path: Path, kind, expected):
    """Run from an empty working directory with no --output: nothing at all may appear in it
    (runs/NAME-TIME is where a run directory would go)."""
    config = tmp_path / "input" / "user.yaml"
    config.parent.mkdir()
    _write(config, kind)
    work = tmp_path / "work"
    work.mkdir()
    proc = run_bounded("train", str(config), cwd=work)
    err = _refused_fast(proc)
    assert expected in err
    assert str(config) in err
    assert list(work.iterdir()) == []


def test_billion_laughs_is_refused_in_milliseconds(tmp_path: Path):
    start = time.perf_counter()
    with pytest.raises(ValueError, match="billion laughs"):
        load_yaml(_billion_laughs())  # 9**9 = 387,420,489 values
    assert time.perf_counter() - start < 1.0
    # Through the config reader (6 levels: should the bound ever go, this stays small enough to fail safely).
    (tmp_path / "lol.yaml").write_text(_billion_laughs(6))
    with pytest.raises(ConfigError, match="billion laughs"):
        load_config(tmp_path / "lol.yaml")
    # Aliases that stay under the bound still work (YAML anchors are a feature).
    data = load_yaml("a: &x [1, 2]\nb: *x\nc: {<<: {k: 1}, j: 2}\n")
    assert data == {"a": [1, 2], "b": [1, 2], "c": {"k": 1, "j": 2}}
    with pytest.raises(ValueError, match="expands to more than"):
        load_yaml(_billion_laughs(6))  # 9**6 = 531,441 values


@pytest.mark.parametrize("assignment,expected", [
    ("seed=" + "7" * 5000, "an integer of 5,000 digits"),
    ("task.options.goal=" + "7" * 5000, "an integer of 5,000 digits"),
    ("seed=" + "[" * 5000 + "]" * 5000, f"YAML nests deeper than {MAX_YAML_DEPTH} levels"),
    ("task.options={a: &a [1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], "
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], f: [*e,*e,*e,*e,*e,*e,*e,*e,*e]}",
     "YAML expands to more than"),
    ("seed=" + "x" * 100_000, "seed: Input should be a valid integer"),
    ("x" * 100_000 + "=1", "unknown key 'xxxxxxxx"),
])
def test_hostile_set_value_is_refused_in_one_line(tmp_path: Path, assignment, expected):
    proc = run_bounded("train", "quickstart", "--set", assignment, "--output", str(tmp_path / "run"), cwd=tmp_path)
    err = _refused_fast(proc)
    assert expected in err and "--set" in err
    assert not (tmp_path / "run").exists()


def test_echoed_values_are_short():
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", ["task.options=" + "[" + ", ".join(["'lol'"] * 5000) + "]"])
    assert len(str(err.value)) < 400 and "\n" not in str(err.value)
    assert short_repr(10 ** 5000) == "<an integer of about 5001 digits>"
    assert len(short_repr("x" * 10**6)) == 100


def test_output_file_and_overwrite_symlink_are_refused(tmp_path: Path):
    """Already handled before this change; checked here under the same bounds."""
    (tmp_path / "file").write_text("x")
    err = _refused_fast(run_bounded("train", "quickstart", *QUICK, "--output", str(tmp_path / "file"), cwd=tmp_path))
    assert "is a file, not a directory" in err and (tmp_path / "file").read_text() == "x"
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    err = _refused_fast(run_bounded("train", "quickstart", *QUICK, "--output", str(tmp_path / "link"), "--overwrite",
                                    cwd=tmp_path))
    assert "is a symbolic link" in err and list((tmp_path / "target").iterdir()) == []


# -- sizes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("policy.hidden_sizes=[30000,30000]", "at most 8 hidden layers of at most 4096 units each"),
    ("policy.hidden_sizes=[8,8,8,8,8,8,8,8,8]", "at most 8 hidden layers"),
    ("outer.meta_batch_size=1000000", "outer.meta_batch_size: Input should be less than or equal to 10000"),
    ("rollout.horizon=1000000000", "rollout.horizon: Input should be less than or equal to 10000"),
    ("inner.episodes=100000", "inner.episodes: Input should be less than or equal to 10000"),
    ("resources.num_workers=5000", "resources.num_workers: Input should be less than or equal to 1024"),
    ("eval.tasks=100000", "eval.tasks: Input should be less than or equal to 10000"),
    ("outer.iterations=10000000", "outer.iterations: Input should be less than or equal to 1000000"),
    ("seed=18446744073709551616", "seed: Input should be less than or equal to 9223372036854775807"),
    ("outer.trpo.cg_iters=100000", "outer.trpo.cg_iters: Input should be less than or equal to 1000"),
    ("outer.trpo.curvature_subsample=0", "outer.trpo.curvature_subsample: Input should be greater than or equal to 1"),
])
def test_sizes_have_upper_bounds(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override", ["policy.hidden_sizes=[30000,30000]", "outer.meta_batch_size=1000000",
                                      "rollout.horizon=1000000000"])
def test_cli_refuses_unbounded_sizes_before_writing(tmp_path: Path, override):
    proc = run_bounded("train", "quickstart", "-s", override, "--output", str(tmp_path / "run"), cwd=tmp_path)
    _refused_fast(proc)
    assert not (tmp_path / "run").exists()


def test_presets_fit_a_24_gib_two_core_machine():
    for name in preset_names():
        cfg = load_config(name)
        if name.startswith("ml10-"):  # sized for a cluster (README): each worker fits a 4 GiB node
            estimate = estimate_memory(cfg, embedded=False)
            assert estimate["worker"] < 3 * GiB and estimate["learner"] < 2 * GiB, (name, estimate)
            continue
        estimate = estimate_memory(cfg)
        assert estimate["total"] < 6 * GiB, (name, estimate)
        check_embedded(cfg, estimate, cpus=2, available=20 * GiB)  # 24 GiB less what the system holds


def test_memory_estimate_names_what_drives_it():
    big = load_config("quickstart", ["inner.episodes=2000", "rollout.horizon=1000"])
    estimate = estimate_memory(big)
    assert estimate["total"] > 20 * GiB and estimate["tasks_per_worker"] == 10
    with pytest.raises(ConfigError) as err:
        check_embedded(big, estimate, cpus=2, available=20 * GiB)
    assert "inner.episodes x rollout.horizon" in str(err.value) and "20.0 GiB available" in str(err.value)
    # Workers: processes of their own, which on enough CPUs are limited by memory alone.
    many = load_config("quickstart", ["resources.num_workers=64"])
    with pytest.raises(ConfigError, match=r"resources\.num_workers x resources\.cpus_per_worker = 64 CPUs"):
        check_embedded(many, estimate_memory(many), cpus=2, available=100 * GiB)
    with pytest.raises(ConfigError, match=r"from resources.num_workers \(one process each\)"):
        check_embedded(many, estimate_memory(many), cpus=16, available=8 * GiB)
    check_embedded(many, estimate_memory(many), cpus=16, available=32 * GiB)
    # A cluster: its total and its largest node.
    remote = estimate_memory(big, embedded=False)
    assert remote["ray"] == 0
    with pytest.raises(ConfigError, match=r"the cluster has 16\.0 GiB"):
        check_cluster(big, remote, total=16 * GiB, largest_node=8 * GiB)
    with pytest.raises(ConfigError, match=r"largest node has 2\.0 GiB"):
        check_cluster(big, remote, total=10_000 * GiB, largest_node=2 * GiB)
    check_cluster(big, remote, total=10_000 * GiB, largest_node=1000 * GiB)


def test_cli_refuses_a_config_beyond_this_machines_memory(tmp_path: Path):
    proc = run_bounded("train", "quickstart", *HUGE, "--output", str(tmp_path / "run"), cwd=tmp_path)
    err = _refused_fast(proc)
    assert "this config needs about" in err and "inner.episodes x rollout.horizon" in err and "available" in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_more_workers_than_the_embedded_ray_should_fake(tmp_path: Path):
    workers = max(8, 4 * (os.cpu_count() or 1)) + 1
    if workers > 1024:
        pytest.skip("a machine with more than 255 CPUs")
    proc = run_bounded("train", "quickstart", "-s", f"resources.num_workers={workers}", "--output",
                       str(tmp_path / "run"), cwd=tmp_path)
    err = _refused_fast(proc)
    assert f"= {workers} CPUs, more than the embedded Ray gives" in err and "--address" in err
    assert not (tmp_path / "run").exists()


def test_cluster_memory_is_checked_before_the_run_directory_is_written(ray_address, tmp_path: Path):
    proc = run_cli("train", "quickstart", *HUGE, "--output", str(tmp_path / "run"), "--address", ray_address,
                   timeout=120)
    err = _one_line_usage_error(proc)
    assert "of cluster memory" in err and "Ray's memory resource" in err
    assert not (tmp_path / "run").exists()


# -- a user's family, from the working directory --------------------------------------------------

def test_installed_command_imports_a_family_from_the_working_directory(tmp_path: Path):
    """`metaray train` (the console script, not python -m) on the embedded Ray: the driver and
    both workers import my_family from the working directory."""
    script = Path(sys.executable).parent / "metaray"
    if not script.is_file():
        pytest.skip("the metaray console script is not installed in this environment")
    shutil.copy(ROOT / "tests" / "custom_family.py", tmp_path / "my_family.py")
    (tmp_path / "user.yaml").write_text(textwrap.dedent("""\
        algorithm: maml
        task: {family: "my_family:GoalLine", options: {max_speed: 0.2}}
        policy: {hidden_sizes: [8]}
        inner: {steps: 1, lr: 0.1, episodes: 2}
        outer: {optimizer: adam, lr: 0.01, meta_batch_size: 2, iterations: 3}
        rollout: {horizon: 5, task_group_size: 1}
        resources: {num_workers: 2}
        eval: {tasks: 2, steps: 1}
        """))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    proc = subprocess.run([str(script), "train", "user.yaml", "--output", "run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "iter    3/3" in proc.stdout and "pre-adaptation return" in proc.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["task"]["family"] == "my_family:GoalLine"
    import pyarrow.parquet as pq

    workers = set(pq.read_table(tmp_path / "run" / "tasks.parquet").column("worker").to_pylist())
    assert workers == {"worker-0", "worker-1"}, workers  # both workers imported my_family
