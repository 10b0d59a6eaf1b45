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

Implementation: the 8 trilinear taps of every (output voxel, kernel point) pair are turned into
flat indices and weights with a handful of whole-chunk tensor ops, and
``F.embedding_bag(mode="sum", per_sample_weights=...)`` gathers and blends channels-last rows in
one call, giving the im2col columns ``(voxels, k^3, C)``; a multiply-and-sum with the depthwise
kernel finishes the convolution. Memory is bounded by processing ``chunk_size`` output depth
slices at a time (automatic by default); the result does not depend on the chunk size.

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


#: Default bound on the sampled-columns buffer of one chunk (elements; 4 bytes each in float32).
DEFAULT_CHUNK_ELEMENTS = 1 << 26


def _axis_weights(low: torch.Tensor, frac: torch.Tensor, size: int) -> torch.Tensor:
    """Linear weights of the neighbours ``low`` and ``low + 1``, zero for those outside ``[0, size)``.

    Shapes: ``low, frac (...)`` -> ``(..., 2)``.
    """
    w_low = (1 - frac) * ((low >= 0) & (low < size))
    w_high = frac * ((low >= -1) & (low < size - 1))
    return torch.stack((w_low, w_high), dim=-1)


def _trilinear_taps(
    pd: torch.Tensor, ph: torch.Tensor, pw: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat row indices and weights of the 8 trilinear neighbours of every position.

    Args:
        pd, ph, pw: sampling positions ``(B, ...)`` in input voxel units.
        size: input ``(D, H, W)``.

    Returns:
        ``index (M, 8)`` into the ``(B*D*H*W, C)`` channels-last input and ``weight (M, 8)``,
        ``M = pd.numel()``, in ``pd``'s element order. Neighbours outside the volume get weight 0
        (and an index clamped into range, so that they read a harmless row).
    """
    D, H, W = size
    d0, h0, w0 = torch.floor(pd), torch.floor(ph), torch.floor(pw)
    wd = _axis_weights(d0, pd - d0, D)
    wh = _axis_weights(h0, ph - h0, H)
    ww = _axis_weights(w0, pw - w0, W)
    weight = (wd[..., :, None, None] * wh[..., None, :, None]) * ww[..., None, None, :]
    batch = torch.arange(pd.shape[0], device=pd.device).view((-1,) + (1,) * (pd.dim() - 1))
    corner = ((batch * D + d0.long()) * H + h0.long()) * W + w0.long()
    delta = torch.tensor([a * H * W + b * W + c for a in (0, 1) for b in (0, 1) for c in (0, 1)],
                         device=pd.device)
    index = (corner.unsqueeze(-1) + delta).clamp_(0, pd.shape[0] * D * H * W - 1)
    return index.reshape(-1, 8), weight.reshape(-1, 8)


def _auto_chunk(batch: int, channels: int, n_points: int, plane: int, depth: int) -> int:
    per_slice = batch * n_points * plane * (channels + 24)  # sampled columns + indices/weights
    return max(1, min(depth, DEFAULT_CHUNK_ELEMENTS // max(1, per_slice)))


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
        x: input ``(B, C, D, H, W)``.
        offset: ``(B, 3*k^3, D_out, H_out, W_out)``, per kernel point ``(dd, dh, dw)``.
        weight: depthwise kernel ``(C, 1, k, k, k)``.
        bias: ``(C,)`` or None.
        padding: implicit zero padding (same on every side and axis).
        chunk_size: output depth slices per chunk. None: as many as keep the chunk's sampled
            columns (``B * k^3 * slices * H_out * W_out * C``) under :data:`DEFAULT_CHUNK_ELEMENTS`.
            Only memory and speed change, never the result.

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
    if chunk_size is None:
        step = _auto_chunk(B, C, n_points, Ho * Wo, Do)
    else:
        step = max(1, int(chunk_size))
    rows = x.permute(0, 2, 3, 4, 1).reshape(B * D * H * W, C)
    kernel_t = weight.reshape(C, n_points).t().to(x.dtype)  # (K, C)
    # positions in at least float32: half precision cannot hold fractions of large coordinates
    pos_dtype = torch.promote_types(x.dtype, torch.float32)
    offset = offset.to(pos_dtype).view(B, n_points, 3, Do, Ho, Wo)
    # kernel point p = (i, j, l) -> its position relative to the output voxel, minus the padding
    taps = torch.arange(k, device=x.device, dtype=pos_dtype) - padding
    tap_d = taps.repeat_interleave(k * k).view(1, n_points, 1, 1, 1)
    tap_h = taps.repeat_interleave(k).repeat(k).view(1, n_points, 1, 1, 1)
    tap_w = taps.repeat(k * k).view(1, n_points, 1, 1, 1)
    grid_h = torch.arange(Ho, device=x.device, dtype=pos_dtype).view(1, 1, 1, Ho, 1) + tap_h
    grid_w = torch.arange(Wo, device=x.device, dtype=pos_dtype).view(1, 1, 1, 1, Wo) + tap_w
    chunks = []
    for d0 in range(0, Do, step):
        d1 = min(Do, d0 + step)
        off = offset[:, :, :, d0:d1]  # (B, K, 3, n, Ho, Wo)
        grid_d = torch.arange(d0, d1, device=x.device, dtype=pos_dtype).view(1, 1, -1, 1, 1) + tap_d
        # positions ordered (B, n, Ho, Wo, K) so each voxel's K samples are adjacent rows
        pd = (grid_d + off[:, :, 0]).permute(0, 2, 3, 4, 1)
        ph = (grid_h + off[:, :, 1]).permute(0, 2, 3, 4, 1)
        pw = (grid_w + off[:, :, 2]).permute(0, 2, 3, 4, 1)
        index, tap_weight = _trilinear_taps(pd, ph, pw, (D, H, W))
        # im2col columns (voxels * K, C): one weighted gather of 8 channels-last rows each
        sampled = F.embedding_bag(index, rows, per_sample_weights=tap_weight.to(rows.dtype), mode="sum")
        sampled = sampled.view(-1, n_points, C).mul_(kernel_t).sum(dim=1)
        chunks.append(sampled.view(B, d1 - d0, Ho, Wo, C))
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
        chunk_size: output depth slices processed at once (memory bound only).

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
