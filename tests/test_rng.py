import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltxf.rng import fold_in, make_generator

REPO = Path(__file__).resolve().parents[1]


def test_fold_in_is_sequential_and_in_range():
    assert fold_in(7, 3, "noise") == fold_in(fold_in(7, 3), "noise")
    assert fold_in(7) == 7
    for keys in [(0,), (1, 2, "x"), (-5,), (2**80,), ("",)]:
        assert 0 <= fold_in(123, *keys) < 2**63


def test_fold_in_separates_keys():
    seeds = {
        fold_in(0, 1),
        fold_in(0, "1"),  # type-tagged: int 1 and str "1" differ
        fold_in(0, "ab"),
        fold_in(0, "a", "b"),  # length-prefixed: no concatenation collisions
        fold_in(1, 1),
        fold_in(0, 2),
        fold_in(0, 1, 0),
    }
    assert len(seeds) == 7


def test_fold_in_is_stable_across_processes():
    # A different PYTHONHASHSEED would change anything built on Python's salted hash().
    code = "from ltxf.rng import fold_in; print(fold_in(42, 17, 3, 'timesteps'))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == fold_in(42, 17, 3, "timesteps")


@pytest.mark.parametrize("bad", [1.5, True, None, b"x"])
def test_fold_in_rejects_bad_keys(bad):
    with pytest.raises(ValueError, match="fold_in"):
        fold_in(0, bad)
    with pytest.raises(ValueError, match="fold_in"):
        fold_in(bad, 1)


def test_make_generator_streams():
    def draw(*args):
        return torch.randn(64, generator=make_generator(*args))

    base = draw(0, 10, 0, "noise")
    assert torch.equal(base, draw(0, 10, 0, "noise"))
    for other in [(1, 10, 0, "noise"), (0, 11, 0, "noise"), (0, 10, 1, "noise"), (0, 10, 0, "timesteps")]:
        assert not torch.allclose(base, draw(*other)), other
    gen = make_generator(0, 10, 0, "noise")
    assert gen.device == torch.device("cpu")
    assert gen.initial_seed() == fold_in(0, 10, 0, "noise")
