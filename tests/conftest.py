"""Test-wide environment: CPU DeepSpeed and interpreted Triton, also when pytest runs directly
(the Makefile sets the same). Must happen before deepspeed or triton are imported."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from data_fixtures import digits_pixels, digits_shards, uneven_shards  # noqa: E402,F401  (shard fixtures)


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models run several times faster single-threaded on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
