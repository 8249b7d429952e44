"""Config loading and bad input: one clear message, exit code 2, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaray.config import Config, ConfigError, load_config, preset_names, validate
from tests.conftest import run_cli


def test_every_preset_loads():
    assert "quickstart" in preset_names()
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config("quickstart", ["inner.lr=0.05", "policy.hidden_sizes=[32, 16]", "task.options.low=-1",
                                     "outer.trpo.max_kl=0.02", "algorithm=fomaml"])
    assert cfg.inner.lr == 0.05 and cfg.policy.hidden_sizes == [32, 16]
    assert cfg.task.options == {"low": -1} and cfg.outer.trpo.max_kl == 0.02 and cfg.algorithm == "fomaml"


@pytest.mark.parametrize("overrides,expected", [
    (["inner.lrr=0.1"], "unknown key 'inner.lrr'; allowed keys here: steps, lr, episodes"),
    (["inner.steps=two"], "inner.steps: Input should be a valid integer"),
    (["inner.lr=-1"], "inner.lr: Input should be greater than 0"),
    (["algorithm=ppo"], "algorithm: unknown algorithm 'ppo': use one of maml, fomaml, reptile, promp, pretrain"),
    (["task.family=atari"], "unknown task family 'atari'; allowed: cartpole, navigation2d, bandit"),
    (["task.family=no_such_module:Family"], "cannot import module 'no_such_module'"),
    (["task.family=tests.custom_family:Nope"], "has no attribute 'Nope'"),
    (["task.options.arms=3"], "task.options for family 'navigation2d'"),
    (["algorithm=reptile", "outer.optimizer=trpo"], "outer.optimizer 'trpo' does not fit algorithm 'reptile'"),
    (["outer.optimizer=trpo", "inner.episodes=4", "outer.trpo.curvature_subsample=5"],
     "outer.trpo.curvature_subsample (5) must be at most inner.episodes (4)"),
    (["algorithm=tests.custom_family:GoalLine"], "is not a subclass of metaray.algorithms.base.Algorithm"),
    (["algorithm=nowhere.mod:Algo"], "cannot import algorithm 'nowhere.mod:Algo'"),
    (["outer.optimizer=rmsprop"], "outer.optimizer: Input should be 'adam', 'sgd' or 'trpo'"),
    (["outer.lr=.inf"], "outer.lr: Input should be a finite number"),
    (["inner.lr=.nan"], "inner.lr: Input should be a finite number"),
    (["rollout.gamma=-.inf"], "rollout.gamma: Input should be a finite number"),
])
def test_bad_config_names_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config("quickstart", overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("args,expected", [
    (["quickstart", "-s", "inner.lrr=0.1"], "unknown key 'inner.lrr'"),
    (["quickstart", "-s", "inner.episodes=many"], "inner.episodes: Input should be a valid integer"),
    (["quickstart", "-s", "rollout.gamma=1.5"], "rollout.gamma: Input should be less than or equal to 1"),
    (["quickstart", "-s", "task.family=atari"], "unknown task family 'atari'"),
    (["no-such-preset"], "unknown preset 'no-such-preset': allowed presets are"),
    (["quickstart", "-s", "task.family=not_a_module_xyz:Fam"], "cannot import module 'not_a_module_xyz'"),
    (["BAD_YAML"], "is not valid YAML"),
])
def test_cli_rejects_bad_config_with_exit_2_and_writes_nothing(tmp_path: Path, args, expected):
    if args[0] == "BAD_YAML":
        bad = tmp_path / "bad.yaml"
        bad.write_text("algorithm: maml\ninner: {steps: 1\n")
        args = [str(bad)]
    out = tmp_path / "run"
    proc = run_cli("train", *args, "--output", str(out))
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, "expected one line of error"
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_train_refuses_a_non_empty_run_dir(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("precious")
    proc = run_cli("train", "quickstart", "--output", str(tmp_path))
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (tmp_path / "keep.txt").read_text() == "precious"


_VALID = load_config("quickstart").model_dump(mode="json")
_leaves = [("algorithm",), ("seed",), ("task", "family"), ("policy", "hidden_sizes"), ("policy", "activation"),
           ("inner", "steps"), ("inner", "lr"), ("outer", "optimizer"), ("outer", "meta_batch_size"),
           ("rollout", "gamma"), ("resources", "num_workers"), ("checkpoint", "every"), ("bogus",),
           ("inner", "bogus")]
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 500), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-3, 70), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.sampled_from(_leaves), _values), min_size=1, max_size=3))
def test_random_mutations_load_or_fail_cleanly(mutations):
    data = yaml.safe_load(yaml.safe_dump(_VALID))
    for path, value in mutations:
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    try:
        validate(data, "mutated")
    except ConfigError as err:
        assert str(err).startswith("mutated") and "\n" not in str(err)
