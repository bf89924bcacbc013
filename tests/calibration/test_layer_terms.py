"""The per-step collectives of tensor parallelism (calibration.layer_terms)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from calibration.catalog import load_hardware
from calibration.layer_terms import embedding_allreduce_ms, logits_allgather_ms, moe_exchange_ms
from calibration.roofline import ALLREDUCE_LATENCY_S, INTERCONNECT_EFFICIENCY, RooflineKernels


def values(num_gpus, elements):  # an "all-reduce" that returns the elements it was given
    return np.asarray(elements, dtype=float)


def test_one_gpu_sends_nothing():
    assert not embedding_allreduce_ms(values, 1, np.arange(5), 4096).any()
    assert not logits_allgather_ms(values, 1, np.arange(5), 32000).any()


def test_the_embedding_is_one_all_reduce_of_the_steps_tokens():
    assert embedding_allreduce_ms(values, 2, np.array([0, 3]), 4096).tolist() == [0, 3 * 4096]


def test_the_logits_gather_moves_the_other_ranks_share_of_the_logits():
    """At TP 2 each GPU receives the other's half of rows x vocab bf16 logits: over a link of
    known speed that is rows x vocab bytes, plus one latency."""
    link_gbps = 16.0
    card = replace(load_hardware("rtxpro6000"), interconnect_gbps=link_gbps / INTERCONNECT_EFFICIENCY)
    rows, vocab = np.array([0, 1, 128]), 151936
    got = logits_allgather_ms(RooflineKernels(card).allreduce_ms, 2, rows, vocab)
    bytes_in = rows * vocab * 2 / 2
    assert got[0] == 0
    assert got[1:] == pytest.approx(1e3 * (ALLREDUCE_LATENCY_S + bytes_in[1:] / (link_gbps * 1e9)))
    assert got[2] == pytest.approx(1.226, abs=0.01)  # 19.4 MB at 16 GB/s: a decode step of 128 pays ~1.2 ms


def test_the_moe_exchange_gathers_tokens_and_logits_and_scatters_the_output():
    """Two data-parallel engines, T tokens of both: each GPU receives the other's half of the
    hidden states and router logits (bf16) and sends half the experts' output: T (2 hidden +
    experts) bytes over a link of known speed, plus two latencies (two collectives)."""
    link_gbps, hidden, experts = 16.0, 2048, 128
    card = replace(load_hardware("rtxpro6000"), interconnect_gbps=link_gbps / INTERCONNECT_EFFICIENCY)
    tokens = np.array([0, 1, 4096])
    got = moe_exchange_ms(RooflineKernels(card).allreduce_ms, 2, tokens, hidden, experts)
    assert got[0] == 0 and not moe_exchange_ms(values, 1, tokens, hidden, experts).any()
    moved = tokens[1:] * (2 * hidden + experts)
    assert got[1:] == pytest.approx(1e3 * (2 * ALLREDUCE_LATENCY_S + moved / (link_gbps * 1e9)))
