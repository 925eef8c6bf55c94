"""Kron's kernel path (one numba call per small parameter, :func:`ppo_cbp.nets.kernels.kron_step_`)
against its tensor path: the same steps up to rounding, the same draws; exact resuming and
stacked seeds on the kernel path; switching paths mid-run."""

from __future__ import annotations

import io

import pytest
import torch

from ppo_cbp.nets import kernels
from ppo_cbp.plasticity import kron
from ppo_cbp.plasticity.kron import Kron

F64 = torch.float64
FAST = dict(flat_start=2, decay=0.6, min_prob=0.3, balance_prob=0.5)
CONFIGS = {
    "defaults": {},
    "weight decay, precond_lr, b1": dict(weight_decay=0.05, precond_lr=0.3, b1=0.8),
    "schedule and balancing": dict(FAST, weight_decay=0.05, precond_lr=0.2),
    "diagonal above 5": dict(FAST, max_size_triangular=5, precond_init_scale=2.0),
    "smart_one_diag": dict(FAST, memory_save_mode="smart_one_diag"),
    "one_diag": dict(FAST, memory_save_mode="one_diag"),
    "all_diag": dict(FAST, memory_save_mode="all_diag", b1=0.0),
}
# matrices (one with a size-1 dimension), vectors, a scalar-like vector, a merged conv kernel
SHAPES = [(5, 21), (1, 6), (7, 3), (5,), (1,), (2, 3, 2)]


class Counter:
    """``kernels.kron_step_``, counting its calls."""

    def __init__(self):
        self.calls = 0
        self.wrapped = kernels.kron_step_

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.wrapped(*args, **kwargs)


@pytest.fixture
def counter(monkeypatch):
    c = Counter()
    monkeypatch.setattr(kernels, "kron_step_", c)
    return c


def _params(shapes, seeds: int | None, dtype, seed: int = 0):
    """Parameters ``[seeds, *shape]`` (``shape`` when ``seeds`` is None)."""
    g = torch.Generator().manual_seed(seed)
    lead = () if seeds is None else (seeds,)
    return [torch.randn(*lead, *s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _grads(params, step: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def _run(params, opt, steps, start: int = 0, seed: int = 0):
    for t in range(start, start + steps):
        for p, gr in zip(params, _grads(params, t, seed)):
            p.grad = gr
        opt.step()


def _copies(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    scale = b.abs().max().item() or 1.0
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, (err, scale)


def _compare(pa, oa, pb, ob, rtol):
    for a, b in zip(pa, pb):
        _close(a.detach(), b.detach(), rtol)
        sa, sb = oa.state[a], ob.state[b]
        assert sa["step"] == sb["step"]
        _close(sa["momentum_buffer"], sb["momentum_buffer"], rtol)
        assert [q.shape for q in sa["Q"]] == [q.shape for q in sb["Q"]]
        for qa, qb in zip(sa["Q"], sb["Q"]):
            assert qa.dtype == qb.dtype == a.dtype
            _close(qa, qb, rtol)


def _both_paths(monkeypatch, counter, shapes, hp, seeds, dtype, steps=30):
    """The same run on the tensor path and on the kernel path."""
    seed_list = list(range(3, 3 + (seeds or 1)))
    kw = dict(hp, lr=0.05, seed_dims=0 if seeds is None else 1, seeds=seed_list)
    torch_params = _params(shapes, seeds, dtype)
    kernel_params = _copies(torch_params)
    size = kron.KERNEL_MAX_SIZE
    monkeypatch.setattr(kron, "KERNEL_MAX_SIZE", 0)
    torch_opt = Kron(torch_params, **kw)
    _run(torch_params, torch_opt, steps)
    assert counter.calls == 0
    monkeypatch.setattr(kron, "KERNEL_MAX_SIZE", size)
    kernel_opt = Kron(kernel_params, **kw)
    _run(kernel_params, kernel_opt, steps)
    assert counter.calls == steps * len(shapes)
    return torch_params, torch_opt, kernel_params, kernel_opt


@pytest.mark.parametrize("seeds", [3, 1, None])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kernel_follows_tensor_path_float64(monkeypatch, counter, config, seeds):
    """30 steps on both paths agree to 1e-12 (relative): parameters, momentum, factors."""
    runs = _both_paths(monkeypatch, counter, SHAPES, CONFIGS[config], seeds, F64)
    _compare(*runs, rtol=1e-12)
    params, opt = runs[2:]
    for p in params:  # every factor was updated
        initial = opt._init_state(p, opt.param_groups[0])["Q"]
        assert not any(torch.equal(q, i) for q, i in zip(opt.state[p]["Q"], initial))


@pytest.mark.parametrize("config", ["defaults", "schedule and balancing", "diagonal above 5"])
def test_kernel_follows_tensor_path_float32(monkeypatch, counter, config):
    """In float32 (factors float32 too) to float32's rounding."""
    runs = _both_paths(monkeypatch, counter, SHAPES, CONFIGS[config], 3, torch.float32)
    _compare(*runs, rtol=1e-4)


def _scr_layers(seeds: int | None, dtype, seed: int):
    """The SCR learner's layout: each layer one tensor ``[S, out, in + 1]``, Kron given its
    weight and bias views (strided), whose gradients are views of one tensor too."""
    g = torch.Generator().manual_seed(seed)
    lead = () if seeds is None else (seeds,)
    layers = [torch.randn(*lead, o, i + 1, generator=g, dtype=dtype) for o, i in [(5, 20), (1, 5)]]
    grads = [torch.zeros_like(layer) for layer in layers]
    params = []
    for layer, grad in zip(layers, grads):
        w, b = layer[..., :-1], layer[..., -1]
        w.requires_grad_(), b.requires_grad_()
        w.grad, b.grad = grad[..., :-1], grad[..., -1]
        params += [w, b]
    return layers, grads, params


def _scr_run(layers, grads, opt, steps, start=0, seed=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 * seed + t)
        for grad in grads:
            grad.copy_(torch.randn(grad.shape, generator=g, dtype=grad.dtype))
        opt.step()


def test_strided_views_take_the_kernel(monkeypatch, counter):
    """Weight and bias views of one tensor per layer (their gradients too), as the SCR
    learner passes them: on the kernel path, the same as on the tensor path."""
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05, seed_dims=1, seeds=[1, 2, 3])
    runs = []
    for size in (0, kron.KERNEL_MAX_SIZE):
        monkeypatch.setattr(kron, "KERNEL_MAX_SIZE", size)
        layers, grads, params = _scr_layers(3, F64, 0)
        assert not params[0].is_contiguous() and not params[0].grad.is_contiguous()
        opt = Kron(params, **hp)
        _scr_run(layers, grads, opt, 30)
        runs.append((params, opt))
    assert counter.calls == 30 * 4
    _compare(*runs[0], *runs[1], rtol=1e-12)


def test_only_small_cpu_parameters_take_the_kernel(counter):
    """A dimension above KERNEL_MAX_SIZE, an unmerged 3-D parameter and a float16 one stay on
    the tensor path; the rest take the kernel."""
    big = kron.KERNEL_MAX_SIZE + 1
    params = [
        torch.zeros(3, big, 2, requires_grad=True),
        torch.zeros(3, 2, big, requires_grad=True),
        torch.zeros(3, big, requires_grad=True),
        torch.zeros(3, 4, 3, requires_grad=True),
    ]
    opt = Kron(params, seed_dims=1, seeds=[0, 1, 2])
    _run(params, opt, 2)
    assert counter.calls == 2  # the last one only
    unmerged = torch.zeros(3, 2, 2, 2, dtype=F64, requires_grad=True)
    _run([unmerged], Kron([unmerged], merge_dims=False, seed_dims=1, seeds=[0, 1, 2]), 2)
    half = torch.zeros(3, 4, dtype=torch.float16, requires_grad=True)
    _run([half], Kron([half], seed_dims=1, seeds=[0, 1, 2]), 2)
    assert counter.calls == 2


def test_kernel_resume_is_exact(counter):
    """A state_dict through torch.save mid-run (between two updates of the schedule), then
    more steps on the kernel path: bit for bit the uninterrupted run."""
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05, seed_dims=1, seeds=[4, 5, 6])
    params = _params(SHAPES, 3, F64)
    opt = Kron(params, **hp)
    _run(params, opt, 9)
    assert opt.update_counter > 0
    other = _copies(params)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = Kron(other, **dict(hp, seeds=[7, 8, 9]))  # the state brings the generators
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    _run(params, opt, 12, start=9)
    _run(other, resumed, 12, start=9)
    assert counter.calls == (9 + 12 + 12) * len(SHAPES)
    for p, q in zip(params, other):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], resumed.state[q]["momentum_buffer"])
        for a, b in zip(opt.state[p]["Q"], resumed.state[q]["Q"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_kernel_stacked_seeds_equal_separate_runs(counter, dtype):
    """Each seed of a stack (strided views) equals that seed run alone (seed_dims=0), bit for
    bit, on the kernel path."""
    seeds = [3, 9, 5]
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05)
    stacked_layers, stacked_grads, stacked = _scr_layers(3, dtype, 0)
    alone = [_scr_layers(None, dtype, 0) for _ in seeds]
    for i, (layers, _, _) in enumerate(alone):
        for layer, stacked_layer in zip(layers, stacked_layers):
            layer.copy_(stacked_layer[i])
    opt = Kron(stacked, **hp, seed_dims=1, seeds=seeds)
    opts = [Kron(params, **hp, seeds=[s]) for (_, _, params), s in zip(alone, seeds)]
    for t in range(12):
        g = torch.Generator().manual_seed(t)
        for k, grad in enumerate(stacked_grads):
            grad.copy_(torch.randn(grad.shape, generator=g, dtype=dtype))
            for (_, grads, _), s in zip(alone, range(3)):
                grads[k].copy_(grad[s])
        opt.step()
        for o in opts:
            o.step()
    assert counter.calls == 12 * 4 * 4
    for i, (_, _, params) in enumerate(alone):
        for p, q in zip(stacked, params):
            assert torch.equal(p[i], q), i
            assert torch.equal(
                opt.state[p]["momentum_buffer"][i], opts[i].state[q]["momentum_buffer"]
            )
            for a, b in zip(opt.state[p]["Q"], opts[i].state[q]["Q"]):
                assert torch.equal(a[i], b[0])


def test_switching_paths_mid_run(monkeypatch, counter):
    """The state has one layout on both paths: a run that takes the tensor path for 10 steps
    and the kernel path after follows the tensor path throughout."""
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05, seed_dims=1, seeds=[0, 1, 2])
    params, other = _params(SHAPES, 3, F64), _params(SHAPES, 3, F64)
    monkeypatch.setattr(kron, "KERNEL_MAX_SIZE", 0)
    reference, switched = Kron(params, **hp), Kron(other, **hp)
    _run(params, reference, 25)
    _run(other, switched, 10)
    monkeypatch.setattr(kron, "KERNEL_MAX_SIZE", 64)
    _run(other, switched, 15, start=10)
    assert counter.calls == 15 * len(SHAPES)
    _compare(params, reference, other, switched, rtol=1e-12)
