"""Slowly-Changing Regression (SCR), the small continual regression problem of Dohare et al. (2024).

Input
-----
Each example's input is a binary vector of ``m + 1`` entries, in this order::

    x = [ s_1 .. s_f | r_1 .. r_(m-f) | 1 ]
          slow bits    random bits     constant bias input

- The ``f`` slow bits are held fixed for ``T`` examples (one *segment*); segment ``k`` covers
  examples ``k*T .. (k+1)*T - 1``. The slow bits of segment 0 are uniform random. With
  ``flip_one=True`` (the paper's text, the default), at the start of every later segment one of the
  ``f`` bits, chosen uniformly, is flipped. With ``flip_one=False`` all ``f`` bits are redrawn
  uniformly at random every segment (the official data behind the published figure, ``prob.json``).
- The ``m - f`` random bits are i.i.d. Bernoulli(0.5) for every example.
- The last entry is the constant 1 (the paper's ``(m+1)``-th bit). ``include_bias_input=False`` drops
  it from the returned ``x`` (the target net still sees it).

Paper defaults: ``m = 20``, ``f = 15``, ``T = 10,000``.

Target
------
A fixed net of ``n_hidden = 100`` linear threshold units (LTUs). All its weights are drawn
uniformly from {-1, +1}: the input weights ``W`` (``[n_hidden, m + 1]``, last column = weight of the
bias input) and the output weights ``v`` (``[n_hidden]``). With ``S_i`` the number of negative
entries of row ``W_i`` (bias-input weight included), unit ``i`` has threshold::

    theta_i = beta * (m + 1) - S_i,        beta = 0.7

and outputs ``LTU_i(x) = 1 if W_i . x > theta_i else 0``. The target is
``y = sum_i v_i LTU_i(x)`` (plus ``b`` drawn from {-1, +1} if ``output_bias=True``; the official
target net has such an output bias, the paper does not mention one, default off).

Since ``W_i . x <= (m + 1) - S_i``, the unit fires only when ``x`` matches the positive weights of
``W_i`` to within a fraction ``1 - beta`` of the inputs. This is the intent of the official
``FixLTUNet``; that code computes ``S_i = (m - sum_j W_ij + b_i) / 2``, which has the bias-weight
term with the wrong sign and misses it in the count (the intended count is
``(m + 1 - sum_j W_ij - b_i) / 2``). We use the intended count.

Exactness: ``W_i . x`` is an integer, computed exactly in float32. Because of that,
``W_i . x > theta_i`` is evaluated as ``W_i . x > floor(theta_i)`` with ``beta * (m + 1)`` rounded
to 9 decimals first, so that a mathematically integral threshold (e.g. ``beta = 1``) is not moved
across an integer by floating-point rounding. ``y`` is an integer in ``[-n_hidden - 1,
n_hidden + 1]``, exact in every floating dtype.

Reproducibility
---------------
Example ``t`` of a stream is a pure function of ``(seed, t)``: :meth:`SlowlyChangingRegression.generate`
returns the same values however the stream is cut into calls (checkpoint/resume, lockstep seeds),
and on every device. All draws use NumPy ``PCG64`` seeded by ``SeedSequence([seed, tag, index])``
and only its raw 64-bit output (``bit_generator.random_raw``, stable across NumPy versions):

- target weights: tag 0;
- random bits: tag 4, one draw per chunk of ``2^16`` examples;
- slow bits: blocks of 1024 segments; ``flip_one=False``: tag 2 per block; ``flip_one=True``: initial
  bits tag 1, flip indices tag 3 per block (``raw mod f``, bias below ``f / 2^64``), and the state
  of segment ``k`` is the initial state with every bit toggled by the flips of segments ``1..k``.

Bits are drawn on the host (about 40 kB per 65,536 examples), copied once per chunk to the device
and cached there; the inputs and targets are assembled on the device. For speed on a GPU, call
``generate`` with large ``n`` (e.g. one segment) and step through the result on the device.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from ppo_cbp.seeding import (
    SCR_FLIP,
    SCR_INITIAL_BITS,
    SCR_RANDOM,
    SCR_SLOW,
    SCR_TARGET,
    indexed_rng,
)

__all__ = ["SlowlyChangingRegression", "SlowlyChangingRegressionBatch"]


_RANDOM_CHUNK = 1 << 16  # examples per random-bit draw
_SLOW_BLOCK = 1 << 10  # segments per slow-bit draw
_CACHE_SIZE = 4


def _raw_bits(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` fair bits (uint8) from the raw 64-bit stream, least significant bit first."""
    words = rng.bit_generator.random_raw(-(-count // 64)).astype("<u8")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:count]


def _check_int(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class SlowlyChangingRegression:
    """One Slowly-Changing Regression stream (one seed): inputs and targets of any example range.

    :param seed: run seed (non-negative integer); fixes the target net and the whole input stream.
    :param n_inputs: ``m``, number of input bits, bias input not counted (paper: 20).
    :param n_slow: ``f``, number of slowly-changing bits, ``0 <= f <= m`` (paper: 15).
    :param n_hidden: LTUs in the target net (paper: 100).
    :param beta: ``beta`` in ``theta_i = beta (m + 1) - S_i``, in (0, 1] (paper: 0.7).
    :param change_every: ``T``, examples per segment of fixed slow bits (paper: 10,000).
    :param flip_one: flip one uniformly chosen slow bit per segment (paper's text, default) instead
        of redrawing all slow bits (official data).
    :param include_bias_input: return ``x`` with the constant-1 column (``m + 1`` entries).
    :param output_bias: add an output bias drawn from {-1, +1} to the target (official target net).
    :param device: device of the generated tensors.
    :param dtype: floating dtype of the generated ``x`` and ``y``.

    The attributes are CPU float64 reference copies, for inspection:

    :ivar input_weights: ``[n_hidden, m+1]`` (last column: bias-input weight).
    :ivar output_weights: ``[n_hidden]``.
    :ivar output_bias_value: float, 0.0 without output bias.
    :ivar n_negative_weights: ``S`` (int64 ``[n_hidden]``).
    :ivar thresholds: ``theta`` ``[n_hidden]``.
    """

    def __init__(
        self,
        seed: int,
        n_inputs: int = 20,
        n_slow: int = 15,
        n_hidden: int = 100,
        beta: float = 0.7,
        change_every: int = 10_000,
        flip_one: bool = True,
        include_bias_input: bool = True,
        output_bias: bool = False,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        _check_int("seed", seed, 0)
        _check_int("n_inputs", n_inputs, 1)
        _check_int("n_slow", n_slow, 0)
        _check_int("n_hidden", n_hidden, 1)
        _check_int("change_every", change_every, 1)
        if n_slow > n_inputs:
            raise ValueError(f"n_slow must be <= n_inputs ({n_inputs}), got {n_slow}")
        if not 0.0 < float(beta) <= 1.0:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")

        self.seed = int(seed)
        self.n_inputs = int(n_inputs)
        self.n_slow = int(n_slow)
        self.n_random = self.n_inputs - self.n_slow
        self.n_hidden = int(n_hidden)
        self.beta = float(beta)
        self.change_every = int(change_every)
        self.flip_one = bool(flip_one)
        self.include_bias_input = bool(include_bias_input)
        self.output_bias = bool(output_bias)
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_features = self.n_inputs + 1 if self.include_bias_input else self.n_inputs

        m1 = self.n_inputs + 1
        rng = indexed_rng(self.seed, SCR_TARGET, 0)
        bits = _raw_bits(rng, self.n_hidden * m1 + self.n_hidden + 1).astype(np.int64)
        w = 2 * bits[: self.n_hidden * m1].reshape(self.n_hidden, m1) - 1
        v = 2 * bits[self.n_hidden * m1 : -1] - 1
        b = float(2 * bits[-1] - 1) if self.output_bias else 0.0
        n_neg = (w < 0).sum(axis=1)
        theta = round(self.beta * m1, 9) - n_neg.astype(np.float64)

        self.input_weights = torch.from_numpy(w.astype(np.float64))
        self.output_weights = torch.from_numpy(v.astype(np.float64))
        self.output_bias_value = b
        self.n_negative_weights = torch.from_numpy(n_neg)
        self.thresholds = torch.from_numpy(theta)

        # Device copies used for generation; integer-valued so float32 arithmetic is exact.
        self._w = torch.from_numpy(w.T.astype(np.float32)).to(self.device)  # [m+1, H]
        self._theta_floor = torch.from_numpy(np.floor(theta).astype(np.float32)).to(self.device)
        self._v = torch.from_numpy(v.astype(np.float32)[:, None]).to(self.device)  # [H, 1]

        self._random_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._slow_cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        # _carry[k]: slow bits just before block k's flips (flip_one); _carry[0] = segment 0.
        self._carry: list[np.ndarray] = []

    # ----------------------------------------------------------------------------------------------
    # Slow bits

    def _initial_slow_bits(self) -> np.ndarray:
        return _raw_bits(indexed_rng(self.seed, SCR_INITIAL_BITS, 0), self.n_slow)

    def _slow_block_host(self, block: int) -> np.ndarray:
        """Slow bits (uint8 ``[_SLOW_BLOCK, f]``) of segments ``block*B .. block*B + B - 1``."""
        f, nb = self.n_slow, _SLOW_BLOCK
        if f == 0:
            return np.zeros((nb, 0), dtype=np.uint8)
        if not self.flip_one:
            return _raw_bits(indexed_rng(self.seed, SCR_SLOW, block), nb * f).reshape(nb, f)
        if not self._carry:
            self._carry.append(self._initial_slow_bits())
        while len(self._carry) <= block:  # carries of all earlier blocks, computed once
            k = len(self._carry) - 1
            self._carry.append(self._flip_block(k)[-1])
        return self._flip_block(block)

    def _flip_block(self, block: int) -> np.ndarray:
        f, nb = self.n_slow, _SLOW_BLOCK
        flips = self._rng_flips(block)
        toggles = np.zeros((nb, f), dtype=np.int64)
        toggles[np.arange(nb), flips] = 1
        if block == 0:
            toggles[0] = 0  # segment 0 holds the initial bits
        parity = (np.cumsum(toggles, axis=0) % 2).astype(np.uint8)
        return self._carry[block] ^ parity

    def _rng_flips(self, block: int) -> np.ndarray:
        raw = indexed_rng(self.seed, SCR_FLIP, block).bit_generator.random_raw(_SLOW_BLOCK)
        return (raw % np.uint64(self.n_slow)).astype(np.int64)

    def slow_bits(self, segment: int) -> torch.Tensor:
        """Slow bits of segment ``segment`` (uint8 ``[f]``, on the device)."""
        _check_int("segment", segment, 0)
        return self._cached(self._slow_cache, segment // _SLOW_BLOCK, self._slow_block_host)[
            segment % _SLOW_BLOCK
        ]

    # ----------------------------------------------------------------------------------------------
    # Assembly

    def _random_chunk_host(self, chunk: int) -> np.ndarray:
        bits = _raw_bits(indexed_rng(self.seed, SCR_RANDOM, chunk), _RANDOM_CHUNK * self.n_random)
        return bits.reshape(_RANDOM_CHUNK, self.n_random)

    def _cached(self, cache: OrderedDict[int, torch.Tensor], key: int, make) -> torch.Tensor:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = torch.from_numpy(np.ascontiguousarray(make(key))).to(self.device)
        cache[key] = value
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
        return value

    def _inputs_u8(self, start: int, n: int) -> torch.Tensor:
        """Full inputs (bias column included) of examples ``start .. start+n-1``, uint8 ``[n, m+1]``."""
        end = start + n  # exclusive
        t_seg, b_seg, c_rnd = self.change_every, _SLOW_BLOCK, _RANDOM_CHUNK

        seg0, seg1 = start // t_seg, (end - 1) // t_seg
        blk0, blk1 = seg0 // b_seg, seg1 // b_seg
        table = torch.cat(
            [
                self._cached(self._slow_cache, k, self._slow_block_host)
                for k in range(blk0, blk1 + 1)
            ]
        )
        if seg0 == seg1:
            slow = table[seg0 - blk0 * b_seg].expand(n, self.n_slow)
        else:
            t = torch.arange(start, end, device=self.device)
            slow = table[t // t_seg - blk0 * b_seg]

        chk0, chk1 = start // c_rnd, (end - 1) // c_rnd
        rnd = torch.cat(
            [
                self._cached(self._random_cache, c, self._random_chunk_host)
                for c in range(chk0, chk1 + 1)
            ]
        )
        rnd = rnd[start - chk0 * c_rnd : end - chk0 * c_rnd]

        ones = torch.ones(n, 1, dtype=torch.uint8, device=self.device)
        return torch.cat([slow, rnd, ones], dim=1)

    def _check_range(self, start: int, n: int) -> None:
        _check_int("start", start, 0)
        _check_int("n", n, 0)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """Target ``y = v . LTU(W x) (+ b)`` of inputs ``x`` (``[..., m+1]`` or ``[..., m]``
        without the bias column), returned as ``[..., 1]`` in ``x.dtype``."""
        if x.shape[-1] == self.n_inputs:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        elif x.shape[-1] != self.n_inputs + 1:
            raise ValueError(
                f"x must have {self.n_inputs} or {self.n_inputs + 1} features, got {x.shape[-1]}"
            )
        return self._target_f32(x.to(device=self.device, dtype=torch.float32)).to(x.dtype)

    def _target_f32(self, x_full: torch.Tensor) -> torch.Tensor:
        features = (x_full @ self._w > self._theta_floor).to(torch.float32)
        y = features @ self._v
        if self.output_bias:
            y = y + self.output_bias_value
        return y

    def generate(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``start .. start + n - 1`` of the stream.

        :return: ``(x [n, n_features], y [n, 1])`` on ``device`` in ``dtype``; the same values
            for the same examples whatever the calls' boundaries.
        """
        self._check_range(start, n)
        if n == 0:
            empty = torch.zeros(0, self.n_features, dtype=self.dtype, device=self.device)
            return empty, torch.zeros(0, 1, dtype=self.dtype, device=self.device)
        x_full = self._inputs_u8(start, n).to(torch.float32)
        y = self._target_f32(x_full)
        x = x_full if self.include_bias_input else x_full[:, : self.n_inputs]
        return x.to(self.dtype), y.to(self.dtype)


class SlowlyChangingRegressionBatch:
    """Several seeds of Slowly-Changing Regression generated in lockstep.

    ``generate(start, n)`` returns ``x [S, n, n_features]`` and ``y [S, n, 1]`` whose slice ``s``
    equals ``SlowlyChangingRegression(seeds[s], **kwargs).generate(start, n)`` exactly; the target
    nets are evaluated in one batched matmul.

    :param seeds: one non-negative seed per stream.
    :param kwargs: the other arguments of :class:`SlowlyChangingRegression`, shared by all seeds.
    """

    def __init__(self, seeds: Sequence[int], **kwargs) -> None:
        if len(seeds) == 0:
            raise ValueError("seeds is empty")
        self.streams = [SlowlyChangingRegression(seed, **kwargs) for seed in seeds]
        first = self.streams[0]
        self.device, self.dtype = first.device, first.dtype
        self.n_features, self.n_inputs = first.n_features, first.n_inputs
        self.include_bias_input = first.include_bias_input
        self._w = torch.stack([s._w for s in self.streams])  # [S, m+1, H]
        self._theta_floor = torch.stack([s._theta_floor for s in self.streams])[:, None, :]
        self._v = torch.stack([s._v for s in self.streams])  # [S, H, 1]
        self._b = torch.tensor(
            [s.output_bias_value for s in self.streams], dtype=torch.float32, device=self.device
        )[:, None, None]

    def __len__(self) -> int:
        return len(self.streams)

    def generate(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples ``start .. start + n - 1`` of every seed: ``(x [S, n, F], y [S, n, 1])``."""
        self.streams[0]._check_range(start, n)
        n_seeds = len(self.streams)
        if n == 0:
            shape = (n_seeds, 0, self.n_features)
            return (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(n_seeds, 0, 1, dtype=self.dtype, device=self.device),
            )
        x_full = torch.stack([s._inputs_u8(start, n) for s in self.streams]).to(torch.float32)
        pre = torch.bmm(x_full, self._w)
        y = torch.bmm((pre > self._theta_floor).to(torch.float32), self._v) + self._b
        x = x_full if self.include_bias_input else x_full[..., : self.n_inputs]
        return x.to(self.dtype), y.to(self.dtype)
