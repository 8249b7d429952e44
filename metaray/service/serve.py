"""The adaptation service: a meta-policy on Ray Serve that adapts to a task on request.

``POST /adapt`` takes one of the family's task dicts and a number of steps, runs the inner
loop with real rollouts on that task, and answers with the return after each step and the
adapted parameters (safetensors, base64). ``GET /healthz`` names the model. Requests are
validated before any rollout: unknown or missing task keys, steps out of range and
malformed JSON get a 4xx naming the problem, and the replica keeps serving.

``build_app`` is an application builder, so the same code runs from ``metaray serve`` and
from a Serve config (KubeRay's RayService, k8s/rayservice.yaml).
"""

# No ``from __future__ import annotations``: FastAPI reads the request model from the
# signature at runtime, through Serve's ingress wrapper.
import asyncio
import base64
import json
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

MAX_STEPS = 10

api = FastAPI(title="metaray adaptation service")


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: dict[str, Any]
    """One task of the run's family, e.g. {"goal": [0.3, -0.2]} for navigation2d."""
    steps: int = Field(1, ge=0, le=MAX_STEPS)
    """Adaptation steps; the return is measured before and after each."""
    seed: int = Field(0, ge=0)
    """Seed of the episodes sampled for this request."""
    return_params: bool = True
    """Include the adapted parameters (safetensors, base64) in the answer."""


class ServeArgs(BaseModel):
    """Arguments of the application builder (``args:`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")
    run_dir: str
    replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, gt=0)
    max_ongoing_requests: int = Field(8, ge=1)


@serve.deployment
@serve.ingress(api)
class AdaptationService:
    def __init__(self, run_dir: str) -> None:
        import torch

        from metaray.core.task_worker import TaskWorker
        from metaray.training.run_dir import RunDir

        run = RunDir(run_dir)
        self.config = run.load_config()
        checkpoint = run.latest_checkpoint()
        self.run_dir, self.iteration = run_dir, int(checkpoint["iteration"])
        self.params = checkpoint["params"].numpy()
        self.runner = TaskWorker(self.config)
        example = self.runner.family.sample_tasks(1, np.random.default_rng(0))[0]
        self.task_keys = sorted(example)
        self.task_shapes = {k: np.shape(v) for k, v in example.items()}
        torch.set_num_threads(self.config.resources.torch_threads)  # the workers' numerics, as in eval
        # torch.func.functional_call swaps the module's parameters while it runs, so one
        # adaptation at a time per replica; replicas give the parallelism.
        self.lock = threading.Lock()

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "run": self.run_dir, "iteration": self.iteration,
                "family": self.config.task.family, "algorithm": self.config.algorithm,
                "task_keys": self.task_keys, "max_steps": MAX_STEPS}

    @api.post("/adapt")
    async def adapt(self, request: Request) -> dict[str, Any]:
        """Validate, then run the rollouts in a thread: the replica keeps answering meanwhile."""
        body = await request.body()
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise HTTPException(status_code=400, detail=f"malformed JSON: {err}") from None
        try:
            req = AdaptRequest.model_validate(payload)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise HTTPException(status_code=422, detail=f"{where}: {first['msg']}"
                                + (f" (got {first['input']!r})" if first["type"] != "missing" else "")) from None
        unknown = sorted(set(req.task) - set(self.task_keys))
        missing = sorted(set(self.task_keys) - set(req.task))
        if unknown or missing:
            problem = "; ".join(filter(None, [unknown and f"unknown task keys {unknown}",
                                              missing and f"missing task keys {missing}"]))
            raise HTTPException(status_code=422, detail=f"task: {problem}; a {self.config.task.family} task has "
                                                        f"exactly the keys {self.task_keys}")
        for key, shape in self.task_shapes.items():
            try:
                value = np.asarray(req.task[key], dtype=float)
            except (TypeError, ValueError):
                raise HTTPException(status_code=422, detail=f"task.{key}: expected numbers, got "
                                                            f"{req.task[key]!r}") from None
            if value.shape != shape or not np.isfinite(value).all():
                raise HTTPException(status_code=422, detail=f"task.{key}: expected finite numbers of shape "
                                                            f"{list(shape)}, got {req.task[key]!r}")
        return await asyncio.to_thread(self._adapt, req)

    def _adapt(self, req: AdaptRequest) -> dict[str, Any]:
        from safetensors.torch import save

        from metaray.core.task_worker import TaskEnvError

        try:
            with self.lock:
                returns, env_steps, params = self.runner.adapt_to(
                    self.params, req.task, req.steps, np.random.SeedSequence([req.seed]))
        except TaskEnvError as err:  # the family refused the task's values
            raise HTTPException(status_code=422, detail=f"task: {err}") from None
        answer: dict[str, Any] = {"task": req.task, "steps": req.steps, "returns": returns,
                                  "env_steps": env_steps, "iteration": self.iteration}
        if req.return_params:
            tensors = {name: value.contiguous() for name, value in params.items()}
            blob = save(tensors, metadata={"run": self.run_dir, "iteration": str(self.iteration),
                                           "adaptation_steps": str(req.steps)})
            answer["params_safetensors_b64"] = base64.b64encode(blob).decode()
        return answer


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder: ``import_path: metaray.service.serve:build_app`` with ``args: {run_dir: ...}``."""
    opts = ServeArgs.model_validate(args)
    return AdaptationService.options(
        num_replicas=opts.replicas, max_ongoing_requests=opts.max_ongoing_requests,
        ray_actor_options={"num_cpus": opts.cpus_per_replica},
    ).bind(opts.run_dir)
