"""PSGD Kron against a float64 transcription of kron_torch's code, stacked seeds against runs
alone, resuming, its update-probability schedule, and the two entry points with it."""

from __future__ import annotations

import importlib.util
import io
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import assert_same_state, load, small

from ppo_cbp.errors import UsageError
from ppo_cbp.plasticity.kron import Kron, _upper_product, update_probability
from ppo_cbp.seeding import TAG_KRON, derive_seed
from ppo_cbp.train import Args, main

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# a weight, a bias, a conv kernel (merged to [12, 3]), a size-1 dimension
SHAPES = [(5, 4), (5,), (3, 2, 2, 3), (1, 4)]
# a schedule that skips updates within a few steps, and balancing at half of the updates
FAST = dict(flat_start=2, decay=0.6, min_prob=0.3, balance_prob=0.5)
CONFIGS = {
    "defaults": {},
    "schedule and balancing": dict(FAST, weight_decay=0.05, precond_lr=0.3, b1=0.8),
    "diagonal above 4": dict(FAST, max_size_triangular=4, precond_init_scale=2.0),
    "smart_one_diag": dict(FAST, memory_save_mode="smart_one_diag"),
    "all_diag, not merged": dict(FAST, memory_save_mode="all_diag", merge_dims=False),
}

# ---- kron_torch's definition, transcribed ----------------------------------------------------
# From github.com/evanatyourservice/kron_torch, kron_torch/kron.py at commit
# 884427c32bc45e8293e20c26c85e4ccc4f68c9d1 (the file as of 7a725ea4007ec1d22e4c46347a18f224260116ed):
# ``Kron.step``, ``_init_Q_exprs``, ``_balance_Q``, ``_lb``, ``_solve_triangular_right``,
# ``_calc_A_and_conjB``, ``_update_precond``, ``_precond_grad`` and ``_clip_update_rms``, line
# for line, with three changes: everything in float64 (``precond_dtype`` float64, and no cast to
# float32 in the triangular solve), the balancing draw ``random.Random(42).random()`` and the
# probe ``torch.randn_like(G)`` taken from a given generator (uniform, then each parameter's
# normal draw, in that order), and the 0.01 of the balancing trigger a parameter.


def _ref_schedule(n, max_prob, min_prob, decay, flat_start):
    max_prob = torch.tensor(max_prob, dtype=torch.float32)
    min_prob = torch.tensor(min_prob, dtype=torch.float32)
    decay = torch.tensor(decay, dtype=torch.float32)
    flat_start = torch.tensor(flat_start, dtype=torch.float32)
    prob = max_prob * torch.exp(-decay * (n - flat_start))
    prob.clamp_(min=min_prob, max=max_prob)
    return prob


def _ref_init_Q_exprs(t, scale, max_size, min_ndim_triangular, memory_save_mode, dtype):
    letters = string.ascii_lowercase + string.ascii_uppercase
    shape = t.shape
    if len(shape) == 0:
        Q = [scale * torch.ones_like(t, dtype=dtype)]
        exprA = ",->"
        exprGs = [",->"]
        exprP = ",,->"
    else:
        scale = scale ** (1 / len(shape))
        if memory_save_mode is None:
            dim_diag = [False for _ in shape]
        elif memory_save_mode == "smart_one_diag":
            rev_sorted_dims = np.argsort(shape)[::-1]
            dim_diag = [False for _ in shape]
            sorted_shape = sorted(shape)
            if len(shape) > 1 and sorted_shape[-1] > sorted_shape[-2]:
                dim_diag[rev_sorted_dims[0]] = True
        elif memory_save_mode == "one_diag":
            rev_sorted_dims = np.argsort(shape)[::-1]
            dim_diag = [False for _ in shape]
            dim_diag[rev_sorted_dims[0]] = True
        else:  # "all_diag"
            dim_diag = [True for _ in shape]
        Q = []
        piece1A, piece2A, piece3A = ([], "", "")
        exprGs = []
        piece1P, piece2P, piece3P, piece4P = ([], [], "", "")
        for i, (size, dim_d) in enumerate(zip(shape, dim_diag)):
            if size == 1 or size > max_size or len(shape) < min_ndim_triangular or dim_d:
                Q.append(scale * torch.ones(size, dtype=dtype, device=t.device))
                piece1A.append(letters[i])
                piece2A = piece2A + letters[i]
                piece3A = piece3A + letters[i]
                piece1 = "".join(
                    [(letters[i + 13] if j == i else letters[j]) for j in range(len(shape))]
                )
                exprGs.append(piece1 + "," + piece1 + "->" + letters[i + 13])
                piece1P.append(letters[i + 13])
                piece2P.append(letters[i + 13])
                piece3P = piece3P + letters[i + 13]
                piece4P = piece4P + letters[i + 13]
            else:
                Q.append(scale * torch.eye(size, dtype=dtype, device=t.device))
                piece1A.append(letters[i] + letters[i + 13])
                piece2A = piece2A + letters[i + 13]
                piece3A = piece3A + letters[i]
                piece1 = "".join(
                    [(letters[i + 13] if j == i else letters[j]) for j in range(len(shape))]
                )
                piece2 = "".join(
                    [(letters[i + 26] if j == i else letters[j]) for j in range(len(shape))]
                )
                exprGs.append(piece1 + "," + piece2 + "->" + letters[i + 13] + letters[i + 26])
                a, b, c = (letters[i], letters[i + 13], letters[i + 26])
                piece1P.append(a + b)
                piece2P.append(a + c)
                piece3P = piece3P + c
                piece4P = piece4P + b
        exprA = ",".join(piece1A) + "," + piece2A + "->" + piece3A
        exprP = ",".join(piece1P) + "," + ",".join(piece2P) + "," + piece3P + "->" + piece4P
    return [Q, (exprA, tuple(exprGs), exprP)]


def _ref_balance_Q(Q_in):
    norms = torch.stack([q.norm(float("inf")) for q in Q_in])
    geometric_mean = norms.log().mean().exp()
    norms = geometric_mean / norms
    torch._foreach_mul_(Q_in, list(norms))


def _ref_lb(A, max_abs):
    A /= max_abs
    a0 = torch.einsum("ij,ij->j", A, A)
    i = torch.argmax(a0)
    x = torch.index_select(A, 1, i).flatten().contiguous()
    x = torch.einsum("i,ij->j", x, A)
    x /= x.norm()
    x = torch.einsum("j,kj->k", x, A)
    x = x.norm()
    x *= max_abs
    return x


def _ref_solve_triangular_right(X, A):
    return torch.linalg.solve_triangular(
        A, X.reshape(-1, X.size(-1)), upper=True, left=False, unitriangular=False
    ).reshape_as(X)


def _ref_calc_A_and_conjB(exprA, G, Q, V):
    order = G.dim()
    eps = torch.tensor(torch.finfo(torch.float32).eps, dtype=G.dtype, device=G.device)
    G += eps.sqrt() * G.abs().mean() * V
    conjB = V.permute(*range(1, order), 0)
    for i, q in enumerate(Q):
        conjB = conjB / q if q.dim() < 2 else _ref_solve_triangular_right(conjB, q)
        if i < order - 1:
            conjB = torch.transpose(conjB, i, order - 1)
    A = torch.einsum(exprA, *Q, G)
    return A, conjB


def _ref_update_precond(Q, exprs, G, step, tiny, V):
    exprA, exprGs, _ = exprs
    A, conjB = _ref_calc_A_and_conjB(exprA, G, Q, V)
    for q, exprG in zip(Q, exprGs):
        term1 = torch.einsum(exprG, A, A)
        term2 = torch.einsum(exprG, conjB, conjB)
        term1, term2 = term1 - term2, term1 + term2
        term1 *= step
        norm = term2.norm(float("inf"))
        if q.dim() < 2:
            term1 *= q / norm.clamp_(min=tiny)
        else:
            torch.triu(term1, out=term1)
            term1 /= torch.where(norm > 0, _ref_lb(term2, norm), norm).clamp_(min=tiny)
            term1 = torch.mm(term1, q)
        q.sub_(term1)


def _ref_clip_update_rms(g):
    g.mul_(
        torch.minimum(
            torch.tensor(1.0, dtype=g.dtype, device=g.device),
            1.1 / g.square().mean().sqrt().add(1e-12),
        )
    )


class ReferenceKron:
    """``Kron.step`` of kron_torch for one seed, transcribed (see above)."""

    def __init__(self, params, seed, lr=0.0003, b1=0.9, weight_decay=0.0, precond_lr=0.1,
                 precond_init_scale=1.0, max_size_triangular=8192, min_ndim_triangular=2,
                 memory_save_mode=None, merge_dims=True, max_prob=1.0, min_prob=0.03,
                 decay=0.001, flat_start=500, balance_prob=0.01):  # fmt: skip
        self.params = params
        self.group = dict(
            lr=lr, b1=b1, weight_decay=weight_decay, precond_lr=precond_lr,
            precond_init_scale=precond_init_scale, max_size_triangular=max_size_triangular,
            min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode,
            merge_dims=merge_dims,
        )  # fmt: skip
        self.schedule = (max_prob, min_prob, decay, flat_start)
        self.balance_prob = balance_prob
        self.state = [{} for _ in params]
        self._prob_step = torch.tensor(0, dtype=torch.int32)
        self._update_counter = torch.tensor(0, dtype=torch.int32)
        self.rng = torch.Generator(device=params[0].device).manual_seed(derive_seed(seed, TAG_KRON))
        self.updates = self.balances = 0

    @torch.no_grad()
    def step(self):
        group, precond_dtype = self.group, F64
        update_prob = _ref_schedule(self._prob_step.to(dtype=torch.float32), *self.schedule)
        self._update_counter += 1
        do_update = self._update_counter >= 1 / update_prob
        if do_update:
            self._update_counter = torch.tensor(0, dtype=torch.int32)
        self._prob_step += 1
        draw = torch.rand(1, generator=self.rng, device=self.rng.device)
        balance = bool(draw < self.balance_prob) and bool(do_update)
        self.updates += bool(do_update)
        self.balances += balance
        for p, state in zip(self.params, self.state):
            if p.grad is None:
                continue
            grad = p.grad
            if len(state) == 0:
                state["step"] = 0
                if grad.dim() > 2 and group.get("merge_dims", True):
                    shape1 = [np.prod(grad.shape[:-1]), grad.shape[-1]]
                    shape2 = [grad.shape[0], np.prod(grad.shape[1:])]
                    shape = shape1 if np.diff(shape1) <= np.diff(shape2) else shape2
                    state["merged_shape"] = shape
                    grad = grad.view(*shape)
                state["momentum_buffer"] = torch.zeros_like(grad, dtype=p.dtype)
                state["Q"], state["exprs"] = _ref_init_Q_exprs(
                    grad,
                    group["precond_init_scale"],
                    group["max_size_triangular"],
                    group["min_ndim_triangular"],
                    group["memory_save_mode"],
                    dtype=precond_dtype,
                )
            state["step"] += 1
            if "merged_shape" in state:
                grad = grad.view(*state["merged_shape"])
            beta = group["b1"]
            momentum_buffer = state["momentum_buffer"]
            momentum_buffer.mul_(beta).add_(grad, alpha=1 - beta)
            debiased_momentum = momentum_buffer / (1 - beta ** state["step"])
            debiased_momentum = debiased_momentum.to(dtype=precond_dtype)
            if grad.dim() > 1 and balance:
                _ref_balance_Q(state["Q"])
            if do_update:
                V = torch.empty_like(debiased_momentum).normal_(generator=self.rng)
                _ref_update_precond(
                    state["Q"],
                    state["exprs"],
                    debiased_momentum,
                    torch.tensor(group["precond_lr"], dtype=precond_dtype, device=grad.device),
                    torch.tensor(
                        torch.finfo(precond_dtype).tiny, dtype=precond_dtype, device=grad.device
                    ),  # fmt: skip
                    V,
                )
            pre_grad = torch.einsum(state["exprs"][-1], *state["Q"], *state["Q"], debiased_momentum)
            _ref_clip_update_rms(pre_grad)
            pre_grad = pre_grad.view(p.shape)
            if group["weight_decay"] != 0 and p.dim() >= 2:
                pre_grad.add_(p, alpha=group["weight_decay"])
            p.add_(pre_grad.to(dtype=p.dtype), alpha=-group["lr"])


# ---- helpers ---------------------------------------------------------------------------------


def _params(seed: int, device, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=F64).to(device).requires_grad_() for s in shapes]


def _grads(step: int, seed: int, device, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, generator=g, dtype=F64).to(device) for s in shapes]


def _step(opt, params, grads):
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    opt.step()


# ---- the optimizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_kron_follows_kron_torch(device, config):
    """12 steps of one seed equal kron_torch's code, given the same draws."""
    hp = dict(CONFIGS[config], lr=0.05)
    params, mirror = _params(0, device), _params(0, device)
    opt = Kron(params, **hp, seeds=[7])
    ref = ReferenceKron(mirror, 7, **hp)
    for t in range(12):
        grads = _grads(t, 0, device)
        _step(opt, params, grads)
        _step(ref, mirror, grads)
        for p, e in zip(params, mirror):
            torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-12, atol=1e-12)
    for p, r in zip(params, ref.state):
        for q, e in zip(opt.state[p]["Q"], r["Q"]):
            torch.testing.assert_close(q[0], e, rtol=1e-12, atol=1e-12)
        assert opt.state[p]["step"] == r["step"] == 12
    # what the comparison went through: updates; skipped updates and balancing where asked
    assert not torch.equal(opt.state[params[0]]["Q"][0][0], torch.eye(5, dtype=F64, device=device))
    if config == "defaults":
        assert ref.updates == 12
    else:
        assert 3 <= ref.updates < 12 and ref.balances >= 1, (ref.updates, ref.balances)


@pytest.mark.parametrize("device", DEVICES)
def test_large_factors_follow_kron_torch(device):
    """Factors wider than the blocked triangular product's leaf (its recursion), with one
    diagonal factor beside them, equal kron_torch's code over 6 steps."""
    shapes = [(150, 140), (1, 260)]
    params, mirror = _params(0, device, shapes), _params(0, device, shapes)
    opt = Kron(params, lr=0.05, seeds=[3])
    ref = ReferenceKron(mirror, 3, lr=0.05)
    for t in range(6):
        grads = _grads(t, 0, device, shapes)
        _step(opt, params, grads)
        _step(ref, mirror, grads)
    for p, e, r in zip(params, mirror, ref.state):
        torch.testing.assert_close(p.detach(), e.detach(), rtol=1e-12, atol=1e-12)
        for q, f in zip(opt.state[p]["Q"], r["Q"]):
            torch.testing.assert_close(q[0], f, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, leaf", [(13, 4), (9, 3), (300, 128)])
def test_upper_product_is_the_triangular_product(n, leaf):
    """``_upper_product(a, b)`` is ``triu(a) @ b`` for upper triangular ``b`` (float64), and
    exactly 0 below the diagonal."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(2, n, n, generator=g, dtype=F64)
    b = torch.randn(2, n, n, generator=g, dtype=F64).triu()
    out = _upper_product(a, b, leaf)
    expected = torch.einsum("sij,sjk->sik", a.triu(), b)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.tril(-1), torch.zeros_like(out))


def test_factor_kinds_follow_kron_torch():
    """Triangular and diagonal factors, merged shapes, as kron_torch chooses them."""
    params = _params(0, "cpu")
    opt = Kron(params, max_size_triangular=4, seeds=[1])
    _step(opt, params, _grads(0, 0, "cpu"))
    kinds = [[tuple(q.shape[1:]) for q in opt.state[p]["Q"]] for p in params]
    # [5, 4]: 5 > 4 diagonal, 4 triangular; bias diagonal; [3,2,2,3] -> [12, 3]; [1, 4]: size 1
    assert kinds == [[(5,), (4, 4)], [(5,)], [(12,), (3, 3)], [(1,), (4, 4)]]


def test_a_scalar_is_a_size_one_vector():
    """kron_torch fails on a 0-dim parameter (its probe's permute); here it steps as ``[1]``."""
    a, b = torch.tensor(0.7, dtype=F64, requires_grad=True), torch.tensor([0.7], dtype=F64)
    b.requires_grad_()
    opts = [Kron([x], lr=0.1, seeds=[2]) for x in (a, b)]
    for t in range(5):
        for x, o in zip((a, b), opts):
            x.grad = torch.full_like(x, 0.3 * t - 0.5)
            o.step()
    assert (
        a.shape == ()
        and torch.equal(a.reshape(1), b)
        and not torch.equal(b, torch.tensor([0.7], dtype=F64))
    )


@pytest.mark.parametrize("device", DEVICES)
def test_stacked_seeds_equal_separate_runs(device):
    """Each seed's factors, momentum, draws and clipping are its own: bit for bit."""
    seeds = [3, 9, 5]
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05)
    alone = [_params(i, device) for i in range(3)]
    stacked = [
        torch.stack([a[k].detach() for a in alone]).requires_grad_() for k in range(len(SHAPES))
    ]
    opts = [Kron(a, **hp, seeds=[s]) for a, s in zip(alone, seeds)]
    opt = Kron(stacked, **hp, seed_dims=1, seeds=seeds)
    for t in range(10):
        grads = [_grads(t, i, device) for i in range(3)]
        for i, a in enumerate(alone):
            _step(opts[i], a, grads[i])
        _step(opt, stacked, [torch.stack([g[k] for g in grads]) for k in range(len(SHAPES))])
    for i, a in enumerate(alone):
        for k, p in enumerate(a):
            assert torch.equal(stacked[k][i], p), (i, k)
            for q, qa in zip(opt.state[stacked[k]]["Q"], opts[i].state[p]["Q"]):
                assert torch.equal(q[i], qa[0])


def test_resume_is_exact():
    """state_dict through a file read with weights_only, then more steps: as if never stopped
    (mid-way between two updates of the schedule, the counter and generators included)."""
    hp = dict(CONFIGS["schedule and balancing"], lr=0.05)
    params, other = _params(0, "cpu"), _params(1, "cpu")
    opt = Kron(params, **hp, seeds=[4])
    steps = [_grads(t, 0, "cpu") for t in range(14)]
    for grads in steps[:8]:
        _step(opt, params, grads)
    assert opt.update_counter > 0
    with torch.no_grad():
        for q, p in zip(other, params):
            q.copy_(p)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed = Kron(other, **hp, seeds=[99])  # another seed: the state must bring the generator
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert (resumed.prob_step, resumed.update_counter) == (opt.prob_step, opt.update_counter)
    for grads in steps[8:]:
        _step(opt, params, grads)
        _step(resumed, other, grads)
    for p, q in zip(params, other):
        assert torch.equal(p, q)
        for a, b in zip(opt.state[p]["Q"], resumed.state[q]["Q"]):
            assert torch.equal(a, b)


def test_update_probability_schedule():
    """p(n) = clamp(exp(-0.001 (n - 500)), 0.03, 1): 1 for 500 steps, 0.03 from n ~ 4007; the
    preconditioner is updated when the steps since the last update reach 1 / p."""
    for n in [0, 250, 500, 501, 1000, 2000, 4000, 4007, 4008, 10_000]:
        want = min(max(math.exp(-0.001 * (n - 500)), 0.03), 1.0)
        assert float(update_probability(n)) == pytest.approx(want, rel=1e-6), n
    assert float(update_probability(10_000)) == pytest.approx(0.03, rel=1e-7)
    # the update steps, by the rule in float64, against the optimizer's counter
    want, counter = [], 0
    for n in range(6000):
        counter += 1
        if counter >= 1 / min(max(math.exp(-0.001 * (n - 500)), 0.03), 1.0):
            want.append(n)
            counter = 0
    w = torch.zeros(2, requires_grad=True)
    opt = Kron([w], seeds=[0])
    got = []
    for n in range(6000):
        w.grad = torch.ones(2)
        opt.step()
        if opt.update_counter == 0:
            got.append(n)
    assert got == want
    assert got[:500] == list(range(500)) and np.diff(got[-20:]).tolist() == [34] * 19
    # 1 / p, remembered over its constant stretches, equals it computed anew at every step, in
    # any order of steps (a checkpoint may take the schedule back)
    for n in [*range(0, 6000, 7), 4500, 100, 3000, 501, 9000, 4006, 4007]:
        opt.prob_step = n
        assert opt._update_interval(opt.param_groups[0]) == float(1 / update_probability(n)), n


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0), dict(b1=1.0), dict(weight_decay=-1), dict(precond_lr=0),
     dict(min_prob=0), dict(memory_save_mode="some"), dict(seed_dims=2)],
)  # fmt: skip
def test_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        Kron([torch.zeros(2, requires_grad=True)], **kwargs)


# ---- the entry points ------------------------------------------------------------------------


def test_ppo_kron_update_and_resume(tmp_path):
    """--kron: Kron over both networks and the log-std, lr 3e-4 (Plasticine's), and a run
    interrupted after one update and resumed equals one that never stopped."""
    from ppo_cbp.ppo.settings import resolve_args

    args = resolve_args(Args(kron=True, device="cpu"))
    assert args.learning_rate == 3e-4 and args.weight_decay == 0.0
    kw = dict(kron=True, num_steps=64, num_minibatches=2, update_epochs=1)
    full = main(small(tmp_path, run_name="full", steps=2 * 64, **kw))
    part = main(small(tmp_path, run_name="part", steps=64, **kw)).run_dir
    main(Args(resume=str(part), steps=2 * 64))
    a, b = load(full.run_dir), load(part)
    assert_same_state(a, b)
    opt = b["optimizer"]
    assert opt["prob_step"] == 4 and len(opt["generators"]) == 1
    assert all(len(st["Q"]) in (1, 2) for st in opt["state"].values())
    for key in ("prob_step", "update_counter"):
        assert a["optimizer"][key] == opt[key]
    assert all(map(torch.equal, a["optimizer"]["generators"], opt["generators"]))
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(q, r) for q, r in zip(x["Q"], y["Q"]))


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(kron=True, upgd=True), "--kron and --upgd contradict"),
        (dict(kron=True, adam_reset=True), "--adam-reset and --kron contradict"),
    ],
)
def test_ppo_kron_refusals(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        main(small(tmp_path, **flags))


ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "supervised_kron", ROOT / "scripts" / "supervised.py"
)
supervised = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(supervised)


def test_supervised_kron_run_and_resume(tmp_path, capsys):
    """--method kron: a run extended by --resume equals the run at that length."""
    settings = ["--method", "kron", "--kron-precond-lr", "0.2", "--hidden", "7"]
    settings += ["--bin-size", "20", "--dtype", "float64", "--device", "cpu", "--no-progress"]
    scr = "slowly-changing-regression"
    full, part = tmp_path / "full", tmp_path / "part"
    supervised.main([scr, *settings, "--examples", "80", "--seeds", "0", "1", "--out", str(full)])
    supervised.main([scr, *settings, "--examples", "40", "--seeds", "0", "1", "--out", str(part)])
    supervised.main([scr, "--out", str(part), "--resume", "--examples", "80", "--no-progress"])
    for seed in (0, 1):
        rows = [(d / f"seed_{seed}" / "metrics.csv").read_text() for d in (full, part)]
        assert rows[0] == rows[1]
    with pytest.raises(SystemExit) as info:
        supervised.main([scr, "--method", "bp", "--kron-b1", "0.5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--kron-b1 only applies with --method kron" in err, err


def test_supervised_kron_is_the_optimizer():
    """The autograd learner steps Kron over its stacked parameters, with its settings."""
    from ppo_cbp.benchmarks.autograd_learner import AutogradLearner
    from ppo_cbp.benchmarks.common import MethodConfig, resolve_method
    from ppo_cbp.benchmarks.scr import DEFAULTS

    method = resolve_method(MethodConfig(method="kron", kron_b1=0.8), DEFAULTS)
    assert (method.lr, method.kron_b1, method.kron_precond_lr) == (3e-4, 0.8, 0.1)
    learner = AutogradLearner(
        [3, 4, 2], [0, 1], method, loss="mse", device=torch.device("cpu"), dtype=F64
    )
    assert isinstance(learner.opt, Kron) and learner.opt.seed_dims == 1
    assert learner.opt.param_groups[0]["b1"] == 0.8
    with pytest.raises(UsageError, match="adam and kron contradict"):
        resolve_method(MethodConfig(method="adam+kron"), DEFAULTS)
