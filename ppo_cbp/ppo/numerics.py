"""The PPO trainer's fast numerics: acting forward passes, the minibatch loss with its gradient
by hand, and a lean fused-Adam step.

On the small MLPs of the paper's PPO (two hidden layers of 256 units, minibatches of 128) the
time of an update goes to per-call overheads rather than arithmetic: autograd's graph, module
calls and ``Optimizer.step``'s Python. These functions do the same arithmetic with fewer calls:

* :class:`GaussianActing`: a rollout's actions, the policy mean by :func:`act_forward` (torch, any
  device, preallocated outputs) or :func:`act_forward_np` (numpy, the CPU, between env steps);
* :func:`ppo_loss_and_grads`: PPO's clipped loss, the value loss and their gradient in closed
  form (checked against autograd in float64 by ``tests/test_train_grads.py``);
* :func:`ppo_loss_autograd`: the same loss and gradient by autograd, for any actor and critic
  modules (normalisation layers, other activations) and with an extra loss term (a regulariser);
* :class:`AdamStep`: ``optimizer.step()`` of a fused Adam, bitwise, without its Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ppo_cbp.nets.units import ActivationRecorder, sequential_unit_layers

__all__ = [
    "AdamStep",
    "GaussianActing",
    "act_forward",
    "act_forward_np",
    "hidden_taps",
    "linear_layers",
    "mlp_backward_",
    "mlp_forward",
    "numpy_layers",
    "ppo_loss_and_grads",
    "ppo_loss_autograd",
]

LOG_2PI = math.log(2.0 * math.pi)


def is_plain_mlp(net: nn.Module) -> bool:
    """Whether ``net`` is ``Linear, ReLU, ..., Linear``: the networks the fast paths compute."""
    if not isinstance(net, nn.Sequential) or not len(net) or not isinstance(net[-1], nn.Linear):
        return False
    kinds = [nn.Linear if i % 2 == 0 else nn.ReLU for i in range(len(net))]
    return all(type(m) is k for m, k in zip(net, kinds))


def linear_layers(net: nn.Sequential) -> list[tuple[Tensor, Tensor]]:
    """(transposed weight view, bias) per Linear layer; views follow in-place weight updates."""
    return [(m.weight.t(), m.bias) for m in net if isinstance(m, nn.Linear)]


def act_forward(
    layers: list[tuple[Tensor, Tensor]], x: Tensor, out: Sequence[Tensor] | None = None
) -> Tensor:
    """The MLP's forward without module calls or hooks (the acting hot path on a GPU).

    ``out``: optional preallocated outputs, one ``[batch, width]`` tensor per layer (no
    allocation per call; only outside autograd, e.g. under ``torch.inference_mode``).
    """
    for i, (wt, b) in enumerate(layers):
        x = torch.addmm(b, x, wt) if out is None else torch.addmm(b, x, wt, out=out[i])
        if i < len(layers) - 1:
            x.relu_()
    return x


def numpy_layers(net: nn.Sequential) -> list[np.ndarray]:
    """Each Linear layer of a CPU MLP as one float32 array ``[in + 1, out]``: ``W^T`` with the
    bias as its last row (a copy, for :func:`act_forward_np`)."""
    return [
        np.concatenate([m.weight.detach().numpy().T, m.bias.detach().numpy()[None]])
        for m in net
        if isinstance(m, nn.Linear)
    ]


def act_forward_np(layers: list[np.ndarray], inputs: list[np.ndarray], out: np.ndarray) -> None:
    """:func:`act_forward` in numpy: the acting hot path on the CPU.

    ``inputs[i]`` is layer ``i``'s input ``[batch, in + 1]`` with a last column of ones (the
    bias term of ``layers[i]``): the caller writes the observation into ``inputs[0][:, :-1]``,
    the hidden layers write theirs, and the output goes to ``out``. Between two env steps these
    few numpy calls leave more of the simulator's code and data in the caches than torch's
    dispatcher does (the env step after a torch forward took ~20 us longer on Hopper).
    """
    for i, w in enumerate(layers):
        if i + 1 < len(layers):
            h = inputs[i + 1]
            np.matmul(inputs[i], w, out=h[:, :-1])
            np.maximum(h, 0.0, out=h)  # keeps the column of ones
        else:
            np.matmul(inputs[i], w, out=out)


class GaussianActing:
    """A rollout's actions ``a_t = mu(s_t) + exp(log_std) * eps_t`` for ``num_envs`` envs, from the
    noise ``eps [T, num_envs, act_dim]`` drawn for the whole rollout.

    ``mu`` is the actor's forward: on the CPU in numpy (:func:`act_forward_np`, on a copy of the
    weights taken by :meth:`start`), elsewhere by :func:`act_forward` into preallocated outputs;
    for an actor that is not a plain Linear/ReLU MLP (:func:`is_plain_mlp`), its own forward.
    ``use_numpy`` overrides the choice (the tests compare both paths on the CPU).
    """

    def __init__(
        self, actor: nn.Sequential, log_std: Tensor, num_envs: int, use_numpy: bool | None = None
    ):
        self.actor, self.log_std = actor, log_std
        self.plain = is_plain_mlp(actor)
        self.use_numpy = self.plain and (
            log_std.device.type == "cpu" if use_numpy is None else use_numpy
        )
        self.layers = linear_layers(actor) if self.plain else []
        in_widths = [wt.shape[0] for wt, _ in self.layers]
        out_widths = [wt.shape[1] for wt, _ in self.layers]
        self.out = [torch.empty(num_envs, w, device=log_std.device) for w in out_widths]
        self.inputs_np = [np.ones((num_envs, w + 1), np.float32) for w in in_widths]
        if self.use_numpy:
            self.mean_np = np.empty((num_envs, out_widths[-1]), np.float32)

    def start(self, noise: Tensor) -> None:
        """Begin a rollout with the current weights and ``noise`` (under ``torch.inference_mode``)."""
        self.noise, self.std = noise, self.log_std.exp()
        if self.use_numpy:
            self.layers_np = numpy_layers(self.actor)
            self.scaled_noise = (noise * self.std).numpy()

    def act(self, t: int, obs: np.ndarray, out: np.ndarray) -> None:
        """Step ``t``'s actions for the observations ``obs [num_envs, obs_dim]`` into ``out``."""
        if self.use_numpy:
            self.inputs_np[0][:, :-1] = obs
            act_forward_np(self.layers_np, self.inputs_np, self.mean_np)
            np.add(self.mean_np, self.scaled_noise[t], out=out)
        elif not self.plain:  # LayerNorm, CReLU, an injected head: the module's own forward
            mean = self.actor(torch.from_numpy(obs).to(self.std.device))
            torch.from_numpy(out).copy_(torch.addcmul(mean, self.std, self.noise[t]))
        else:
            mean = act_forward(self.layers, torch.from_numpy(obs).to(self.std.device), self.out)
            torch.from_numpy(out).copy_(torch.addcmul(mean, self.std, self.noise[t]))


def mlp_forward(layers: Sequence[nn.Linear], x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The MLP's output and its hidden (post-ReLU) activations, outside autograd."""
    hidden = []
    for m in layers[:-1]:
        x = torch.addmm(m.bias, x, m.weight.t()).relu_()
        hidden.append(x)
    return torch.addmm(layers[-1].bias, x, layers[-1].weight.t()), hidden


def mlp_backward_(
    layers: Sequence[nn.Linear], x: Tensor, hidden: Sequence[Tensor], grad_out: Tensor
) -> None:
    """Backprop ``grad_out = dL/d(output)`` through the MLP into each layer's ``.grad``.

    For layer ``l`` with input ``a`` (``x`` or the previous hidden activation) and output
    gradient ``g``: ``dW = g^T a``, ``db = sum_rows g`` and, below it, ``dL/da = (g W) * [a > 0]``
    (ReLU's derivative read off its output). The ``.grad`` tensors are overwritten, not added to.
    """
    g = grad_out
    for i in range(len(layers) - 1, -1, -1):
        w, b = layers[i].weight, layers[i].bias
        a = hidden[i - 1] if i > 0 else x
        if w.grad is None or b.grad is None:
            w.grad, b.grad = torch.empty_like(w), torch.empty_like(b)
        if w.shape[1] < 64:
            # MKL computes this thin product ~2x faster as [in, out] than as [out, in].
            w.grad.copy_(torch.mm(a.t(), g).t())
        else:
            torch.mm(g.t(), a, out=w.grad)
        torch.sum(g, 0, out=b.grad)
        if i > 0:
            g = torch.ops.aten.threshold_backward(torch.mm(g, w), a, 0.0)


@torch.no_grad()
def ppo_loss_and_grads(
    actor: Sequence[nn.Linear],
    critic: Sequence[nn.Linear],
    log_std: Tensor,
    x: Tensor,
    act: Tensor,
    old_logp: Tensor,
    neg_adv: Tensor,
    ret: Tensor,
    clip_coef: float,
    vf_coef: float,
    ent_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """PPO's minibatch loss and its gradient, by hand (no autograd graph).

    The policy is ``N(mean(x), diag(exp(log_std))^2)`` with ``mean`` the ``actor`` MLP (its
    Linear layers, ReLU between them) and ``V(x)`` the ``critic`` MLP. With ``M`` samples,
    ``z = (act - mean) * exp(-log_std)``, ``log r = log pi(act) - old_logp`` where
    ``log pi = -z.z/2 - sum(log_std) - D log(2 pi)/2``, ``r = exp(log r)``, ``A = -neg_adv``
    and ``eps = clip_coef``, the loss is

        L = pg + vf_coef * v - ent_coef * H,
        pg = mean(max(-A r, -A clip(r, 1 - eps, 1 + eps))),   v = mean((V(x) - ret)^2),
        H = sum(log_std) + D (1 + log(2 pi)) / 2.

    Gradients, with ``G_i = (-A_i r_i / M) k_i`` where ``k_i = 1`` if the unclipped term is at
    least the clipped one (always inside ``[1 - eps, 1 + eps]``, where both are equal), else 0;
    this is autograd's gradient of ``max``/``clamp`` except where the two terms are equal outside
    the range, which needs ``A_i = 0`` (then ``G_i = 0`` anyway) or a tie by rounding:

        dL/dmean_ij    = G_i z_ij exp(-log_std_j),
        dL/dlog_std_j  = sum_i G_i (z_ij^2 - 1) - ent_coef,
        dL/dV_i        = 2 vf_coef (V_i - ret_i) / M,

    then backpropagated through both MLPs by :func:`mlp_backward_`. Every parameter's
    ``.grad`` (allocated on first use) is overwritten, as after ``zero_grad`` and ``backward``.

    :return: ``(pg, v, log_ratio, actor_hidden, critic_hidden)``: the two loss terms (0-dim),
        ``log r`` per sample and each MLP's hidden activations on ``x`` (for CBP/ReDo).
    """
    m, d = act.shape
    mean, actor_hidden = mlp_forward(actor, x)
    value, critic_hidden = mlp_forward(critic, x)
    inv_std = torch.exp(-log_std)
    z = (act - mean).mul_(inv_std)
    z2 = z.square()
    log_ratio = z2.sum(1).mul_(-0.5).sub_(old_logp).sub_(log_std.sum() + 0.5 * d * LOG_2PI)
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    unclipped_term = neg_adv * ratio
    clipped_term = neg_adv * clipped
    pg = torch.maximum(unclipped_term, clipped_term).mean()
    g = unclipped_term.mul_(unclipped_term >= clipped_term).mul_(1.0 / m)  # dL/dlog_ratio
    if log_std.grad is None:
        log_std.grad = torch.empty_like(log_std)
    torch.mv(z2.sub_(1.0).t(), g, out=log_std.grad)
    if ent_coef:
        log_std.grad.sub_(ent_coef)
    err = value.view(-1) - ret
    v = err.square().mean()
    mlp_backward_(actor, x, actor_hidden, z.mul_(g[:, None]).mul_(inv_std))
    mlp_backward_(critic, x, critic_hidden, err.mul_(2.0 * vf_coef / m)[:, None])
    return pg, v, log_ratio, actor_hidden, critic_hidden


def hidden_taps(net: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``net``'s hidden activations as CBP and ReDo read them
    (:func:`~ppo_cbp.nets.units.sequential_unit_layers`), or ``[]`` for a network it cannot
    describe (not an ``nn.Sequential`` of Linear/Conv2d layers with per-unit activations, e.g.
    one whose CReLU doubles the width): CBP and ReDo cannot run on such a network either."""
    try:
        return sequential_unit_layers(net, "kaiming_uniform")[1]
    except (TypeError, ValueError):
        return []


ExtraLoss = Tensor | Callable[[], Tensor]
"""A loss term added before ``backward``: a tensor, or a function called once the PPO loss is
built (so that its forward passes run inside the same autograd context)."""


@torch.enable_grad()
def ppo_loss_autograd(
    actor: nn.Module,
    critic: nn.Module,
    log_std: Tensor,
    x: Tensor,
    act: Tensor,
    old_logp: Tensor,
    neg_adv: Tensor,
    ret: Tensor,
    clip_coef: float,
    vf_coef: float,
    ent_coef: float = 0.0,
    extra_loss: ExtraLoss | None = None,
    actor_taps: Sequence[nn.Module] | None = None,
    critic_taps: Sequence[nn.Module] | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """PPO's minibatch loss of :func:`ppo_loss_and_grads`, differentiated by autograd.

    The loss is the same, ``L = pg + vf_coef * v - ent_coef * H (+ extra)``, with the policy
    ``N(actor(x), diag(exp(log_std))^2)`` and the value ``critic(x)``, but the actor and critic
    are any modules mapping ``x [M, obs]`` to ``[M, D]`` and ``[M, 1]`` (or ``[M]``): e.g. an
    ``nn.Sequential`` with LayerNorm or CReLU. ``extra_loss`` (a tensor, or a function returning
    one, called after the PPO loss is built) is added before ``backward``, e.g. the churn term of
    :class:`~ppo_cbp.plasticity.c_chain.ChurnReduction`.

    Every parameter of ``actor`` and ``critic`` and ``log_std`` gets its gradient in ``.grad``:
    an existing ``.grad`` is zeroed and accumulated into (the tensor is kept, as the optimizer
    and :class:`AdamStep` may hold it), a missing one is created, and a parameter the loss does
    not reach gets zeros. Runs with gradients enabled even inside ``torch.no_grad()``.

    ``actor_taps``/``critic_taps``: the modules whose outputs are returned as hidden activations
    (default :func:`hidden_taps`, the layers CBP and ReDo act on; pass them to skip that lookup).

    :return: ``(pg, v, log_ratio, actor_hidden, critic_hidden)`` as :func:`ppo_loss_and_grads`
        returns them, all detached: the two loss terms (0-dim), ``log r`` per sample and the
        taps' outputs on ``x``.
    """
    m, d = act.shape
    if x.shape[0] != m or any(t.shape != (m,) for t in (old_logp, neg_adv, ret)):
        raise ValueError(
            f"minibatch tensors disagree: x {tuple(x.shape)}, act {tuple(act.shape)}, old_logp "
            f"{tuple(old_logp.shape)}, neg_adv {tuple(neg_adv.shape)}, ret {tuple(ret.shape)}; "
            f"expected [M, obs], [M, D] and [M] with M = {m}"
        )
    if log_std.shape != (d,):
        raise ValueError(f"log_std has shape {tuple(log_std.shape)}, expected ({d},)")
    params = [*actor.parameters(), log_std, *critic.parameters()]
    for p in params:
        if p.grad is not None:
            p.grad.zero_()
    taps = [hidden_taps(actor) if actor_taps is None else list(actor_taps)]
    taps.append(hidden_taps(critic) if critic_taps is None else list(critic_taps))
    recorders = [ActivationRecorder(t) for t in taps]
    try:
        mean = actor(x)
        value = critic(x)
        hidden = [[h.detach() for h in r.latest()] if r.outputs else [] for r in recorders]
    finally:
        for r in recorders:
            r.remove()
    if mean.shape != act.shape:
        raise ValueError(f"actor output {tuple(mean.shape)}, expected {tuple(act.shape)}")
    z = (act - mean) * torch.exp(-log_std)
    log_ratio = -0.5 * z.square().sum(1) - log_std.sum() - 0.5 * d * LOG_2PI - old_logp
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    pg = torch.maximum(neg_adv * ratio, neg_adv * clipped).mean()
    v = (value.reshape(-1) - ret).square().mean()
    loss = pg + vf_coef * v
    if ent_coef:
        loss = loss - ent_coef * (log_std.sum() + 0.5 * d * (1.0 + LOG_2PI))
    if extra_loss is not None:
        loss = loss + (extra_loss() if callable(extra_loss) else extra_loss)
    loss.backward()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return pg.detach(), v.detach(), log_ratio.detach(), hidden[0], hidden[1]


class AdamStep:
    """``optimizer.step()`` of a fused, single-group ``torch.optim.Adam``, with less Python.

    Between the update's matrix products, ``Optimizer.step`` spent ~130 us per call in Python
    (grouping parameters, looking up state, hooks) on top of its ~130 us kernel. This calls
    the two ops that torch's fused Adam runs, ``torch._foreach_add_(steps, 1)`` and
    ``torch._fused_adam_``, on the optimizer's own state tensors with the group's current
    settings, so the result is bitwise that of ``optimizer.step()`` and ``state_dict``,
    ``load_state_dict`` and in-place state resets (CBP/ReDo) keep working. Any other optimizer
    (not fused, amsgrad, maximize, several groups, a torch without the op), the first step
    (which creates the state) and a step after the state tensors were replaced go through
    ``optimizer.step()``; a change of the optimizer's groups or their parameters is noticed at
    the next call. Parameters without a gradient are not expected.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._configure()

    def _configure(self) -> None:
        groups = self.optimizer.param_groups
        g = groups[0]
        self._layout = self._group_layout()
        self.direct = (
            isinstance(self.optimizer, torch.optim.Adam)
            and len(groups) == 1
            and bool(g.get("fused"))
            and not any(g.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable"))
            and not g.get("decoupled_weight_decay", False)
            and hasattr(torch, "_fused_adam_")
        )
        self.params: list[Tensor] = list(g["params"])
        self._state: tuple[list[Tensor], list[Tensor], list[Tensor]] | None = None

    def _group_layout(self) -> list[tuple[int, ...]]:
        return [tuple(map(id, g["params"])) for g in self.optimizer.param_groups]

    def _lookup(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]] | None:
        state = self.optimizer.state
        if not all(p in state for p in self.params):
            return None
        return (
            [state[p]["exp_avg"] for p in self.params],
            [state[p]["exp_avg_sq"] for p in self.params],
            [state[p]["step"] for p in self.params],
        )

    @torch.no_grad()
    def __call__(self) -> None:
        # Parameters that join or leave the optimizer (a plasticity injection) change its
        # groups: the cached parameter list would keep training the ones that left.
        if self._group_layout() != self._layout:
            self._configure()
        if self.direct:
            s = self._state
            first = self.params[0]
            if s is None or self.optimizer.state.get(first, {}).get("exp_avg") is not s[0][0]:
                s = self._state = self._lookup()
            if s is not None:
                g = self.optimizer.param_groups[0]
                beta1, beta2 = g["betas"]
                torch._foreach_add_(s[2], 1)
                torch._fused_adam_(
                    self.params,
                    [p.grad for p in self.params],
                    s[0],
                    s[1],
                    [],
                    s[2],
                    amsgrad=False,
                    lr=g["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=g["weight_decay"],
                    eps=g["eps"],
                    maximize=False,
                )
                return
        self.optimizer.step()
