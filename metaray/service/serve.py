"""The adaptation service: a meta-policy on Ray Serve that adapts to a task on request.

``POST /adapt`` takes one of the family's task dicts and a number of steps, runs the inner
loop with real rollouts on that task, and answers with the return after each step and the
adapted parameters (safetensors, base64). ``GET /healthz`` says the service is up.

An open port takes whatever it is sent, so a request is checked, cheapest first, before
anything is parsed or rolled out, and every refusal is a short 4xx naming the problem
(echoed input is cut to ``SHOW_CHARS``), never a 500 or a stuck replica:

- 401 without the bearer token, when one is configured (``METARAY_SERVE_TOKEN`` or a
  token file); ``/healthz`` stays open for probes and then answers only ``status``;
- 415 unless ``Content-Type: application/json``; 413 for a body over ``max_body_bytes``,
  by Content-Length and by counting a chunked body as it streams in, so it is never held:
  in the replica, and first in Serve's HTTP proxy (``BodyLimit``, see ``proxy_env``), which
  otherwise reads every body whole into its memory whatever the replica answers;
- 400 for malformed or too deeply nested JSON; 422 for wrong keys, shapes or types (strict:
  ``true`` and ``"0.3"`` are no numbers), numbers too large for a float, and task values
  outside the bounds the family declares (``metaray.tasks.base.task_problems``);
- 422 when adaptation diverges (non-finite returns or parameters): no 200 with NaN;
- 503 ``busy`` at once when a replica already holds ``max_pending_adaptations``, rather
  than queueing without bound; Serve admits more requests than that per replica
  (``max_ongoing_requests``), so ``/healthz`` is never queued behind adaptations.

``/docs`` and ``/openapi.json`` are off unless asked for; nothing names a path on disk.
``build_app`` is an application builder, so the same code runs from ``metaray serve`` and
from a Serve config (KubeRay's RayService, k8s/rayservice.yaml).
"""

# No ``from __future__ import annotations``: FastAPI reads the handlers' signatures at runtime.
import asyncio
import base64
import hmac
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

MAX_STEPS = 10
MAX_BODY_BYTES = 2**20
MAX_JSON_DEPTH = 16
"""Nesting allowed in a body (a built-in family's request is 3 deep); Python's parser would
recurse on up to ~1000 levels, and everything after it (repr, numpy) again."""
SHOW_CHARS = 200
"""Longest piece of a request quoted back in an error."""
TOKEN_ENV = "METARAY_SERVE_TOKEN"
BODY_LIMIT_ENV = "METARAY_SERVE_MAX_BODY_BYTES"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"


class AdaptRequest(BaseModel):
    # Strict: a client sending "steps": true or "seed": "3" has a bug worth hearing about.
    model_config = ConfigDict(extra="forbid", strict=True)
    task: dict[str, Any]
    """One task of the run's family, e.g. {"goal": [0.3, -0.2]} for navigation2d."""
    steps: int = Field(1, ge=0, le=MAX_STEPS)
    """Adaptation steps; the return is measured before and after each."""
    seed: int = Field(0, ge=0, le=2**64 - 1)
    """Seed of the episodes sampled for this request."""
    return_params: bool = True
    """Include the adapted parameters (safetensors, base64) in the answer."""


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    max_pending_adaptations: int = Field(8, ge=1)
    """Adaptations a replica holds (one runs, the rest wait); more get 503 busy."""
    max_ongoing_requests: int = Field(32, ge=2)
    """Requests Serve sends a replica at once: above max_pending_adaptations, so health
    checks and quick refusals get through while adaptations wait."""
    max_queued_requests: int = Field(128, ge=-1)
    """Requests the proxy queues when every replica is full; more get 503 (-1: no limit)."""
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1)
    auth_token_file: str | None = None
    """File holding the bearer token, on the replicas' nodes; else METARAY_SERVE_TOKEN, else none."""
    openapi: bool = False
    """Serve /docs, /redoc and /openapi.json."""

    @model_validator(mode="after")
    def _room_for_health(self) -> "ServeArgs":
        if self.max_ongoing_requests <= self.max_pending_adaptations:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must exceed "
                             f"max_pending_adaptations ({self.max_pending_adaptations}), or /healthz "
                             "waits behind adaptations")
        return self


def load_token(token_file: str | None) -> str | None:
    """The bearer token: the file's content if one is named, else ``METARAY_SERVE_TOKEN``, else
    None (no auth). A blank token is an error, never "no auth": a secret that arrived empty
    must not leave the service open."""
    if token_file:
        token, source = Path(token_file).read_text().strip(), f"token file {token_file}"
    elif TOKEN_ENV in os.environ:
        token, source = os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if not token:
        raise ValueError(f"{source} is empty; refusing to serve with an empty bearer token")
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(f"{source}: a bearer token is printable ASCII without spaces")
    return token


def _clip(text: str) -> str:
    return text if len(text) <= SHOW_CHARS else f"{text[:SHOW_CHARS]}... ({len(text)} chars)"


def _show(value: Any) -> str:
    return _clip(repr(value))


def _refuse(status: int, detail: str, headers: dict[str, str] | None = None) -> HTTPException:
    # A backstop on top of _show: a detail built from several echoed pieces stays short.
    return HTTPException(status_code=status, detail=detail[:4 * SHOW_CHARS], headers=headers)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit``; iterative, so no depth can make it recurse."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        for child in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _numbers(value: Any) -> bool:
    """A JSON number or a (nested) list of them; bool and str are no numbers."""
    if isinstance(value, list):
        return all(_numbers(v) for v in value)
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bearer_ok(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
    scheme, _, credentials = value.partition(b" ")
    # compare_digest takes as long for a near miss as for a far one.
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def check_finite(returns: list[float], params: dict[str, Any]) -> None:
    """Adaptation that diverged (the task's rewards overflow, NaN parameters) is refused, not
    answered with NaN returns and parameters that look like a model."""
    bad = [name for name, ok in (("returns", all(math.isfinite(r) for r in returns)),
                                 ("parameters", all(bool(np.isfinite(np.asarray(v)).all()) for v in params.values())))
           if not ok]
    if bad:
        raise _refuse(422, f"adaptation produced non-finite {' and '.join(bad)} on this task; "
                           "its values are outside what the meta-policy can adapt to")


class RequestChecker:
    """Everything /adapt checks in a body: no HTTP and no Ray, so it is tested on its own."""

    def __init__(self, family: Any, family_name: str, example: dict[str, Any]) -> None:
        from metaray.tasks.base import task_problems

        self.family, self.family_name, self.task_problems = family, family_name, task_problems
        self.task_keys = sorted(example)
        # A key whose example is a string (Meta-World's env_name) takes a string only from a family
        # that checks it (``check_task``); without one, a string key is refused like any non-number.
        checks = callable(getattr(family, "check_task", None))
        self.text_keys = {k for k, v in example.items() if isinstance(v, str)} if checks else set()
        self.task_shapes = {k: np.shape(v) for k, v in example.items() if k not in self.text_keys}

    def parse(self, body: bytes) -> AdaptRequest:
        too_deep = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
        try:
            payload = json.loads(body, parse_constant=_no_constant)
        except RecursionError:  # the parser recurses per level: ~1000 levels raise this
            raise _refuse(400, too_deep) from None
        except ValueError as err:  # JSONDecodeError, bad UTF-8, NaN, an integer of 4300+ digits
            raise _refuse(400, f"malformed JSON: {_clip(str(err))}") from None
        if _too_deep(payload, MAX_JSON_DEPTH):
            raise _refuse(400, too_deep)
        try:
            req = AdaptRequest.model_validate(payload)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise _refuse(422, f"{_clip(where)}: {first['msg']}"
                               + (f" (got {_show(first['input'])})" if first["type"] != "missing" else "")) from None
        self.check_task(req.task)
        return req

    def check_task(self, task: dict[str, Any]) -> None:
        unknown = sorted(set(task) - set(self.task_keys))
        missing = sorted(set(self.task_keys) - set(task))
        if unknown or missing:
            problem = "; ".join(filter(None, [unknown and f"unknown task keys {_show(unknown)}",
                                              missing and f"missing task keys {missing}"]))
            raise _refuse(422, f"task: {problem}; a {self.family_name} task has exactly the keys {self.task_keys}")
        for key in sorted(self.text_keys):
            if not isinstance(task[key], str) or len(task[key]) > SHOW_CHARS:
                raise _refuse(422, f"task.{key}: expected a string of at most {SHOW_CHARS} characters, "
                                   f"got {_show(task[key])}")
        for key, shape in self.task_shapes.items():
            expected = f"task.{key}: expected finite numbers of shape {list(shape)}"
            if not _numbers(task[key]):
                raise _refuse(422, f"{expected}, got {_show(task[key])}")
            try:
                value = np.asarray(task[key], dtype=float)
            except OverflowError:  # an integer literal with hundreds of digits
                raise _refuse(422, f"{expected}: a number is too large for a float") from None
            except ValueError:  # ragged nested lists
                raise _refuse(422, f"{expected}, got {_show(task[key])}") from None
            if value.shape != shape or not np.isfinite(value).all():
                raise _refuse(422, f"{expected}, got {_show(task[key])}")
        problems = self.task_problems(self.family, task)
        if problems:
            raise _refuse(422, f"task: {'; '.join(problems)} (bounds of the {self.family_name} family)")


def _body_too_large(limit: int, declared: bytes | None = None) -> list[dict[str, Any]]:
    size = f"of {declared.decode()} bytes " if declared else ""
    body = json.dumps({"detail": f"request body {size}is over the limit of {limit} bytes"}).encode()
    return [{"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]},
            {"type": "http.response.body", "body": body}]


class BodyLimit:
    """ASGI middleware for Serve's HTTP proxy: 413 for a body over ``limit``, by Content-Length
    before a byte is read, or as soon as a chunked body passes it. The request then looks
    disconnected to the proxy, which stops reading and cancels it at the replica."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            for message in _body_too_large(self.limit, declared):
                await send(message)
            return
        state = {"received": 0, "started": False, "refused": False}

        async def counted_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and not state["refused"]:
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.limit and not state["started"]:
                    state["refused"] = True
                    for reply in _body_too_large(self.limit):
                        await send(reply)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["refused"]:  # the 413 went out: what the app answers is dropped
                return
            state["started"] = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)


def proxy_middlewares() -> list[Any]:
    """The ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` callback: ``BodyLimit`` in the proxy."""
    from starlette.middleware import Middleware

    return [Middleware(BodyLimit, limit=int(os.environ.get(BODY_LIMIT_ENV, MAX_BODY_BYTES)))]


def proxy_env(max_body_bytes: int) -> dict[str, str]:
    """Environment that puts the body limit into Serve's HTTP proxy; the proxy reads it when it
    starts, so it is set before Ray starts (``metaray serve``) or on the pods (RayService).
    A callback of the user's own is left in place."""
    return {PROXY_CALLBACK_ENV: os.environ.get(PROXY_CALLBACK_ENV, f"{__name__}:proxy_middlewares"),
            BODY_LIMIT_ENV: str(max_body_bytes)}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 once it passes ``limit``: the replica's own check, for a proxy without
    ``BodyLimit`` (a cluster that does not set ``proxy_env``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _refuse(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():  # a chunked body has no Content-Length: count it
        size += len(chunk)
        if size > limit:
            raise _refuse(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _BearerAuth:
    """ASGI middleware: 401 before any body is read, unless the path is open (probes)."""

    def __init__(self, app: Any, token: str, open_paths: tuple[str, ...]) -> None:
        self.app, self.token, self.open_paths = app, token.encode(), open_paths

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "").rstrip("/")) or "/"
            if path not in self.open_paths and not _bearer_ok(scope["headers"], self.token):
                response = JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer ...)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bind_replica_grpc_to_node_ip() -> None:
    """Make this replica's inter-deployment gRPC server listen on the node's address, not ``[::]``.

    Ray Serve 2.60 starts it on every interface once the replica is initialized, where Ray's
    own servers bind to the node's address; with RAY_AUTH_MODE=disabled it is then open to any
    host. metaray has one deployment, and Serve's callers reach a replica at its node's address,
    so nothing is lost. A Ray without this hook is left as is (tests/test_exposure.py checks)."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_metaray", False):
        return
    node_ip = ray.util.get_node_ip_address()
    node_ip = f"[{node_ip}]" if ":" in node_ip else node_ip  # an IPv6 node

    def bound(server: Any, address: str) -> int:
        return original(server, f"{node_ip}:0" if address == "[::]:0" else address)

    bound._metaray = True
    replica.add_port_to_grpc_server = bound


@serve.deployment
@serve.ingress()  # the app is built per replica (__serve_build_asgi_app__), from its settings
class AdaptationService:
    def __init__(self, opts: ServeArgs, require_token: bool) -> None:
        import torch

        from metaray.core.task_worker import TaskWorker
        from metaray.training.run_dir import RunDir
        from metaray.training.trainer import check_compatible

        _bind_replica_grpc_to_node_ip()  # before Serve starts the replica's gRPC server, right after this
        run = RunDir(opts.run_dir)
        config, checkpoint = run.load_model()  # also for a RayService, which has no CLI to check first
        self.opts, self.config = opts, config
        self.run_name, self.iteration = run.name, int(checkpoint["iteration"])
        self.params = checkpoint["params"].numpy()
        self.runner = TaskWorker(self.config)
        check_compatible(checkpoint, config, self.runner.n_params, str(run.checkpoint_files()[-1]))
        example = self.runner.family.sample_tasks(1, np.random.default_rng(0))[0]
        self.checker = RequestChecker(self.runner.family, self.config.task.family, example)
        self.token = load_token(opts.auth_token_file)
        if require_token and self.token is None:  # fail closed: the builder saw a token, this node none
            raise RuntimeError(f"a bearer token was configured but this replica has none ({TOKEN_ENV} unset)")
        torch.set_num_threads(self.config.resources.torch_threads)  # the workers' numerics, as in eval
        # torch.func.functional_call swaps the module's parameters while it runs, so one
        # adaptation at a time per replica (one thread); replicas give the parallelism.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapt")
        self.pending = 0  # only touched on the event loop: no lock

    def __serve_build_asgi_app__(self) -> FastAPI:
        docs = self.opts.openapi
        app = FastAPI(title="metaray adaptation service", docs_url="/docs" if docs else None,
                      redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
        app.add_api_route("/healthz", self.healthz, methods=["GET"], response_model=None)
        app.add_api_route("/adapt", self.adapt, methods=["POST"], response_model=None)
        if self.token is not None:
            app.add_middleware(_BearerAuth, token=self.token, open_paths=("/healthz",))
        return app

    async def healthz(self, request: Request) -> dict[str, Any]:
        """Async, so it never waits for a thread; with a token, only callers holding it see the model."""
        if self.token is not None and not _bearer_ok(request.scope["headers"], self.token.encode()):
            return {"status": "ok"}
        return {"status": "ok", "run": self.run_name, "iteration": self.iteration,
                "family": self.config.task.family, "algorithm": self.config.algorithm,
                "task_keys": self.checker.task_keys, "max_steps": MAX_STEPS}

    async def adapt(self, request: Request) -> dict[str, Any]:
        """Check, then run the rollouts on the replica's adaptation thread: the event loop keeps answering."""
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            got = _show(content_type) if content_type else "none"
            raise _refuse(415, f"Content-Type must be application/json (got {got})")
        req = self.checker.parse(await read_body(request, self.opts.max_body_bytes))
        if self.pending >= self.opts.max_pending_adaptations:
            raise _refuse(503, f"busy: {self.pending} adaptations pending on this replica; retry later",
                          {"Retry-After": "1"})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self._adapt, req)
        finally:
            self.pending -= 1

    def _adapt(self, req: AdaptRequest) -> dict[str, Any]:
        from safetensors.torch import save

        from metaray.core.task_worker import TaskEnvError

        try:
            returns, env_steps, params, success = self.runner.adapt_to(
                self.params, req.task, req.steps, np.random.SeedSequence([req.seed]))
        except TaskEnvError as err:  # the family refused the task's values
            raise _refuse(422, f"task: {_clip(str(err))}") from None
        except ArithmeticError as err:  # the task's numbers broke the env's arithmetic
            raise _refuse(422, f"task: adaptation failed: {_clip(f'{type(err).__name__}: {err}')}") from None
        check_finite(returns, params)
        answer: dict[str, Any] = {"task": req.task, "steps": req.steps, "returns": returns,
                                  "env_steps": env_steps, "iteration": self.iteration,
                                  # RL²: returns[k] is the k-th episode of one trial; the weights do not change
                                  "adaptation": "memory" if self.runner.algorithm.memory_based else "gradient"}
        if all(math.isfinite(s) for s in success):  # the family reports success: the rate per step
            answer["success"] = success
        if req.return_params:
            tensors = {name: value.contiguous() for name, value in params.items()}
            blob = save(tensors, metadata={"run": self.run_name, "iteration": str(self.iteration),
                                           "adaptation_steps": str(req.steps)})
            answer["params_safetensors_b64"] = base64.b64encode(blob).decode()
        return answer


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``import_path: metaray.service.serve:build_app`` with ``args: {run_dir: ...}``.

    A token seen here (a file named in args, or ``METARAY_SERVE_TOKEN``, e.g. from a
    Kubernetes Secret) makes it required on every replica: one that finds none fails to
    start rather than serve openly. The token itself is never put into the deployment's
    arguments, which Serve stores and shows.
    """
    opts = ServeArgs.model_validate(args)
    require_token = bool(opts.auth_token_file) or TOKEN_ENV in os.environ
    return AdaptationService.options(
        num_replicas=opts.replicas, max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests, ray_actor_options={"num_cpus": opts.cpus_per_replica},
    ).bind(opts, require_token)
