"""Curriculum samplers: reproducibility, distributions, replay."""

import numpy as np
import pytest
from scipy import stats

from simfluence.collect.curricula import EpochSampler, FixedCurriculum, UniformSampler, derive_seed

POOL = np.arange(100, 150)  # indices need not start at 0


@pytest.mark.parametrize("make", [lambda: UniformSampler(POOL, 4), lambda: EpochSampler(POOL, 4, subset_size=30)])
def test_same_seed_same_curriculum_and_other_seed_differs(make):
    first, again, other = make().sample(60, 7), make().sample(60, 7), make().sample(60, 8)
    assert first.dtype == np.int32 and first.shape == (60, 4)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_derive_seed_is_stable_and_distinct():
    seeds = [derive_seed(0, r) for r in range(1000)]
    assert len(set(seeds)) == 1000
    assert seeds[5] == derive_seed(0, 5) and derive_seed(1, 5) != seeds[5]
    assert all(0 <= seed < 2**32 for seed in seeds)


def test_uniform_sampler_frequencies_match_uniform():
    curriculum = UniformSampler(POOL, 4).sample(5000, 3)  # 20,000 draws, 400 expected per index
    assert set(np.unique(curriculum)) <= set(POOL)
    counts = np.bincount(curriculum.ravel() - POOL[0], minlength=POOL.size)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert np.abs(counts - 400).max() < 6 * np.sqrt(400)


def test_uniform_sampler_draws_with_replacement():
    curriculum = UniformSampler([3, 4], 8).sample(50, 0)
    assert ((curriculum == 3).sum(axis=1) > 1).any()


def test_epoch_sampler_each_epoch_is_a_permutation_of_one_subset():
    sampler = EpochSampler(POOL, batch_size=4, subset_size=30)  # 30 is not a multiple of 4: batches straddle
    stream = sampler.sample(61, 11).ravel()  # 244 entries: 8 full epochs and a partial one
    subset = np.sort(stream[:30])
    assert np.unique(subset).size == 30 and set(subset) <= set(POOL)
    orders = [stream[start:start + 30] for start in range(0, 240, 30)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), subset)
    assert len({tuple(order) for order in orders}) > 1  # reshuffled each epoch
    assert set(stream[240:]) <= set(subset) and np.unique(stream[240:]).size == 4


def test_epoch_sampler_default_subset_is_the_whole_pool():
    stream = EpochSampler(POOL, batch_size=5).sample(10, 0).ravel()
    np.testing.assert_array_equal(np.sort(stream), POOL)


def test_fixed_curriculum_replays_its_array():
    array = np.array([[0, 1], [2, -1], [3, 3]])
    sampler = FixedCurriculum(array)
    np.testing.assert_array_equal(sampler.sample(3, seed=1), array)
    np.testing.assert_array_equal(sampler.sample(2, seed=2), array[:2])
    assert sampler.sample(3).dtype == np.int32
    with pytest.raises(ValueError, match="num_steps"):
        sampler.sample(4)


def test_describe_tells_samplers_apart():
    assert UniformSampler(POOL, 4).describe() != UniformSampler(POOL[:-1], 4).describe()
    assert UniformSampler(POOL, 4).describe() != EpochSampler(POOL, 4).describe()
    assert FixedCurriculum([[1, 2]]).describe() != FixedCurriculum([[2, 1]]).describe()


@pytest.mark.parametrize("make, field", [
    (lambda: UniformSampler([], 4), "pool"),
    (lambda: UniformSampler([0.5, 1.0], 4), "pool"),
    (lambda: UniformSampler([-1, 2], 4), "pool"),
    (lambda: UniformSampler(POOL, 0), "batch_size"),
    (lambda: EpochSampler(POOL, 4, subset_size=51), "subset_size"),
    (lambda: FixedCurriculum([[-1, -1]]), "curriculum"),
    (lambda: FixedCurriculum([1, 2]), "curriculum"),
])
def test_bad_arguments_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        make()
