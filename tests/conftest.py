"""Test-wide environment: CPU DeepSpeed and interpreted Triton, also when pytest runs directly
(the Makefile sets the same). Must happen before deepspeed or triton are imported."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "1")

from data_fixtures import digits_pixels, digits_shards, uneven_shards  # noqa: E402,F401  (shard fixtures)
