"""The MLP policies' initial weights: policy.init, policy.output_gain and policy.init_log_std."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from metaray.config import ConfigError, dump_config, load_config, load_config_text
from metaray.core.policy import Policy, SpaceSpec, build_policy, flatten, init_linear

CHEETAH = SpaceSpec(17, 0, 6, False, -np.ones(6, np.float32), np.ones(6, np.float32))  # HalfCheetah's sizes
CARTPOLE = SpaceSpec(4, 0, 2, True)
REFERENCE = ["policy.hidden_sizes=[64,64]", "policy.activation=tanh"]


def _policy(spec: SpaceSpec, *overrides: str, seed: int = 0) -> Policy:
    return build_policy(spec, load_config("quickstart", [*REFERENCE, *overrides]).policy, seed)


def _linears(policy: Policy) -> list[nn.Linear]:
    return [m for m in policy.body if isinstance(m, nn.Linear)]


def _xavier_as_before(spec: SpaceSpec, hidden: list[int], seed: int) -> dict[str, torch.Tensor]:
    """The initial weights as metaray drew them before policy.init existed, written out."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        widths = [spec.obs_dim, *hidden, spec.act_dim]
        layers = [nn.Linear(a, b) for a, b in pairwise(widths)]  # torch's init draws first
        for layer in layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    out = {f"body.{2 * k}.{name}": getattr(layer, name)
           for k, layer in enumerate(layers) for name in ("weight", "bias")}
    return out if spec.discrete else {**out, "log_std": torch.zeros(spec.act_dim)}


@pytest.mark.parametrize("spec", [CHEETAH, CARTPOLE])
def test_default_is_the_xavier_init_of_before_bit_for_bit(spec):
    policy = _policy(spec, seed=7)
    expected = _xavier_as_before(spec, [64, 64], seed=7)
    params = policy.params()
    assert params.keys() == expected.keys() and all(torch.equal(params[k], expected[k]) for k in params)
    assert torch.equal(flatten(policy.params()), flatten(_policy(spec, "policy.init=xavier", seed=7).params()))


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_orthogonal_layers_have_the_baselines_gains(activation):
    policy = _policy(CHEETAH, "policy.init=orthogonal", f"policy.activation={activation}")
    *hidden, head = _linears(policy)
    for layer, gain in [*((h, math.sqrt(2)) for h in hidden), (head, 0.01)]:
        w = layer.weight.detach().double()
        small = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # orthonormal rows or columns, times gain
        assert torch.allclose(small, gain**2 * torch.eye(small.shape[0], dtype=torch.float64), atol=1e-5 * gain**2)
        assert not layer.bias.any()


def test_orthogonal_start_has_near_zero_means_xavier_does_not():
    obs = torch.randn(4096, CHEETAH.obs_dim, generator=torch.Generator().manual_seed(0)) * 3
    orth = _policy(CHEETAH, "policy.init=orthogonal")(obs).mean.detach()
    xavier = _policy(CHEETAH)(obs).mean.detach()
    # |mean_j| <= ||head row j|| * ||h|| = 0.01 * sqrt(64) for tanh features in [-1, 1], whatever the input.
    assert orth.abs().max() <= 0.01 * math.sqrt(64) + 1e-6
    assert orth.abs().mean() < 0.02 < 0.2 < xavier.abs().mean()


def test_output_gain_and_init_log_std():
    obs = torch.randn(256, CHEETAH.obs_dim, generator=torch.Generator().manual_seed(1))
    zero = _policy(CHEETAH, "policy.init=orthogonal", "policy.output_gain=0", "policy.init_log_std=-1.6")(obs)
    assert not zero.mean.any() and torch.allclose(zero.stddev, torch.full((256, 6), math.exp(-1.6)))
    base, small = _policy(CHEETAH), _policy(CHEETAH, "policy.output_gain=0.01")  # the same draws, scaled
    head, small_head = _linears(base)[-1], _linears(small)[-1]
    assert torch.allclose(small_head.weight, 0.01 * head.weight)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(_linears(base)[:-1], _linears(small)[:-1]))


def test_weights_depend_only_on_the_seed():
    a, b = (flatten(_policy(CHEETAH, "policy.init=orthogonal", seed=3).params()) for _ in range(2))
    torch.manual_seed(12345)  # the global generator's state is not an input
    c = flatten(_policy(CHEETAH, "policy.init=orthogonal", seed=3).params())
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, flatten(_policy(CHEETAH, "policy.init=orthogonal", seed=4).params()))


@pytest.mark.parametrize("override,expected", [
    ("policy.init=kaiming", "policy.init: Input should be 'xavier' or 'orthogonal' (got 'kaiming')"),
    ("policy.output_gain=-0.5", "policy.output_gain: Input should be greater than or equal to 0"),
    ("policy.output_gain=11", "policy.output_gain: Input should be less than or equal to 10"),
    ("policy.output_gain=.nan", "policy.output_gain: Input should be a finite number"),
    ("policy.output_gain=small", "policy.output_gain: Input should be a valid number"),
    ("policy.init_log_std=-.inf", "policy.init_log_std: Input should be a finite number"),
])
def test_bad_values_name_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("halfcheetah-vel", [override])
    assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        init_linear([nn.Linear(2, 2)], "kaiming")


def test_defaults_dump_as_before_and_set_values_round_trip():
    default = yaml.safe_load(dump_config(load_config("quickstart")))["policy"]
    assert default == {"hidden_sizes": [64, 64], "activation": "tanh", "init_log_std": 0.0}
    cfg = load_config("quickstart", ["policy.init=orthogonal", "policy.output_gain=0.1"])
    assert yaml.safe_load(dump_config(cfg))["policy"]["init"] == "orthogonal"
    assert load_config_text(dump_config(cfg), "dumped") == cfg
