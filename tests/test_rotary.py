"""rotary.py on CPU: per-token positions of packed batches, and the packed rotation against transformers' ESM RoPE
(half-split) and the reference AMPLIFY's complex RoPE (interleaved), forward and backward. The Triton kernel and the
routing inside TE's attention are checked on a GPU (tests/test_modeling_te_gpu.py)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import EsmConfig
from transformers.models.esm.modeling_esm import EsmRotaryEmbedding, rotate_half

from convert import rotary_inverse_frequencies
from modeling_amplify import apply_rotary, rotary_frequencies
from rotary import PackedRotary, packed_positions, packed_rotary, rotate

HEAD_DIM = 16


def _cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    trailing=st.integers(0, 5),
)
def test_positions_restart_at_every_sequence(lengths: list[int], trailing: int) -> None:
    """Zero-length segments (static shapes) are skipped; tokens past the last sequence stay inside the table."""
    cu_seqlens = _cu_seqlens(lengths)
    tokens = sum(lengths) + trailing
    rows = max([*lengths, 1])
    expected = [p for n in lengths for p in range(n)]
    positions = packed_positions(cu_seqlens, tokens, rows)
    assert positions.dtype == torch.int32 and positions.shape == (tokens,)
    assert positions[: sum(lengths)].tolist() == expected
    assert all(0 <= p < rows for p in positions[sum(lengths) :].tolist())


def test_half_split_rotation_matches_transformers_esm_per_sequence() -> None:
    """Three packed sequences rotated at once equal transformers' ESM RoPE applied to each sequence alone."""
    torch.manual_seed(0)
    lengths, heads = [5, 0, 11, 7], 3
    config = EsmConfig(hidden_size=heads * HEAD_DIM, num_attention_heads=heads, rope_theta=10000.0)
    reference = EsmRotaryEmbedding(config)
    x = torch.randn(sum(lengths), heads, HEAD_DIM)
    rope = packed_rotary(rotary_inverse_frequencies(HEAD_DIM, 10000.0), _cu_seqlens(lengths), x.shape[0], max(lengths))
    out = rope.apply(x, interleaved=False)
    start = 0
    for n in lengths:
        chunk = x[start : start + n]
        cos, sin = reference(chunk, torch.arange(n)[None])
        expected = chunk * cos[0][:, None, :] + rotate_half(chunk) * sin[0][:, None, :]
        torch.testing.assert_close(out[start : start + n], expected, rtol=1e-6, atol=1e-6)
        start += n


def test_interleaved_rotation_matches_reference_amplify_per_sequence() -> None:
    torch.manual_seed(1)
    lengths, heads = [9, 4], 2
    x = torch.randn(sum(lengths), heads, HEAD_DIM)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    out = packed_rotary(inv_freq, _cu_seqlens(lengths), x.shape[0], max(lengths)).apply(x, interleaved=True)
    start = 0
    for n in lengths:
        expected = apply_rotary(x[None, start : start + n], rotary_frequencies(HEAD_DIM, n))[0]
        torch.testing.assert_close(out[start : start + n], expected, rtol=1e-6, atol=1e-6)
        start += n


@pytest.mark.parametrize("interleaved", [False, True])
def test_gradient_is_the_inverse_rotation(interleaved: bool) -> None:
    """The backward is the rotation by minus the angles: float64 gradcheck, and rotating back restores x."""
    torch.manual_seed(2)
    cu_seqlens = _cu_seqlens([6, 3])
    angles = torch.outer(torch.arange(6, dtype=torch.float64), rotary_inverse_frequencies(HEAD_DIM, 10000.0).double())
    rope = PackedRotary(angles.cos(), angles.sin(), packed_positions(cu_seqlens, 9, 6))
    x = torch.randn(9, 2, HEAD_DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rope.apply(t, interleaved), (x,))
    back = rotate(rope.apply(x, interleaved), *rope.tensors(), interleaved, inverse=True)
    torch.testing.assert_close(back, x.detach(), rtol=0, atol=1e-12)


def test_strided_view_of_a_fused_qkv_buffer() -> None:
    """TE hands RoPE the query as a strided view of the fused QKV output; the result is that of a contiguous copy."""
    torch.manual_seed(3)
    heads = 4
    qkv = torch.randn(10, heads, 3, HEAD_DIM, dtype=torch.bfloat16)  # TE's interleaved per-head layout
    query = qkv[:, :, 0, :]
    assert not query.is_contiguous()
    rope = packed_rotary(rotary_inverse_frequencies(HEAD_DIM, 10000.0), _cu_seqlens([4, 6]), 10, 6)
    out = rope.apply(query, interleaved=False)
    assert out.is_contiguous() and out.dtype == torch.bfloat16
    assert torch.equal(out, rope.apply(query.contiguous(), interleaved=False))


@pytest.mark.parametrize("interleaved", [False, True])
def test_in_place_rotation_keeps_q_k_v_one_buffer_with_the_same_gradients(interleaved: bool) -> None:
    """Rotating q and k inside the fused QKV output gives the values and input gradient of the out-of-place rotation,
    and gradients that arrive as views of one packed buffer leave as views of that same buffer (no concatenation)."""
    torch.manual_seed(4)
    tokens, heads = 10, 3
    rope = packed_rotary(rotary_inverse_frequencies(HEAD_DIM, 10000.0), _cu_seqlens([4, 6]), tokens, 6)
    hidden = torch.randn(tokens, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(heads * 3 * HEAD_DIM, 8, dtype=torch.float64)
    upstream = torch.randn(tokens, heads, 3, HEAD_DIM, dtype=torch.float64)

    def attention_inputs(in_place: bool) -> list[torch.Tensor]:
        qkv = (hidden @ weight.T).view(tokens, heads, 3, HEAD_DIM)  # TE's interleaved per-head layout
        q, k, v = (qkv[:, :, i, :] for i in range(3))
        turn = rope.apply_in_place if in_place else rope.apply
        return [turn(q, interleaved), turn(k, interleaved), v]

    expected = attention_inputs(in_place=False)
    (expected_grad,) = torch.autograd.grad(expected, hidden, [upstream[:, :, i, :] for i in range(3)])
    ours = attention_inputs(in_place=True)
    assert len({t.untyped_storage().data_ptr() for t in ours}) == 1  # still one [tokens, heads, 3, d] buffer
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    packed_grad = upstream.clone()  # what a packed attention backward returns: views of one dQKV
    (grad,) = torch.autograd.grad(ours, hidden, [packed_grad[:, :, i, :] for i in range(3)])
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(packed_grad[:, :, 2], upstream[:, :, 2], rtol=0, atol=0)  # v's gradient untouched
    turned_back = rotate(upstream[:, :, 0], *rope.tensors(), interleaved, inverse=True)
    assert torch.equal(packed_grad[:, :, 0], turned_back)  # q's was turned back in place


def test_in_place_gradient_that_cannot_be_written_is_rotated_into_a_new_tensor() -> None:
    rope = packed_rotary(rotary_inverse_frequencies(HEAD_DIM, 10000.0), _cu_seqlens([5]), 5, 5)
    x = torch.randn(5, 2, HEAD_DIM, dtype=torch.float64).clone().requires_grad_()
    out = rope.apply_in_place(x.clone(), interleaved=False)
    broadcast = torch.ones(1, 1, HEAD_DIM, dtype=torch.float64).expand(5, 2, HEAD_DIM)
    (grad,) = torch.autograd.grad(out, x, broadcast)
    torch.testing.assert_close(grad, rotate(broadcast.contiguous(), *rope.tensors(), False, inverse=True))
    assert torch.equal(broadcast, torch.ones(5, 2, HEAD_DIM, dtype=torch.float64))


def test_shape_mismatch_is_one_clear_error() -> None:
    rope = packed_rotary(rotary_inverse_frequencies(HEAD_DIM, 10000.0), _cu_seqlens([4]), 4, 4)
    with pytest.raises(ValueError, match="packed RoPE needs x"):
        rope.apply(torch.randn(4, 2, HEAD_DIM + 2), interleaved=False)
    broadcast = torch.randn(1, 2, HEAD_DIM).expand(4, 2, HEAD_DIM)  # four tokens sharing one row's memory
    with pytest.raises(ValueError, match="in-place RoPE needs a last dimension of stride 1 and no broadcast one"):
        rotate(broadcast, *rope.tensors(), False, in_place=True)
