import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucformat import bitpack


def slow_pack(codes: list[int], bits: int) -> bytes:
    """Reference: the SPEC's LSB-first bit stream, one bit at a time."""
    n = (len(codes) + 7) // 8 * 8
    stream = []
    for c in codes + [0] * (n - len(codes)):
        stream += [(c >> k) & 1 for k in range(bits)]
    return bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(bitpack.WIDTHS), rows=st.integers(1, 4), n=st.integers(1, 77), data=st.data())
def test_round_trip_and_reference(bits, rows, n, data):
    vals = data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=rows * n, max_size=rows * n))
    codes = torch.tensor(vals, dtype=torch.uint8).reshape(rows, n)
    packed = bitpack.pack(codes, bits)
    assert packed.shape == (rows, bitpack.packed_row_bytes(n, bits))
    for r in range(rows):
        assert bytes(packed[r].tolist()) == slow_pack(vals[r * n:(r + 1) * n], bits)
    assert torch.equal(bitpack.unpack(packed, bits, n), codes)


def test_pinned_bytes():
    # 3-bit codes 1..8 (mod 8): stream 100 010 110 001 101 011 111 000 (LSB first) -> 0xd1 0x58 0x1f
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert bitpack.pack(codes, 3).tolist() == [[0xD1, 0x58, 0x1F]]
    assert bitpack.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21, 0, 0, 0]]


def test_leading_dims_and_errors():
    codes = torch.randint(0, 32, (2, 3, 13), dtype=torch.uint8)
    assert torch.equal(bitpack.unpack(bitpack.pack(codes, 5), 5, 13), codes)
    with pytest.raises(ValueError, match="unsupported code width 7"):
        bitpack.pack(codes, 7)
    with pytest.raises(ValueError, match="cannot hold"):
        bitpack.unpack(torch.zeros(1, 4, dtype=torch.uint8), 5, 13)
