"""Compressors: specs, exact round trips, compact indices, and payloads a peer could forge."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gossip.core.compress import BLOCK, CompressError, Compressor, _decode_indices, _encode_indices

SPECS = ["none", "fp16", "bf16", "int8", "int4", "sign", "topk:0.01", "randk:0.1", "topk:0.01+int8",
         "randk:0.05+int4", "topk:0.2+sign", "topk:1+bf16"]  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", [1, 7, BLOCK, BLOCK + 1, 10_000])
def test_the_receiver_decodes_exactly_what_the_sender_kept(spec: str, n: int) -> None:
    c = Compressor.parse(spec)
    x = torch.randn(n, generator=gen(n)) * 3
    payload, decoded = c.compress(x, gen(1))
    assert len(payload) <= c.max_nbytes(n)
    assert torch.equal(c.decompress(payload, n), decoded)  # bit for bit: references stay in step
    assert c.spec == Compressor.parse(c.spec).spec


def test_specs_parse_and_print_back() -> None:
    assert Compressor.parse("topk:0.01+int8") == Compressor("topk", 0.01, "int8")
    assert Compressor.parse(" none ").spec == "none" and Compressor.parse("").spec == "none"
    assert Compressor.parse("sign").biased and Compressor.parse("topk:0.1").biased
    assert not Compressor.parse("randk:0.1+int8").biased and not Compressor.parse("int4").biased


@pytest.mark.parametrize(
    "spec",
    [
        "int9",
        "topk",
        "topk:0",
        "topk:1.5",
        "topk:x",
        "int8+topk:0.1",
        "topk:0.1+randk:0.1",
        "int8+int4",
        "sign:2",
        "gzip",
    ],
)
def test_bad_specs_say_what_is_allowed(spec: str) -> None:
    with pytest.raises(CompressError, match="compress spec"):
        Compressor.parse(spec)


def test_sizes_are_what_the_docs_say() -> None:
    n = 100_000
    assert Compressor.parse("int8").max_nbytes(n) == n + 4 * math.ceil(n / BLOCK)
    assert Compressor.parse("int4").max_nbytes(n) == n // 2 + 4 * math.ceil(n / BLOCK)
    assert Compressor.parse("sign").max_nbytes(n) == n // 8 + 4 * math.ceil(n / BLOCK)
    c = Compressor.parse("topk:0.01+int8")
    payload, _ = c.compress(torch.randn(n, generator=gen()), gen())
    # 1000 indices as varint gaps of ~100 take 1-2 bytes each, far below 4-byte indices.
    assert len(payload) < 4 + 2 * 1000 + 1000 + 4 * 4
    assert n * 4 / len(payload) > 100


def test_topk_keeps_the_largest_and_randk_is_unbiased_on_average() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05])
    _, d = Compressor.parse("topk:0.375").compress(x, gen())
    assert torch.equal(d, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0]))
    # Stochastic rounding: int4 of a constant is unbiased.
    c = Compressor.parse("int4")
    y = torch.full((BLOCK,), 0.3)
    y[0] = 1.0  # the block's scale: 1/7
    mean = torch.stack([c.compress(y, gen(s))[1] for s in range(400)]).mean(dim=0)
    assert abs(float(mean[1:].mean()) - 0.3) < 0.01


def test_sign_sends_one_bit_and_the_blocks_mean_magnitude() -> None:
    x = torch.tensor([1.0, -3.0, 2.0, -2.0])
    _, d = Compressor.parse("sign").compress(x, gen())
    assert torch.equal(d, torch.tensor([2.0, -2.0, 2.0, -2.0]))


def _forged(spec: str, n: int, mutate: str) -> bytes:
    c = Compressor.parse(spec)
    payload = bytearray(c.compress(torch.randn(n, generator=gen()), gen())[0])
    if mutate == "short":
        return bytes(payload[:-1])
    if mutate == "long":
        return bytes(payload + b"\0")
    payload[0] ^= 1  # "count": the number of indices
    return bytes(payload)


@pytest.mark.parametrize(
    ("spec", "mutate"),
    [("int8", "short"), ("int8", "long"), ("topk:0.1+int8", "count"), ("sign", "long"), ("none", "short")],
)
def test_malformed_payloads_are_refused(spec: str, mutate: str) -> None:
    n = 1000
    with pytest.raises(CompressError):
        Compressor.parse(spec).decompress(_forged(spec, n, mutate), n)


def test_forged_fields_are_refused() -> None:
    n = 300
    c = Compressor.parse("int8")
    payload = bytearray(c.compress(torch.randn(n, generator=gen()), gen())[0])
    payload[0:4] = np.float32("inf").tobytes()  # the first block's scale
    with pytest.raises(CompressError, match="scale"):
        c.decompress(bytes(payload), n)
    payload = bytearray(c.compress(torch.randn(n, generator=gen()), gen())[0])
    payload[8] = 0x80  # -128: never produced
    with pytest.raises(CompressError, match="-128"):
        c.decompress(bytes(payload), n)
    sparse = Compressor.parse("topk:0.5")
    # Two indices, gaps 3 then 0: a repeat.
    with pytest.raises(CompressError, match="repeat"):
        sparse.decompress((2).to_bytes(4, "little") + bytes([3, 0]) + bytes(8), 4)
    # A gap past the end of the vector.
    with pytest.raises(CompressError, match="outside"):
        sparse.decompress((2).to_bytes(4, "little") + bytes([1, 9]) + bytes(8), 4)
    # A varint that never ends.
    with pytest.raises(CompressError):
        sparse.decompress((2).to_bytes(4, "little") + bytes([0x80] * 12), 4)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.sampled_from(SPECS), st.integers(1, 400))
def test_any_bytes_decode_or_are_refused_never_crash(data: bytes, spec: str, n: int) -> None:
    c = Compressor.parse(spec)
    try:
        out = c.decompress(data, n)
    except CompressError:
        return
    assert out.shape == (n,) and bool(torch.isfinite(out).all())


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 2**34), min_size=1, max_size=300), st.booleans())
def test_index_gaps_of_every_length_round_trip(indices: set[int], near: bool) -> None:
    """Both codings of the gaps: every gap in one byte (``near``), and gaps of up to 5 bytes."""
    idx = np.array(sorted(indices), dtype=np.int64)
    if near:
        idx = np.arange(len(idx), dtype=np.int64) * 3
    n = int(idx[-1]) + 1
    data = _encode_indices(idx)

    back, used = _decode_indices(memoryview(data), len(idx), n)

    assert used == len(data)
    assert np.array_equal(back, idx)
