"""Typed, validated run configuration.

A config is a YAML file or the name of a preset shipped in ``metaray/presets``, plus
``--set key.path=value`` overrides. Everything is validated before anything runs, so a
typo fails in a second with the field's name rather than an hour into a run.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from metaray.limits import MAX_CONFIG_BYTES, InputLimitError, load_yaml, one_line, read_text, short_repr

MAX_LAYERS, MAX_WIDTH = 8, 4096
"""policy.hidden_sizes: at most 8 hidden layers of at most 4096 units (about 120M parameters at most)."""


class ConfigError(ValueError):
    """Bad user input: one message naming the file, the field and what is allowed."""


class _Section(BaseModel):
    # inf and nan are no step sizes, discounts or bounds: `--set outer.lr=.inf` fails here, not as NaN weights.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TaskConfig(_Section):
    family: str = "navigation2d"
    """A built-in family (cartpole, navigation2d, bandit) or an import path module:Class."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the family's constructor."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from metaray.tasks import resolve_family_class

        resolve_family_class(value)  # raises ValueError naming the allowed values
        return value

    @model_validator(mode="after")
    def _options_fit_family(self) -> TaskConfig:
        from metaray.tasks import make_family

        make_family(self.family, self.options)
        return self


class PolicyConfig(_Section):
    hidden_sizes: list[int] = Field(default_factory=lambda: [64, 64])
    """Widths of the MLP's hidden layers: 1 to 8 layers of 1 to 4096 units."""
    activation: Literal["tanh", "relu"] = "tanh"
    """Hidden-layer nonlinearity."""
    init: Literal["xavier", "orthogonal"] = "xavier"
    """Initial weights (biases zero). xavier: xavier-uniform, as the MAML reference code.
    orthogonal: as Stable-Baselines3 and CleanRL, orthogonal with gain sqrt(2) in the hidden
    layers and output_gain in the output layer (the means or logits). Not used by rl2, whose
    recurrent policy has its own (orthogonal heads of gain 0.01 and 1 on a xavier trunk)."""
    output_gain: float | None = Field(None, ge=0, le=10)
    """Gain of the output layer's initial weights, 0 to 10; None: the init's own (xavier 1,
    orthogonal 0.01: near-zero first means, so a Gaussian policy starts centred in its action range)."""
    init_log_std: float = 0.0
    """Initial log standard deviation of Gaussian policies (continuous actions); any finite value
    (unbounded as it always was, so earlier run directories still validate)."""

    @field_validator("hidden_sizes")
    @classmethod
    def _positive_widths(cls, value: list[int]) -> list[int]:
        if not value or any(w < 1 for w in value):
            raise ValueError("must be a non-empty list of positive integers")
        if len(value) > MAX_LAYERS or any(w > MAX_WIDTH for w in value):
            raise ValueError(f"at most {MAX_LAYERS} hidden layers of at most {MAX_WIDTH} units each")
        return value

    @model_serializer(mode="wrap")
    def _dump_without_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """init and output_gain appear in a dump only when set away from their defaults: a run
        that leaves them dumps its config as before they existed, so the config.yaml and the
        checkpoints of earlier runs still match (resume compares the policy section)."""
        data = handler(self)
        for key in ("init", "output_gain"):
            if data.get(key) == type(self).model_fields[key].default:
                del data[key]
        return data


class InnerConfig(_Section):
    steps: int = Field(1, ge=1, le=50)
    """Policy-gradient adaptation steps per task."""
    lr: float = Field(0.1, gt=0)
    """Inner (adaptation) step size, as in the MAML paper."""
    episodes: int = Field(20, ge=1, le=10_000)
    """Episodes collected per inner step per task (at most 10,000); for rl2, trials per task."""


class TRPOConfig(_Section):
    max_kl: float = Field(0.01, gt=0)
    """KL bound of the trust region."""
    cg_iters: int = Field(10, ge=1, le=1000)
    """Conjugate-gradient iterations (at most 1,000)."""
    cg_damping: float = Field(1e-5, ge=0)
    """Damping added to the Fisher-vector product."""
    ls_max_steps: int = Field(15, ge=1, le=1000)
    """Backtracking line-search steps (at most 1,000)."""
    ls_backtrack_ratio: float = Field(0.8, gt=0, lt=1)
    """Shrink factor per line-search step."""
    curvature_subsample: int = Field(1, ge=1, le=1000)
    """The Fisher-vector products (and the inner-loss Hessians inside them) see every k-th episode
    of each batch: a curvature minibatch, as in Hessian-free optimisation and OpenAI Baselines' TRPO
    (every 5th sample). 1, the default, is the exact product of the MAML paper. The gradient, the
    adaptation and the line search always use every episode."""


class ProMPConfig(_Section):
    steps: int = Field(5, ge=1, le=1000)
    """Outer optimizer steps per batch of samples (the first at the sampling parameters; at most 1,000)."""
    clip: float = Field(0.3, gt=0, lt=1)
    """Clipping range of the outer likelihood ratio."""
    kl_coef: float = Field(5e-4, ge=0)
    """Weight of the KL penalty between sampling-time and current pre-update policies."""


class ReptileConfig(_Section):
    post_batch: bool = False
    """Also sample a batch at the adapted parameters, only to report the post-adaptation return
    (its env steps are counted apart, as metric_env_steps)."""


class RL2Config(_Section):
    """RL²'s recurrent policy, trials and PPO outer step (used only by algorithm rl2)."""

    hidden_size: int = Field(128, ge=1, le=MAX_WIDTH)
    """Width of the GRU (the policy's memory); policy.hidden_sizes and activation are unused by rl2."""
    episodes_per_trial: int = Field(2, ge=1, le=100)
    """Episodes of one task per trial; the recurrent state carries across them and resets between trials.
    Each task of the meta-batch samples inner.episodes trials."""
    memory: bool = True
    """False resets the state every step and hides the previous action and reward: the memoryless ablation."""
    epochs: int = Field(4, ge=1, le=100)
    """PPO epochs over one iteration's trials."""
    minibatches: int = Field(2, ge=1, le=1000)
    """Minibatches per epoch, each a share of every task's trials (at most inner.episodes)."""
    clip: float = Field(0.2, gt=0, lt=1)
    """Clipping range of PPO's likelihood ratio."""
    value_coef: float = Field(0.5, ge=0)
    """Weight of the value loss 0.5 * (V - return)^2 (the value head shares the GRU)."""
    entropy_coef: float = Field(0.01, ge=0)
    """Weight of the entropy bonus."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Each optimizer step's mean gradient is scaled down to at most this norm."""


class OuterConfig(_Section):
    optimizer: Literal["adam", "sgd", "trpo"] = "adam"
    """Outer optimizer; trpo only for algorithms that support it (maml, pretrain)."""
    lr: float = Field(1e-3, gt=0)
    """Outer step size (unused by trpo, whose step is set by max_kl)."""
    meta_batch_size: int = Field(20, ge=1, le=10_000)
    """Tasks per meta-iteration; independent of the number of workers (at most 10,000)."""
    iterations: int = Field(100, ge=1, le=1_000_000)
    """Meta-iterations to run (at most 1,000,000: the driver keeps a metrics row for each)."""
    trpo: TRPOConfig = Field(default_factory=TRPOConfig)
    promp: ProMPConfig = Field(default_factory=ProMPConfig)
    reptile: ReptileConfig = Field(default_factory=ReptileConfig)


class RolloutConfig(_Section):
    horizon: int = Field(100, ge=1, le=10_000)
    """Maximum steps per episode (at most 10,000: the advantages use a horizon x horizon discount matrix)."""
    gamma: float = Field(0.99, gt=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(1.0, ge=0, le=1)
    """GAE lambda (1.0 = Monte-Carlo returns minus the baseline)."""
    normalize_advantages: bool = True
    """Normalise advantages per task, as the MAML reference code does."""
    task_group_size: int = Field(5, ge=1, le=10_000)
    """Tasks (consecutive task indices) that share one batched policy forward while sampling.
    Part of the numerical recipe: fixed by the config, so no result depends on how tasks
    are spread over workers. Workers get whole groups: meta_batch_size / task_group_size a
    multiple of num_workers balances them."""


class ResourcesConfig(_Section):
    num_workers: int = Field(2, ge=1, le=1024)
    """Worker actors (at most 1,024; on the embedded Ray, num_workers x cpus_per_worker at most
    max(8, 4 x the machine's CPUs))."""
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    """CPUs reserved per worker actor (scheduling only: results do not depend on it)."""
    torch_threads: int = Field(1, ge=1, le=256)
    """Intra-op threads of each worker's torch. Results are bit-identical for any num_workers at a
    given value, not across values (a BLAS sums in another order with more threads)."""
    batch_tasks: bool = True
    """Send each worker its share of the meta-batch in one call and sample its groups together."""
    placement: Literal["spread", "pack"] = "spread"
    """spread: one worker per node where possible; pack: Ray's default, filling a node first."""
    worker_resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources each worker needs (e.g. {"spot": 1} to land on labelled nodes)."""
    task_timeout_s: float | None = Field(None, gt=0, le=7 * 24 * 3600)
    """Dispatch a task again on another worker when it runs longer than this, and sample a task
    again elsewhere when its worker leaves an outer-step request unanswered this long (None: never)."""
    min_valid_fraction: float = Field(0.5, gt=0, le=1)
    """Retry the iteration when fewer of its task results than this fraction are finite."""
    max_iteration_retries: int = Field(2, ge=0, le=100)
    """Fresh, seeded task draws for an iteration with too few finite results before the run fails."""


class CheckpointConfig(_Section):
    every: int = Field(10, ge=1, le=1_000_000)
    """Write a checkpoint every N iterations (and always at the end)."""
    keep: int = Field(3, ge=1, le=10_000)
    """Newest checkpoints kept; older ones are deleted."""


class EvalConfig(_Section):
    tasks: int = Field(20, ge=1, le=10_000)
    """Held-out tasks evaluated at the end of training (at most 10,000)."""
    steps: int = Field(1, ge=0, le=50)
    """Adaptation steps evaluated at the end of training (rl2: episodes of the trial after the first)."""


class Config(_Section):
    algorithm: str = "maml"
    """maml, fomaml, reptile, promp, rl2, pretrain (the no-adaptation baseline) or an import path module:Class."""
    seed: int = Field(0, ge=0, le=2**63 - 1)
    """Root of every random stream of the run (a 64-bit signed integer, as the run's tables store it)."""
    task: TaskConfig = Field(default_factory=TaskConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    outer: OuterConfig = Field(default_factory=OuterConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    rl2: RL2Config = Field(default_factory=RL2Config)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        from metaray.algorithms.base import resolve_algorithm

        resolve_algorithm(value)  # raises ValueError naming the allowed values
        return value

    @model_validator(mode="after")
    def _optimizer_fits_algorithm(self) -> Config:
        from metaray.algorithms.base import resolve_algorithm

        supported = resolve_algorithm(self.algorithm).outer_optimizers
        if self.outer.optimizer not in supported:
            raise ValueError(f"outer.optimizer {self.outer.optimizer!r} does not fit algorithm {self.algorithm!r}; "
                             f"use {' or '.join(map(repr, supported))}")
        subsample = self.outer.trpo.curvature_subsample
        if self.outer.optimizer == "trpo" and subsample > self.inner.episodes:
            raise ValueError(f"outer.trpo.curvature_subsample ({subsample}) must be at most inner.episodes "
                             f"({self.inner.episodes}), the batch it takes every k-th episode of")
        resolve_algorithm(self.algorithm).check_config(self)  # ValueError naming the fields
        return self


def preset_names() -> list[str]:
    folder = resources.files("metaray") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str | Path) -> tuple[dict[str, Any], str]:
    """Return the raw mapping of a YAML file or preset, and a label for messages."""
    path = Path(source)
    try:
        exists = path.exists()
    except OSError:  # a name too long to be a path (ENAMETOOLONG): no file, so a preset name
        exists = False
    if path.suffix in (".yaml", ".yml") or exists:
        if not exists:
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a regular file")
        label = str(path)
        try:
            text = read_text(path)  # at most 1 MiB of UTF-8
        except InputLimitError as err:
            raise ConfigError(str(err)) from None
    else:
        name = str(source)
        if name not in preset_names():
            raise ConfigError(
                f"unknown preset {short_repr(name)}: allowed presets are {', '.join(preset_names())} "
                "(or give a path to a .yaml file)"
            )
        text = (resources.files("metaray") / "presets" / f"{name}.yaml").read_text()
        label = f"preset {name}"
    return _parse(text, label), label


def _parse(text: str, label: str) -> dict[str, Any]:
    """The mapping a config's YAML text holds, read within bounds; ConfigError naming ``label``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{label} is larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        data = load_yaml(text)  # bounded: size after alias expansion, depth, integer length
    except InputLimitError as err:
        raise ConfigError(f"{label}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(one_line(f"{label} is not valid YAML{where}: {problem}")) from None
    except ValueError as err:  # a scalar no value fits, such as the date 2001-13-45
        raise ConfigError(one_line(f"{label} is not valid YAML: {err}")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must hold a mapping of config sections, not {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.path=value`` override in place; the value is parsed as YAML."""
    shown = short_repr(assignment)
    if "=" not in assignment:
        raise ConfigError(f"--set {shown}: expected key.path=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {shown}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except InputLimitError as err:  # within YAML's syntax but beyond a bound: refused, not taken as text
        raise ConfigError(f"--set {shown}: {err}") from None
    except (yaml.YAMLError, ValueError):  # not YAML (or a scalar no value fits): the text itself
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {shown}: {short_repr(part)} is not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, label: str) -> str:
    """The first error on one line; an echoed input or key is cut to 100 characters, so that
    no input, however large, makes the message large (or slow to build)."""
    first = error.errors(include_url=False, include_context=False)[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = one_line(first["msg"].removeprefix("Value error, "), 400)
    if first["type"] == "extra_forbidden":
        section = _section_model(first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return f"{label}: unknown key {short_repr(loc)}; allowed keys here: {allowed}"
    got = first.get("input")
    shown = "" if isinstance(got, dict) else f" (got {short_repr(got)})"
    return f"{label}: {one_line(loc, 100)}: {msg}{shown}"


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def validate(data: dict[str, Any], label: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, label)) from None


def load_config(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a preset name or YAML path, apply overrides, validate; raises ConfigError."""
    data, label = _read_source(source)  # parsed afresh: overrides may change it in place
    return _with_overrides(data, label, overrides)


def load_config_text(text: str, label: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """As ``load_config``, for YAML text that is not in a file (a submitted job's resolved config)."""
    return _with_overrides(_parse(text, label), label, overrides)


def _with_overrides(data: dict[str, Any], label: str, overrides: list[str] | tuple[str, ...]) -> Config:
    for assignment in overrides:
        apply_override(data, assignment)
    return validate(data, label + (" with --set overrides" if overrides else ""))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
