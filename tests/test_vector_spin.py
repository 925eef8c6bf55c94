"""ParallelEnvs spins only where every process has a core of its own: on a busy machine the
spinning trainer and workers starved each other (--num-envs 2 ran 9-20x slower than one env)."""

from __future__ import annotations

import os

import pytest
from ppo_cbp.envs import vector


@pytest.fixture
def cores(monkeypatch):
    def set_machine(n: int, load: float) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    return set_machine


def test_a_busy_machine_waits_on_the_pipes(cores):
    cores(2, 1.5)  # a busy 2-core machine: the case that ran 9-20x slower
    assert vector.spare_cores() == 0.5
    assert not vector.spin_pays(2)
    cores(16, 2.0)
    assert vector.spin_pays(2) == vector._SPIN
    assert not vector.spin_pays(15)


def test_the_default_follows_the_machine(cores, monkeypatch):
    chosen = []

    class Stop(Exception):
        pass

    def local(fn):  # stops the constructor once it has chosen
        chosen.append(None)
        raise Stop

    monkeypatch.setattr(vector, "SingleEnv", local)
    monkeypatch.setattr(vector, "spin_pays", lambda n: chosen.append(n) or False)
    with pytest.raises(Stop):
        vector.ParallelEnvs([None, None, None])
    assert chosen[0] == 3
