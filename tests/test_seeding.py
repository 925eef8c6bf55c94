"""The random streams: one table of tags, no tag shared within a derivation, no tag elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from ppo_cbp import seeding

ROOT = Path(__file__).resolve().parents[1]


def values(tag: int | range) -> list[int]:
    return list(tag) if isinstance(tag, range) else [tag]


@pytest.mark.parametrize("derivation", sorted(seeding.STREAM_TAGS))
def test_no_two_tags_of_one_derivation_are_equal(derivation):
    seen: dict[int, str] = {}
    for name, tag in seeding.STREAM_TAGS[derivation].items():
        for value in values(tag):
            assert value not in seen, f"{name} and {seen[value]} share tag {value}"
            seen[value] = name


def test_the_increment_family_meets_no_other_tag():
    """CIFAR's network of increment k >= 1 takes tag 1000 k: no other tag may be one of those."""
    stride = seeding.INCREMENT_INIT_STRIDE
    others = [
        (name, value)
        for name, tag in seeding.STREAM_TAGS["derive_seed"].items()
        for value in values(tag)
        if value > 0 and value % stride == 0
    ]
    assert others == []
    assert seeding.increment_init_tag(0) == seeding.TAG_INIT
    assert [seeding.increment_init_tag(k) for k in (1, 2)] == [stride, 2 * stride]


def test_every_tag_constant_of_the_module_is_in_the_table():
    """A tag defined in seeding.py but left out of STREAM_TAGS would escape the check above."""
    tree = ast.parse((ROOT / "ppo_cbp" / "seeding.py").read_text())
    constants = {
        target.id
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name) and target.id.isupper()
    }
    listed = {
        name
        for derivation, table in seeding.STREAM_TAGS.items()
        if derivation != "ppo_seeds"
        for name in table
    }
    not_tags = {"STREAM_TAGS", "PPO_STREAMS", "INCREMENT_INIT_STRIDE", "TAG_INJECTION"}
    assert constants - not_tags == listed
    assert seeding.TAG_INJECTION in seeding.INJECTION_TAGS


def test_no_module_defines_a_stream_tag_of_its_own():
    """Tags live in one table: a module-level TAG_*/*_TAG/STREAM_* constant elsewhere is a tag
    that the uniqueness check cannot see."""
    offenders = []
    for path in [*(ROOT / "ppo_cbp").rglob("*.py"), *(ROOT / "envs").rglob("*.py")]:
        if path.name == "seeding.py":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                name = getattr(target, "id", "")
                if "TAG" in name.upper().split("_") or name.upper().startswith(("TAG", "_TAG")):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


def test_derive_seed_is_sixty_three_bits_of_the_seed_sequence():
    for seed, tag in [(0, 0), (1, 1), (7, 60), (2**40, 13)]:
        word = np.random.SeedSequence([seed, tag]).generate_state(4, np.uint32)
        expected = (int(word[0]) | int(word[1]) << 32) >> 1  # the 64-bit word from two 32-bit ones
        assert seeding.derive_seed(seed, tag) == expected
        assert 0 <= seeding.derive_seed(seed, tag) < 2**63
        torch.Generator().manual_seed(seeding.derive_seed(seed, tag))  # a valid torch seed


def test_ppo_seeds_are_the_seed_sequence_words_in_stream_order():
    words = np.random.SeedSequence(5).generate_state(8, np.uint32)
    expected = [(int(words[2 * i]) | int(words[2 * i + 1]) << 32) % 2**63 for i in range(4)]
    assert seeding.ppo_seeds(5) == expected
    assert list(seeding.PPO_STREAMS.values()) == [0, 1, 2, 3]


def test_task_and_indexed_generators_are_pure_functions_of_their_key():
    a = seeding.task_rng(3, 2, seeding.STREAM_PIXELS).bit_generator.random_raw(4)
    assert np.array_equal(
        a, seeding.task_rng(3, 2, seeding.STREAM_PIXELS).bit_generator.random_raw(4)
    )
    assert not np.array_equal(
        a, seeding.task_rng(3, 2, seeding.STREAM_EXAMPLES).bit_generator.random_raw(4)
    )
    key = np.random.SeedSequence([3, seeding.SCR_FLIP, 9])
    expected = np.random.Generator(np.random.PCG64(key)).bit_generator.random_raw(4)
    assert np.array_equal(
        seeding.indexed_rng(3, seeding.SCR_FLIP, 9).bit_generator.random_raw(4), expected
    )
    with pytest.raises(ValueError, match="task must be a non-negative integer"):
        seeding.task_rng(3, -1, 0)
