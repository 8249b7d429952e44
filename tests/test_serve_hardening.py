"""The adaptation service's checks that need no running service: task bounds of the families,
the request checker on a cartpole run's tasks, the non-finite guard, the token and the body
limits. The same code answers over HTTP in test_serve.py."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi import HTTPException
from starlette.requests import Request

from metaray.config import load_config
from metaray.core.policy import flatten
from metaray.core.task_worker import TaskWorker
from metaray.service.serve import (
    AdaptationService,
    BodyLimit,
    RequestChecker,
    ServeArgs,
    check_finite,
    load_token,
    proxy_env,
    read_body,
)
from metaray.tasks import BUILTIN_FAMILIES
from metaray.tasks.base import task_problems
from metaray.tasks.cartpole import CartPole
from tests.conftest import ROOT

CARTPOLE = {"gravity": 9.8, "masscart": 1.0, "masspole": 0.1, "length": 0.5, "force_mag": 10.0, "actuation_sign": 1}


def _refusal(checker: RequestChecker, payload: dict) -> HTTPException:
    with pytest.raises(HTTPException) as caught:
        checker.parse(json.dumps(payload).encode())
    return caught.value


@pytest.fixture(scope="module")
def cartpole_checker() -> RequestChecker:
    family = CartPole()
    return RequestChecker(family, "cartpole", family.sample_tasks(1, np.random.default_rng(0))[0])


def test_a_physical_cartpole_task_passes(cartpole_checker):
    assert cartpole_checker.parse(json.dumps({"task": CARTPOLE, "steps": 2}).encode()).steps == 2


@pytest.mark.parametrize("values,named", [
    ({"masscart": 0, "masspole": 0}, ["masscart=0 is outside [0.01, 100]", "masspole=0 is outside [0.001, 10]"]),
    ({"length": 0}, ["length=0 is outside [0.01, 10]"]),
    ({"gravity": 1e300}, ["gravity=1e+300 is outside [0, 100]"]),
    ({"force_mag": 1e300}, ["force_mag=1e+300 is outside [0, 1000]"]),
    ({"masscart": 1e-300, "masspole": 1e-300}, ["masscart=1e-300 is outside", "masspole=1e-300 is outside"]),
    ({"masspole": -0.1}, ["masspole=-0.1 is outside [0.001, 10]"]),
    ({"actuation_sign": 0}, ["actuation_sign must be -1 or 1 (got 0)"]),
])
def test_unphysical_cartpole_tasks_get_one_422_naming_keys_and_bounds(cartpole_checker, values, named):
    refusal = _refusal(cartpole_checker, {"task": {**CARTPOLE, **values}})
    assert refusal.status_code == 422 and "\n" not in refusal.detail
    assert refusal.detail.startswith("task: ") and refusal.detail.endswith("(bounds of the cartpole family)")
    assert all(phrase in refusal.detail for phrase in named), refusal.detail


@pytest.mark.parametrize("name", sorted(BUILTIN_FAMILIES))
def test_builtin_families_bound_every_task_key_and_accept_their_own_tasks(name):
    family = BUILTIN_FAMILIES[name]()
    tasks = family.sample_tasks(200, np.random.default_rng(0))
    numeric = {k for k, v in tasks[0].items() if not isinstance(v, str)}  # a string key: check_task's
    assert numeric <= set(family.task_bounds), "every numeric key of a built-in task is bounded"
    assert all(task_problems(family, task) == [] for task in tasks)


def test_a_user_family_may_declare_bounds_and_a_check():
    class Bounded:
        task_bounds = {"size": (1.0, 2.0)}

        def check_task(self, task):
            if task["size"] == 1.5:
                raise ValueError("size 1.5 is reserved")

    class Open:  # declares nothing: any finite value is the family's business
        pass

    assert task_problems(Bounded(), {"size": [1.0, 2.0]}) == []
    assert task_problems(Bounded(), {"size": [1.0, 2.5]}) == ["size=[1.0, 2.5] is outside [1, 2]"]
    assert task_problems(Bounded(), {"size": 1.5}) == ["size 1.5 is reserved"]
    assert task_problems(Open(), {"size": 1e300}) == []
    checker = RequestChecker(Bounded(), "mine:Bounded", {"size": 1.0})
    assert _refusal(checker, {"task": {"size": 3}}).detail == \
        "task: size=3 is outside [1, 2] (bounds of the mine:Bounded family)"


def test_deep_or_huge_json_is_a_4xx_not_a_recursion_or_overflow_error(cartpole_checker):
    huge = json.dumps({"task": {**CARTPOLE, "length": 10**400}}).encode()
    for body, status, message in [(b"[" * 100_000 + b"]" * 100_000, 400, "JSON nested deeper than 16 levels"),
                                  (b'{"task": ' + b"[" * 17 + b"]" * 17 + b"}", 400, "JSON nested deeper than 16"),
                                  (huge, 422, "task.length: expected finite numbers of shape []: a number is too "
                                              "large for a float")]:
        with pytest.raises(HTTPException) as caught:
            cartpole_checker.parse(body)
        assert caught.value.status_code == status and message in caught.value.detail, caught.value.detail


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_non_finite_adaptation_is_refused():
    """navigation2d's goal at 1e200 (outside its bounds, so the service never gets this far
    with it) overflows the returns; the guard stops NaN from reaching an answer."""
    check_finite([-1.0, -0.5], {"w": torch.zeros(3)})
    for returns, params, named in [([-1.0, float("nan")], {"w": torch.zeros(3)}, "non-finite returns"),
                                   ([-1.0, -0.5], {"w": torch.tensor([0.0, float("inf")])}, "non-finite parameters")]:
        with pytest.raises(HTTPException) as caught:
            check_finite(returns, params)
        assert caught.value.status_code == 422 and named in caught.value.detail

    worker = TaskWorker(load_config("quickstart", ["inner.episodes=4", "rollout.horizon=20"]))
    returns, _, params, _ = worker.adapt_to(flatten(worker.template).numpy(), {"goal": [1e200, 1e200]}, 1,
                                            np.random.SeedSequence([0]))
    with pytest.raises(HTTPException) as caught:
        check_finite(returns, params)
    assert caught.value.status_code == 422 and "adaptation produced non-finite returns and parameters" in \
        caught.value.detail


def test_the_token_comes_from_a_file_or_the_environment_and_is_never_blank(tmp_path, monkeypatch):
    monkeypatch.delenv("METARAY_SERVE_TOKEN", raising=False)
    assert load_token(None) is None
    monkeypatch.setenv("METARAY_SERVE_TOKEN", " from-env \n")
    assert load_token(None) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(str(tmp_path / "token")) == "from-file"  # a file named wins
    for blank in ("", " \n"):
        monkeypatch.setenv("METARAY_SERVE_TOKEN", blank)
        with pytest.raises(ValueError, match="METARAY_SERVE_TOKEN is empty"):
            load_token(None)
    (tmp_path / "spaced").write_text("two words")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        load_token(str(tmp_path / "spaced"))


@pytest.mark.parametrize("how", ["empty file", "missing file", "empty env"])
def test_an_empty_or_missing_token_is_a_usage_error(tmp_path, how):
    (tmp_path / "empty").write_text("\n")
    args = {"empty file": ["--service-token-file", str(tmp_path / "empty")],
            "missing file": ["--service-token-file", str(tmp_path / "absent")], "empty env": []}[how]
    env = {**os.environ, "METARAY_SERVE_TOKEN": ""} if how == "empty env" else \
        {k: v for k, v in os.environ.items() if k != "METARAY_SERVE_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "metaray.cli", "serve", str(tmp_path / "run"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    expected = {"empty file": "is empty; refusing to serve with an empty bearer token",
                "missing file": "No such file", "empty env": "METARAY_SERVE_TOKEN is empty"}[how]
    # The run directory does not exist either: the token must be what is refused.
    assert proc.stderr.startswith("error: ") and expected in proc.stderr, proc.stderr
    assert "not a metaray run directory" not in proc.stderr


def test_serve_args_keep_room_for_health_checks():
    assert ServeArgs(run_dir="/runs/x").max_ongoing_requests > ServeArgs(run_dir="/runs/x").max_pending_adaptations
    with pytest.raises(ValueError, match="must exceed max_pending_adaptations"):
        ServeArgs(run_dir="/runs/x", max_ongoing_requests=8, max_pending_adaptations=8)


def _request(chunks: list[bytes], headers: dict[str, str]) -> Request:
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        return messages.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/adapt",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


def test_the_replica_counts_a_chunked_body_without_content_length():
    """The replica's own limit, for a proxy without BodyLimit: no Content-Length, cut off by count."""
    assert asyncio.run(read_body(_request([b"ab", b"cd"], {}), 4)) == b"abcd"
    for request in (_request([b"ab", b"cd", b"e"], {}), _request([b"abcde"], {"content-length": "5"})):
        with pytest.raises(HTTPException) as caught:
            asyncio.run(read_body(request, 4))
        assert caught.value.status_code == 413 and "over the limit of 4 bytes" in caught.value.detail


def test_the_proxy_limit_answers_413_without_reading_on(monkeypatch):
    async def run(headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[dict], list[str], int]:
        sent, seen, pending = [], [], [{"type": "http.request", "body": c, "more_body": True} for c in chunks]

        async def app(scope, receive, send):  # reads the whole body, as Serve's proxy does
            while (message := await receive())["type"] == "http.request":
                seen.append(message["type"])
            seen.append(message["type"])

        async def receive():
            return pending.pop(0)

        async def send(message):
            sent.append(message)

        await BodyLimit(app, limit=4)({"type": "http", "headers": headers}, receive, send)
        return sent, seen, len(pending)

    sent, seen, unread = asyncio.run(run([(b"content-length", b"5")], [b"abcde"]))
    assert sent[0]["status"] == 413 and seen == [] and unread == 1  # not a byte read
    sent, seen, unread = asyncio.run(run([], [b"ab", b"cd", b"e", b"more", b"more"]))
    assert sent[0]["status"] == 413 and seen[-1] == "http.disconnect" and unread == 2
    monkeypatch.delenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", raising=False)
    assert proxy_env(123) == {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "metaray.service.serve:proxy_middlewares",
                              "METARAY_SERVE_MAX_BODY_BYTES": "123"}


@pytest.mark.parametrize("openapi", [False, True])
def test_api_docs_only_when_asked_and_the_token_guards_the_app(openapi):
    """--openapi turns the docs on (the service in test_serve.py shows they are off by default)."""
    async def healthz(request: Request) -> dict:
        return {}

    async def adapt(request: Request) -> dict:
        return {}

    build = AdaptationService.func_or_class.__serve_build_asgi_app__
    for token in (None, "t0k3n"):
        app = build(SimpleNamespace(opts=ServeArgs(run_dir="/runs/x", openapi=openapi), token=token,
                                    healthz=healthz, adapt=adapt))
        assert (app.docs_url, app.redoc_url, app.openapi_url) == \
            (("/docs", "/redoc", "/openapi.json") if openapi else (None, None, None))
        assert {r.path for r in app.routes} >= {"/healthz", "/adapt"}
        assert [m.cls.__name__ for m in app.user_middleware] == ([] if token is None else ["_BearerAuth"])
