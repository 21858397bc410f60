"""--batch-size auto: the batch from free memory, whole seed groups, the fixed CPU default."""

import click
import pytest

from nemo_surgery.cli.scale import BatchSize
from nemo_surgery.engine.batching import FIXED_DEFAULT, batch_from_memory, resolve_batch_size


def test_batch_from_memory_fits_the_free_share_in_whole_seed_groups():
    gib = 1 << 30
    assert batch_from_memory(40 * gib, 0.125 * gib, seeds=8) == 256  # 0.8 * 40 / 0.125 = 256 = 32 groups of 8
    assert batch_from_memory(40 * gib, 0.3 * gib, seeds=10) == 100  # 106 -> whole groups of 10
    assert batch_from_memory(1 * gib, 4.0 * gib, seeds=10) == 1  # never zero
    assert batch_from_memory(1000 * gib, 0.001 * gib, seeds=10) == 1020  # capped at 1024, then whole groups


def test_auto_is_the_fixed_default_off_cuda(planted_model):
    assert resolve_batch_size("auto", planted_model) == FIXED_DEFAULT
    assert resolve_batch_size(0, planted_model) == FIXED_DEFAULT
    assert resolve_batch_size(7, planted_model) == 7


def test_batch_size_option():
    kind = BatchSize()
    assert kind.convert("auto", None, None) == 0 and kind.convert("12", None, None) == 12
    for bad in ("0x", "-3", "0.5"):
        with pytest.raises(click.BadParameter):
            kind.convert(bad, None, None)
