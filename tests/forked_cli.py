"""The CLI, many invocations of it, without an interpreter's start-up for each.

``python -m metaray.cli``, as tests.conftest.run_cli runs it, in a process of its own per invocation;
but each process is forked from one interpreter that has imported what the CLI imports (torch, Ray,
metaray) and does nothing else. A command that ends before a run starts (a refusal, a job-server or
run-directory command) then takes a fraction of a second, not the ~3 s of CPU a fresh interpreter
spends on those imports; invocations given together run side by side.

Each fork runs the module as ``python -m`` does (runpy, as ``__main__``, the working directory first
on sys.path), with the invocation's working directory and environment and stdin on /dev/null, and
ends as the interpreter ends (non-daemon threads joined, atexit handlers run, streams flushed; an
uncaught exception printed by sys.excepthook, exit 1). The server itself runs nothing: nothing
passes from one invocation to another. Only the frames of a traceback differ from a fresh
interpreter's (runpy's own, and this server's).

Not for commands that start or join a Ray run: fork after the imports is safe because the server
never starts Ray, gRPC or torch's thread pools, but a run's own processes are better left as they
are in production.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

_SERVER = r"""
import atexit, json, os, runpy, sys, threading

import ray.exceptions, torch, typer  # noqa: F401
from ray import serve  # noqa: F401
from ray.job_submission import JobSubmissionClient  # noqa: F401

import metaray.core.task_worker, metaray.evaluation.comparisons, metaray.limits  # noqa: F401
import metaray.runtime.auth, metaray.runtime.cluster, metaray.runtime.learner, metaray.runtime.pool  # noqa: F401
import metaray.service.jobs, metaray.service.serve, metaray.training.progress  # noqa: F401
import metaray.training.run_dir, metaray.training.trainer  # noqa: F401

assert "metaray.cli" not in sys.modules  # it runs as __main__, as under python -m


def cli(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                            (2, request["stderr"], os.O_WRONLY)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["-m", *request["args"]]
    sys.path[0] = os.getcwd()
    code = 0
    try:
        runpy.run_module("metaray.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


for line in sys.stdin:
    pending, running, codes = list(enumerate(json.loads(line))), {}, {}
    while pending or running:
        while pending and len(running) < 4:
            i, request = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                cli(request)
            running[pid] = i
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    print(json.dumps([codes[i] for i in sorted(codes)]), flush=True)
"""


class ForkedCli:
    """Call with invocations of the CLI, each its arguments or (arguments, {"cwd": ..., "env": ...}); returns
    their CompletedProcess in the order given. The default working directory is the repository, the default
    environment this process's at the call."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.count = tmp, itertools.count()
        self.server = subprocess.Popen([sys.executable, "-c", _SERVER], cwd=ROOT, env=dict(os.environ),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, *invocations, timeout: float = 600) -> list[subprocess.CompletedProcess]:
        calls = [(inv[0], inv[1]) if len(inv) == 2 and isinstance(inv[1], dict) else (inv, {}) for inv in invocations]
        requests = []
        for args, options in calls:
            n = next(self.count)
            out, err = self.tmp / f"{n}.out", self.tmp / f"{n}.err"
            out.touch()
            err.touch()
            requests.append({"args": [str(a) for a in args], "cwd": str(options.get("cwd", ROOT)),
                             "env": dict(options.get("env", os.environ)), "stdout": str(out), "stderr": str(err)})
        self.server.stdin.write(json.dumps(requests) + "\n")
        self.server.stdin.flush()
        if not select.select([self.server.stdout], [], [], timeout)[0]:
            self.server.kill()
            raise TimeoutError(f"the CLI did not answer in {timeout} s: {invocations}")
        line = self.server.stdout.readline()
        assert line, f"the CLI's fork server exited ({self.server.wait()})"
        return [subprocess.CompletedProcess([sys.executable, "-m", "metaray.cli", *r["args"]], code,
                                            Path(r["stdout"]).read_text(), Path(r["stderr"]).read_text())
                for r, code in zip(requests, json.loads(line), strict=True)]

    def close(self) -> None:
        self.server.stdin.close()
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()

    def __enter__(self) -> ForkedCli:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
