"""Training configuration: plain defaults, an optional config file, command-line overrides.

Every setting of ``train.py`` is one field of :class:`TrainConfig`. The command line
has one ``--flag-name`` per field (``feature_dim`` -> ``--feature-dim``), generated from
the dataclass so that the two never drift apart. Precedence, lowest first:

1. the defaults below (the documented default run),
2. a config file given with ``--config FILE`` (``.toml`` or ``.json``; keys are field
   names, with ``_`` or ``-``),
3. flags given on the command line.

Example:
    >>> cfg, given = parse_args(["--method", "baseline", "--max-steps", "3"])
    >>> cfg.method, cfg.max_steps, cfg.backbone, sorted(given)
    ('baseline', 3, 'cnn', ['max_steps', 'method'])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkhorn_ot.options import BACKENDS as SOLVER_BACKENDS
from sinkhorn_ot.options import GRADS as SOLVER_GRADS

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON config files still work
    tomllib = None

__all__ = [
    "BACKBONES",
    "DATA_KINDS",
    "MATCHING_METHODS",
    "METHODS",
    "RESUMABLE_OVERRIDES",
    "TrainConfig",
    "build_parser",
    "load_config_file",
    "matching_config",
    "parse_args",
]

METHODS = ("baseline", "elim", "elim-attention")
"""Training methods: the regression loss only; + OT identity matching (ELIM-Sinkhorn);
+ matching whose ID shift is a learned cross-attention weight (ELIM-Attention, appendix
§4.3, :class:`elim.attention.ELIMAttention`). ELIM-Age is not a method but a domain:
``--method elim --domain age``. ``elim.models.build_model``, ``build_optimizers`` and
``train.py``'s ``train_step`` are the only places that branch on the method."""
MATCHING_METHODS = ("elim", "elim-attention")
"""Methods that add the ELIM loss (and need several domains per batch)."""
BACKBONES = ("cnn", "alexnet", "resnet18", "mixer")
DATA_KINDS = ("synthetic", "csv", "afew-va", "affectnet")
UPDATES = ("two-step", "combined")
DEFAULT_SAMPLES_PER_IDENTITY = 12
"""K when ``--samples-per-identity`` is left out and the data has enough domains: more
than the Gumbel top-10, so that the sampling selects."""
_PEOPLE = {"n_train_identities": 96, "train_images_per_identity": 32, "va_spread": 0.3}
CONFOUNDING_LEVELS = {
    "none": {**_PEOPLE, "confounding": 0.0},
    "partial": {**_PEOPLE, "confounding": 0.5},
    "strong": {
        "n_train_identities": 48,
        "train_images_per_identity": 64,
        "va_spread": 0.15,
        "confounding": 1.0,
    },
}
"""``--confounding`` levels of the synthetic faces -> ``SyntheticConfig`` fields.

``strong`` is the generator's default (and the only setting of earlier releases): 48
training people x 64 images, each person's labels within 0.15 of their own centre
(about 87 % of the label variance lies between people), and skin, background, hair and
light following that centre. ``partial`` (the default) and ``none`` have 96 people x 32
images whose labels spread 0.3 around their centre, and appearance that follows the
centre at half strength or not at all. Held-out people are never confounded."""
SINKHORN_MODES = ("paper", "converged")

RESUMABLE_OVERRIDES = frozenset(
    {
        "max_steps",
        "epochs",
        "eval_every",
        "ckpt_every",
        "log_every",
        "device",
        "threads",
        "workers",
        "plots",
        "progress",
        "resume",
        "out",
        "cache",
    }
)
"""Fields that ``--resume`` may change; any other field is taken from the checkpoint,
because changing it mid-run would silently produce a different experiment."""


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    """All settings of one training run (see ``train.py --help``)."""

    # ----------------------------------------------------------------- method
    method: str = field(
        default="elim",
        metadata=_help(
            "baseline: regression loss only; elim: + OT identity matching; "
            "elim-attention: + matching with a learned cross-attention ID shift",
            choices=METHODS,
        ),
    )
    update: str = field(
        default="two-step",
        metadata=_help(
            "two-step: the released code's main step then a separate ELIM step on "
            "recomputed features (two optimiser steps per iteration); combined: one "
            "backward of main + ELIM loss and one optimiser step",
            choices=UPDATES,
        ),
    )
    # ----------------------------------------------------------------- data
    data: str = field(default="synthetic", metadata=_help("data source", choices=DATA_KINDS))
    data_root: str | None = field(
        default=None,
        metadata=_help(
            "data folder; default examples/elim/data_cache/synthetic for --data synthetic "
            "(generated on first use)"
        ),
    )
    confounding: str = field(
        default="partial",
        metadata=_help(
            "synthetic data: how much a training identity's labels and appearance go "
            "together: none, partial or strong (the faces of earlier releases); see "
            "elim.config.CONFOUNDING_LEVELS. Held-out identities are never confounded",
            choices=tuple(CONFOUNDING_LEVELS),
        ),
    )
    validation_identities: int = field(
        default=0,
        metadata=_help(
            "evaluate on the last N TRAINING identities (trained without them) instead of "
            "the held-out ones: for choosing a recipe without looking at the test set"
        ),
    )
    image_size: int = field(default=32, metadata=_help("network input side in pixels"))
    domain: str = field(
        default="auto",
        metadata=_help(
            "what a matching domain is: identity, age (ELIM-Age: 5 age groups, needs ages "
            "in [18, 85)), image, or auto (identity for synthetic/csv/afew-va; age group "
            "for affectnet with --age-file, else image)",
            choices=("auto", "identity", "age", "image"),
        ),
    )
    age_file: str | None = field(default=None, metadata=_help("per-image or per-identity ages CSV"))
    identity: str = field(
        default="clip",
        metadata=_help("AFEW-VA identity: the clip or the actor", choices=("clip", "actor")),
    )
    cache: str = field(
        default="auto",
        metadata=_help(
            "keep the decoded, resized images in memory (auto: when they fit in 2 GiB)",
            choices=("auto", "on", "off"),
        ),
    )
    workers: int = field(default=0, metadata=_help("DataLoader workers when not cached"))
    synthetic_overrides: dict = field(
        default_factory=dict,
        metadata=_help(
            "config-file only: SyntheticConfig fields to change (tests and experiments; "
            "reported results use the frozen defaults)",
            cli=False,
        ),
    )
    # ----------------------------------------------------------------- model
    backbone: str = field(
        default="cnn",
        metadata=_help(
            "encoder f_phi: cnn (a small CNN for CPU training from scratch), or the "
            "paper's alexnet, resnet18, mixer",
            choices=BACKBONES,
        ),
    )
    feature_dim: int = field(default=64, metadata=_help("feature size D"))
    pretrained: str | None = field(
        default=None, metadata=_help("local state_dict of the torchvision/timm backbone")
    )
    # ----------------------------------------------------------------- batches
    batch_size: int = field(default=120, metadata=_help("images per step and process: P x K"))
    samples_per_identity: int | None = field(
        default=None,
        metadata=_help(
            "K of the P x K identity-aware sampler; default 12, or as many as it takes to "
            "fit the data's domains (5 age groups with --domain age: 5 x batch/5)"
        ),
    )
    epochs: int = field(
        default=60, metadata=_help("passes over the training images (60 x 25 = 1500 iterations)")
    )
    max_steps: int | None = field(
        default=None, metadata=_help("stop after this many iterations (overrides --epochs)")
    )
    # ----------------------------------------------------------------- ELIM matching
    num_domains: int = field(default=10, metadata=_help("identities matched per step (1 ref)"))
    top_k: int = field(default=10, metadata=_help("Gumbel top-k per identity; 0 keeps all"))
    gumbel_temperature: float = field(default=0.5, metadata=_help("Gumbel-softmax temperature"))
    ot_eps: float = field(default=0.2, metadata=_help("Sinkhorn eps (the code's lambda = 1/eps)"))
    sinkhorn: str = field(
        default="paper",
        metadata=_help(
            "paper: Algorithm 1, kernel form, T fixed iterations; converged: log domain "
            "run to --ot-tol",
            choices=SINKHORN_MODES,
        ),
    )
    ot_iters: int | None = field(
        default=None, metadata=_help("Sinkhorn iterations: T (paper, 5) or the cap (1000)")
    )
    ot_tol: float = field(default=1e-5, metadata=_help("tolerance of --sinkhorn converged"))
    ot_grad: str = field(
        default="none",
        metadata=_help(
            "none: the shift is computed from detached features (released code); "
            "implicit/envelope/unroll: differentiate through the solver",
            choices=SOLVER_GRADS,
        ),
    )
    ot_backend: str = field(
        default="auto",
        metadata=_help(
            "solver backend of the matching: auto (the native kernels, built on first "
            "use, else torch), torch or native",
            choices=SOLVER_BACKENDS,
        ),
    )
    shift: str = field(
        default="vector",
        metadata=_help(
            "vector: one ID shift per target sample; scalar: the released code's single value",
            choices=("vector", "scalar"),
        ),
    )
    mass: str = field(
        default="target",
        metadata=_help(
            "common mass of the relevance weights", choices=("target", "unit", "reference")
        ),
    )
    elim_weight: float = field(default=0.5, metadata=_help("weight of the ELIM loss"))
    ramp_start: int = field(default=5, metadata=_help("first iteration of the ELIM loss"))
    ramp_end: int = field(default=50, metadata=_help("iteration from which its ramp is 1"))
    per_domain_projector: bool = field(
        default=True,
        metadata=_help("ELIM loss: one projector call (BatchNorm batch) per identity"),
    )
    elim_bn_stats: str = field(
        default="freeze",
        metadata=_help(
            "projector BatchNorm running statistics during the ELIM loss: freeze (they "
            "describe raw features, which is what evaluation feeds) or update (released "
            "code: the normalised target features overwrite them)",
            choices=("freeze", "update"),
        ),
    )
    clip_grad: float = field(
        default=1.0, metadata=_help("encoder grad-norm clip of the ELIM step; 0 disables")
    )
    attention_heads: int = field(
        default=8, metadata=_help("elim-attention: heads of both MHA layers (divide D)")
    )
    # ----------------------------------------------------------------- optimiser
    lr: float = field(default=2e-3, metadata=_help("Adam lr of the encoder"))
    projector_lr_mult: float = field(
        default=0.2, metadata=_help("projector lr = this x --lr (released code: 0.2)")
    )
    attention_lr_mult: float = field(
        default=1.0,
        metadata=_help(
            "elim-attention: lr of the attention module = this x --lr (it starts from "
            "random weights, like the encoder; the paper gives no value)"
        ),
    )
    betas: tuple[float, float] = field(default=(0.5, 0.99), metadata=_help("Adam betas"))
    weight_decay: float = field(default=0.0, metadata=_help("Adam weight decay"))
    milestones: tuple[int, ...] = field(
        default=(1000, 1300),
        metadata=_help(
            "MultiStepLR milestones, in iterations (released code: 500, 2500, 5000, "
            "7500, 10000 over a longer run)"
        ),
    )
    gamma: float = field(default=0.3, metadata=_help("MultiStepLR factor (released code: 0.8)"))
    # ----------------------------------------------------------------- run
    seed: int = field(default=0, metadata=_help("seed of weights, batches, augmentation, matching"))
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N"))
    threads: int = field(
        default=1,
        metadata=_help(
            "torch CPU threads per process. Fixed (not taken from the machine's load) "
            "because the thread count changes the order of float sums, hence the numbers: "
            "the same command gives the same metrics at any load"
        ),
    )
    out: str | None = field(
        default=None, metadata=_help("output folder; default examples/elim/runs/METHOD")
    )
    resume: str | None = field(
        default=None,
        metadata=_help("checkpoint to continue from; '--resume' alone = OUT/checkpoint.pt"),
    )
    eval_every: int = field(
        default=250, metadata=_help("also evaluate every N iterations; 0 = only at the end")
    )
    ckpt_every: int = field(default=250, metadata=_help("checkpoint every N iterations"))
    log_every: int = field(default=1, metadata=_help("write the step log every N iterations"))
    plots: bool = field(default=True, metadata=_help("save the scatter and curve plots"))
    progress: bool = field(default=True, metadata=_help("tqdm progress bars"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values that argparse cannot (ranges and cross-field constraints).

        Raises:
            ValueError: naming the offending field and its value.
        """
        for name, choices in (
            ("method", METHODS),
            ("update", UPDATES),
            ("data", DATA_KINDS),
            ("backbone", BACKBONES),
            ("sinkhorn", SINKHORN_MODES),
            ("ot_grad", SOLVER_GRADS),
            ("ot_backend", SOLVER_BACKENDS),
            ("confounding", tuple(CONFOUNDING_LEVELS)),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}")
        positive = ("image_size", "feature_dim", "batch_size", "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.samples_per_identity is not None and self.samples_per_identity < 1:
            raise ValueError(
                f"`samples_per_identity` must be >= 1, got {self.samples_per_identity}"
            )
        if self.samples_per_identity is not None and self.batch_size % self.samples_per_identity:
            raise ValueError(
                f"`batch_size` ({self.batch_size}) must be a multiple of "
                f"`samples_per_identity` ({self.samples_per_identity}): batches are P x K"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"`max_steps` must be >= 0, got {self.max_steps}")
        if self.num_domains < 2:
            raise ValueError(f"`num_domains` must be >= 2, got {self.num_domains}")
        for name in ("top_k", "eval_every", "workers", "ramp_start", "validation_identities"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}")
        for name in ("ckpt_every", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.ramp_end < max(self.ramp_start, 1):
            raise ValueError(
                f"`ramp_end` must be >= max(ramp_start, 1), got {self.ramp_end} "
                f"(ramp_start {self.ramp_start})"
            )
        if not self.ot_eps > 0 or not self.lr > 0 or not self.ot_tol > 0:
            raise ValueError(
                f"`ot_eps`, `lr` and `ot_tol` must be > 0, got {self.ot_eps}, {self.lr}, {self.ot_tol}"
            )
        if self.ot_iters is not None and self.ot_iters < 1:
            raise ValueError(f"`ot_iters` must be >= 1, got {self.ot_iters}")
        if len(self.betas) != 2:
            raise ValueError(f"`betas` must hold two numbers, got {self.betas}")
        if self.clip_grad < 0:
            raise ValueError(f"`clip_grad` must be >= 0, got {self.clip_grad}")
        # Only checked where it is used, so that any D stays valid for the other methods.
        if self.method == "elim-attention" and (
            self.attention_heads < 1 or self.feature_dim % self.attention_heads
        ):
            raise ValueError(
                f"`attention_heads` must be a positive divisor of feature_dim "
                f"({self.feature_dim}), got {self.attention_heads}"
            )
        if not self.attention_lr_mult > 0:
            raise ValueError(f"`attention_lr_mult` must be > 0, got {self.attention_lr_mult}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists), as stored in checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``.

        Example:
            >>> TrainConfig.from_dict(TrainConfig(seed=3).to_dict()).seed
            3
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**{k: _coerce(known[k], v) for k, v in values.items()})


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; works with string annotations resolved by typing."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


_HINTS: dict[str, Any] = {}


def _hint(f: dataclasses.Field) -> Any:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS[f.name]


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a value read from a config file to the field's type."""
    base, optional = _base_type(_hint(f))
    if value is None:
        if not optional:
            raise ValueError(f"config key `{f.name}` cannot be null")
        return None
    origin = typing.get_origin(base)
    if origin is tuple:
        return tuple(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    expected = origin or base
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ValueError(
            f"config key `{f.name}` must be {getattr(expected, '__name__', expected)}, "
            f"got {value!r}"
        )
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``.toml`` or ``.json`` config file into ``{field_name: value}``.

    Keys may use ``-`` or ``_``. Values are checked against the field types.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.toml"
        >>> _ = p.write_text('method = "baseline"\\nmax-steps = 10\\n')
        >>> load_config_file(p)
        {'method': 'baseline', 'max_steps': 10}
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    if path.suffix == ".toml":
        if tomllib is None:
            raise ValueError(f"{path}: TOML config files need Python >= 3.11; use JSON")
        raw = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        raw = json.loads(path.read_text())
    else:
        raise ValueError(f"config file must end in .toml or .json, got {path}")
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    known = {f.name: f for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    return {k: _coerce(known[k], v) for k, v in values.items()}


def _str2bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser, one flag per :class:`TrainConfig` field.

    Defaults are suppressed so that :func:`parse_args` can tell which flags were given.
    """
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train ELIM (or the baseline) and evaluate on held-out identities.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="a .toml or .json file of TrainConfig fields")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        if not meta.pop("cli", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        base, optional = _base_type(_hint(f))
        kwargs: dict[str, Any] = {
            "help": f"{meta.pop('help')} (default: {getattr(defaults, f.name)})"
        }
        kwargs.update(meta)
        if f.name == "resume":
            kwargs.update(nargs="?", const="auto", metavar="PATH")
        elif base is bool:
            kwargs.update(type=_str2bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(base) is tuple:
            item = typing.get_args(base)[0]
            kwargs.update(type=item, nargs="+")
        elif optional and base in (int, float):
            kwargs.update(type=lambda s, _t=base: None if s.lower() == "none" else _t(s))
        else:
            kwargs.update(type=base)
        parser.add_argument(flag, dest=f.name, **kwargs)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """Defaults < config file < command line.

    Args:
        argv: arguments without the program name; ``None`` reads ``sys.argv``.

    Returns:
        ``(config, given)``: the merged config and the names of the fields set by the
        config file or the command line.
    """
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        values.update(load_config_file(config_file))
    for key, value in args.items():
        values[key] = tuple(value) if isinstance(value, list) else value
    return TrainConfig(**values), set(values)


def matching_config(cfg: TrainConfig):
    """The :class:`elim.matching.MatchingConfig` of a training config.

    ``--ot-grad none`` keeps the released code's detached shift; any other mode
    computes the shift from the live features and differentiates through the solver.

    Example:
        >>> m = matching_config(TrainConfig(sinkhorn="converged"))
        >>> m.method, m.tol, m.backend, m.detach_shift
        ('log', 1e-05, 'auto', True)
    """
    from .matching import MatchingConfig  # deferred: it imports the solver

    base = MatchingConfig.paper() if cfg.sinkhorn == "paper" else MatchingConfig.converged()
    return MatchingConfig(
        num_domains=cfg.num_domains,
        top_k=cfg.top_k or None,
        gumbel_temperature=cfg.gumbel_temperature,
        eps=cfg.ot_eps,
        method=base.method,
        max_iter=cfg.ot_iters or base.max_iter,
        tol=None if cfg.sinkhorn == "paper" else cfg.ot_tol,
        grad=cfg.ot_grad,
        shift=cfg.shift,
        mass=cfg.mass,
        detach_shift=cfg.ot_grad == "none",
        backend=cfg.ot_backend,
    )
