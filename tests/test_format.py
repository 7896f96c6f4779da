"""Encodings of docs/format.md: bf16 rounding, group-64 affine quantization, byte layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flashmoe_native import format as fmt


def test_bf16_matches_torch_round_to_nearest_even() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
            # exact ties: the low 16 bits are 0x8000, so only round-to-even decides
            (np.arange(1000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
            np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45], np.float32),
        ]
    )
    expected = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(fmt.f32_to_bf16(x), expected)
    np.testing.assert_array_equal(fmt.bf16_to_f32(expected), torch.from_numpy(x).bfloat16().float())
    nan = fmt.f32_to_bf16(np.array([np.nan], np.float32))
    assert np.isnan(fmt.bf16_to_f32(nan)).all()


def naive_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """docs/format.md read literally, one group and one element at a time."""
    rows, cols = w.shape
    levels = 2**bits - 1
    q = np.zeros((rows, cols), np.int64)
    scales = np.zeros((rows, cols // 64), np.uint16)
    biases = np.zeros((rows, cols // 64), np.uint16)
    for r in range(rows):
        for g in range(cols // 64):
            group = w[r, 64 * g : 64 * g + 64]
            rng = np.float32(group.max() - group.min())
            scale_t = torch.tensor(rng / np.float32(levels)).bfloat16()
            bias_t = torch.tensor(group.min()).bfloat16()
            scales[r, g] = scale_t.view(torch.int16).item() & 0xFFFF
            biases[r, g] = bias_t.view(torch.int16).item() & 0xFFFF
            scale, bias = np.float32(scale_t.float().item()), np.float32(bias_t.float().item())
            for c in range(64):
                if scale == 0:
                    q[r, 64 * g + c] = 0
                else:
                    v = np.rint(np.float32(group[c] - bias) / scale)
                    q[r, 64 * g + c] = int(min(max(v, 0), levels))
    words = np.zeros((rows, cols * bits // 32), np.uint32)
    for r in range(rows):
        for c in range(cols):
            word, j = divmod(c, 32 // bits)
            words[r, word] |= np.uint32(q[r, c] << (bits * j))
    return words, scales, biases


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_equals_the_spec_read_literally(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((6, 192)) * rng.uniform(0.01, 3, (6, 1))).astype(np.float32)
    w[2, 64:128] = 0.75  # a constant group: scale 0
    got = fmt.quantize(w, bits)
    want = naive_quantize(w, bits)
    for g, e, what in zip(got, want, ("data", "scales", "biases"), strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, what
        np.testing.assert_array_equal(g, e, err_msg=what)


def test_4bit_nibble_order_and_8bit_byte_order() -> None:
    # 4 bits: q = column mod 16 spans the full range of each group, so it round-trips exactly
    cols = np.arange(256)
    w4 = ((cols % 16) * 0.5 - 2.0).astype(np.float32)[None, :]
    data4, scales4, biases4 = fmt.quantize(w4, 4)
    assert data4[0, 0] == 0x76543210 and data4[0, 1] == 0xFEDCBA98
    np.testing.assert_array_equal(fmt.dequantize(data4, scales4, biases4, 4), w4)
    packed = fmt.pack_quantized(data4, scales4, biases4, 4)
    # byte b holds column 2b in its low nibble and 2b+1 in its high nibble
    assert packed[0] == 0x10 and packed[1] == 0x32 and packed[7] == 0xFE

    # 8 bits: per group q = 0, 4, ..., 248, 255 spans the full range, so scale = step exactly
    q8 = np.concatenate([np.arange(63) * 4, [255]])
    w8 = np.concatenate([q8 * 0.25 - 1.0, q8 * 4.0 - 100.0]).astype(np.float32)[None, :]
    data8, scales8, biases8 = fmt.quantize(w8, 8)
    packed8 = fmt.pack_quantized(data8, scales8, biases8, 8)
    np.testing.assert_array_equal(packed8[:128], np.tile(q8, 2).astype(np.uint8))  # byte b = col b
    np.testing.assert_array_equal(fmt.bf16_to_f32(scales8[0]), [0.25, 4.0])
    np.testing.assert_array_equal(fmt.dequantize(data8, scales8, biases8, 8), w8)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_error_is_bounded_by_half_a_step(bits: int) -> None:
    rng = np.random.default_rng(10 + bits)
    w = (rng.standard_normal((64, 512)) * 0.05 + rng.uniform(-0.2, 0.2, (64, 1))).astype(np.float32)
    data, scales, biases = fmt.quantize(w, bits)
    back = fmt.dequantize(data, scales, biases, bits)
    groups = w.reshape(64, 8, 64)
    lo, hi = groups.min(2), groups.max(2)
    # half a step, plus what bf16 rounding of scale and bias (2^-9 relative each) can shift
    bound = (hi - lo) / (2**bits - 1) * 0.5 + 2.0**-8 * (np.abs(lo) + (hi - lo)) + 1e-7
    err = np.abs(back - w).reshape(64, 8, 64).max(2)
    assert (err <= bound).all(), float((err / bound).max())
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)
    assert rel < {4: 0.1, 8: 0.01}[bits]


def test_constant_groups_reproduce_their_bf16_value() -> None:
    w = np.full((3, 128), -1.2345, np.float32)
    for bits in (4, 8):
        data, scales, biases = fmt.quantize(w, bits)
        assert (scales == 0).all() and (data == 0).all()
        np.testing.assert_array_equal(fmt.dequantize(data, scales, biases, bits), fmt.bf16_round(w))


def test_layout_of_the_397b_expert_matches_the_spec_example() -> None:
    part = fmt.quant_layout(1024, 4096, 4)
    assert (part.scales_offset, part.biases_offset, part.nbytes) == (2097152, 2228224, 2359296)
    parts, block_bytes, stride = fmt.expert_block_layout(
        {"gate": "q4", "up": "q4", "down": "q4"},
        {"gate": [1024, 4096], "up": [1024, 4096], "down": [4096, 1024]},
    )
    assert [parts[p]["offset"] for p in ("gate", "up", "down")] == [0, 2359296, 4718592]
    assert block_bytes == stride == 7077888


def test_parts_are_64_byte_aligned_and_padding_is_zero() -> None:
    # 3 rows x 64 cols at 4 bits: 96 data bytes, 6 scale bytes -> padding after both
    layout = fmt.quant_layout(3, 64, 4)
    assert (layout.data_nbytes, layout.scales_offset, layout.biases_offset) == (96, 128, 192)
    assert layout.nbytes == 198 == fmt.tensor_nbytes("q4", [3, 64])
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 64)).astype(np.float32)
    buf = fmt.encode_tensor(w, "q4")
    assert buf.size == 198
    assert not buf[96:128].any() and not buf[134:192].any()
    np.testing.assert_array_equal(
        fmt.decode_tensor(buf, "q4", [3, 64]), fmt.dequantize(*fmt.quantize(w, 4), 4)
    )
    _, block_bytes, stride = fmt.expert_block_layout(
        {"gate": "q4", "up": "q4", "down": "bf16"},
        {"gate": [3, 64], "up": [3, 64], "down": [64, 3]},
    )
    # gate 198 bytes at 0, up at 256, down (bf16, 384 bytes) at 512
    assert (block_bytes, stride) == (896, 4096)


def test_f32_and_bf16_round_trip() -> None:
    rng = np.random.default_rng(4)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    np.testing.assert_array_equal(fmt.decode_tensor(fmt.encode_tensor(w, "f32"), "f32", [5, 7]), w)
    back = fmt.decode_tensor(fmt.encode_tensor(w, "bf16"), "bf16", [5, 7])
    np.testing.assert_array_equal(back, fmt.bf16_round(w))
    assert np.abs(back - w).max() <= np.abs(w).max() * 2.0**-8


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [("q4", [3, 65]), ("q8", [64]), ("f16", [4, 64]), ("bf16", [0, 64]), ("f32", [])],
)
def test_impossible_tensors_are_rejected(dtype: str, shape: list[int]) -> None:
    with pytest.raises(ValueError):
        fmt.tensor_nbytes(dtype, shape)
