"""What the supervised benchmarks share: methods, the stacked learner, outputs and checkpoints.

A run trains S seeds in lockstep (:mod:`ppo_cbp.stacked`) and writes, under ``out``:

* ``config.json``: the resolved configuration (every default filled in);
* ``seed_<seed>/metrics.csv``: one row per task (or bin), every metric a column;
* ``seed_<seed>/tb/``: the same metrics as TensorBoard scalars, step = task (or bin) index;
* ``summary.json``: per seed, the mean of each metric over the run and its last value;
* ``checkpoint.pt``: everything needed to continue exactly (written atomically at task
  boundaries, ``torch.save`` to a temporary file then ``os.replace``; read with
  ``weights_only=True``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ppo_cbp.cbp import UTILITIES, ContinualBackprop
from ppo_cbp.redo import ReDo
from ppo_cbp.stacked import TAG_CBP, TAG_REDO, StackedMLP, StackedTrainer, derive_seed

METHODS = ("bp", "l2", "snp", "cbp", "redo", "adam", "dropout", "online_norm")
Method = Literal["bp", "l2", "snp", "cbp", "redo", "adam", "dropout", "online_norm"]


@dataclass
class MethodConfig:
    """The learning method and its hyperparameters; ``None`` means the benchmark's default.

    Methods: ``bp`` (SGD), ``l2`` (SGD + coupled L2), ``snp`` (Shrink & Perturb: SGD + L2 +
    Gaussian noise after every step), ``cbp`` (SGD + continual backprop), ``redo`` (SGD +
    ReDo), ``adam`` (Adam), ``dropout`` (SGD + dropout on every hidden layer), ``online_norm``
    (SGD + online normalization after every hidden linear layer, before the activation;
    :mod:`ppo_cbp.online_norm`; Permuted MNIST only).
    """

    method: Method = "bp"
    """Learning method."""
    lr: float | None = None
    """Step size (SGD or Adam)."""
    weight_decay: float | None = None
    """Coupled L2 coefficient (l2, snp; 0 otherwise unless set)."""
    noise_std: float | None = None
    """Shrink & Perturb's noise standard deviation."""
    replacement_rate: float | None = None
    """CBP's replacement rate rho."""
    maturity_threshold: int | None = None
    """CBP's maturity threshold m (steps)."""
    decay_rate: float = 0.99
    """CBP's utility decay rate eta."""
    utility: str = "adaptable_contribution"
    """CBP's utility: contribution or adaptable_contribution."""
    redo_threshold: float = 0.1
    """ReDo's tau; the dormant score is computed on the last redo_period examples."""
    redo_period: int = 100
    """ReDo recycles every redo_period steps."""
    dropout: float | None = None
    """Dropout probability (dropout method)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    alpha_f: float | None = None
    """Online normalization's forward decay alpha_f (running mean and variance), in (0, 1);
    default 0.999, the authors' recommended value (the loss-of-plasticity paper does not state
    its own)."""
    alpha_b: float | None = None
    """Online normalization's backward decay alpha_b (the two gradient control processes), in
    (0, 1); default 0.99, the authors' recommended value."""


@dataclass
class ResolvedMethod:
    method: str
    optimizer: str
    lr: float
    weight_decay: float = 0.0
    noise_std: float = 0.0
    dropout: float = 0.0
    replacement_rate: float = 0.0
    maturity_threshold: int = 0
    decay_rate: float = 0.99
    utility: str = "adaptable_contribution"
    redo_threshold: float = 0.1
    redo_period: int = 100
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    alpha_f: float = 0.999
    alpha_b: float = 0.99
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_method(cfg: MethodConfig, defaults: dict[str, dict[str, Any]]) -> ResolvedMethod:
    """Fill ``cfg``'s unset values from ``defaults[method]`` and check every value."""
    if cfg.method not in METHODS or cfg.method not in defaults:
        raise ValueError(f"unknown method {cfg.method!r}; expected one of {', '.join(defaults)}")
    d = defaults[cfg.method]

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(cfg, name)
        return d.get(name, fallback) if value is None else value

    r = ResolvedMethod(
        method=cfg.method,
        optimizer="adam" if cfg.method == "adam" else "sgd",
        lr=float(pick("lr", d["lr"])),
        weight_decay=float(pick("weight_decay", 0.0)),
        noise_std=float(pick("noise_std", 0.0)) if cfg.method == "snp" else 0.0,
        dropout=float(pick("dropout", 0.0)) if cfg.method == "dropout" else 0.0,
        replacement_rate=float(pick("replacement_rate", 0.0)),
        maturity_threshold=int(pick("maturity_threshold", 100)),
        decay_rate=cfg.decay_rate,
        utility=cfg.utility,
        redo_threshold=cfg.redo_threshold,
        redo_period=cfg.redo_period,
        adam_betas=tuple(cfg.adam_betas),
        adam_eps=cfg.adam_eps,
        alpha_f=float(pick("alpha_f", 0.999)),
        alpha_b=float(pick("alpha_b", 0.99)),
    )
    checks = [
        ("lr", r.lr > 0),
        ("weight_decay", r.weight_decay >= 0),
        ("noise_std", r.noise_std >= 0),
        ("dropout", 0 <= r.dropout < 1),
        ("replacement_rate", 0 <= r.replacement_rate <= 1),
        ("maturity_threshold", r.maturity_threshold >= 0),
        ("decay_rate", 0 <= r.decay_rate < 1),
        ("redo_threshold", r.redo_threshold >= 0),
        ("redo_period", r.redo_period >= 1),
        ("alpha_f", 0 < r.alpha_f < 1),
        ("alpha_b", 0 < r.alpha_b < 1),
    ]
    for name, ok in checks:
        if not ok or (isinstance(getattr(r, name), float) and math.isnan(getattr(r, name))):
            raise ValueError(f"{name} = {getattr(r, name)} is out of range for {r.method}")
    if r.utility not in UTILITIES:
        raise ValueError(f"unknown utility {r.utility!r}; expected one of {', '.join(UTILITIES)}")
    return r


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return getattr(torch, dtype)


def check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    return seeds


class Learner:
    """Stacked networks, their trainer and the method's operator (CBP or ReDo).

    :meth:`step` trains on one example (or batch) per seed and runs the operator on that
    step's hidden activations. ReDo scores units on the activations of the last
    ``redo_period`` examples (a ring buffer), since a single example is no estimate of E|h|.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        seeds: Sequence[int],
        method: ResolvedMethod,
        *,
        loss: str,
        activation: str = "relu",
        device: torch.device,
        dtype: torch.dtype,
    ):
        if method.method in ("cbp", "redo", "dropout", "online_norm") and len(sizes) < 3:
            raise ValueError(f"method {method.method} needs at least one hidden layer")
        self.seeds = list(seeds)
        self.method = method
        norm = (method.alpha_f, method.alpha_b) if method.method == "online_norm" else None
        self.net = StackedMLP(
            sizes, seeds, activation=activation, norm_decays=norm, device=device, dtype=dtype
        )
        self.trainer = StackedTrainer(
            self.net,
            loss=loss,
            optimizer=method.optimizer,
            lr=method.lr,
            weight_decay=method.weight_decay,
            betas=method.adam_betas,
            eps=method.adam_eps,
            noise_std=method.noise_std,
            dropout=method.dropout,
        )
        self.cbp: ContinualBackprop | None = None
        self.redo: ReDo | None = None
        self._ring: list[Tensor] = []
        if method.method == "cbp":
            self.cbp = ContinualBackprop(
                self.trainer.unit_layers(),
                self.trainer.state_tensors,
                replacement_rate=method.replacement_rate,
                maturity_threshold=method.maturity_threshold,
                decay_rate=method.decay_rate,
                utility=method.utility,
                seed=[derive_seed(s, TAG_CBP) for s in seeds],
            )
        elif method.method == "redo":
            self.redo = ReDo(
                self.trainer.unit_layers(),
                self.trainer.state_tensors,
                threshold=method.redo_threshold,
                period=method.redo_period,
                seed=[derive_seed(s, TAG_REDO) for s in seeds],
            )
            self._ring = [
                torch.zeros(len(seeds), method.redo_period, n, device=device, dtype=dtype)
                for n in sizes[1:-1]
            ]

    def step(self, x_aug: Tensor, target: Tensor, out: Tensor | None = None) -> None:
        hidden = self.trainer.step(x_aug, target, out=out)
        if self.cbp is not None:
            self.cbp.step(hidden, self.trainer.magnitudes)
        elif self.redo is not None:
            slot = self.redo.steps % self.redo.period
            for ring, h in zip(self._ring, hidden):
                ring[:, slot] = h[:, -1]
            self.redo.step(self._ring)

    def units_replaced(self) -> Tensor:
        """Units replaced so far per seed (``[S]``, int64, host)."""
        if self.cbp is not None:
            return torch.full((len(self.seeds),), self.cbp.num_replaced, dtype=torch.int64)
        if self.redo is not None:
            return self.redo.replaced.cpu()
        return torch.zeros(len(self.seeds), dtype=torch.int64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "trainer": self.trainer.state_dict(),
            "cbp": None if self.cbp is None else self.cbp.state_dict(),
            "redo": None if self.redo is None else self.redo.state_dict(),
            "ring": [r.clone() for r in self._ring],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.trainer.load_state_dict(state["trainer"])
        if self.cbp is not None:
            self.cbp.load_state_dict(state["cbp"])
        if self.redo is not None:
            self.redo.load_state_dict(state["redo"])
        for dst, src in zip(self._ring, state["ring"]):
            dst.copy_(src)


# --------------------------------------------------------------------------------------------
# Outputs and checkpoints


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def config_dict(cfg: Any) -> dict[str, Any]:
    return _jsonable(asdict(cfg))


class RunOutputs:
    """Per-seed CSV and TensorBoard writers plus the run's checkpoint and summary files."""

    CHECKPOINT = "checkpoint.pt"

    def __init__(self, out: Path, seeds: Sequence[int], config: dict[str, Any], resume: bool):
        self.out = Path(out)
        self.seeds = list(seeds)
        self.config = config
        ckpt = self.out / self.CHECKPOINT
        if ckpt.exists() and not resume:
            raise ValueError(
                f"{self.out} already holds a run ({ckpt}); pass --resume to continue it or "
                "choose another --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[list[dict[str, float]]] = [[] for _ in self.seeds]
        self._writers: list[Any] | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.out / self.CHECKPOINT

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The saved state, after checking that it belongs to the same configuration."""
        if not self.checkpoint_path.exists():
            return None
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        ignored = {"resume", "progress", "out", "device"}
        diff = {
            k: (saved.get(k), v)
            for k, v in self.config.items()
            if k not in ignored and saved.get(k) != v
        }
        if diff:
            raise ValueError(f"--resume with a different configuration: {diff} (saved, given)")
        self.rows = state["rows"]
        return state

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        state = dict(state, config=json.dumps(self.config), rows=self.rows)
        tmp = self.out / (self.CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def start(self) -> None:
        """Write the config, rewrite each CSV from the rows kept so far, open TensorBoard."""
        from torch.utils.tensorboard import SummaryWriter

        write_json(self.out / "config.json", self.config)
        self._writers = []
        for s, seed in enumerate(self.seeds):
            folder = self.out / f"seed_{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            rows = self.rows[s]
            with open(folder / "metrics.csv", "w", newline="") as f:
                if rows:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
            self._writers.append(SummaryWriter(str(folder / "tb"), purge_step=len(rows)))

    def append(self, rows: Sequence[dict[str, float]]) -> None:
        """One row per seed (same keys for every seed and every row)."""
        for s, (seed, row) in enumerate(zip(self.seeds, rows)):
            step = len(self.rows[s])
            path = self.out / f"seed_{seed}" / "metrics.csv"
            new = step == 0
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    w.writeheader()
                w.writerow(row)
            self.rows[s].append(dict(row))
            for key, value in row.items():
                self._writers[s].add_scalar(key, value, step)
            self._writers[s].flush()

    def summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        per_seed = {}
        for seed, rows in zip(self.seeds, self.rows):
            if not rows:
                continue
            keys = list(rows[0])
            per_seed[str(seed)] = {
                "rows": len(rows),
                "mean": {k: sum(r[k] for r in rows) / len(rows) for k in keys},
                "last": dict(rows[-1]),
            }
        summary = dict(extra, seeds=per_seed)
        write_json(self.out / "summary.json", summary)
        return summary

    def close(self) -> None:
        for w in self._writers or []:
            w.close()
