"""Depthwise 3D deformable convolution (DCNv1) in pure PyTorch, CPU and GPU.

Re-implements the forward pass of the D3D CUDA extension used by 3D DeformUX-Net (no CPU path
exists upstream). Semantics, from the extension's im2col kernel (see REFERENCE section 3):

* one offset field shared by all channels (``deformable_groups=1``), no modulation mask;
* offset channel ``3p + (0, 1, 2)`` holds ``(dd, dh, dw)`` for kernel point ``p = i*k*k + j*k + l``;
* output voxel ``(d, h, w)`` samples the input at ``(d - pad + i + dd, h - pad + j + dh, w - pad + l + dw)``
  with trilinear interpolation, corners outside the volume read as zero (the value is zero
  unless ``-1 < pos < size`` on every axis) -- the same as
  ``F.grid_sample(align_corners=True, padding_mode="zeros")``;
* the samples are weighted by the depthwise kernel ``[C, 1, k, k, k]`` and the bias is added.

Implementation (im2col by weighted gather). Because the offsets are shared by all channels, the
8 trilinear corners of every (kernel point, output voxel) pair are computed once, as flat row
indices and weights, and ``F.embedding_bag(mode="sum", per_sample_weights=...)`` gathers and
blends the 8 channels-last input rows of each pair in one call, giving the im2col columns
``(B, k^3, voxels, C)``; a multiply by the depthwise kernel and a sum over the kernel points
finish the convolution. What makes it fast:

* the input is zero-padded (1 plane before, 2 after, on every axis) and the positions clamped
  to ``[-1, size]``: a clamped position reads only zero planes, so no validity masks are needed
  and every index is in range;
* columns are ordered kernel point first, so positions need no transpose and the final sum runs
  over whole contiguous slabs;
* the 8 corner weights and indices are written column by column from contiguous per-axis
  vectors (broadcasting over a trailing dimension of size 2 is several times slower);
* the gathered table is a contiguous (rows, C) tensor -- ``embedding_bag``'s vectorised path
  needs that -- and indices are int32 when the volume allows;
* output depth slices are processed in chunks under :data:`DEFAULT_CHUNK_ELEMENTS` (memory)
  and, on CPU, small enough to stay in cache; the result does not depend on the chunk size
  (the sum over kernel points always runs in the same order).

The previous formulation (masks, clamped indices, voxel-major columns; about 5x slower on CPU) is
kept in ``bench/bench_deform_conv.py`` as the reference the benchmark and tests compare with.

Stride 1 and dilation 1 only (all DeformUX-Net layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The D3D extension processes the batch in steps of this many samples.
D3D_IM2COL_STEP = 64

#: Default bound on the working buffers of one chunk (elements; 4 bytes each in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 26

#: On CPU, chunks are also kept under this many elements by default so the working set stays in
#: cache (bench/bench_deform_conv.py, 2 CPU cores: 1-2x faster than whole-volume chunks, at a
#: fraction of their memory). Not applied on GPUs, where small chunks only add kernel launches.
CACHE_CHUNK_ELEMENTS = 1 << 21

#: Zero planes added before / after every spatial axis of the gathered input.
_PAD_LOW, _PAD_HIGH = 1, 2


def _auto_chunk(
    batch: int, channels: int, n_points: int, plane: int, depth: int, device_type: str = "cpu"
) -> int:
    """Output depth slices per chunk: under :data:`DEFAULT_CHUNK_ELEMENTS` (and, on CPU, the cache target)."""
    per_slice = batch * n_points * plane * (channels + 24)  # columns + indices, weights, positions
    budget = min(DEFAULT_CHUNK_ELEMENTS, CACHE_CHUNK_ELEMENTS) if device_type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return max(1, min(depth, budget // max(1, per_slice)))


def _padded_rows(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> contiguous channels-last rows ``(B*(D+3)*(H+3)*(W+3), C)`` with zero borders."""
    pad = (_PAD_LOW, _PAD_HIGH) * 3
    return F.pad(x, pad).permute(0, 2, 3, 4, 1).contiguous().view(-1, x.shape[1])


def _corner_weights(fd: torch.Tensor, fh: torch.Tensor, fw: torch.Tensor) -> torch.Tensor:
    """Trilinear weights of the 8 corners, ordered (d, h, w) lexicographically.

    Shapes: fractional parts ``(M,)`` each -> ``(M, 8)``.
    """
    products = ((wd * wh, ww) for wd in (1 - fd, fd) for wh in (1 - fh, fh) for ww in (1 - fw, fw))
    if torch.is_grad_enabled() and fd.requires_grad | fh.requires_grad | fw.requires_grad:
        return torch.stack([wdh * ww for wdh, ww in products], dim=1)  # differentiable, slower
    out = torch.empty(fd.numel(), 8, dtype=fd.dtype, device=fd.device)
    for column, (wdh, ww) in enumerate(products):
        torch.mul(wdh, ww, out=out[:, column])
    return out


def _corner_indices(base: torch.Tensor, plane: int, row: int) -> torch.Tensor:
    """Row indices of the 8 corners given the low corner's; ``(M,)`` -> ``(M, 8)``, same order as the weights."""
    out = torch.empty(base.numel(), 8, dtype=base.dtype, device=base.device)
    column = 0
    for a in (0, plane):
        for b in (0, row):
            for c in (0, 1):
                torch.add(base, a + b + c, out=out[:, column])
                column += 1
    return out


def _weighted_point_sum(columns: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``sum_p columns[:, p] * kernel[p]``, always in kernel-point order (so chunking cannot change it).

    Shapes: ``columns (B, K, V, C)``, ``kernel (K, C)`` -> ``(B, V, C)``.
    """
    total = columns[:, 0] * kernel[0]
    for p in range(1, kernel.shape[0]):
        total.addcmul_(columns[:, p], kernel[p])
    return total


def deform_conv3d(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: int = 1,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Depthwise 3D deformable convolution, stride 1, dilation 1.

    Args:
        x: input ``(B, C, D, H, W)``, any floating dtype (positions are computed in at least float32).
        offset: ``(B, 3*k^3, D_out, H_out, W_out)``, per kernel point ``(dd, dh, dw)``.
        weight: depthwise kernel ``(C, 1, k, k, k)``.
        bias: ``(C,)`` or None.
        padding: implicit zero padding (same on every side and axis).
        chunk_size: output depth slices per chunk. None: see :func:`_auto_chunk` (columns
            ``B * k^3 * slices * H_out * W_out * C`` plus per-point buffers under
            :data:`DEFAULT_CHUNK_ELEMENTS` and, on CPU, :data:`CACHE_CHUNK_ELEMENTS`). Only
            memory and speed change, never the result.

    Returns:
        ``(B, C, D_out, H_out, W_out)`` with ``D_out = D + 2*padding - k + 1`` (a channels-last
        strided tensor).
    """
    if x.dim() != 5 or weight.dim() != 5 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"expected x (B,C,D,H,W) and a depthwise weight (C,1,k,k,k); "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    B, C, D, H, W = x.shape
    k = weight.shape[-1]
    if tuple(weight.shape[2:]) != (k, k, k):
        raise ValueError(f"only cubic kernels are supported, got {tuple(weight.shape[2:])}")
    out_size = (D + 2 * padding - k + 1, H + 2 * padding - k + 1, W + 2 * padding - k + 1)
    n_points = k ** 3
    if tuple(offset.shape) != (B, 3 * n_points, *out_size):
        raise ValueError(f"offset must have shape {(B, 3 * n_points, *out_size)}, got {tuple(offset.shape)}")
    Do, Ho, Wo = out_size
    device = x.device
    step = _auto_chunk(B, C, n_points, Ho * Wo, Do, device.type) if chunk_size is None else max(1, int(chunk_size))

    rows = _padded_rows(x)
    extra = _PAD_LOW + _PAD_HIGH
    Dp, Hp, Wp = D + extra, H + extra, W + extra
    index_dtype = torch.int32 if rows.shape[0] < 2**31 - 1 else torch.int64
    # row of voxel (0, 0, 0) of each sample in the padded rows (low corners count from there)
    first_row = (torch.arange(B, device=device, dtype=index_dtype) * (Dp * Hp * Wp)
                 + _PAD_LOW * (Hp * Wp + Wp + 1)).view(B, 1, 1, 1, 1)
    kernel = weight.reshape(C, n_points).t().to(x.dtype)  # (K, C)
    # positions in at least float32: half precision cannot hold fractions of large coordinates
    pos_dtype = torch.promote_types(x.dtype, torch.float32)
    offset = offset.to(pos_dtype).view(B, n_points, 3, Do, Ho, Wo)
    # kernel point p = (i, j, l) -> its position relative to the output voxel, minus the padding
    taps = torch.arange(k, device=device, dtype=pos_dtype) - padding
    tap_d = taps.repeat_interleave(k * k).view(1, n_points, 1, 1, 1)
    tap_h = taps.repeat_interleave(k).repeat(k).view(1, n_points, 1, 1, 1)
    tap_w = taps.repeat(k * k).view(1, n_points, 1, 1, 1)
    grid_h = torch.arange(Ho, device=device, dtype=pos_dtype).view(1, 1, 1, Ho, 1) + tap_h
    grid_w = torch.arange(Wo, device=device, dtype=pos_dtype).view(1, 1, 1, 1, Wo) + tap_w
    last_base = rows.shape[0] - 1 - (Hp * Wp + Wp + 1)

    def low_corner(grid: torch.Tensor, component: int, size: int, d0: int, d1: int):
        """Integer low corner and fractional part of one axis, positions ``(B, K, n, Ho, Wo)``."""
        pos = (grid + offset[:, :, component, d0:d1]).clamp_(-1, size)  # outside: zero planes only
        low = torch.floor(pos)
        return low.to(index_dtype), (pos - low).view(-1)

    chunks = []
    for d0 in range(0, Do, step):
        d1 = min(Do, d0 + step)
        grid_d = torch.arange(d0, d1, device=device, dtype=pos_dtype).view(1, 1, -1, 1, 1) + tap_d
        low_d, frac_d = low_corner(grid_d, 0, D, d0, d1)
        low_h, frac_h = low_corner(grid_h, 1, H, d0, d1)
        low_w, frac_w = low_corner(grid_w, 2, W, d0, d1)
        base = ((low_d * Hp + low_h) * Wp + low_w + first_row).view(-1)
        base.clamp_(0, last_base)  # only reached by NaN offsets, whose weights make the result NaN
        index = _corner_indices(base, Hp * Wp, Wp)
        corner_w = _corner_weights(frac_d, frac_h, frac_w).to(x.dtype)
        # im2col columns (B, K, voxels, C): one weighted gather of 8 channels-last rows each
        columns = F.embedding_bag(index, rows, per_sample_weights=corner_w, mode="sum")
        summed = _weighted_point_sum(columns.view(B, n_points, -1, C), kernel)
        chunks.append(summed.view(B, d1 - d0, Ho, Wo, C))
    out = chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    return out.permute(0, 4, 1, 2, 3)


def d3d_offset_view(offset: torch.Tensor, out_size: Sequence[int], im2col_step: int = D3D_IM2COL_STEP) -> torch.Tensor:
    """The offsets the D3D CUDA op actually reads when ``offset`` has the wrong spatial size.

    The extension indexes the offset buffer as if it were ``(B, 3K, D_out, H_out, W_out)``,
    stepping the base pointer by the *real* per-sample size every ``im2col_step`` samples. With
    DeformUX-Net's repository ``conv_offset`` (kernel 1, padding 1) the offset map is
    ``(D+2)(H+2)(W+2)``, so each step reads the first ``step*3K*D_out*H_out*W_out`` values of its
    buffer: spatially scrambled, and sample b>0 reads values computed from sample b-1 or earlier.
    For ``B <= 64`` this is ``offset.reshape(-1)[:B*3K*DHW_out].view(B, 3K, *out_size)``.

    Shapes: ``(B, 3K, d, h, w)`` -> ``(B, 3K, *out_size)`` (unchanged when sizes already agree).
    """
    B, channels = offset.shape[:2]
    out_size = tuple(int(s) for s in out_size)
    if tuple(offset.shape[2:]) == out_size:
        return offset
    step = min(B, im2col_step)
    if B % step:
        raise ValueError(f"the D3D op needs the batch ({B}) to be a multiple of {step}")
    per_sample = math.prod(offset.shape[1:])
    needed = channels * math.prod(out_size)
    if needed > per_sample:
        raise ValueError(f"offset map {tuple(offset.shape)} is smaller than the output {out_size} needs")
    flat = offset.reshape(B // step, step * per_sample)[:, : step * needed]
    return flat.reshape(B, channels, *out_size)


class DeformConv3d(nn.Module):
    """Depthwise deformable conv with its offset branch (D3D ``DeformConvPack`` layout, groups=C).

    Args:
        channels: C (input = output channels).
        kernel_size: k of the deformable kernel (3 in DeformUX-Net).
        padding: padding of both the deformable conv and the offset conv (1).
        offset_kernel_size: kernel of ``conv_offset``: 3 in the compiled extension (consistent
            offsets), 1 in the repository source (offset map larger than the output, read with
            the CUDA op's strides, see :func:`d3d_offset_view`).
        bias: whether the deformable conv has a bias (the official layer always does).
        chunk_size: output depth slices processed at once (memory and speed only; None = automatic).

    Shapes: ``(B, C, D, H, W) -> (B, C, D, H, W)`` for k=3, padding=1.
    Keys: ``weight [C,1,k,k,k]``, ``bias [C]``, ``conv_offset.{weight [3k^3,C,ko,ko,ko], bias}``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        offset_kernel_size: int = 3,
        bias: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.padding = padding
        self.chunk_size = chunk_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.conv_offset = nn.Conv3d(channels, 3 * kernel_size ** 3, offset_kernel_size, padding=padding, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)  # starts as a plain conv, as upstream
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_size = [s + 2 * self.padding - self.kernel_size + 1 for s in x.shape[2:]]
        offset = d3d_offset_view(self.conv_offset(x), out_size)
        return deform_conv3d(x, offset, self.weight, self.bias, self.padding, self.chunk_size)
