"""MLP policies with a functional forward, so adapted parameters are values, not modules."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal
from torch.func import functional_call

Params = OrderedDict[str, torch.Tensor]

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}

INITS = ("xavier", "orthogonal")
"""Weight initialisations of the MLP policies (``policy.init``)."""

HIDDEN_GAIN = {"xavier": 1.0, "orthogonal": 2.0**0.5}
OUTPUT_GAIN = {"xavier": 1.0, "orthogonal": 0.01}
"""Gains of the hidden layers and of the output layer (means or logits) for each init, the
output layer's unless ``policy.output_gain`` sets it. xavier: xavier-uniform at gain 1, as in
the MAML reference code (pytorch-maml-rl). orthogonal: as Stable-Baselines3's ActorCriticPolicy
and CleanRL's PPO do, for tanh and relu alike: orthogonal weights of gain sqrt(2) in the hidden
layers and 0.01 in the action head, so the first policy's means (or logits) are near zero."""


def init_linear(layers: list[nn.Linear], init: str = "xavier", output_gain: float | None = None) -> None:
    """Initialise an MLP's linear layers in place (the last is the output layer); biases zero.

    Draws from torch's global generator, one layer after the other: seed it first."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}: use {' or '.join(INITS)}")
    fill = nn.init.xavier_uniform_ if init == "xavier" else nn.init.orthogonal_
    for k, layer in enumerate(layers):
        last = k == len(layers) - 1
        gain = (OUTPUT_GAIN[init] if output_gain is None else output_gain) if last else HIDDEN_GAIN[init]
        fill(layer.weight, gain=gain)
        nn.init.zeros_(layer.bias)


@dataclass(frozen=True)
class SpaceSpec:
    """What the policy needs to know of an env's spaces."""

    obs_dim: int
    obs_discrete: int  # number of discrete observations (one-hot encoded), 0 for Box
    act_dim: int  # number of actions (discrete) or action dimensions (continuous)
    discrete: bool
    act_low: np.ndarray | None = None
    act_high: np.ndarray | None = None

    @classmethod
    def from_env(cls, env: gym.Env) -> SpaceSpec:
        obs, act = env.observation_space, env.action_space
        if isinstance(obs, gym.spaces.Discrete):
            obs_dim, obs_discrete = int(obs.n), int(obs.n)
        elif isinstance(obs, gym.spaces.Box):
            obs_dim, obs_discrete = int(np.prod(obs.shape)), 0
        else:
            raise ValueError(f"unsupported observation space {obs}: use Box or Discrete")
        if isinstance(act, gym.spaces.Discrete):
            return cls(obs_dim, obs_discrete, int(act.n), True)
        if isinstance(act, gym.spaces.Box):
            low = np.broadcast_to(act.low, act.shape).reshape(-1).astype(np.float32)
            high = np.broadcast_to(act.high, act.shape).reshape(-1).astype(np.float32)
            return cls(obs_dim, obs_discrete, int(np.prod(act.shape)), False, low, high)
        raise ValueError(f"unsupported action space {act}: use Box or Discrete")

    def encode_obs(self, obs: np.ndarray) -> np.ndarray:
        """Batch of raw observations -> float32 [batch, obs_dim]."""
        if self.obs_discrete:
            return np.eye(self.obs_discrete, dtype=np.float32)[np.asarray(obs, dtype=np.int64)]
        return np.asarray(obs, dtype=np.float32).reshape(len(obs), self.obs_dim)


class Policy(nn.Module):
    """Categorical policy for discrete actions, Gaussian with a learned log-std otherwise."""

    def __init__(
        self,
        spec: SpaceSpec,
        hidden_sizes: list[int],
        activation: str = "tanh",
        init_log_std: float = 0.0,
        init: str = "xavier",
        output_gain: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = []
        width = spec.obs_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, spec.act_dim))
        self.body = nn.Sequential(*layers)
        init_linear([m for m in self.body if isinstance(m, nn.Linear)], init, output_gain)
        if not spec.discrete:
            self.log_std = nn.Parameter(torch.full((spec.act_dim,), float(init_log_std)))

    def forward(self, obs: torch.Tensor) -> Distribution:
        return self.head(self.body(obs), None if self.spec.discrete else self.log_std)

    def head(self, out: torch.Tensor, log_std: torch.Tensor | None) -> Distribution:
        """The action distribution from the body's output: shared by the loss path (``dist``)
        and the sampling path (``sampler``), so the two can only differ in the body's arithmetic."""
        # No argument validation: it costs time on every step, and non-finite parameters
        # are caught by the task worker instead.
        if self.spec.discrete:
            return Categorical(logits=out, validate_args=False)
        return Independent(Normal(out, log_std.exp(), validate_args=False), 1, validate_args=False)

    def dist(self, obs: torch.Tensor, params: Params) -> Distribution:
        return functional_call(self, params, (obs,))

    def sampler(self, params: list[Params]) -> Callable[[torch.Tensor], torch.Tensor]:
        """obs [tasks, batch, obs_dim] -> logits or means [tasks, batch, out], each task at its own
        parameters: one batched matrix product per layer for every task at once, for the
        rollout's hot loop (none of functional_call's per-call module swapping).

        With more than one torch thread a task's slice may differ in its last bits with the
        number of tasks in the call (the BLAS picks its blocking by shape), so callers fix
        the composition of every call from the config (see ``collect_many``'s groups)."""
        names = [i for i, m in enumerate(self.body) if isinstance(m, nn.Linear)]
        layers = [(torch.stack([p[f"body.{i}.weight"] for p in params]).transpose(1, 2),
                   torch.stack([p[f"body.{i}.bias"] for p in params]).unsqueeze(1)) for i in names]
        act = torch.tanh if isinstance(self.body[1], nn.Tanh) else torch.relu

        def forward(obs: torch.Tensor) -> torch.Tensor:
            for k, (w, b) in enumerate(layers):
                obs = torch.baddbmm(b, obs, w)
                if k < len(layers) - 1:
                    obs = act(obs)
            return obs

        return forward

    def params(self) -> Params:
        return OrderedDict((k, v.detach().clone()) for k, v in self.named_parameters())


def flatten(params: Params) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflatten(flat: torch.Tensor, like: Params) -> Params:
    out: Params = OrderedDict()
    offset = 0
    for name, p in like.items():
        n = p.numel()
        out[name] = flat[offset : offset + n].view_as(p)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"parameter vector has {flat.numel()} values, the policy needs {offset}")
    return out


def build_policy(spec: SpaceSpec, policy_cfg, seed: int) -> Policy:
    """A policy whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Policy(spec, policy_cfg.hidden_sizes, policy_cfg.activation, policy_cfg.init_log_std,
                      policy_cfg.init, policy_cfg.output_gain)
