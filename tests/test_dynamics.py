"""The dynamics, observation and reward changes (ppo_cbp.envs.dynamics) against the MuJoCo model
fields they set, their seeding and their exact restore; the released friction table."""

import copy
import warnings

import gymnasium as gym
import numpy as np
import pytest
from ppo_cbp.envs.dynamics import (
    SCALES,
    TABLE_PATH,
    DynamicsChange,
    FixedDynamics,
    forward_reward,
    paper_frictions,
)
from ppo_cbp.envs.friction import FrictionChange, sample_frictions
from ppo_cbp.envs.vector import CheckpointableEnv

ENVS = [
    f"{n}-v{v}" for n in ("Ant", "Hopper", "Walker2d", "HalfCheetah", "Humanoid") for v in (4, 5)
]
SEEDS = {s: 100 + i for i, s in enumerate((*SCALES, "permute", "offset"))}
FIELDS = {  # what each quantity writes
    "gravity": ["opt.gravity"],
    "mass": ["body_mass", "body_inertia", "body_subtreemass"],
    "damping": ["dof_damping"],
    "gear": ["actuator_gear"],
}
WATCHED = [
    "opt.gravity",
    "body_mass",
    "body_inertia",
    "body_subtreemass",
    "dof_damping",
    "actuator_gear",
    "geom_friction",
    "dof_armature",
    "body_pos",
    "geom_size",
    "actuator_ctrlrange",
    "jnt_stiffness",
    "opt.timestep",
]


def make(env_id="Hopper-v4"):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        return gym.make(env_id)


def field(model, name):
    obj = model
    for part in name.split("."):
        obj = getattr(obj, part)
    return np.array(obj, copy=True)


def wrapper(env_id="Hopper-v4", every=300, **kw):
    return DynamicsChange(make(env_id), every=every, seed=3, seeds=SEEDS, **kw)


def drive(env, steps, seed=0, actions_seed=0):
    """Random actions; returns (reward, obs, info) per step."""
    rng = np.random.default_rng(actions_seed)
    out = []
    env.reset(seed=seed)
    for _ in range(steps):
        obs, reward, terminated, truncated, info = env.step(
            rng.uniform(-1, 1, env.action_space.shape)
        )
        out.append((float(reward), obs.copy(), dict(info)))
        if terminated or truncated:
            env.reset()
    return out


@pytest.mark.parametrize("env_id", ENVS)
@pytest.mark.parametrize("quantity", SCALES)
def test_each_multiplier_scales_its_fields_and_nothing_else(env_id, quantity):
    env = wrapper(env_id, scales={quantity: (0.5, 2.0)}, friction=False)
    model = env.unwrapped.model
    fresh = make(env_id).unwrapped.model  # the model's own values
    seen = set()
    for segment in range(4):
        m = env.values()[quantity]
        seen.add(m)
        assert 0.5 <= m <= 2.0 and env.segment == segment
        for name in WATCHED:
            expected = field(fresh, name)
            if name in FIELDS[quantity]:
                expected = expected * m
            assert np.array_equal(field(model, name), expected), (name, segment)
        env._change()
    assert len(seen) == 4  # redrawn at each segment
    if quantity == "gravity":  # direction kept
        g = field(model, "opt.gravity")
        assert g[0] == g[1] == 0 and g[2] < 0


def test_masses_and_inertias_scale_together_and_several_quantities_at_once():
    env = wrapper("Ant-v4", scales=dict.fromkeys(SCALES, (0.5, 2.0)))
    model, fresh = env.unwrapped.model, make("Ant-v4").unwrapped.model
    values = env.values()
    assert set(values) == {"friction", *SCALES}
    ratio = model.body_mass[1:] / fresh.body_mass[1:]
    assert np.allclose(ratio, values["mass"], rtol=1e-15)
    assert np.allclose(model.body_inertia[1:] / fresh.body_inertia[1:], values["mass"], rtol=1e-15)
    assert np.all(model.geom_friction[:, 0] == values["friction"])
    assert np.array_equal(model.geom_friction[:, 1:], fresh.geom_friction[:, 1:])
    # the subtree masses stay the sums of the (scaled) masses, as MuJoCo's mj_setConst gives them
    import mujoco

    check = copy.copy(model)
    mujoco.mj_setConst(check, mujoco.MjData(check))
    assert np.allclose(check.body_subtreemass, model.body_subtreemass, rtol=1e-12)


def test_friction_alone_is_friction_change_step_for_step_and_state_for_state():
    a = FrictionChange(make(), every=300, seed=3)
    b = DynamicsChange(make(), every=300, seed=3)
    ra, rb = drive(a, 2000), drive(b, 2000)
    assert [(r, i["friction"], i["friction_segment"]) for r, _, i in ra] == [
        (r, i["friction"], i["friction_segment"]) for r, _, i in rb
    ]
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(ra, rb))
    assert b.segment >= 4
    # a FrictionChange's state (a checkpoint from before DynamicsChange) restores into it
    c = DynamicsChange(make(), every=300, seed=3)
    c.load_state_dict(a.state_dict())
    assert c.friction == a.friction and c.segment == a.segment


def test_each_quantity_has_its_own_stream_and_the_seed_decides():
    one = wrapper(scales={"gravity": (0.5, 2.0)})
    two = wrapper(scales={"gravity": (0.5, 2.0), "mass": (0.5, 2.0)}, obs_offset_std=1.0)
    for _ in range(5):
        assert one.values()["gravity"] == two.values()["gravity"]
        assert one.friction == two.friction
        one._change()
        two._change()
    other = DynamicsChange(
        make(), every=300, seed=3, scales={"gravity": (0.5, 2.0)}, seeds={"gravity": 7}
    )
    assert other.values()["gravity"] != wrapper(scales={"gravity": (0.5, 2.0)}).values()["gravity"]


def test_drift_moves_linearly_to_the_next_segment_and_keeps_the_sequence():
    abrupt = wrapper(scales={"gear": (0.5, 2.0)}, every=400)
    drift = wrapper(scales={"gear": (0.5, 2.0)}, every=400, drift=True)
    starts = []
    for _ in range(3):
        starts.append((abrupt.friction, abrupt.values()["gear"]))
        abrupt._change()
    assert (drift.friction, drift.current["gear"]) == starts[0]
    assert (drift.friction_next, drift.target["gear"]) == starts[1]
    drift.reset(seed=0)
    rng = np.random.default_rng(0)
    fresh = make().unwrapped.model
    for _ in range(150):
        _, _, terminated, truncated, _ = drift.step(rng.uniform(-1, 1, 3))
        if terminated or truncated:
            drift.reset()
        a = min(drift.steps_since_change / 400, 1.0)
        g0, g1 = starts[drift.segment][1], starts[drift.segment + 1][1]
        assert drift.values()["gear"] == pytest.approx(g0 + a * (g1 - g0), rel=1e-15)
        assert np.array_equal(
            drift.unwrapped.model.actuator_gear, fresh.actuator_gear * drift.values()["gear"]
        )
        f0, f1 = starts[drift.segment][0], starts[drift.segment + 1][0]
        assert np.all(drift.unwrapped.model.geom_friction[:, 0] == drift.values()["friction"])
        assert drift.values()["friction"] == pytest.approx(f0 + a * (f1 - f0), rel=1e-15)


def test_observation_permutation_and_offset():
    plain = DynamicsChange(make(), every=300, seed=3)
    changed = wrapper(permute_obs=True, obs_offset_std=1.0)
    rp, rc = drive(plain, 700), drive(changed, 700)
    segments = set()
    for (r0, o0, _), (r1, o1, i1) in zip(rp, rc):
        k = i1["friction_segment"]
        s = changed.segment_setting(k)
        assert r0 == r1
        assert np.array_equal(o1, o0[s["permute"]] + s["offset"])
        segments.add(k)
    assert len(segments) >= 2
    s0, s1 = changed.segment_setting(0), changed.segment_setting(1)
    assert sorted(s0["permute"]) == list(range(11)) and not np.array_equal(
        s0["permute"], s1["permute"]
    )
    assert (
        0.3 < np.std(np.concatenate([changed.segment_setting(k)["offset"] for k in range(20)])) < 2
    )


@pytest.mark.parametrize("env_id", ENVS)
def test_reward_flip_negates_the_forward_term_only(env_id):
    env = make(env_id)
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(5):
        _, reward, _, _, info = env.step(rng.uniform(-1, 1, env.action_space.shape))
        f = forward_reward(env, info)
        terms = {k: v for k, v in info.items() if k.startswith("reward_")}
        if terms:  # the reported terms add up to the reward, the forward one among them
            assert sum(terms.values()) == pytest.approx(reward, abs=1e-9)
            assert f in terms.values()
        assert f == pytest.approx(
            env.unwrapped._forward_reward_weight * info["x_velocity"]
            if getattr(env.unwrapped, "_forward_reward_weight", None)
            else info["x_velocity"]
        )
    plain = DynamicsChange(make(env_id), every=300, seed=3)
    flip = DynamicsChange(make(env_id), every=300, seed=3, flip_reward=True)
    for (r0, _, i0), (r1, _, _) in zip(drive(plain, 700), drive(flip, 700)):
        sign = -1 if i0["friction_segment"] % 2 else 1
        expected = r0 if sign > 0 else r0 - 2 * forward_reward(plain.env, i0)
        assert r1 == expected


def test_state_dict_restores_mid_segment_and_mid_drift():
    kw = dict(
        scales=dict.fromkeys(SCALES, (0.5, 2.0)),
        drift=True,
        permute_obs=True,
        obs_offset_std=1.0,
        flip_reward=True,
    )
    ref = CheckpointableEnv(wrapper(every=350, **kw), 0)
    rng = np.random.default_rng(5)
    actions = rng.uniform(-1, 1, (1600, 3))
    ref.reset(seed=0)
    saved, out = None, []
    for t, a in enumerate(actions):
        obs, r, term, trunc, info = ref.step(a)
        out.append((r, obs.copy(), info["friction"]))
        if term or trunc:
            ref.reset()
        if t == 899:
            saved = copy.deepcopy(ref.checkpoint_state())
            state = ref.get_wrapper_attr("state_dict")()
    assert 0 < state["steps_since_change"] and 0 < state["dynamics"]["current"]["gravity"]
    resumed = CheckpointableEnv(wrapper(every=350, **kw), 0)
    resumed.restore_state([saved])
    for t, a in enumerate(actions[900:], 900):
        obs, r, term, trunc, info = resumed.step(a)
        assert (r, info["friction"]) == (out[t][0], out[t][2]) and np.array_equal(obs, out[t][1])
        if term or trunc:
            resumed.reset()
    w = resumed.env
    assert w.values() == ref.env.values() and w.segment == ref.env.segment >= 3
    with pytest.raises(ValueError, match="does not match"):
        wrapper(every=350, scales={"gravity": (0.5, 2.0)}).load_state_dict(w.state_dict())


def test_the_table_is_the_released_one_and_is_used_in_order():
    table = np.load(TABLE_PATH, allow_pickle=False)
    assert table.shape == (100, 50) and table.dtype == np.float64
    assert 0.02 <= table.min() and table.max() <= 2.0
    assert np.array_equal(paper_frictions(), table)
    env = DynamicsChange(make("Ant-v4"), every=300, seed=3, friction_table=table[3])
    seen = [env.friction]
    for _ in range(6):
        env._change()
        seen.append(env.friction)
    assert seen == table[3, :7].tolist()
    assert not np.array_equal(table[3, :7], sample_frictions(3, 7))


def test_fixed_dynamics_applies_a_setting():
    env = wrapper(
        scales=dict.fromkeys(SCALES, (0.5, 2.0)),
        permute_obs=True,
        obs_offset_std=1.0,
        flip_reward=True,
    )
    for _ in range(3):
        env._change()
    setting = env.setting()
    fixed = FixedDynamics(make(), setting)
    for name in WATCHED:
        assert np.array_equal(
            field(fixed.unwrapped.model, name), field(env.unwrapped.model, name)
        ), name
    assert setting["direction"] == -1.0
    with pytest.raises(ValueError, match="unknown"):
        FixedDynamics(make(), {"viscosity": 2.0})


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown quantities"):
        wrapper(scales={"viscosity": (0.5, 2.0)})
    with pytest.raises(ValueError, match="low"):
        wrapper(scales={"gravity": (0.0, 2.0)})
    with pytest.raises(ValueError, match="no seed"):
        DynamicsChange(make(), scales={"gravity": (0.5, 2.0)})


def test_pyproject_ships_the_table_with_its_source_and_licence():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())
    shipped = config["tool"]["setuptools"]["package-data"]["ppo_cbp.envs"]
    assert {"data/paper_frictions.npy", "data/README.md", "data/LICENSE"} <= set(shipped)
    readme = (root / "envs" / "data" / "README.md").read_text()
    assert "63c35f3c758bbb713dd42c72d43dc192fde0d109" in readme and "MIT License" in readme
