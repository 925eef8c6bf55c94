"""One seed's network of a supervised run (``scripts/supervised.py``), as a plain ``nn.Module``.

:func:`load_learner` reads ``out/checkpoint.pt`` and returns seed ``seed``'s slice of the fused
:class:`~ppo_cbp.benchmarks.common.Learner`'s :class:`~ppo_cbp.nets.stacked_mlp.StackedMLP`
(``params[layer][s]``: ``[n_out, n_in + 1]``, the bias last) as ``Linear, activation, ...,
Linear`` (:class:`SeedMLP`), computing what :meth:`StackedMLP.forward` computes for that seed;
or, for the autograd learner (methods the fused trainer lacks), the seed's ``nn.Sequential``
as :func:`~ppo_cbp.benchmarks.autograd_learner.build_mlp` builds it (LayerNorm, CReLU) with
slice ``s`` of every stacked parameter; for Continual ImageNet the seed's ConvNet (or linear
network) and for class-incremental CIFAR-100 the seed's ResNet-18 (all 100 outputs: the run
masks the classes not yet seen; BatchNorm's running statistics included), in eval mode.
Injected heads are not covered yet: one ``error:`` line says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError
from ppo_cbp.nets.stacked_mlp import LEAKY_RELU_SLOPE

__all__ = ["SeedMLP", "load_learner"]

_ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": lambda z: z,
    "elu": F.elu,
    "leaky_relu": lambda z: F.leaky_relu(z, LEAKY_RELU_SLOPE),
    "swish": F.silu,
}


class SeedMLP(nn.Module):
    """``Linear, activation, ..., Linear`` with the weights of one seed of a stacked MLP."""

    def __init__(self, params: list[Tensor], activation: str):
        super().__init__()
        self.activation = activation
        self.layers = nn.ModuleList()
        for p in params:
            linear = nn.Linear(p.shape[1] - 1, p.shape[0], dtype=p.dtype)
            with torch.no_grad():
                linear.weight.copy_(p[:, :-1])
                linear.bias.copy_(p[:, -1])
            self.layers.append(linear)

    def forward(self, x: Tensor) -> Tensor:
        f = _ACTIVATIONS[self.activation]
        for linear in self.layers[:-1]:
            x = f(linear(x))
        return self.layers[-1](x)


def load_learner(out: str | Path, seed: int) -> nn.Module:
    """Seed ``seed``'s network of the supervised run in ``out`` (its ``--out`` folder or its
    ``checkpoint.pt``), on the CPU in the run's dtype.

    :raises UsageError: one line for a missing folder or checkpoint, an unreadable one, a
        ``train.py`` run (use ``load_policy``), a seed the run did not train, or a learner
        this loader does not cover."""
    p = Path(out)
    if not p.exists():
        raise UsageError(f"run folder {out} does not exist")
    path = p if p.is_file() else p / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"{p} holds no checkpoint.pt: pass a scripts/supervised.py --out folder")
    state = run_folder.load_checkpoint(
        path,
        "scripts/supervised.py",
        "pass a scripts/supervised.py --out folder",
        "it cannot be loaded",
    )
    if isinstance(state, dict) and "format" in state and "args" in state:
        raise UsageError(
            f"{path.parent} is a run folder of train.py, not of scripts/supervised.py: load its "
            f"policy with ppo_cbp.load_policy({str(path.parent)!r})"
        )
    try:
        config: dict[str, Any] = json.loads(state["config"])
        learner = state["learner"]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path} is not a checkpoint of scripts/supervised.py ({e})") from None
    seeds = [int(s) for s in config.get("seeds", [])]
    if seed not in seeds:
        raise UsageError(f"seed {seed} is not one of the run's seeds {seeds}")
    s = seeds.index(seed)
    module = learner.get("module") if isinstance(learner, dict) else None
    if isinstance(module, dict) and module and all(k.startswith("params.") for k in module):
        return _autograd_mlp(module, s, config)
    net = learner.get("net") if isinstance(learner, dict) else None
    conv = _conv_network(state.get("benchmark"), net, s, config)
    if conv is not None:
        return conv
    if not isinstance(net, dict) or "params" not in net:
        raise UsageError(
            f"{path}: load_learner covers every benchmark's network but an injected head; "
            f"this run's learner, --method {config.get('method')}, is not covered yet"
        )
    if net.get("norms"):
        raise UsageError(f"{path}: load_learner does not cover online normalisation yet")
    return SeedMLP([p[s] for p in net["params"]], config.get("activation", "relu")).eval()


def _autograd_mlp(module: dict[str, Tensor], s: int, config: dict[str, Any]) -> nn.Module:
    """Seed ``s``'s ``nn.Sequential`` of an autograd learner's stacked state (``params.<i>``,
    aligned with each seed's ``parameters()``)."""
    from ppo_cbp.benchmarks.autograd_learner import build_mlp

    params = [module[f"params.{i}"] for i in range(len(module))]
    names = set((config.get("resolved_method") or {}).get("methods") or [])
    crelu = "crelu" in names
    weights = [p for p in params if p.dim() == 3]
    sizes = [weights[0].shape[2]] + [w.shape[1] for w in weights]
    net = build_mlp(
        sizes,
        0,  # the draw is overwritten by the saved values
        activation=config.get("activation", "relu"),
        init="kaiming_uniform",
        layer_norm=bool(names & {"layer_norm", "nap"}),
        crelu=crelu,
        device=torch.device("cpu"),
        dtype=params[0].dtype,
    )
    mine = list(net.parameters())
    if [tuple(p.shape) for p in mine] != [tuple(p.shape[1:]) for p in params]:
        raise UsageError("load_learner: the checkpoint's network is not the autograd learner's MLP")
    with torch.no_grad():
        for dst, src in zip(mine, params, strict=True):
            dst.copy_(src[s])
    return net.eval()


def _conv_network(benchmark: Any, net: Any, s: int, config: dict[str, Any]) -> nn.Module | None:
    """Seed ``s``'s network of a Continual ImageNet or CIFAR-100 run, or None for another
    benchmark."""
    if benchmark not in ("continual-imagenet", "incremental-cifar") or not isinstance(net, dict):
        return None
    tensors = [t for t in net.values() if isinstance(t, Tensor) and t.is_floating_point()]
    dtype = tensors[0].dtype if tensors else torch.float32
    if benchmark == "continual-imagenet":
        from ppo_cbp.benchmarks.continual_imagenet import imagenet_convnet, linear_network

        spec = str((config.get("method") or {}).get("method", ""))
        model = linear_network(2) if "linear" in spec.split("+") else imagenet_convnet(2)
        model = model.to(dtype)
        params = [net[f"params.{i}"] for i in range(len(net))]
        mine = list(model.parameters())
        if [tuple(p.shape) for p in mine] != [tuple(p.shape[1:]) for p in params]:
            raise UsageError("load_learner: the checkpoint's network is not the ImageNet ConvNet")
        with torch.no_grad():
            for dst, src in zip(mine, params, strict=True):
                dst.copy_(src[s])
        return model.eval()
    from ppo_cbp.nets.resnet import ResNet18

    model = ResNet18(num_classes=100).to(dtype)
    missing, unexpected = model.load_state_dict({k: v[s] for k, v in net.items()}, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UsageError("load_learner: the checkpoint's network is not the CIFAR ResNet-18")
    return model.eval()
