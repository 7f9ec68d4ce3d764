"""BatchDesign takes torch batches on any device without converting them through NumPy."""

import numpy as np
import torch

from dense import dense_design
from simfluence.simulators.design import BatchDesign


class NoNumpy(torch.Tensor):
    """A tensor that refuses NumPy conversion, as a CUDA tensor does."""

    def __array__(self, *args, **kwargs):
        raise TypeError("can't convert this tensor to numpy: it stands for a device tensor")


def _batches() -> np.ndarray:
    rng = np.random.default_rng(0)
    batches = rng.integers(0, 7, (5, 3))
    batches[1, 1:] = -1
    batches[3] = -1  # an emptied step
    batches[4] = [2, 2, 5]  # a duplicate counts twice
    return batches


def test_tensor_batches_give_the_numpy_design():
    batches = _batches()
    table = torch.as_tensor(np.random.default_rng(1).normal(size=(7, 4)))
    reference = BatchDesign(batches, 7)
    identity = torch.eye(7, dtype=torch.float64)
    assert np.array_equal(reference.matmul(identity).numpy(), dense_design(batches, 7))
    for tensor in (torch.as_tensor(batches), torch.as_tensor(batches).as_subclass(NoNumpy)):
        design = BatchDesign(tensor, 7)
        assert np.array_equal(design.matmul(identity).as_subclass(torch.Tensor).numpy(), dense_design(batches, 7))
        got = design.matmul(table).as_subclass(torch.Tensor)
        assert torch.allclose(got, reference.matmul(table))
        back = design.rmatmul(reference.matmul(table)).as_subclass(torch.Tensor)
        assert torch.allclose(back, reference.rmatmul(reference.matmul(table)))
        assert torch.equal(design.occurrences.as_subclass(torch.Tensor), reference.occurrences)

