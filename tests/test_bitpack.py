import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucformat import bitpack


def slow_pack(codes: list[int], bits: int) -> bytes:
    """Reference, straight from SPEC.md 2.1: per plane (low bits first), an LSB-first bit stream of that
    plane's bits of every code, one bit at a time."""
    n = (len(codes) + 7) // 8 * 8
    codes = codes + [0] * (n - len(codes))
    out, low = b"", 0
    for width in bitpack.PLANES[bits]:
        stream = []
        for c in codes:
            stream += [(c >> (low + k)) & 1 for k in range(width)]
        out += bytes(sum(stream[i + k] << k for k in range(8)) for i in range(0, len(stream), 8))
        low += width
    return out


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
    # 3-bit codes 1,2,3,4,5,6,7,0: low 2-bit plane 1,2,3,0 | 1,2,3,0 -> 0b00111001 twice = 0x39 0x39;
    # high 1-bit plane 0,0,0,1,1,1,1,0 -> 0b01111000 = 0x78
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    assert bitpack.pack(codes, 3).tolist() == [[0x39, 0x39, 0x78]]
    # 5-bit code 31 then zeros: nibble plane 0x0f 0 0 0, high plane 0x01
    assert bitpack.pack(torch.tensor([[31, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8), 5).tolist() == [[15, 0, 0, 0, 1]]
    assert bitpack.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21, 0, 0, 0]]


def test_leading_dims_and_errors():
    codes = torch.randint(0, 32, (2, 3, 13), dtype=torch.uint8)
    assert torch.equal(bitpack.unpack(bitpack.pack(codes, 5), 5, 13), codes)
    with pytest.raises(ValueError, match="unsupported code width 7"):
        bitpack.pack(codes, 7)
    with pytest.raises(ValueError, match="cannot hold"):
        bitpack.unpack(torch.zeros(1, 4, dtype=torch.uint8), 5, 13)
