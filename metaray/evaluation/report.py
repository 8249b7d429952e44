"""Pictures and tables from run directories: what a user looks at to judge a run.

Everything is read back from the run's Parquet files, so a report can be made at any
time, for a finished run, a running one or one that was killed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metaray.config import ConfigError
from metaray.training.run_dir import RunDir, read_rows

FIGSIZE, DPI = (7.0, 4.5), 100  # 700 x 450 pixels
POLICY_STYLE = {"metaray": ("metaray (meta-learned)", "tab:blue"), "pretrained": ("pretrained", "tab:orange"),
                "random": ("random init", "tab:gray")}


def _figure(ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=FIGSIZE, dpi=DPI)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def learning_curve(run: RunDir, path: Path) -> Path:
    """Mean pre- and post-adaptation return of the training tasks against iteration."""
    rows = run.read_metrics()
    if not rows:
        raise ConfigError(run.shown(f"{run.metrics_path} has no rows yet: nothing to plot"))
    its = [r["iteration"] + 1 for r in rows]
    fig, ax = _figure()
    ax.plot(its, [r["pre_return"] for r in rows], label="before adaptation", color="tab:gray")
    post = [r["post_return"] for r in rows]
    if any(v is not None and np.isfinite(v) for v in post):  # Reptile measures it only on request
        ax.plot(its, post, label="after adaptation", color="tab:blue")
    cfg = run.load_config()
    ax.set(xlabel="meta-iteration", ylabel="mean return (training tasks)",
           title=f"{cfg.algorithm} on {cfg.task.family}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and bool(np.isfinite(value))


def eval_curves(evals: list[dict[str, Any]], column: str = "return") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """policy -> (mean, standard error) of the held-out return (or another column of eval.parquet,
    ``success``) per adaptation step; a policy with no value in that column has no curve."""
    rows = [r for r in evals if r["adaptation_steps"] is not None]
    if column != "return":  # success: rows of old runs and of families without it have none
        rows = [r for r in rows if _finite(r.get(column))]
    curves = {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        steps = max(r["adaptation_steps"] for r in mine) + 1
        tasks = max(r["task_index"] for r in mine) + 1
        table = np.full((tasks, steps), np.nan)
        for r in mine:
            table[r["task_index"], r["adaptation_steps"]] = r[column]
        se = table.std(0, ddof=1) / np.sqrt(tasks) if tasks > 1 else np.zeros(steps)
        curves[policy] = (table.mean(0), se)
    return curves


def adaptation_curve(run: RunDir, path: Path) -> Path:
    """Held-out return after 0..K adaptation steps, meta-learned policy and baselines."""
    curves = eval_curves(read_rows(run.eval_path))
    if not curves:
        raise ConfigError(run.shown(f"{run.eval_path} does not exist: run `metaray eval {run.path}` first"))
    fig, ax = _figure()
    for policy, (mean, se) in curves.items():
        label, color = POLICY_STYLE.get(policy, (policy, None))
        steps = np.arange(len(mean))
        ax.errorbar(steps, mean, yerr=se, label=label, color=color, marker="o", capsize=3)
    cfg = run.load_config()
    ax.set(xlabel="adaptation steps (policy-gradient)", ylabel="mean return (held-out tasks)",
           title=f"{cfg.algorithm} on {cfg.task.family}: adaptation on held-out tasks")
    ax.set_xticks(range(max(len(m) for m, _ in curves.values())))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _success_rows(rows: list[dict[str, Any]]) -> bool:
    return any(_finite(r.get("pre_success_rate")) or _finite(r.get("post_success_rate")) for r in rows)


def success_curve(run: RunDir, path: Path) -> Path | None:
    """Success rate (info["success"] at any step of an episode) of the training tasks before and
    after adaptation per iteration and, once evaluated, of the held-out tasks per adaptation
    step; None when the run's family reports no success."""
    rows = run.read_metrics()
    curves = eval_curves(read_rows(run.eval_path), "success") if run.eval_path.is_file() else {}
    if not _success_rows(rows) and not curves:
        return None
    cfg = run.load_config()
    fig, axes = _figure(2 if curves else 1)
    train_ax = axes[0] if curves else axes
    its = [r["iteration"] + 1 for r in rows]
    rate = lambda key: [r[key] if _finite(r.get(key)) else np.nan for r in rows]  # noqa: E731
    train_ax.plot(its, rate("pre_success_rate"), label="before adaptation", color="tab:gray")
    if any(_finite(r.get("post_success_rate")) for r in rows):
        train_ax.plot(its, rate("post_success_rate"), label="after adaptation", color="tab:blue")
    train_ax.set(xlabel="meta-iteration", ylabel="success rate (training tasks)", ylim=(-0.02, 1.02),
                 title=f"{cfg.algorithm} on {cfg.task.family}" if curves else
                 f"{cfg.algorithm} on {cfg.task.family}: success rate")
    train_ax.grid(alpha=0.3)
    train_ax.legend()
    if curves:
        ax = axes[1]
        for policy, (mean, se) in curves.items():
            label, color = POLICY_STYLE.get(policy, (policy, None))
            ax.errorbar(np.arange(len(mean)), mean, yerr=se, label=label, color=color, marker="o", capsize=3)
        ax.set(xlabel="adaptation steps", ylabel="success rate (held-out tasks)", ylim=(-0.02, 1.02),
               title="held-out tasks")
        ax.set_xticks(range(max(len(m) for m, _ in curves.values())))
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def report(run: RunDir) -> list[str]:
    """Write the run's plots next to its data (onto the store for a URI); returns where they are."""
    if not run.config_path.is_file():
        raise ConfigError(f"{run.where} is not a metaray run directory (no config.yaml)")
    out = [learning_curve(run, run.path / "learning_curve.png")]
    if run.eval_path.is_file():
        out.append(adaptation_curve(run, run.path / "adaptation_curve.png"))
    success = success_curve(run, run.path / "success_curve.png")
    if success is not None:
        out.append(success)
    run.flush()
    return [run.shown(str(path)) for path in out]


def compare_rows(paths: list[str]) -> list[dict[str, Any]]:
    """Final held-out returns of several runs, one row each, from their eval.parquet."""
    rows = []
    for path in paths:
        run = RunDir(path)
        cfg = run.load_config()
        evals = read_rows(run.eval_path)
        curves = eval_curves(evals)
        if "metaray" not in curves:
            raise ConfigError(run.shown(f"{run.eval_path} holds no evaluation: run `metaray eval {path}` first"))
        mean, se = curves["metaray"]
        row: dict[str, Any] = {
            "run": run.where, "algorithm": cfg.algorithm, "family": cfg.task.family,
            "iteration": evals[0]["iteration"], "tasks": len({r["task_index"] for r in evals}),
            "return": [float(m) for m in mean], "stderr": [float(s) for s in se],
        }
        for name in ("random", "pretrained"):
            if name in curves:
                row[name] = [float(m) for m in curves[name][0]]
        success = eval_curves(evals, "success").get("metaray")
        if success is not None:  # the family reports success: the held-out rate per adaptation step
            row["success"] = [float(m) for m in success[0]]
        rows.append(row)
    return rows
