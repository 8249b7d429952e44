"""``metaray bench``: every figure written (tiny budgets: the figures are meaningless here), and
the README's Performance block rendered from it, nothing else in the README touched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from metaray.bench.markdown import BEGIN, END, performance_markdown, replace_block
from tests.conftest import run_cli
from tests.forked_cli import ForkedCli

PROSE_BEFORE = "# Project\n\n## Performance\n\nHand-written prose that must survive.\n\n"
PROSE_AFTER = "\n\nMore prose after the figures.\n"


def _readme(path: Path, block: str = "stale figures") -> Path:
    path.write_text(f"{PROSE_BEFORE}{BEGIN}\n{block}\n{END}{PROSE_AFTER}", encoding="utf-8")
    return path


def _complete(settings: object = None, huge: bool = False) -> str:
    """A bench.json shaped like a real one but for one hostile field."""
    from metaray.bench.markdown import performance_markdown

    figures = {"limit_steps_per_s": "HUGE" if huge else 1.0, "rollout_steps_per_s": 1.0,
               "rollout_vs_limit": 1.0, "parallel_episodes": 20}
    bench = {"machine": {"processor": "x", "cpus": 2, "memory_gib": 1, "torch": "t", "ray": "r", "platform": "p"},
             "settings": {} if settings is None else settings, "rollout": {"navigation2d": figures}}
    if settings is None and not huge:  # the shape is right so far: it fails further on, as "missing"
        with pytest.raises(ValueError, match="missing"):
            performance_markdown(bench)
    return json.dumps(bench).replace('"HUGE"', "1" + "0" * 400)  # an integer no float can hold


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The CLI for the commands that measure nothing: see tests/forked_cli.py."""
    with ForkedCli(tmp_path_factory.mktemp("cli")) as forked:
        yield forked


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory) -> tuple[dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    out, readme = tmp / "bench.json", _readme(tmp / "README.md")
    proc = run_cli("bench", "--quick", "--iterations", "3", "--warmup", "1", "--output", str(out),
                   "--readme", str(readme))
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), out, readme


def test_bench_writes_every_figure(quick_bench):
    result, _, _ = quick_bench
    for family in ("navigation2d", "cartpole"):
        r = result["rollout"][family]
        assert r["limit_steps_per_s"] > 0 and r["rollout_vs_limit"] == pytest.approx(
            r["rollout_steps_per_s"] / r["limit_steps_per_s"])
    for family, env in (("halfcheetah", "HalfCheetah-v5"), ("ant", "Ant-v5")):
        r = result["rollout"][family]
        assert r["env"] == env and r["mj_step_limit_steps_per_s"] > 0
        assert r["rollout_vs_limit"] == pytest.approx(r["rollout_steps_per_s"] / r["mj_step_limit_steps_per_s"])
        assert r["worker_share_steps_per_s"] > 0 and r["worker_share_vs_limit"] == pytest.approx(
            r["worker_share_steps_per_s"] / r["mj_step_limit_steps_per_s"])
        assert r["worker_share_tasks"] == 4  # --quick: meta-batch 4 is one group of 5: one worker samples it all
        for key in ("rollout_vs_limit_turns", "worker_share_vs_limit_turns"):
            assert len(r[key]) == 3 and all(x > 0 for x in r[key])  # measured interleaved, three turns each
    trials = result["rollout"]["navigation2d_rl2"]
    assert trials["trial_steps_per_s"] > 0 and trials["vs_mlp_rollout"] == pytest.approx(
        trials["trial_steps_per_s"] / result["rollout"]["navigation2d"]["rollout_steps_per_s"])
    p = result["trpo_products"]
    assert p["cg_round_s"] > 0 and 0 < p["cg_round_floor_s"] and p["matmul_gflops"] > 0
    assert p["cg_round_vs_floor"] == pytest.approx(p["cg_round_s"] / p["cg_round_floor_s"])
    c = p["curvature_subsample"]
    assert c["every"] == 2 and c["cg_round_vs_exact"] == pytest.approx(c["cg_round_s"] / p["cg_round_s"])
    for setting in ("navigation2d_maml_trpo", "cartpole_reptile", "navigation2d_rl2", "halfcheetah_vel_trpo",
                    "navigation2d_maml_trpo_curvature_subsample", "halfcheetah_vel_trpo_curvature_subsample"):
        s = result[setting]
        assert s["iteration_s"] > 0 and s["train_steps_per_s"] > 0 and s["iterations_measured"] == 2
        assert set(s["phase_s"]) == {"sampling", "adaptation_and_meta_gradient", "outer_step", "ray_overhead"}
    assert set(result["workers_scaling"]) >= {"1", "2", "speedup"}
    assert result["vs_reference"]["halfcheetah_vel_speedup"] == pytest.approx(
        result["reference"]["halfcheetah_vel_iteration_s"] / result["halfcheetah_vel_trpo"]["iteration_s"])
    m = result["machine"]
    assert m["cpus"] >= 1 and m["processor"] and m["memory_gib"] > 0 and result["settings"]["quick"] is True


def test_interleaved_takes_turns_and_totals_each_meter():
    """Meters run in rotation, each for its share of the time, and a rate is total steps over total
    time, not a mean of the turns' rates (a turn that ran long counts for more)."""
    from metaray.bench.speed import interleaved

    calls: list[tuple[str, float]] = []

    def meter(name: str, turns: list[tuple[int, float]]):
        left = iter(turns)

        def run(seconds: float) -> tuple[int, float]:
            calls.append((name, seconds))
            return next(left)
        return run

    out = interleaved({"a": meter("a", [(10, 1.0), (30, 1.0), (60, 2.0)]),
                       "b": meter("b", [(5, 1.0), (5, 1.0), (5, 1.0)])}, seconds=1.5, rounds=3)
    assert calls == [("a", 0.5), ("b", 0.5)] * 3
    assert out["a"]["steps_per_s"] == pytest.approx(100 / 4.0) and out["b"]["steps_per_s"] == pytest.approx(5.0)
    assert out["a"]["turns_steps_per_s"] == pytest.approx([10.0, 30.0, 30.0])


def test_bench_renders_the_readme_block_and_nothing_else(quick_bench, tmp_path, cli):
    result, out, readme = quick_bench
    text = readme.read_text(encoding="utf-8")
    assert text.startswith(PROSE_BEFORE + BEGIN) and text.endswith(END + PROSE_AFTER)
    assert "stale figures" not in text
    block = performance_markdown(result)
    assert block in text
    nav = result["rollout"]["navigation2d"]
    assert f"{nav['rollout_steps_per_s']:,.0f}" in block and "Quick run" in block
    # Rendering again from the JSON alone gives the same README (measuring nothing).
    again = _readme(tmp_path / "README.md")
    (proc,) = cli(("bench", "--from", str(out), "--readme", str(again)))
    assert proc.returncode == 0, proc.stderr
    assert again.read_text(encoding="utf-8") == text
    hc = result["rollout"]["halfcheetah"]
    assert f"{hc['rollout_vs_limit']:.2f} ({min(hc['rollout_vs_limit_turns']):.2f}–" in block
    assert "measured in turns, 3 each" in block
    # A bench.json from before the samplers were measured in turns still renders, without the ranges.
    old = copy.deepcopy(result)
    for figures in old["rollout"].values():
        for key in [k for k in figures if k.endswith("_turns")]:
            del figures[key]
    old_block = performance_markdown(old)
    assert f"| {hc['rollout_vs_limit']:.2f} | ≥ 0.7 |" in old_block and "measured in turns" not in old_block


def test_bench_refusals_are_one_line_and_touch_nothing(tmp_path, cli):
    """A bad bench.json (not JSON, not an object, incomplete), a README without markers (refused
    before minutes of measuring), --from without --readme: exit 2, one line, nothing written."""
    readmes, jsons = [], []
    deep = "[" * 100_000 + "]" * 100_000
    for i, content in enumerate(("{not json", "[1, 2]", '{"machine": {}}', _complete(settings=[]), deep,
                                 _complete(huge=True))):
        (tmp_path / f"{i}.json").write_text(content)
        jsons.append(tmp_path / f"{i}.json")
        readmes.append(_readme(tmp_path / f"README{i}.md"))
    before = [r.read_bytes() for r in readmes]
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers here\n")
    out = tmp_path / "bench.json"
    same = _readme(tmp_path / "same.md")
    procs = cli(*[("bench", "--from", str(j), "--readme", str(r)) for j, r in zip(jsons, readmes)],
                ("bench", "--output", str(out), "--readme", str(bare)), ("bench", "--from", str(jsons[0])),
                ("bench", "--output", str(same), "--readme", str(same)))
    whys = ("Expecting", "missing", "missing", "malformed", "nested too deeply", "malformed", "bench markers",
            "give --readme", "the same file")
    assert len(procs) == len(whys)
    for proc, why in zip(procs, whys):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and why in proc.stderr, proc.stderr
    assert [r.read_bytes() for r in readmes] == before and bare.read_text() == "# no markers here\n"
    assert same.read_text(encoding="utf-8").startswith(PROSE_BEFORE)
    assert not out.exists()


def test_replace_block_needs_exactly_one_pair_of_markers():
    text = f"a\n{BEGIN}\nold\n{END}\nb"
    assert replace_block(text, "new") == f"a\n{BEGIN}\nnew\n{END}\nb"
    for broken in ("a", f"{END}\n{BEGIN}", f"{BEGIN}{BEGIN}{END}", f"{BEGIN}\n{END}\n{END}"):
        with pytest.raises(ValueError, match="bench markers"):
            replace_block(broken, "new")
