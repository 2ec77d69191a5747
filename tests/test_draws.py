"""Randomness by position: the derived generators are deterministic, distinct per kind and position, share the
experts' derivation, and a checkpoint of the earlier sequential generator is refused in one sentence."""

import pytest
import torch

from fastdd.data import load_dataset
from fastdd.distill import get_distiller
from fastdd.distill.draws import draw_generator, draw_seed
from fastdd.distill.experts import expert_seed
from fastdd.errors import FastddError


def test_same_position_same_draws_other_position_other_draws():
    a = torch.rand(5, generator=draw_generator(7, "real", 3, 2, 1))
    assert torch.equal(a, torch.rand(5, generator=draw_generator(7, "real", 3, 2, 1)))
    others = [("real", 3, 2, 0), ("real", 3, 1, 2), ("augment", 3, 2, 1), ("real", 32, 1), ("real", 3, 21)]
    seeds = {draw_seed(7, *position) for position in others} | {draw_seed(7, "real", 3, 2, 1), draw_seed(8, "real", 3, 2, 1)}
    assert len(seeds) == len(others) + 2
    assert all(0 <= s < 2**63 for s in seeds)


def test_the_experts_seed_is_the_expert_kind():
    assert all(draw_seed(s, "expert", k) == expert_seed(s, k) for s in (0, 5, -3) for k in (0, 1, 17))


@pytest.mark.parametrize("position", [("a:b",), ("",), (True,), (1.5,)])
def test_ambiguous_positions_are_refused(position):
    with pytest.raises((ValueError, TypeError)):
        draw_seed(0, "real", *position)


def test_a_checkpoint_of_the_sequential_generator_is_refused():
    digits = load_dataset("digits")
    cls = get_distiller("dm")
    config = cls.config_class.from_options(dict(ipc=1, iterations=1, width=8, batch_real=8), method="dm")
    distiller = cls(config, digits)
    state = distiller.state_dict()
    distiller.load_state_dict(state)  # this version's own checkpoint
    old = {key: value for key, value in state.items() if key != "draws"}
    old["generator"] = torch.Generator().get_state()
    with pytest.raises(FastddError, match="cannot continue that run exactly: start the run again without --resume"):
        distiller.load_state_dict(old)
