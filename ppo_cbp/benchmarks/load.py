"""One seed's network of a supervised run (``scripts/supervised.py``), as a plain ``nn.Module``.

:func:`load_learner` reads ``out/checkpoint.pt`` and builds seed ``seed``'s network as its run
builds one seed's (the MLP of :func:`~ppo_cbp.benchmarks.autograd_learner.build_mlp`, with
LayerNorm, CReLU or DFF where the method has them; Continual ImageNet's ConvNet or linear network;
CIFAR-100's ResNet-18, all 100 outputs: the run masks the classes not yet seen), then copies
slice ``s`` of every stacked tensor into it: the fused trainer's ``[n_out, n_in + 1]`` layer
matrices (the bias last) and ``[2, units]`` LayerNorm gains and offsets, the autograd and conv learners' parameters in the seed's
``parameters()`` order, the ResNet's BatchNorm statistics by name. In eval mode, on the CPU,
in the run's dtype. Injected heads are not covered yet: one ``error:`` line says so.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ppo_cbp import run_folder
from ppo_cbp.errors import UsageError

__all__ = ["load_learner"]


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
    if isinstance(learner, dict) and learner.get("injection"):  # the fused trainer's injection
        net = None
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
    matrices = net["params"]  # [S, n_out, n_in + 1] per layer, the bias last
    sizes = [matrices[0].shape[2] - 1] + [m.shape[1] for m in matrices]
    names = set((config.get("resolved_method") or {}).get("methods") or [])
    mlp = _mlp(sizes, config, names, matrices[0].dtype)
    # a seed's parameters(): per layer weight and bias, then its LayerNorm's gain and offset
    # (the fused trainer's [S, 2, units] per hidden layer)
    norms = net.get("layer_norms") or []
    params = [
        t
        for i, m in enumerate(matrices)
        for t in (m[..., :-1], m[..., -1], *(norms[i].unbind(1) if i < len(norms) else ()))
    ]
    return _copy_slice(mlp, params, s, "the fused trainer's MLP")


def _copy_slice(model: nn.Module, stacked: Sequence[Tensor], s: int, what: str) -> nn.Module:
    """``model`` (in eval mode) with slice ``s`` of each of ``stacked``, which are aligned with
    ``model.parameters()``."""
    mine = list(model.parameters())
    if [tuple(p.shape) for p in mine] != [tuple(p.shape[1:]) for p in stacked]:
        raise UsageError(f"load_learner: the checkpoint's network is not {what}")
    with torch.no_grad():
        for dst, src in zip(mine, stacked, strict=True):
            dst.copy_(src[s])
    return model.eval()


def _mlp(
    sizes: list[int], config: dict[str, Any], names: set[str], dtype: torch.dtype
) -> nn.Module:
    """One seed's MLP as the autograd learner builds it (its draw is overwritten)."""
    from ppo_cbp.benchmarks.autograd_learner import build_mlp

    return build_mlp(
        sizes,
        0,
        activation=config.get("activation", "relu"),
        init="kaiming_uniform",
        layer_norm=bool(names & {"layer_norm", "nap"}),
        crelu="crelu" in names,
        dff="dff" in names,
        device=torch.device("cpu"),
        dtype=dtype,
    )


def _autograd_mlp(module: dict[str, Tensor], s: int, config: dict[str, Any]) -> nn.Module:
    """Seed ``s``'s MLP of an autograd learner's stacked state (``params.<i>``, aligned with
    each seed's ``parameters()``)."""
    params = [module[f"params.{i}"] for i in range(len(module))]
    names = set((config.get("resolved_method") or {}).get("methods") or [])
    weights = [p for p in params if p.dim() == 3]
    sizes = [weights[0].shape[2]] + [w.shape[1] for w in weights]
    mlp = _mlp(sizes, config, names, params[0].dtype)
    return _copy_slice(mlp, params, s, "the autograd learner's MLP")


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
        params = [net[f"params.{i}"] for i in range(len(net))]
        return _copy_slice(model.to(dtype), params, s, "the ImageNet ConvNet")
    from ppo_cbp.nets.resnet import ResNet18

    model = ResNet18(num_classes=100).to(dtype)
    missing, unexpected = model.load_state_dict({k: v[s] for k, v in net.items()}, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise UsageError("load_learner: the checkpoint's network is not the CIFAR ResNet-18")
    return model.eval()
