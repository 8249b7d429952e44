"""RL²: the recurrent policy, its trials, PPO's gradient, the learner half, and learning with memory."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from metaray.algorithms.rl2 import RL2, ppo_gradient, ppo_loss
from metaray.config import ConfigError, load_config
from metaray.core import seeding
from metaray.core.policy import flatten
from metaray.core.recurrent import RecurrentPolicy
from metaray.core.task_worker import TaskWorker
from metaray.core.trial_worker import sample_trials
from metaray.core.trials import Trials

BANDIT = ["algorithm=rl2", "task.family=bandit", "task.options={arms: 3}", "rollout.horizon=1",
          "rl2.episodes_per_trial=6", "inner.episodes=6", "rl2.hidden_size=8", "policy.hidden_sizes=[16]"]
FAMILIES = {
    "bandit": BANDIT,  # discrete actions, one step per episode
    # discrete, episodes that end early
    "cartpole": ["algorithm=rl2", "task.family=cartpole", "rollout.horizon=15", "rl2.episodes_per_trial=3",
                 "inner.episodes=5", "rl2.hidden_size=8", "policy.hidden_sizes=[16]"],
    "navigation2d": ["algorithm=rl2", "rollout.horizon=8", "rl2.episodes_per_trial=2", "inner.episodes=4",
                     "rl2.hidden_size=8", "policy.hidden_sizes=[16]"],  # Gaussian
}


@pytest.fixture(autouse=True)
def one_thread():
    """The workers' recipe (resources.torch_threads=1); more threads only spin on these tiny kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trials(family: str, tasks: int = 2, extra: tuple[str, ...] = ()) -> tuple[TaskWorker, list[Trials]]:
    cfg = load_config("quickstart", [*FAMILIES[family], *extra])
    worker = TaskWorker(cfg)
    jobs = [(i, t, np.random.default_rng(100 + i)) for i, t in enumerate(seeding.train_tasks(worker.family, 0, 0,
                                                                                                tasks))]
    trials, _ = sample_trials(worker, flatten(worker.template).numpy(), jobs, cfg.rl2.episodes_per_trial)
    return worker, trials


def _double(trials: Trials) -> Trials:
    cast = {f.name: getattr(trials, f.name) for f in dataclasses.fields(trials)}
    for name, value in cast.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            cast[name] = value.double()
    return Trials(**cast)


def test_the_step_and_the_fused_unroll_are_torchs_gru():
    """The sampler's written-out step against torch's nn.GRUCell, and the loss path's fused unroll
    against stepping: independent computations of the same GRU."""
    worker, (trials, _) = _trials("navigation2d")
    policy, params = worker.policy, worker.template
    cell = nn.GRUCell(policy.input_size, policy.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(params[f"gru.{name}_l0"] + 0.1)  # away from the init
    shifted = {k: (v + 0.1 if k.startswith("gru.") else v) for k, v in params.items()}
    h = torch.randn(4, policy.hidden_size)
    x = trials.inputs[3]
    assert torch.allclose(policy.step(shifted, x, h), cell(x, h), atol=1e-6)
    out, values = policy.unroll(shifted, trials.inputs)
    h = torch.zeros(trials.inputs.shape[1], policy.hidden_size)
    for t in range(trials.inputs.shape[0]):
        h = cell(trials.inputs[t], h)
        step_out, step_value = policy.heads(shifted, h, trials.inputs[t])
        assert torch.allclose(out[t], step_out, atol=1e-5) and torch.allclose(values[t], step_value, atol=1e-5)


@pytest.mark.parametrize("family", ["bandit", "navigation2d"])
def test_ppo_gradient_matches_finite_differences(family):
    """Autograd's gradient of the PPO loss through the unrolled GRU, against central differences of
    the loss along random directions (float64), off the sampling parameters so the ratio is not 1."""
    torch.manual_seed(0)
    worker, (trials, _) = _trials(family)
    policy = worker.policy.double()
    trials = _double(trials)
    theta = {k: v.double() + 0.05 * torch.randn_like(v.double()) for k, v in worker.template.items()}
    grad, loss = ppo_gradient(policy, theta, trials, clip=0.2, value_coef=0.5, entropy_coef=0.01)
    assert np.isfinite(loss) and grad.norm() > 0
    flat = flatten(theta)
    for _ in range(3):
        d = torch.randn_like(flat)
        d /= d.norm()

        def at(x: torch.Tensor) -> float:
            offset, p = 0, {}
            for k, v in theta.items():
                p[k] = x[offset: offset + v.numel()].view_as(v)
                offset += v.numel()
            return float(ppo_loss(policy, p, trials, 0.2, 0.5, 0.01)[0])

        eps = 1e-6
        numeric = (at(flat + eps * d) - at(flat - eps * d)) / (2 * eps)
        assert abs(float(grad @ d) - numeric) <= 1e-6 + 1e-4 * abs(numeric), (float(grad @ d), numeric)


@pytest.mark.parametrize("family", ["bandit", "cartpole", "navigation2d"])
def test_trials_carry_the_state_across_episodes_and_start_each_trial_from_zero(family):
    worker, (trials, _) = _trials(family)
    policy, params = worker.policy, worker.template
    n, obs_dim, act_dim = trials.mask.shape[1], policy.spec.obs_dim, policy.spec.act_dim
    # Each trial alone, unrolled from a zero state through all its episodes, gives the sampler's
    # log-probabilities and values: the state started at zero and was never reset inside the trial.
    for j in range(n):
        steps = int(trials.mask[:, j].sum())
        out, values = policy.unroll(params, trials.inputs[:steps, j: j + 1])
        lp = policy.dist(params, out).log_prob(trials.actions[:steps, j: j + 1])
        assert torch.allclose(lp, trials.log_probs[:steps, j: j + 1], atol=1e-5)
        assert torch.allclose(values, trials.values[:steps, j: j + 1], atol=1e-5)
    # The inputs: no previous action, reward or flag at a trial's start; then the previous step's
    # action and reward, and the flag on the first step of every later episode.
    x = trials.inputs
    assert torch.equal(x[0, :, obs_dim:], torch.zeros(n, act_dim + 2))
    ends = np.cumsum(trials.episode_steps, axis=0)  # [episodes, n]
    for j in range(n):
        steps = int(ends[-1, j])
        firsts = set(ends[:-1, j].tolist())
        for t in range(1, steps):
            assert float(x[t, j, -1]) == (1.0 if t in firsts else 0.0)
            assert float(x[t, j, -2]) == float(trials.rewards[t - 1, j])
            prev = trials.actions[t - 1, j]
            if policy.spec.discrete:
                assert int(x[t, j, obs_dim: obs_dim + act_dim].argmax()) == int(prev)
            else:
                low, high = policy.spec.act_low, policy.spec.act_high
                assert np.allclose(x[t, j, obs_dim: obs_dim + act_dim].numpy(), np.clip(prev.numpy(), low, high))
    # Every step is counted in exactly one episode, and the returns are the rewards' sums.
    assert int(trials.mask.sum()) == trials.steps
    assert np.isclose(trials.episode_returns.sum(), float(trials.rewards.sum()), atol=1e-4)


def test_the_state_carries_what_an_earlier_episode_revealed_and_the_ablation_forgets_it():
    """Changing only the first episode's rewards changes the second episode's actions'
    probabilities with memory, and changes nothing without it."""
    worker, (trials, _) = _trials("navigation2d")
    ep1 = int(trials.episode_steps[0, 0])
    changed = trials.inputs.clone()
    changed[1:ep1, :, -2] += 1.0  # the previous-reward inputs inside episode 1
    for memory, differs in ((True, True), (False, False)):
        policy = RecurrentPolicy(worker.policy.spec, worker.policy.hidden_size, [16], memory=memory)
        params = worker.template
        a, _ = policy.unroll(params, trials.inputs)
        b, _ = policy.unroll(params, changed)
        late = slice(ep1, ep1 + 3)  # the second episode's first steps, whose own inputs are unchanged
        assert (not torch.allclose(a[late], b[late], atol=1e-7)) is differs


def test_trial_results_do_not_depend_on_which_tasks_are_sampled_together():
    cfg = load_config("quickstart", [*FAMILIES["cartpole"], "rollout.task_group_size=2", "outer.meta_batch_size=4"])
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    jobs = [(i, t, seeding.train_episode_seed(0, 0, i)) for i, t in enumerate(seeding.train_tasks(worker.family, 0, 0,
                                                                                                      4))]
    together = worker.run_tasks(flat, jobs, 0)
    later = TaskWorker(cfg)
    apart = later.run_tasks(flat, jobs[2:], 0) + later.run_tasks(flat, jobs[:2], 0)
    for a, b in zip(together, sorted(apart, key=lambda r: r.task_index)):
        assert a.task_index == b.task_index and np.array_equal(a.vector, b.vector)
        assert (a.pre_return, a.post_return, a.env_steps) == (b.pre_return, b.post_return, b.env_steps)
    # A later optimizer step's gradient from the kept trials, asked of either worker.
    moved = flat + 0.01
    assert np.array_equal(worker.answer(0, 1, "gradient", moved, np.asarray(3)),
                          later.answer(0, 1, "gradient", moved, np.asarray(3)))


class _FakeOuter:
    """A stand-in OuterContext: the learner half's arithmetic without workers."""

    def __init__(self, answers: list[np.ndarray]) -> None:
        self.params = torch.nn.Parameter(torch.zeros(2))
        self.rejected, self.answers, self.asked, self.applied = 0, answers, [], []

    def apply(self, gradient: torch.Tensor) -> None:
        self.applied.append(gradient.clone().float())
        with torch.no_grad():
            self.params -= gradient.float()

    def ask(self, request: str, *args: np.ndarray) -> list:
        assert request == "gradient"
        self.asked.append(int(args[1]))
        return self.answers


def test_learner_half_takes_epochs_times_minibatches_clipped_steps():
    cfg = load_config("quickstart", [*BANDIT, "rl2.epochs=2", "rl2.minibatches=3", "rl2.max_grad_norm=0.5",
                                     "outer.meta_batch_size=3"])
    rl2 = RL2(cfg, None, None)
    small, big, bad = np.array([0.1, 0.0]), np.array([3.0, 4.0]), np.array([np.nan, 0.0])
    outer = _FakeOuter([small, big, bad])  # each later step: the mean of the two finite answers
    rl2.outer_step(outer, torch.tensor([0.3, 0.4]))
    assert outer.asked == [1, 2, 3, 4, 5] and outer.rejected == 5
    assert torch.allclose(outer.applied[0], torch.tensor([0.3, 0.4]))  # norm 0.5: not scaled
    later = torch.tensor([1.55, 2.0])
    assert all(torch.allclose(g, later * (0.5 / later.norm())) for g in outer.applied[1:])
    outer = _FakeOuter([bad, bad, small])  # too few finite answers: no step on them
    rl2.outer_step(outer, torch.tensor([0.3, 0.4]))
    assert outer.asked == [1] and len(outer.applied) == 1


def test_rl2_config_is_checked():
    with pytest.raises(ConfigError, match=r"rl2\.minibatches=8 is more than the inner\.episodes=6"):
        load_config("quickstart", [*BANDIT, "rl2.minibatches=8"])
    with pytest.raises(ConfigError, match=r"rl2\.hidden_size"):
        load_config("quickstart", [*BANDIT, "rl2.hidden_size=0"])
    with pytest.raises(ConfigError, match=r"outer\.optimizer 'trpo' does not fit algorithm 'rl2'"):
        load_config("quickstart", [*BANDIT, "outer.optimizer=trpo"])
    for option in ("policy.init=orthogonal", "policy.output_gain=0.5"):
        with pytest.raises(ConfigError, match=r"policy\.init and policy\.output_gain do not apply to rl2"):
            load_config("quickstart", [*BANDIT, option])


# The bandit-rl2 preset: the dependent bandit (arms paying p and 1 - p); without memory every
# pull pays 0.5 in expectation, a policy that remembers its first pulls can approach 0.75.
LEARN = ["outer.iterations=40", "checkpoint.every=1000"]


def test_rl2_learns_to_use_its_memory_on_held_out_tasks(ray_local, tmp_path):
    """Fixed seeds, real Ray (2 workers): on held-out tasks, the trial's later pulls beat its first
    by 0.1, and beat the same PPO and budget without memory by 0.1."""
    from metaray.evaluation.comparisons import pretrain_config
    from metaray.training.run_dir import RunDir
    from metaray.training.trainer import train

    curves = {}
    memory = load_config("bandit-rl2", LEARN)
    for name, cfg in (("memory", memory), ("memoryless", pretrain_config(memory))):
        run = RunDir(tmp_path / name)
        run.prepare(cfg, overwrite=False)
        curves[name] = train(cfg, run, log=lambda _: None)["eval"].mean_return
    first, late = curves["memory"][0], float(np.mean(curves["memory"][5:]))
    baseline = float(np.mean(curves["memoryless"][5:]))
    print(f"rl2 dependent bandit: per pull {np.round(curves['memory'], 3)}; "
          f"memoryless {np.round(curves['memoryless'], 3)}")
    assert late > first + 0.1
    assert late > baseline + 0.1


def test_adapting_an_rl2_policy_runs_one_trial_and_leaves_the_weights():
    """What `eval` and the service's /adapt do for RL²: a trial of steps + 1 episodes, step k its
    (k+1)-th episode; the first episodes do not depend on how many follow; the weights are theta's."""
    cfg = load_config("quickstart", FAMILIES["navigation2d"])
    worker = TaskWorker(cfg)
    flat = flatten(worker.template).numpy()
    task = seeding.eval_tasks(worker.family, 0, 1)[0]
    short = worker.adapt_to(flat, task, 1, seeding.eval_episode_seed(0, 0))
    long = worker.adapt_to(flat, task, 3, seeding.eval_episode_seed(0, 0))
    assert len(long[0]) == 4 and long[0][:2] == short[0] and long[1][:2] == short[1]
    assert all(0 < s <= cfg.inner.episodes * cfg.rollout.horizon for s in long[1])
    assert all(torch.equal(long[2][k], worker.template[k]) for k in worker.template)
