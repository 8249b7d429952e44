"""Workers hand the learner one in-order sum per fixed task group (runtime/worker.py): checked
against a plain float32 loop over the same vectors, independently of how the tasks were split."""

from __future__ import annotations

import numpy as np
import pytest

from metaray.core.task_worker import TaskResult
from metaray.runtime.worker import group_results


def _results(n: int, size: int, bad: set[int]) -> list[TaskResult]:
    rng = np.random.default_rng(3)
    out = []
    for i in range(n):
        vector = (rng.standard_normal(size) * 10.0 ** rng.integers(-6, 6, size)).astype(np.float32)
        if i in bad:
            vector[i % size] = np.nan if i % 2 else np.inf
        out.append(TaskResult(task_index=i, vector=vector, outer_loss=float(i), pre_return=-1.0 * i,
                              post_return=-0.5 * i, env_steps=100 + i, timings={"sample_s": 0.1 * i}))
    return out


@pytest.mark.parametrize("group_size", [1, 3, 5])
def test_group_sums_are_in_task_order_and_leave_out_non_finite_vectors(group_size):
    n, bad = 11, {2, 7}
    results = _results(n, 37, bad)
    expected = {}
    for r in results:  # the reference: a sequential float32 sum per group, task by task
        if r.task_index not in bad:
            g = r.task_index // group_size
            expected[g] = expected.get(g, np.zeros(37, np.float32)) + r.vector
    vectors = [r.vector.copy() for r in results]
    # A worker holds whole groups, any contiguous run of them: sum two halves separately.
    cut = (n // group_size // 2) * group_size
    groups = group_results(results[:cut], group_size) + group_results(results[cut:], group_size)
    assert [g.group for g in groups] == list(range(-(-n // group_size)))
    for g in groups:
        want = expected.get(g.group, np.zeros(37, np.float32))
        np.testing.assert_array_equal(g.total, want)  # bit for bit: same operands, same order
        assert [row["task_index"] for row in g.rows] == [i for i in range(n) if i // group_size == g.group]
    rows = [row for g in groups for row in g.rows]
    assert [row["rejected"] for row in rows] == [i in bad for i in range(n)]
    assert rows[4] == {"task_index": 4, "worker": "", "pre_return": -4.0, "post_return": -2.0, "outer_loss": 4.0,
                       "env_steps": 104, "metric_env_steps": 0, "rejected": False,
                       "pre_success": rows[4]["pre_success"],
                       "post_success": rows[4]["post_success"], "sample_s": pytest.approx(0.4)}
    assert np.isnan(rows[4]["pre_success"]) and np.isnan(rows[4]["post_success"])
    for r, v in zip(results, vectors):  # the workers' own vectors are left as they were
        np.testing.assert_array_equal(r.vector, v)
    assert all("vector" not in row for row in rows)
