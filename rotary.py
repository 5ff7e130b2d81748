"""Rotary position embeddings of packed (THD) batches: one Triton kernel per tensor, positions read per token.

TE's THD RoPE kernel (TransformerEngine 2.20) runs one thread block per token that recomputes the token's sines and
cosines and moves one element per thread, so it is latency-bound: for the queries of a 16k-token ESM-2 650M batch it
takes about four times as long as reading and writing them. Here the positions of a batch are computed once (on the
device, from ``cu_seqlens``), every layer reads its angles from one small cosine/sine table, and each program rotates
a tile of tokens x heads x dimensions. The arithmetic is TE's: float32 angles, ``x * cos + rotate(x) * sin`` in
float32, rounded once to the input's dtype; both the half-split (ESM-2) and the interleaved (AMPLIFY) layouts.

TE's ``MultiheadAttention`` applies RoPE itself, so :func:`route_te_rope` makes its RoPE call dispatch on the table
it is given: a :class:`PackedRotary` runs here, anything else (TE's own frequency tensor, e.g. under context
parallelism or for padded batches) runs TE's kernel unchanged. It rotates the query and the key in place, inside the
fused QKV projection's output, so the attention is handed one packed [tokens, heads, 3, head_dim] buffer instead of
two new tensors and a strided value (which TE copies to make contiguous), and its packed gradient needs no
concatenation on the way back. Without CUDA the same rotation runs in plain torch.
"""

import warnings
from dataclasses import dataclass
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below serves
    triton = None

ROPE_KERNELS = ("triton", "te")  # a TE model's choice for packed batches: this module's kernel, or TE's


def check_rope_kernel(rope_kernel: str) -> None:
    """Refuse a ``rope_kernel`` that is not one of ``ROPE_KERNELS``."""
    if rope_kernel not in ROPE_KERNELS:
        raise ValueError(f"rope_kernel must be one of {ROPE_KERNELS}, got {rope_kernel!r}")


@dataclass(frozen=True)
class PackedRotary:
    """The ``rotary_pos_emb`` that routes a packed batch's RoPE to this module.

    ``cos`` and ``sin`` are float32 ``[rows, head_dim // 2]`` tables (one row per position), ``positions`` the int32
    position of every token of the batch within its sequence. Not a tuple: TE reads a tuple as (query, key) tables.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three tensors, e.g. as CUDA-graph inputs (rebuild with ``PackedRotary(*tensors)``)."""
        return self.cos, self.sin, self.positions

    def apply(self, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """Rotate ``x`` ``[tokens, heads, head_dim]`` (any strides); differentiable."""
        return _PackedRope.apply(x, self.cos, self.sin, self.positions, interleaved, False)

    def apply_in_place(self, x: torch.Tensor, interleaved: bool) -> torch.Tensor:
        """Rotate ``x`` in its own memory and return it; the backward rotates its gradient back in place too.

        For a query or key that is a view of a fused QKV projection no other op reads (TE's attention): q, k and v
        then stay one packed buffer, which the attention reads as such, and its packed gradient reaches the QKV
        projection without the copy of v and the concatenation of dq, dk and dv that separate rotated tensors cost.
        """
        return _PackedRope.apply(x, self.cos, self.sin, self.positions, interleaved, True)


def rotary_tables(inv_freq: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of ``position * inv_freq`` for positions ``0 .. rows - 1``, in float32 as TE computes them."""
    angles = torch.outer(torch.arange(rows, device=inv_freq.device, dtype=torch.float32), inv_freq.float())
    return angles.cos(), angles.sin()


def packed_positions(cu_seqlens: torch.Tensor, tokens: int, rows: int) -> torch.Tensor:
    """Each token's position within its sequence, from ``cu_seqlens``, without reading anything back to the host.

    Tokens past ``cu_seqlens[-1]`` (none in the recipe's batches) get a position inside the table: they belong to no
    sequence and carry no loss, but must not read outside it.
    """
    index = torch.arange(tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    sequence = (torch.searchsorted(cu_seqlens, index, right=True) - 1).clamp_(0, cu_seqlens.numel() - 2)
    return (index - cu_seqlens[sequence]).clamp_(0, rows - 1).to(torch.int32)


def packed_rotary(inv_freq: torch.Tensor, cu_seqlens: torch.Tensor, tokens: int, rows: int) -> PackedRotary:
    """The tables (``rows`` positions) and the positions of a packed batch of ``tokens`` tokens."""
    return PackedRotary(*rotary_tables(inv_freq, rows), packed_positions(cu_seqlens, tokens, rows))


def rotate(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool,
    inverse: bool = False,
    in_place: bool = False,
) -> torch.Tensor:
    """RoPE of ``x`` ``[tokens, heads, head_dim]`` (``inverse``: by minus the angles, which is its gradient).

    Returns a new contiguous tensor of ``x``'s dtype (the Triton kernel on CUDA, plain torch elsewhere), or with
    ``in_place`` ``x`` itself, rotated in its own memory (last dimension contiguous, no broadcast dimension): each
    Triton program reads its tile before it writes it, and no two programs share a token.
    """
    if x.dim() != 3 or x.shape[-1] != 2 * cos.shape[-1] or positions.shape != x.shape[:1]:
        raise ValueError(
            f"packed RoPE needs x [tokens, heads, 2 * {cos.shape[-1]}] and {tuple(positions.shape)} positions, got "
            f"x {tuple(x.shape)}"
        )
    if in_place and (x.stride(-1) != 1 or 0 in x.stride()):
        raise ValueError(f"in-place RoPE needs a last dimension of stride 1 and no broadcast one, got {x.stride()}")
    if x.is_cuda and triton is not None:
        out = x if in_place else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        return _rotate_triton(x, out, cos, sin, positions, interleaved, inverse)
    rotated = _rotate_torch(x.detach() if in_place else x, cos, sin, positions, interleaved, inverse)
    if not in_place:
        return rotated
    # Through .data, which autograd does not version, as it does not see the kernel's writes: the same semantics.
    x.data.copy_(rotated)
    return x


def _rotate_torch(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool, inverse: bool
) -> torch.Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)  # float32, as TE computes, or float64 for float64 inputs
    index = positions.long()
    c, s = cos[index][:, None, :].to(compute), sin[index][:, None, :].to(compute)
    if inverse:
        s = -s
    values = x.to(compute)
    half = cos.shape[-1]
    first, second = (values[..., 0::2], values[..., 1::2]) if interleaved else (values[..., :half], values[..., half:])
    out_first, out_second = first * c - second * s, second * c + first * s
    if interleaved:
        out = torch.stack((out_first, out_second), dim=-1).flatten(-2)
    else:
        out = torch.cat((out_first, out_second), dim=-1)
    return out.to(x.dtype)


class _PackedRope(torch.autograd.Function):
    # In place (``in_place``), not mark_dirty: x is then a view that TE's SplitAlongDim (a custom Function) returned,
    # which autograd forbids to mark modified. That is sound because nothing saved the projection's output for its
    # backward (TE's linear layers keep their inputs), so no saved value is overwritten.
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        interleaved: bool,
        in_place: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved, ctx.in_place = interleaved, in_place
        out = rotate(x, cos, sin, positions, interleaved, in_place=in_place)
        return out.view_as(x) if in_place else out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin, positions = ctx.saved_tensors
        # In place, the attention's backward hands this gradient to this function alone, so it may be overwritten;
        # one that cannot be written element by element (broadcast, strided last dimension) goes into a new tensor.
        writable = ctx.in_place and grad.stride(-1) == 1 and 0 not in grad.stride()
        rotated = rotate(grad, cos, sin, positions, ctx.interleaved, inverse=True, in_place=writable)
        return rotated, None, None, None, None, None


if triton is not None:

    @triton.jit
    def _rope_kernel(
        x_ptr,
        out_ptr,
        pos_ptr,
        cos_ptr,
        sin_ptr,
        tokens,
        heads,
        x_stride_t,
        x_stride_h,
        out_stride_t,
        out_stride_h,
        HALF: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        INVERSE: tl.constexpr,
    ):
        # One program: BLOCK_T tokens x all heads x the rotated pairs (j, j + HALF), or (2j, 2j + 1) interleaved.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        h = tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_D)
        t_ok = t < tokens
        angle_mask = t_ok[:, None] & (j < HALF)[None, :]
        angle = tl.load(pos_ptr + t, mask=t_ok, other=0)[:, None] * HALF + j[None, :]
        cos = tl.load(cos_ptr + angle, mask=angle_mask, other=0.0)[:, None, :]
        sin = tl.load(sin_ptr + angle, mask=angle_mask, other=0.0)[:, None, :]
        if INVERSE:
            sin = -sin
        t64 = t.to(tl.int64)[:, None, None]
        x_rows = x_ptr + t64 * x_stride_t + h[None, :, None] * x_stride_h
        out_rows = out_ptr + t64 * out_stride_t + h[None, :, None] * out_stride_h
        out_dtype = out_ptr.dtype.element_ty
        if INTERLEAVED:
            # Whole rows in one contiguous load, split into (even, odd) pairs in registers: strided loads of every
            # other element ran 5x slower than TE's kernel.
            d = tl.arange(0, 2 * BLOCK_D)
            mask = t_ok[:, None, None] & (h < heads)[None, :, None] & (d < 2 * HALF)[None, None, :]
            x = tl.load(x_rows + d[None, None, :], mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_D, 2)))
            out = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)
            tl.store(
                out_rows + d[None, None, :], tl.reshape(out, (BLOCK_T, BLOCK_H, 2 * BLOCK_D)).to(out_dtype), mask=mask
            )
        else:
            mask = t_ok[:, None, None] & (h < heads)[None, :, None] & (j < HALF)[None, None, :]
            first = j[None, None, :]
            second = first + HALF
            x1 = tl.load(x_rows + first, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_rows + second, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_rows + first, (x1 * cos - x2 * sin).to(out_dtype), mask=mask)
            tl.store(out_rows + second, (x2 * cos + x1 * sin).to(out_dtype), mask=mask)


# Elements of one half that a program rotates: 4 tokens of 20 heads x 32 pairs (ESM-2 650M) keep 4 warps busy
# without spilling registers.
_TILE_ELEMENTS = 4096


def _rotate_triton(
    x: torch.Tensor,
    out: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool,
    inverse: bool,
) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, heads, _ = x.shape
    half = cos.shape[-1]
    block_h, block_d = triton.next_power_of_2(heads), triton.next_power_of_2(half)
    block_t = max(1, _TILE_ELEMENTS // (block_h * block_d))
    _rope_kernel[(triton.cdiv(tokens, block_t),)](
        x,
        out,
        positions,
        cos.contiguous(),
        sin.contiguous(),
        tokens,
        heads,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        HALF=half,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        INTERLEAVED=interleaved,
        INVERSE=inverse,
        num_warps=4,
    )
    return out


def route_te_rope() -> None:
    """Make TE's ``MultiheadAttention`` run a :class:`PackedRotary` here; its other RoPE calls are TE's as before.

    Idempotent. Called when the TE models are imported.

    TE finds the packed layout of the rotated views by their pointers and strides and warns that this detection is
    deprecated in favour of handing it the packed buffer, which its ``MultiheadAttention`` does only without RoPE; that
    warning is silenced here (TE 2.20).
    """
    from transformer_engine.pytorch.attention import multi_head_attention

    te_apply = multi_head_attention.apply_rotary_pos_emb
    if getattr(te_apply, "routes_packed_rotary", False):
        return
    warnings.filterwarnings(
        "ignore", message="Relying on pointer-based detection of packed q/k/v", category=DeprecationWarning
    )

    def apply_rotary_pos_emb(t: torch.Tensor, freqs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(freqs, PackedRotary):
            return te_apply(t, freqs, *args, **kwargs)
        if kwargs.get("cp_size", 1) != 1 or kwargs.get("start_positions") is not None:
            raise ValueError("PackedRotary serves whole packed sequences: context parallelism and inference use TE's")
        return freqs.apply_in_place(t, bool(kwargs.get("interleaved", False)))

    apply_rotary_pos_emb.routes_packed_rotary = True
    multi_head_attention.apply_rotary_pos_emb = apply_rotary_pos_emb
