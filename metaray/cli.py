"""Command line: ``metaray train | eval | report | runs compare | serve | submit | jobs | bench | presets``."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from metaray.config import ConfigError, load_config, load_config_text, preset_names, validate

if TYPE_CHECKING:
    from metaray.training.run_dir import RunDir

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distributed meta-reinforcement learning (MAML, FOMAML, Reptile) on Ray.")

AddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, "
                      "else an embedded local Ray)."),
]
AuthTokenOpt = Annotated[
    Path | None,
    typer.Option(help="File holding the Ray cluster's token, for clusters started with RAY_AUTH_MODE=token; "
                      "turns RAY_AUTH_MODE=token on here (default: Ray's own sources, with RAY_AUTH_MODE=token: "
                      "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).", show_default=False),
]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _run_guarded(fn: Callable[[], T]) -> T:
    """Turn user-input errors into one line and exit 2; run failures into one line and exit 1."""
    import ray.exceptions

    from metaray.core.task_worker import TaskEnvError
    from metaray.runtime.cluster import ExposedRayError, UnreachableClusterError
    from metaray.runtime.learner import IterationFailedError
    from metaray.runtime.pool import NoLiveWorkerError, WorkerStartError
    from metaray.training.run_dir import NonFiniteParamsError

    run_failures = (TaskEnvError, IterationFailedError, NoLiveWorkerError, WorkerStartError, NonFiniteParamsError)
    try:
        return fn()
    except ConfigError as err:
        raise _fail(str(err), 2) from None
    except (UnreachableClusterError, ExposedRayError, ConnectionError, *run_failures) as err:
        raise _fail(str(err), 1) from None
    except ray.exceptions.AuthenticationError:  # Ray's own (multi-line) refusal, where no check came first
        from metaray.runtime.auth import failure

        raise _fail(str(failure(None)), 1) from None
    except ray.exceptions.RayTaskError as err:
        cause: BaseException | None = err
        while cause is not None:  # a worker's error arrives wrapped by the learner's
            if isinstance(cause, run_failures):
                first = next((line for line in str(cause).splitlines() if line.strip() and
                              not line.startswith((" ", "ray::", "Traceback"))), str(cause))
                raise _fail(first.split(": ", 1)[-1] if isinstance(cause, ray.exceptions.RayError) else first,
                            1) from None
            cause = getattr(cause, "cause", None)
        raise


@app.command()
def train(
    config: Annotated[str | None, typer.Argument(help="Preset name or path to a YAML config.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="key.path=value, repeatable.")] = None,
    output: Annotated[str | None, typer.Option(
        "--output", "-o", help="Run dir: a path, s3://BUCKET/PREFIX, gs://... (default runs/NAME-TIME).")] = None,
    address: AddressOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty run directory.")] = False,
    resume: Annotated[str | None, typer.Option(help="Continue RUN_DIR from its newest checkpoint.")] = None,
    config_env: Annotated[str | None, typer.Option(
        help="Read the config's YAML from this environment variable instead (what a submitted job does).")] = None,
    auth_token_file: AuthTokenOpt = None,
) -> None:
    """Meta-train a policy and report held-out pre- and post-adaptation returns."""

    def run(stack: ExitStack) -> None:
        from metaray.core.task_worker import TaskWorker
        from metaray.limits import check_cluster, check_embedded, estimate_memory
        from metaray.runtime.auth import use_token_file
        from metaray.runtime.cluster import check_reachable, ray_session, resolve_address
        from metaray.training.progress import make_progress
        from metaray.training.run_dir import RunDir
        from metaray.training.trainer import check_compatible, check_resumable
        from metaray.training.trainer import train as train_loop

        use_token_file(auth_token_file)  # a bad file is a usage error, before anything else
        cluster = resolve_address(address)
        if cluster:
            check_reachable(cluster)  # before anything is written
        if resume is not None:
            if config is not None or config_env is not None or output is not None or overwrite:
                raise ConfigError("--resume RUN_DIR takes its config and directory from the run; "
                                  "give no CONFIG, --config-env, --output or --overwrite (--set still applies)")
            run = RunDir(resume)
            run.load_config()  # a run directory, before a lock file is made in it
            stack.enter_context(run.lock("metaray train --resume"))
            _, checkpoint = run.load_model()
            # Compared with the checkpoint's own config: config.yaml may differ from it where an
            # evaluation may (resources.*), but a resume may not (resources.torch_threads).
            saved = validate(checkpoint["config"], run.shown(f"the config inside {run.checkpoint_files()[-1]}"))
            cfg = load_config(run.config_path, set_ or [])
        elif config_env is not None:
            if config is not None:
                raise ConfigError("give a CONFIG or --config-env, not both")
            if config_env not in os.environ:
                raise ConfigError(f"--config-env {config_env}: no such environment variable")
            cfg = load_config_text(os.environ[config_env], f"the config in ${config_env}", set_ or [])
            name = "job"
        else:
            if config is None:
                raise ConfigError("give a CONFIG (preset name or YAML file), or --resume RUN_DIR")
            cfg = load_config(config, set_ or [])
            name = Path(config).stem if config.endswith((".yaml", ".yml")) else config
        if resume is None:
            run = RunDir(output or str(Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"))
            run.check_target(overwrite)  # a file, a symlink, foreign content: refused, nothing touched
        # What the run will hold, against what this machine has: before the policy is built, and
        # before anything is written (a cluster's memory is checked once connected, below).
        estimate = estimate_memory(cfg, embedded=not cluster)
        if not cluster:
            check_embedded(cfg, estimate)
        runner = TaskWorker(cfg)  # builds the family and one env: bad input fails before anything is written
        if resume is not None:
            # A damaged, incompatible or diverging resume fails here, before anything is written.
            check_compatible(checkpoint, cfg, runner.n_params, run.shown(str(run.checkpoint_files()[-1])))
            check_resumable(saved, cfg, int(checkpoint["iteration"]), run.where)

        def write_run_dir() -> None:
            if resume is not None:
                run.write_config(cfg)
            else:
                run.path.mkdir(parents=True, exist_ok=True)
                stack.enter_context(run.lock("metaray train"))  # held until the run is over
                run.prepare(cfg, overwrite)
            typer.echo(f"run directory: {run.where}")

        if not cluster:
            write_run_dir()  # before the embedded Ray starts: a bad --output fails in a second
        cpus = cfg.resources.num_workers * cfg.resources.cpus_per_worker
        start = time.perf_counter()
        with ray_session(address, cpus):
            if cluster:
                check_cluster(cfg, estimate)  # the cluster's memory, known once connected
                write_run_dir()
            summary = train_loop(cfg, run, runner=runner, resume=resume is not None,
                                 progress=make_progress(sys.stdout, typer.echo))
        result = summary["eval"]
        mean, se = result.mean_return, result.stderr_return
        typer.echo(f"done in {time.perf_counter() - start:.1f}s")
        typer.echo(f"held-out tasks: {cfg.eval.tasks} (never seen in training)")
        rate = [f"   success {s:.2f}" for s in result.mean_success] if result.has_success else [""] * len(mean)
        if _memory_based(cfg.algorithm):  # RL²: the k-th episode of a trial, no gradient step
            for k in range(len(mean)):
                typer.echo(f"  episode {k + 1} of a trial: {mean[k]:10.3f} ± {se[k]:.3f}{rate[k]}")
            return
        typer.echo(f"  pre-adaptation return:  {mean[0]:10.3f} ± {se[0]:.3f}{rate[0]}")
        for k in range(1, len(mean)):
            typer.echo(f"  after {k} step{'s' if k > 1 else ' '}:         {mean[k]:10.3f} ± {se[k]:.3f}{rate[k]}")

    with ExitStack() as stack:  # the run directory's lock, released when the run is over
        _run_guarded(lambda: run(stack))


@app.command("eval")
def eval_(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by train (a path or a URI).")],
    tasks: Annotated[int, typer.Option(min=1, max=10_000, help="Held-out tasks.")] = 40,
    steps: Annotated[int | None, typer.Option(
        min=0, max=50, help="Adaptation steps (0..K are reported; default 3). For rl2, episodes of a trial after "
                            "the first (default: rl2.episodes_per_trial - 1).")] = None,
    seed: Annotated[int | None, typer.Option(min=0, max=2**63 - 1,
                                             help="Seed of the held-out stream (default: the run's).")] = None,
    baselines: Annotated[str | None, typer.Option(
        help="Also evaluate baselines on the same tasks: random, pretrained, ppo or all, comma-separated; "
             "bare --baselines means random,pretrained.")] = None,
    ppo_budget: Annotated[int, typer.Option(min=1, max=10**9, help="Env steps PPO may take per task.")] = 200_000,
    ppo_tasks: Annotated[int | None, typer.Option(
        min=1, help="Run PPO on the first N held-out tasks only (default: all; PPO is costly).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    address: AddressOpt = None,
    auth_token_file: AuthTokenOpt = None,
) -> None:
    """Adapt the final meta-policy on held-out tasks for 0..K steps (MAML paper protocol); write eval.parquet."""

    def run() -> None:
        from metaray.evaluation.comparisons import parse_names
        from metaray.runtime.auth import use_token_file
        from metaray.runtime.cluster import check_reachable, resolve_address
        from metaray.training.run_dir import RunDir

        use_token_file(auth_token_file)
        names = parse_names(baselines) if baselines is not None else []
        rd = RunDir(run_dir)
        rd.load_config()  # a run directory, before a lock file is made in it
        if cluster := resolve_address(address):
            check_reachable(cluster)  # a refused token, before the run is locked
        with rd.lock("metaray eval"):  # eval.parquet and the pretrained baseline are written into the run
            _evaluate(rd, names)

    steps_given = steps

    def _evaluate(rd: RunDir, names: list[str]) -> None:
        import torch

        from metaray.core.task_worker import TaskWorker
        from metaray.evaluation.comparisons import evaluate_with_baselines
        from metaray.limits import check_embedded, estimate_memory
        from metaray.runtime.cluster import ray_session, resolve_address
        from metaray.training.progress import make_progress
        from metaray.training.trainer import check_compatible, save_eval

        cfg, ckpt = rd.load_model()  # checked against each other before Ray starts
        if not resolve_address(address):  # its workers on this machine: as for train
            check_embedded(cfg, estimate_memory(cfg, embedded=True))
        check_compatible(ckpt, cfg, TaskWorker(cfg).n_params, rd.shown(str(rd.checkpoint_files()[-1])))
        if not torch.isfinite(ckpt["params"]).all():
            raise ConfigError(f"{rd.shown(str(rd.checkpoint_files()[-1]))} holds non-finite (NaN or inf) parameters: "
                              "nothing to evaluate")
        eval_seed = cfg.seed if seed is None else seed
        steps = (min(cfg.rl2.episodes_per_trial - 1, 50) if _memory_based(cfg.algorithm) else 3) \
            if steps_given is None else steps_given
        # With --json, stdout carries the JSON alone; progress goes to stderr.
        progress = make_progress(sys.stderr if as_json else sys.stdout)
        with ray_session(address, cfg.resources.num_workers * cfg.resources.cpus_per_worker):
            results, summary, ppo_rows = evaluate_with_baselines(
                cfg, rd, ckpt["params"].numpy(), names, tasks, steps, eval_seed, progress, ppo_budget, ppo_tasks)
        # The results are printed before eval.parquet is written: a run directory that cannot be
        # written (read-only, full) loses nothing that was computed.
        if as_json:
            out = {"run_dir": rd.where, "iteration": int(ckpt["iteration"]), "seed": eval_seed,
                   **results["metaray"].to_json()}
            if names:
                out["baselines"] = summary
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
        else:
            _print_eval(rd.where, ckpt, tasks, steps, eval_seed, results, summary)
        try:
            save_eval(rd, results, int(ckpt["iteration"]), eval_seed, ppo_rows)
        except OSError as err:
            raise _fail(f"the results above were not saved: cannot write {rd.eval_path}: "
                        f"{err.strerror or err}", 1) from None
        if not as_json:
            typer.echo(f"wrote {rd.eval_path}")

    _run_guarded(run)


def _memory_based(algorithm: str) -> bool:
    """Whether ``algorithm`` adapts in a recurrent state (RL²): "step k" is then a trial's k-th episode."""
    from metaray.algorithms.base import resolve_algorithm

    try:
        return resolve_algorithm(algorithm).memory_based
    except ValueError:
        return False


def _print_eval(run_dir: str, ckpt: dict, tasks: int, steps: int, eval_seed: int, results: dict,
                summary: dict) -> None:
    """The evaluation as a table: mean ± stderr per adaptation step, one column per policy."""
    typer.echo(f"{run_dir} at iteration {ckpt['iteration']}: {tasks} held-out tasks, seed {eval_seed}")
    if _memory_based(str(ckpt.get("config", {}).get("algorithm", ""))):
        typer.echo("steps k: the (k+1)-th episode of a trial; the recurrent state adapts, no gradient step")
    header = f"{'steps':>5}" + "".join(f"  {name:>22}" for name in results)
    typer.echo(header + "\n" + f"{'':>5}" + "".join(f"  {'mean ± stderr':>22}" for _ in results))
    for k in range(steps + 1):
        cells = "".join(f"  {r.mean_return[k]:12.3f} ± {r.stderr_return[k]:7.3f}" for r in results.values())
        typer.echo(f"{k:>5}{cells}")
    if any(r.has_success for r in results.values()):
        typer.echo("success rate (episodes that met the task's success criterion at any step)")
        for k in range(steps + 1):
            typer.echo(f"{k:>5}" + "".join(f"  {r.mean_success[k]:22.3f}" for r in results.values()))
    if "ppo" in summary:
        p = summary["ppo"]
        bound = " (at least: some tasks never reached it)" if p["ratio_is_lower_bound"] else ""
        typer.echo(f"ppo: reached metaray's {steps}-step return on {p['reached']}/{p['tasks']} tasks; median "
                   f"{p['median_env_steps_to_target']:,.0f} env steps vs {p['metaray_adaptation_env_steps']:,.0f}"
                   f" for metaray's adaptation = {p['sample_efficiency_ratio'] or float('nan'):.1f}x{bound}")


@app.command()
def report(run_dir: Annotated[str, typer.Argument(help="A run directory written by train (a path or a URI).")]) -> None:
    """Write PNG plots (learning curve; adaptation curve with baselines once evaluated) into RUN_DIR."""
    from metaray.evaluation.report import report as make_report
    from metaray.training.run_dir import RunDir

    for path in _run_guarded(lambda: make_report(RunDir(run_dir))):
        typer.echo(f"wrote {path}")


@app.command("serve")
def serve_(
    run_dir: Annotated[str, typer.Argument(help="A run directory written by train (a path or a URI).")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port.")] = 8000,
    host: Annotated[str, typer.Option(help="HTTP bind address (0.0.0.0 to listen on every interface).")] = "127.0.0.1",
    replicas: Annotated[int, typer.Option(min=1, max=256, help="Serve replicas of the meta-policy.")] = 1,
    cpus_per_replica: Annotated[float, typer.Option(min=0.01, help="CPUs reserved per replica.")] = 1.0,
    address: AddressOpt = None,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Largest request body; larger get 413.")] = 2**20,
    service_token_file: Annotated[Path | None, typer.Option(
        help="File holding a bearer token every request but GET /healthz must carry (default: the "
             "METARAY_SERVE_TOKEN environment variable; neither: no token).")] = None,
    openapi: Annotated[bool, typer.Option("--openapi", help="Serve /docs, /redoc and /openapi.json.")] = False,
    auth_token_file: AuthTokenOpt = None,
) -> None:
    """Serve the meta-policy on Ray Serve: POST /adapt adapts it to a task, GET /healthz names it."""
    import signal

    def run() -> None:

        from ray import serve

        from metaray.runtime.auth import use_token_file
        from metaray.runtime.cluster import ray_session
        from metaray.service.serve import build_app, load_token, proxy_env
        from metaray.training.run_dir import RunDir

        token_file = str(service_token_file.resolve()) if service_token_file is not None else None
        try:
            load_token(token_file)  # a missing, unreadable or empty token is a usage error, before Ray starts
        except (OSError, ValueError) as err:
            raise ConfigError(f"--service-token-file: {err}" if token_file else str(err)) from None
        use_token_file(auth_token_file)  # the Ray cluster's token, not the service's
        from metaray.core.task_worker import TaskWorker
        from metaray.training.trainer import check_compatible

        rd = RunDir(run_dir)
        # A missing, damaged or edited model fails here, not in a replica.
        cfg, checkpoint = rd.load_model()
        check_compatible(checkpoint, cfg, TaskWorker(cfg).n_params, rd.shown(str(rd.checkpoint_files()[-1])))
        os.environ.update(proxy_env(max_body_bytes))  # the body limit in an embedded Ray's HTTP proxy too
        with ray_session(address, replicas * cpus_per_replica):
            # SIGTERM (a pod stopping, a test) takes Ctrl-C's path, so Serve is shut down; set
            # after connecting, since ray.init installs a SIGTERM handler of its own.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            serve.start(http_options={"host": host, "port": port})
            try:
                serve.run(build_app({"run_dir": rd.location, "replicas": replicas,
                                     "cpus_per_replica": cpus_per_replica, "max_body_bytes": max_body_bytes,
                                     "auth_token_file": token_file, "openapi": openapi}),
                          name="metaray", route_prefix="/")
                typer.echo(f"serving {rd.where} on http://{host}:{port} (POST /adapt, GET /healthz); Ctrl-C stops")
                signal.pause()
            except KeyboardInterrupt:
                typer.echo("stopping")
            finally:
                serve.shutdown()

    _run_guarded(run)


runs_app = typer.Typer(help="Look at several run directories together.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("compare")
def runs_compare(
    run_dirs: Annotated[list[str], typer.Argument(help="Run directories with an evaluation (paths or URIs).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON list on stdout.")] = False,
) -> None:
    """Final held-out returns of several runs side by side (from each run's eval.parquet)."""
    from rich.console import Console
    from rich.table import Table

    from metaray.evaluation.report import compare_rows

    rows = _run_guarded(lambda: compare_rows(run_dirs))
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    steps = max(len(r["return"]) for r in rows)
    table = Table(title="held-out return after k adaptation steps (rl2: in the (k+1)-th episode of a trial; "
                        "mean ± stderr)")
    for col in ["run", "algorithm", "family", "iteration", "tasks", *[f"k={k}" for k in range(steps)],
                "random", "pretrained"]:
        table.add_column(col, justify="left" if col in ("run", "algorithm", "family") else "right", no_wrap=True)
    for r in rows:
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(r["return"], r["stderr"])]
        cells += [""] * (steps - len(cells))
        last = [f"{r[name][-1]:.2f}" if name in r else "-" for name in ("random", "pretrained")]
        table.add_row(r["run"], r["algorithm"], r["family"], str(r["iteration"]), str(r["tasks"]), *cells, *last)
    Console(width=None if sys.stdout.isatty() else 250).print(table)


@app.command()
def submit(
    config: Annotated[str, typer.Argument(help="Preset name or YAML file (anywhere: it is sent resolved).")],
    address: Annotated[str | None, typer.Option(help="Job server, http://HOST:8265.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="key.path=value, repeatable.")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o",
                                               help="Run dir on the cluster; default runs/NAME-TIME.")] = None,
    working_dir: Annotated[str | None, typer.Option(help="Directory uploaded as the job's working dir.")] = ".",
    pip: Annotated[list[str] | None, typer.Option(help="pip requirement installed for the job, repeatable.")] = None,
    runtime_env: Annotated[Path | None, typer.Option(help="Runtime environment YAML (merged first).")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Stream the job's logs until it ends.")] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Return once the job is submitted.")] = False,
    auth_token_file: AuthTokenOpt = None,
) -> None:
    """Submit `metaray train` as a Ray Job; exit 0 only if it SUCCEEDED (unless --no-wait)."""

    def run() -> None:
        from metaray.service import jobs

        # Validated and resolved here, from wherever the file is: the job runs exactly this config.
        cfg = load_config(config, set_ or [])
        name = Path(config).stem if config.endswith((".yaml", ".yml")) else config
        out = output or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        from metaray.training.storage import check_uri, local_path

        if local_path(out) is None:
            check_uri(out)  # credentials or '..' in it: refused here, not in the job's metadata
        env = jobs.train_runtime_env(jobs.build_runtime_env(runtime_env, working_dir or None, pip or []), cfg)
        client = jobs.job_client(address, auth_token_file)
        job_id = jobs.submit(client, jobs.train_entrypoint(out), env)
        typer.echo(f"submitted job {job_id}")
        if no_wait:
            return
        status = jobs.follow(client, job_id, typer.echo, stream_logs=follow)
        typer.echo(f"job {job_id} {status}")
        if status != "SUCCEEDED":
            raise typer.Exit(1)

    _run_guarded(run)


jobs_app = typer.Typer(help="Status, logs and stopping of submitted jobs.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
JobAddressOpt = Annotated[str | None, typer.Option(help="Job server, http://HOST:8265.")]


@jobs_app.command("status")
def jobs_status(job_id: str, address: JobAddressOpt = None, auth_token_file: AuthTokenOpt = None) -> None:
    """Print a job's status; exit 0 for SUCCEEDED, PENDING or RUNNING."""
    from metaray.service import jobs

    info = _run_guarded(lambda: jobs.job_client(address, auth_token_file).get_job_info(job_id))
    typer.echo(f"{job_id} {info.status.value}" + (f": {info.message}" if info.message else ""))
    if info.status.value in ("FAILED", "STOPPED"):
        raise typer.Exit(1)


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: JobAddressOpt = None,
              follow: Annotated[bool, typer.Option("--follow", help="Stream until the job ends.")] = False,
              auth_token_file: AuthTokenOpt = None) -> None:
    """Print a job's logs."""
    from metaray.service import jobs

    client = _run_guarded(lambda: jobs.job_client(address, auth_token_file))
    if follow:
        _run_guarded(lambda: jobs.follow(client, job_id, typer.echo, stream_logs=True))
    else:
        typer.echo(_run_guarded(lambda: client.get_job_logs(job_id)), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: JobAddressOpt = None, auth_token_file: AuthTokenOpt = None) -> None:
    """Ask the job server to stop a job."""
    from metaray.service import jobs

    stopped = _run_guarded(lambda: jobs.job_client(address, auth_token_file).stop_job(job_id))
    typer.echo(f"{job_id} {'stop requested' if stopped else 'was not running'}")


@app.command()
def bench(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the JSON.")] = Path("bench.json"),
    iterations: Annotated[int, typer.Option(min=2, help="Iterations per timed run.")] = 7,
    warmup: Annotated[int, typer.Option(min=0, help="Leading iterations left out of the medians.")] = 2,
    quick: Annotated[bool, typer.Option(help="Tiny budgets: checks the benchmark runs, figures meaningless.")] = False,
    readme: Annotated[Path | None, typer.Option(
        help="Also render the figures into this README, between its bench markers.")] = None,
    from_json: Annotated[Path | None, typer.Option(
        "--from", help="Measure nothing: render this bench.json into --readme.")] = None,
) -> None:
    """Measure rollout speed against the physical limit and training speed; write JSON."""
    from metaray.bench.markdown import performance_markdown, replace_block
    from metaray.limits import one_line
    from metaray.training.run_dir import atomic_write

    if warmup >= iterations:
        raise _fail(f"--warmup ({warmup}) must be below --iterations ({iterations})", 2)
    if from_json is not None and readme is None:
        raise _fail("--from renders into a README: give --readme too", 2)
    if readme is not None and from_json is None and output.resolve() == readme.resolve():
        raise _fail(f"--output and --readme are the same file ({readme}): the JSON would replace the README", 2)
    text = None
    if readme is not None:  # checked before minutes of measuring, rechecked before writing
        try:
            replace_block(readme.read_text(encoding="utf-8"), "")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise _fail(f"--readme {readme}: {one_line(err)}", 2) from None
    if from_json is not None:
        try:
            if from_json.stat().st_size > 16 * 2**20:
                raise ValueError("larger than 16 MiB; a bench.json is a few kB")
            result = json.loads(from_json.read_text(encoding="utf-8"))
            block = performance_markdown(result if isinstance(result, dict) else {})
        except RecursionError:
            raise _fail(f"--from {from_json}: nested too deeply to be a bench.json", 2) from None
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise _fail(f"--from {from_json}: {one_line(err)}", 2) from None
    else:
        from metaray.bench import run_bench

        result = run_bench(iterations, warmup, quick)
        text = json.dumps(result, indent=2)
        atomic_write(output, lambda f: f.write(text.encode()))
        typer.echo(text)
        typer.echo(f"wrote {output}")
        block = performance_markdown(result)
    if readme is not None:
        try:
            updated = replace_block(readme.read_text(encoding="utf-8"), block)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise _fail(f"--readme {readme}: {one_line(err)}", 2) from None
        atomic_write(readme, lambda f: f.write(updated.encode()))
        typer.echo(f"rendered the figures into {readme}")


@app.command()
def presets() -> None:
    """List the shipped presets."""
    for name in preset_names():
        typer.echo(name)


def _bare_baselines(argv: list[str]) -> list[str]:
    """``--baselines`` with no value means the default set (click options cannot have optional values).

    The next word is the option's value unless it is another option or an existing path
    (the RUN_DIR argument), so ``--baselines RUN_DIR`` and ``--baselines --json`` both work.
    """
    from metaray.evaluation.comparisons import DEFAULT

    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--baselines" and (nxt is None or nxt.startswith("-") or Path(nxt).exists()):
            out.append(",".join(DEFAULT))
    return out


def main() -> None:
    _working_dir_on_path()
    app(args=_bare_baselines(sys.argv[1:]), prog_name="metaray")


def _working_dir_on_path() -> None:
    """Put the working directory on sys.path (last), as ``python -m metaray.cli`` does (first).

    The installed ``metaray`` script has its own bin directory there instead, so a config's
    ``module:Class`` (task.family, algorithm) would not find a module of the working directory.
    A config naming one imports it: it is as trusted as a Python file. Ray's workers get the
    driver's working directory on their path from Ray itself (a local or embedded cluster).
    """
    try:
        cwd = os.getcwd()
    except OSError:  # the working directory was removed: nothing to import from it
        return
    if cwd not in sys.path and "" not in sys.path:
        # Last, not first: a ray.py or numpy.py lying in the directory must not shadow a dependency.
        sys.path.append(cwd)


if __name__ == "__main__":
    main()
