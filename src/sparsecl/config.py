"""Run configuration: one dataclass filled, in increasing priority, from defaults, a preset, a YAML
file and command-line flags. Method options are validated against the method's own dataclass."""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from sparsecl import SparseCLError
from sparsecl.sparse.flops import CONVENTIONS as FLOP_CONVENTIONS

SETTINGS = ("class-il", "task-il")
# Where a run's data lives: never part of what makes two runs the same run.
LOCATION_KEYS = ("data_dir", "data_root")
SEED_LIMIT = 2**32  # numpy's legacy seeding takes 0 <= seed < 2**32

SPARSE_KERNEL_MODES = ("off", "on", "auto")


@dataclass
class RunConfig:
    """Everything that defines a run (the method's own options live in ``method_options``)."""

    method: str = "der++"
    benchmark: str = "digits"
    setting: str = "class-il"  # class-il (reports Class-IL and Task-IL) | task-il
    backbone: str | None = None  # None = the benchmark's default
    backbone_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    data_root: str | None = None  # root of an `image-folder` benchmark
    class_order: str | None = None  # None | seed:N | comma-separated raw labels
    n_tasks: int | None = None
    image_size: int | None = None
    download: bool = True
    validation: float | None = None  # hold out this fraction of each class's training data and
    # evaluate on it instead of the test set (hyper-parameter search)
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 512
    drop_last: bool = False
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    keep_checkpoints: str = "last"  # last | all
    # Speed options (CUDA): bf16 autocast with fp32 master weights; channels_last activations.
    amp: bool = False
    channels_last: bool = False
    cuda_graph: bool = False  # capture each task's training step once, replay it (CUDA)
    sync_bn: bool = False  # torchrun on CUDA: SyncBatchNorm (statistics of the global batch)
    fused_optimizer: bool = False  # torch's fused SGD/Adam/AdamW step (one kernel for all parameters)
    compile: str | None = None  # torch.compile backend for the training forward/backward, e.g. inductor
    tensorboard: bool = False  # write TensorBoard event files under RUN_DIR/tensorboard
    wandb: str | None = None  # log to this Weights & Biases project (mode, entity, login: wandb's env)
    threads: int | None = None  # torch CPU threads; None = torch's default (OMP_NUM_THREADS), recorded at start
    flop_convention: str = "spec"  # spec | sparcl-paper: which count result.json's flops.train is
    # on: masked layers run on real sparse CPU kernels (sparsecl.sparse.execution); off: masks multiply dense
    # tensors; auto: the kernels only where they measure faster (sparsecl.sparse.kernel_choice)
    sparse_kernels: str = "off"
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.setting not in SETTINGS:
            raise SparseCLError(f"unknown setting {self.setting!r} (known: {', '.join(SETTINGS)})")
        if type(self.seed) is not int or not 0 <= self.seed < SEED_LIMIT:
            raise SparseCLError(f"seed must be an integer in [0, 2**32), got {self.seed}")
        if self.epochs < 1:
            raise SparseCLError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise SparseCLError("batch sizes must be >= 1")
        if self.keep_checkpoints not in ("last", "all"):
            raise SparseCLError("keep_checkpoints must be 'last' or 'all'")
        if self.validation is not None and not 0.0 < self.validation < 1.0:
            raise SparseCLError(f"validation must be a fraction in (0, 1), got {self.validation}")
        if self.threads is not None and self.threads < 1:
            raise SparseCLError(f"threads must be >= 1, got {self.threads}")
        if self.flop_convention not in FLOP_CONVENTIONS:
            raise SparseCLError(f"unknown flop_convention {self.flop_convention!r} (known: {', '.join(FLOP_CONVENTIONS)})")
        if self.sparse_kernels not in SPARSE_KERNEL_MODES:
            raise SparseCLError(f"unknown sparse_kernels {self.sparse_kernels!r} (known: {', '.join(SPARSE_KERNEL_MODES)})")
        if self.n_tasks is not None and self.n_tasks < 1:
            raise SparseCLError(f"n_tasks must be >= 1, got {self.n_tasks}")
        if self.wandb is not None and not self.wandb.strip():
            raise SparseCLError("wandb needs a project name")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (often a string from the CLI) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise SparseCLError(f"option {name} expects true/false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise SparseCLError(f"option {name} expects {tp.__name__}, got {value!r}") from None
    return value


def _resolve_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build_options(options_cls: type, values: dict[str, Any], owner: str) -> Any:
    """Instantiate ``options_cls`` from ``values``; unknown keys and bad types are one-line errors."""
    hints = _resolve_hints(options_cls)
    known = {f.name for f in fields(options_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SparseCLError(
            f"{owner} has no option {', '.join(unknown)} (its options: {', '.join(sorted(known))})"
        )
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    opts = options_cls(**kwargs)
    if hasattr(opts, "validate"):
        opts.validate()
    return opts


def preset_dir() -> Path:
    return Path(str(resources.files("sparsecl") / "presets"))


def preset_names() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.yaml"))


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SparseCLError(f"config file not found: {p}") from None
    except IsADirectoryError:
        raise SparseCLError(f"config file {p} is a directory, not a YAML file") from None
    except UnicodeDecodeError:
        raise SparseCLError(f"config file {p} is not a text file (YAML expected)") from None
    except OSError as e:
        raise SparseCLError(f"cannot read config file {p}: {(e.strerror or str(e)).lower()}") from None
    return parse_yaml(text, p)


def parse_yaml(text: str, p: Path) -> dict[str, Any]:
    """The mapping in YAML ``text`` (read from ``p``, named in errors)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SparseCLError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SparseCLError(f"config file {p} must hold a mapping of options")
    return data


def load_preset(name: str) -> dict[str, Any]:
    path = preset_dir() / f"{name}.yaml"
    if not path.exists():
        raise SparseCLError(f"unknown preset {name!r} (see `sparsecl list`)")
    return load_preset_file(path)


def load_preset_file(path: str | Path) -> dict[str, Any]:
    """A preset's run options (a shipped one, or a file such as `sparsecl tune`'s best preset):
    its ``description`` and ``source`` say where the values come from, they set nothing."""
    data = load_yaml(path)
    data.pop("description", None)
    data.pop("source", None)
    return data


def preset_description(name: str) -> str:
    return str(load_yaml(preset_dir() / f"{name}.yaml").get("description", ""))


def merge_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge partial configs (later wins; ``method_options``/``backbone_options`` merge by key)."""
    known = {f.name for f in fields(RunConfig)}
    hints = _resolve_hints(RunConfig)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in known:
                raise SparseCLError(f"unknown run option {key!r} (known: {', '.join(sorted(known))})")
            if key in ("method_options", "backbone_options"):
                if not isinstance(value, dict):
                    raise SparseCLError(f"{key} must be a mapping")
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
    kwargs = {k: v if k in ("method_options", "backbone_options") else _coerce(v, hints[k], k) for k, v in merged.items()}
    cfg = RunConfig(**kwargs)
    cfg.validate()
    return cfg


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write ``cfg`` as YAML."""
    from sparsecl.engine.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """A configuration (as a dict) without what may differ between a run and its resume or
    export (device, data location, output folder): what makes two runs the same run."""
    return {k: v for k, v in cfg.items() if k not in ("device", "out", *LOCATION_KEYS)}


def first_difference(old: Any, new: Any, where: str = "") -> str | None:
    """``key: old -> new`` for the first setting where two configurations differ, else None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            diff = first_difference(old.get(key), new.get(key), f"{where}{key}.")
            if diff:
                return diff
        return None
    return None if old == new else f"{where.rstrip('.')}: {old!r} -> {new!r}"


def config_from_text(text: str, path: Path) -> RunConfig:
    """The run configuration of YAML text already read from ``path``."""
    return merge_config(parse_yaml(text, path))
