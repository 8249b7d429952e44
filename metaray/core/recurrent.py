"""The recurrent policy of RL²: adaptation lives in its hidden state, not in its weights.

A GRU reads, at each step, the observation, the previous action (one-hot when discrete),
the previous reward and a flag set on the first step of every episode after a trial's first
(Duan et al. 2016). The categorical or Gaussian head and the value head share the GRU and
an MLP over its state and the current input: the value of a step depends on what the trial
has revealed so far, which only the recurrent state holds, and one recurrent pass then
serves both heads.

The forward is written out from the parameters (a dict, as for the MLP policies), so the
sampling path (one GRU step for a group of trials at a time) and the loss path (a minibatch
of whole trials unrolled) run the same arithmetic, and a finite-difference check can take
any parameter vector. The GRU's equations and parameters are torch's ``nn.GRU``'s: the step
is written out (one step for many trials at a time), and the loss path unrolls whole trials
with torch's own fused GRU, which a test checks gives the step's results.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Independent, Normal
from torch.func import functional_call

from metaray.core.policy import ACTIVATIONS, Params, SpaceSpec


class RecurrentPolicy(nn.Module):
    """A GRU over the trial, then an MLP (``hidden_sizes``) over its state and the current
    input, then the action head and the value head.

    The current input reaches the MLP directly: the state carries what the trial has revealed
    about the task, and the policy need not push the current observation through the GRU's
    gates to act on it (measured: with the heads on the state alone, PPO learnt a fixed 2D
    navigation goal many times slower than a memoryless MLP). With ``memory`` False the state
    is zero at every step and the previous action, reward and flag are zeroed: exactly a
    memoryless MLP policy of the observation, with the same parameters, the ablation a
    memory-based result is judged against."""

    def __init__(self, spec: SpaceSpec, hidden_size: int, hidden_sizes: list[int], activation: str = "tanh",
                 init_log_std: float = 0.0, memory: bool = True) -> None:
        super().__init__()
        self.spec, self.hidden_size, self.memory = spec, hidden_size, memory
        self.input_size = spec.obs_dim + spec.act_dim + 2
        self.gru = nn.GRU(self.input_size, hidden_size)  # one layer; torch's init: uniform in +-1/sqrt(hidden)
        layers: list[nn.Module] = []
        width = hidden_size + self.input_size
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            width = size
        self.trunk = nn.Sequential(*layers)
        for module in self.trunk:
            if isinstance(module, nn.Linear):  # as the MLP policies
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pi = nn.Linear(width, spec.act_dim)
        self.v = nn.Linear(width, 1)
        # As the strong PPO baselines do: a near-uniform (near-zero mean) first policy, a unit-gain value.
        nn.init.orthogonal_(self.pi.weight, gain=0.01)
        nn.init.orthogonal_(self.v.weight, gain=1.0)
        nn.init.zeros_(self.pi.bias)
        nn.init.zeros_(self.v.bias)
        self._act = torch.tanh if activation == "tanh" else torch.relu
        self._layers = [i for i, m in enumerate(self.trunk) if isinstance(m, nn.Linear)]
        if not spec.discrete:
            self.log_std = nn.Parameter(torch.full((spec.act_dim,), float(init_log_std)))

    # -- inputs ------------------------------------------------------------------------------------

    def encode(self, obs: np.ndarray, prev_action: np.ndarray, prev_reward: np.ndarray,
               first: np.ndarray) -> np.ndarray:
        """float32 [batch, input_size] from raw observations, the previous actions (indices, -1
        for none, or vectors), rewards and new-episode flags of a batch of trials."""
        spec = self.spec
        n = len(obs)
        x = np.zeros((n, self.input_size), dtype=np.float32)
        x[:, : spec.obs_dim] = spec.encode_obs(obs)
        if not self.memory:
            return x
        if spec.discrete:  # one-hot; -1 (a trial's first step) has no previous action
            prev = np.asarray(prev_action, dtype=np.int64)
            rows = np.flatnonzero(prev >= 0)
            x[rows, spec.obs_dim + prev[rows]] = 1.0
        else:
            x[:, spec.obs_dim : spec.obs_dim + spec.act_dim] = np.asarray(prev_action).reshape(n, spec.act_dim)
        x[:, -2] = prev_reward
        x[:, -1] = first
        return x

    # -- the forward ---------------------------------------------------------------------------------

    def step(self, params: Params, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step: [batch, input_size], [batch, hidden] -> the new state [batch, hidden]."""
        if not self.memory:
            h = torch.zeros_like(h)
        gi = torch.addmm(params["gru.bias_ih_l0"], x, params["gru.weight_ih_l0"].t())
        gh = torch.addmm(params["gru.bias_hh_l0"], h, params["gru.weight_hh_l0"].t())
        i_r, i_z, i_n = gi.chunk(3, -1)
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n)  # (1 - z) * n + z * h

    def heads(self, params: Params, h: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits or means, value) from the state and the input it was computed from."""
        lead = h.shape[:-1]
        z = torch.cat([h.reshape(-1, self.hidden_size), x.reshape(-1, self.input_size)], dim=1)
        for i in self._layers:
            z = self._act(torch.addmm(params[f"trunk.{i}.bias"], z, params[f"trunk.{i}.weight"].t()))
        out = torch.addmm(params["pi.bias"], z, params["pi.weight"].t())
        value = torch.addmm(params["v.bias"], z, params["v.weight"].t())
        return out.reshape(*lead, -1), value.reshape(lead)

    def head(self, out: torch.Tensor, log_std: torch.Tensor | None) -> Distribution:
        if self.spec.discrete:
            return Categorical(logits=out, validate_args=False)
        return Independent(Normal(out, log_std.exp(), validate_args=False), 1, validate_args=False)

    def unroll(self, params: Params, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trials from their start: inputs [T, B, input_size] -> (outputs [T, B, out], values [T, B]).

        Steps past a trial's end (padding) change nothing before them, so no mask is needed."""
        if self.memory:
            gru = {k.removeprefix("gru."): v for k, v in params.items() if k.startswith("gru.")}
            states = functional_call(self.gru, gru, (inputs, inputs.new_zeros(1, inputs.shape[1], self.hidden_size)))[0]
        else:  # every step from a zero state: all steps at once
            flat = inputs.reshape(-1, inputs.shape[-1])
            states = self.step(params, flat, flat.new_zeros(len(flat), self.hidden_size)).reshape(
                *inputs.shape[:2], self.hidden_size)
        return self.heads(params, states, inputs)

    def dist(self, params: Params, out: torch.Tensor) -> Distribution:
        return self.head(out, None if self.spec.discrete else params["log_std"])

    def params(self) -> Params:
        return OrderedDict((k, v.detach().clone()) for k, v in self.named_parameters())


def build_recurrent_policy(spec: SpaceSpec, hidden_size: int, policy_cfg, seed: int,
                           memory: bool = True) -> RecurrentPolicy:
    """A recurrent policy whose initial weights depend only on ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RecurrentPolicy(spec, hidden_size, policy_cfg.hidden_sizes, policy_cfg.activation,
                               policy_cfg.init_log_std, memory)
