"""The PPO agent: the policy-mean and value networks, the log-std, the optimizer and the
plasticity methods, built from the trainer's flags through the method suite
(:mod:`ppo_cbp.plasticity.suite`).

:func:`method_names` reads which methods ``ppo_cbp/train.py``'s flags select, :func:`settings`
their settings under the suite's names, and :func:`make_agent` builds the networks (with the
architecture the flags ask for), the optimizer (Adam, the UPGD authors' Adam-style
:class:`~ppo_cbp.plasticity.upgd.AdaptiveUPGD` for ``--upgd`` or PSGD
:class:`~ppo_cbp.plasticity.kron.Kron` for ``--kron``, any of them inside TRAC for
``--trac``) and one :class:`~ppo_cbp.plasticity.suite.Suite` over both networks.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ppo_cbp.init import init_linear_
from ppo_cbp.nets.crelu import crelu_mlp
from ppo_cbp.nets.dff import dff_mlp
from ppo_cbp.plasticity import suite
from ppo_cbp.plasticity.hooks import Layer, Network
from ppo_cbp.plasticity.injection import InjectableNetwork
from ppo_cbp.plasticity.kron import Kron
from ppo_cbp.plasticity.normalize_project import layer_norm_mlp, layer_norms
from ppo_cbp.plasticity.upgd import AdaptiveUPGD
from ppo_cbp.ppo.numerics import is_plain_mlp
from ppo_cbp.seeding import TAG_INJECTION

__all__ = [
    "Agent",
    "make_agent",
    "make_mlp",
    "make_networks",
    "method_names",
    "network_of",
    "settings",
]

NETWORKS = ("policy", "value")
"""The agent's networks, in the order the methods see them."""

# train.py's switches: on when the flag is set (bool) or differs from its "off" value
_SWITCHES = {
    "cbp": True,
    "redo": True,
    "l2": True,
    "snp": "shrink_perturb",
    "l2_init": 0.0,
    "parseval": 0.0,
    "weight_clipping": 0.0,
    "soft_snp": ("soft_shrink_perturb", 1.0),
    "snp_init": ("shrink_perturb_init", 1.0),
    "head_reset": 0,
    "adam_reset": True,
    "layer_norm": True,
    "nap": True,
    "crelu": True,
    "dff": True,
    "injection": True,
    "upgd": True,
    "kron": True,
    "trac": True,
    "c_chain": True,
}


# The value a value-switched flag takes when its method is named with its source's default
# (``--l2-init 0.01``): what a configuration's label takes as the method's default.
_SOURCE_VALUES = {
    "l2_init": 1e-2,
    "parseval": 1e-3,
    "weight_clipping": 3.0,
    "soft_snp": 0.999999,
    "snp_init": 0.5,
    "head_reset": 1,
}


def switch_default(name: str) -> tuple[str, Any]:
    """The ``Args`` field that switches method ``name`` on and its value for the method at its
    source's default: ``("cbp", True)``, ``("l2_init", 0.01)``, ``("shrink_perturb", True)``."""
    off = _SWITCHES[name]
    field = off if isinstance(off, str) else off[0] if isinstance(off, tuple) else name
    return field, _SOURCE_VALUES.get(name, True)


def method_names(args: Any) -> tuple[str, ...]:
    """The suite's names of the methods ``args`` (``train.py``'s ``Args``) switch on."""
    names = []
    for name, off in _SWITCHES.items():
        if off is True:
            on = bool(getattr(args, name))
        elif isinstance(off, str):
            on = bool(getattr(args, off))
        elif isinstance(off, tuple):
            on = getattr(args, off[0]) != off[1]
        else:
            on = getattr(args, name) != off
        if on:
            names.append(name)
    return tuple(names)


def settings(args: Any) -> dict[str, Any]:
    """The methods' settings of ``args`` under the suite's names."""
    out = {name: getattr(args, name) for name in suite.SETTINGS if hasattr(args, name)}
    return out


def spell(name: str) -> str:
    """A method as ``train.py`` switches it on (its flag)."""
    return suite.METHODS[name].flag or name


def make_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, init: str) -> nn.Sequential:
    """``Linear, ReLU, ..., Linear`` with every layer from ``init`` and zero biases."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    net = nn.Sequential(*layers)
    for m in net:
        if isinstance(m, nn.Linear):
            init_linear_(m, init, "relu")
    return net


def network_of(net: nn.Module, optimizer: torch.optim.Optimizer, init: str, seed: int) -> Network:
    """What the plasticity methods see of an MLP of this module's builders (every layer drawn
    from ``init`` with ReLU's gain; an injectable one through its own view)."""
    if isinstance(net, InjectableNetwork):
        return net.as_network(optimizer, init=init, seeds=[seed])
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    layers = [
        Layer(m.weight, m.bias, init, "relu", head=i == len(linears) - 1, name=f"layer{i}")
        for i, m in enumerate(linears)
    ]
    return Network(layers, list(net.parameters()), optimizer, seed_dims=0, seeds=[seed])


@dataclass
class Agent:
    """The policy ``N(actor(s), exp(log_std)^2)``, the value ``critic(s)``, their optimizer
    and the plasticity methods of both networks (:attr:`methods`)."""

    actor: nn.Module
    critic: nn.Module
    log_std: nn.Parameter
    optimizer: torch.optim.Optimizer
    methods: suite.Suite

    @property
    def churn(self):
        """C-CHAIN's term on the policy mean (it adds to the loss: the autograd path), or None."""
        return self.methods.churn

    @property
    def params(self) -> list[nn.Parameter]:
        """The trained parameters (an injection's frozen ones left out)."""
        every = [*self.actor.parameters(), self.log_std, *self.critic.parameters()]
        return [p for p in every if p.requires_grad]

    @property
    def autograd(self) -> bool:
        """Whether the update needs autograd: a network the closed-form gradient does not
        cover, or a loss term it does not know."""
        plain = is_plain_mlp(self.actor) and is_plain_mlp(self.critic)
        return not plain or self.churn is not None

    def sequential_networks(self) -> tuple[tuple[str, nn.Sequential], ...]:
        """The named MLPs whose units the metrics read: each network as built, or the
        Sequential inside an injected one."""
        return tuple((name, getattr(net, "net", net)) for name, net in self.networks_as_built())

    def networks_as_built(self) -> tuple[tuple[str, nn.Module], ...]:
        """The policy-mean and value networks by name, as :func:`make_agent` built them."""
        return (("policy", self.actor), ("value", self.critic))

    @property
    def units_replaced(self) -> dict[str, int]:
        """Units CBP/ReDo replaced so far, per network; empty without either."""
        return self.methods.units_replaced()

    def state_dict(self) -> dict[str, Any]:
        """The networks, log-std, optimizer and methods' states under the checkpoint's keys
        (not copied: :func:`ppo_cbp.ppo.run.snapshot` clones them)."""
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "log_std": self.log_std.detach(),
            "optimizer": self.optimizer.state_dict(),
            "suite": self.methods.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, or a checkpoint written before the method
        suite (CBP/ReDo under ``resetters``, the others per network under ``methods``,
        C-CHAIN under ``churn``)."""
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        with torch.no_grad():
            self.log_std.copy_(state["log_std"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "suite" in state:
            self.methods.load_state_dict(state["suite"])
        else:
            self.methods.load_entries(_legacy_entries(self.methods, state), strict=False)


# The order of each network's methods in checkpoints written before the method suite.
_LEGACY_ORDER = (
    "l2_init",
    "parseval",
    "soft_snp",
    "weight_clipping",
    "nap",
    "snp_init",
    "head_reset",
    "adam_reset",
    "injection",
)


def _legacy_entries(methods: suite.Suite, state: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    names = set(methods.names)
    entries = []
    for net in NETWORKS:
        listed = [n for n in _LEGACY_ORDER if n in names]
        saved = state.get("methods", {}).get(net, {}).get("methods", [])
        entries += [(n, net, s) for n, s in zip(listed, saved, strict=False)]
        resetter = state.get("resetters", {}).get(net)
        if resetter is not None:
            entries.append(("cbp" if "cbp" in names else "redo", net, resetter))
    if state.get("churn") is not None:
        entries.append(("c_chain", "policy", state["churn"]))
    return entries


def make_networks(
    args: Any, obs_dim: int, act_dim: int, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The policy-mean and value networks of ``args`` (``hidden_sizes``, ``init``,
    ``layer_norm``/``nap``, ``crelu``, ``dff``, ``injection``/``injection_layers``), freshly initialised
    on ``device``: what :func:`make_agent` builds, and what a saved run is loaded into
    (:mod:`ppo_cbp.ppo.load`)."""
    build = make_mlp
    layer_norm = args.layer_norm or args.nap
    if args.crelu:
        build = functools.partial(crelu_mlp, layer_norm=layer_norm)
    elif args.dff:
        build = functools.partial(dff_mlp, layer_norm=layer_norm)
    elif layer_norm:
        build = layer_norm_mlp
    actor: nn.Module = build(obs_dim, args.hidden_sizes, act_dim, args.init).to(device)
    critic: nn.Module = build(obs_dim, args.hidden_sizes, 1, args.init).to(device)
    if args.injection:
        actor = InjectableNetwork(actor, head_layers=args.injection_layers)
        critic = InjectableNetwork(critic, head_layers=args.injection_layers)
    return actor, critic


def make_agent(
    args: Any,
    obs_dim: int,
    act_dim: int,
    device: torch.device,
    seeds: dict[str, int],
    noise_generator: torch.Generator,
) -> Agent:
    """Both MLPs, the log-std, one optimizer over all of them and the methods of ``args``.

    :param args: the trainer's resolved settings.
    :param seeds: the run's stream seeds (:func:`ppo_cbp.seeding.ppo_seeds`): each network's
        methods draw from its own, UPGD's and Kron's from streams of ``perturb``.
    :param noise_generator: Shrink & Perturb's noise generator (the run's ``perturb`` one).
    """
    names = method_names(args)
    actor, critic = make_networks(args, obs_dim, act_dim, device)
    log_std = nn.Parameter(torch.full((act_dim,), args.log_std_init, device=device))
    params = [*actor.parameters(), log_std, *critic.parameters()]
    betas = (args.adam_beta1, args.adam_beta2)
    optimizer: torch.optim.Optimizer
    if args.upgd:
        optimizer = AdaptiveUPGD(
            params,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            beta_utility=args.upgd_beta_utility,
            sigma=args.upgd_sigma,
            betas=betas,
            eps=args.adam_eps,
            seeds=[seeds["perturb"]],  # its own stream (derive_seed) of the perturbation seed
        )
    elif args.kron:  # Plasticine's Kron(params, lr=...): kron_torch's other defaults
        optimizer = Kron(
            params, lr=args.learning_rate, weight_decay=args.weight_decay, seeds=[seeds["perturb"]]
        )
    else:
        kwargs = dict(lr=args.learning_rate, betas=betas, eps=args.adam_eps)
        kwargs["weight_decay"] = args.weight_decay
        try:  # the fused kernel: one call per step (CPU support since torch 2.4)
            optimizer = torch.optim.Adam(params, **kwargs, fused=True)
        except (RuntimeError, ValueError):
            optimizer = torch.optim.Adam(params, **kwargs)
    optimizer, state_owner = suite.with_trac(names, optimizer)
    targets = []
    for k, (name, net) in enumerate((("policy", actor), ("value", critic))):
        targets.append(
            suite.Target(
                name,
                network_of(net, state_owner, args.init, seeds[name]),
                module=net,
                units=net,
                unit_seeds=seeds[name],
                norms=layer_norms(net) if args.nap else None,
                injection_tag=TAG_INJECTION + k,
                churn=name == "policy",
            )
        )
    methods = suite.build(
        names,
        settings(args),
        targets,
        init=args.init,
        noise_generators=[noise_generator],
        reset_optimizer_state=args.reset_optimizer_state,
        accumulate=not args.paper_exact,
    )
    return Agent(actor, critic, log_std, optimizer, methods)


def method_state(checkpoint: Mapping[str, Any], name: str, network: str) -> dict[str, Any] | None:
    """The state of method ``name`` (a suite name: ``"cbp"``, ``"c_chain"``, ...) of network
    ``network`` (``"policy"`` or ``"value"``) in a PPO checkpoint, or None without it."""
    for entry in checkpoint["suite"]["methods"]:
        if entry["name"] == name and entry["target"] == network:
            return entry["state"]
    return None
