"""bench.ffn_timeline stamps a copy of the int4 decode kernel at points it finds by their text: a change to the
kernel that moves one is found here, on any machine, rather than on the GPU machine."""

from __future__ import annotations

import pytest

from bench.ffn_timeline import SLOTS, stamped_source
from gpu_worker import mma_decode


def test_every_stamp_lands_once_and_the_end_on_both_paths_of_the_sums():
    stamped = stamped_source(mma_decode._SOURCE.read_text())
    assert [stamped.count(f"STAMP({slot})") for slot in range(SLOTS)] == [1, 1, 1, 2, 1, 1]
    assert stamped.rstrip().endswith("STAMP(3);\n}")


def test_a_point_the_kernel_no_longer_has_is_named():
    source = mma_decode._SOURCE.read_text().replace("// the other lanes' copies of this stage have landed too", "")
    with pytest.raises(ValueError, match=r"has 0 places, not one, like \S__syncwarp\(\);  // the other lanes"):
        stamped_source(source)
