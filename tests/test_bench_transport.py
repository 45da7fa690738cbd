"""`asyncdb bench transport`, run small: every figure and its floor in each round."""

from __future__ import annotations

import pytest

from asyncdb.bench import transport


@pytest.mark.slow
async def test_every_ratio_is_taken_within_rounds():
    result = await transport.run(repeat=2, bulk_messages=2, asks=50, tells=200, ws_messages=2)
    samples = result["samples"]
    for figure in ("shm_bulk_gbps", "memfd_copy_gbps", "memcpy_gbps", "ask_rtt_us",
                   "eventfd_loop_rtt_us", "mp_queue_rtt_us", "tell_msgs_per_s"):
        assert len(samples[figure]) == 2 and all(x > 0 for x in samples[figure])
    pairs = [a / b for a, b in zip(samples["ask_rtt_us"], samples["eventfd_loop_rtt_us"],
                                   strict=True)]
    assert result["ask_rtt_loop_ratio"] == pytest.approx(sum(pairs) / 2, abs=1e-3)
    assert result["ask_n_to_n_per_s"] > 0 and result["ws_rtt_us"] > 0
