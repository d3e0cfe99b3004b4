"""Canonical float operators: the few shapes every supported model is
rewritten into before calibration (see ``canonicalize``).

Each is a small torch module whose ``forward`` is the float computation
(used for calibration) and whose attributes hold what the converter needs to
build the integer op (weights, epsilon, the constant factor).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class FLinear(torch.nn.Module):
    """y = x @ weight.T + bias, weight [N, K] (a MatMul/Gemm with constant weight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(-1))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class FConv2d(torch.nn.Module):
    """2-D convolution with constant weight; pads are (top, left, bottom, right)."""

    def __init__(self, weight, bias, stride, pads, dilation, groups):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).reshape(-1))
        self.stride, self.pads, self.dilation, self.groups = tuple(stride), tuple(pads), tuple(dilation), groups

    def forward(self, x):
        top, left, bottom, right = self.pads
        if any(self.pads):
            x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class FMatMul(torch.nn.Module):
    """Batched matmul of two activations (attention's QK^T and AV)."""

    def forward(self, a, b):
        return torch.matmul(a, b)


class FScale(torch.nn.Module):
    """Multiplication by a positive scalar constant (e.g. attention's 1/sqrt(d))."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * self.factor


class FAdd(torch.nn.Module):
    """Elementwise sum of two tensors (residual add, positional embedding)."""

    def forward(self, a, b):
        return a + b


class FSoftmax(torch.nn.Module):
    """Softmax over the last axis."""

    def forward(self, x):
        return torch.softmax(x, dim=-1)


class FMaskedSoftmax(torch.nn.Module):
    """Softmax over the last axis of ``x`` restricted to the kept keys of a padding mask.

    ``x``: scores ``[B, ..., Lk]``; ``mask``: ``[B, Lk]`` (the ``attention_mask``
    input as ``transformers`` takes it, any integer or boolean dtype).  Key
    ``k`` of batch row ``b`` is kept when ``mask[b, k] != 0``; a masked key
    gets probability exactly 0, and a row with no kept key is all 0 (what
    ``Where(IsNaN(softmax), 0, softmax)`` gives after a ``-inf`` mask).
    """

    def forward(self, x, mask):
        keep = key_mask(mask, x.dim())
        probs = torch.softmax(x.masked_fill(~keep, -math.inf), dim=-1)
        return torch.nan_to_num(probs, nan=0.0)


def key_mask(mask: torch.Tensor, rank: int) -> torch.Tensor:
    """``mask [B, Lk] != 0`` reshaped to ``[B, 1, ..., 1, Lk]`` (rank ``rank``), broadcastable onto the scores."""
    return (mask != 0).reshape((mask.shape[0],) + (1,) * (rank - 2) + (mask.shape[-1],))


class FGelu(torch.nn.Module):
    """Exact (erf) GELU."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class FTable(torch.nn.Module):
    """An elementwise function of one activation, ``fn`` (``quantizer/elementwise.py`` extracts it).

    ``fn`` is a GraphModule of the ONNX nodes it fused (one input, one
    output); its constants are scalars, or vary along one axis only:
    ``channels`` of them along ``axis`` (negative, from the last), else
    ``channels`` is 1.  ``ops`` lists the fused op types, for reports.
    """

    def __init__(self, fn: torch.nn.Module, channels: int = 1, axis: int = -1, ops: tuple[str, ...] = ()):
        super().__init__()
        self.fn = fn
        self.channels, self.axis, self.ops = int(channels), int(axis), tuple(ops)

    def forward(self, x):
        out = self.fn(x)
        return out[0] if isinstance(out, tuple) else out

    def extra_repr(self) -> str:
        return f"{' -> '.join(self.ops)}, channels={self.channels}, axis={self.axis}"


class FMul(torch.nn.Module):
    """Elementwise product of two tensors (a gate onto an activation); one may be a constant."""

    def forward(self, a, b):
        return a * b


class FLayerNorm(torch.nn.Module):
    """LayerNorm over the last axis with affine gamma/beta."""

    def __init__(self, gamma: torch.Tensor, beta: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("gamma", gamma.detach().to(torch.float32).reshape(-1))
        self.register_buffer("beta", beta.detach().to(torch.float32).reshape(-1))
        self.eps = float(eps)

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.gamma, self.beta, self.eps)


class FClamp(torch.nn.Module):
    """``clamp(x, lo, hi)`` with constant bounds (``-inf`` / ``inf`` where absent): Relu, ReLU6, Clip."""

    def __init__(self, lo: float = -math.inf, hi: float = math.inf):
        super().__init__()
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x):
        return torch.clamp(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}"


class FAvgPool(torch.nn.Module):
    """2-D average pooling of NCHW, the divisor always ``kh * kw`` (count_include_pad).

    ``kernel`` None is global pooling (the whole ``H x W``, keeping the two
    axes as 1 x 1); otherwise the input is zero-padded by ``pads = (top,
    left, bottom, right)`` and windows of ``kernel`` step by ``stride``.
    """

    def __init__(self, kernel=None, stride=None, pads=(0, 0, 0, 0)):
        super().__init__()
        self.kernel = None if kernel is None else tuple(int(k) for k in kernel)
        self.stride = None if kernel is None else tuple(int(v) for v in (stride or kernel))
        self.pads = tuple(int(p) for p in pads)

    def forward(self, x):
        if self.kernel is None:
            return x.mean(dim=(2, 3), keepdim=True)
        top, left, bottom, right = self.pads
        if any(self.pads):
            x = F.pad(x, (left, right, top, bottom))
        return F.avg_pool2d(x, self.kernel, self.stride)

    def extra_repr(self) -> str:
        return "global" if self.kernel is None else f"kernel={self.kernel}, stride={self.stride}, pads={self.pads}"


CANONICAL_TYPES = (
    FLinear,
    FConv2d,
    FMatMul,
    FScale,
    FAdd,
    FSoftmax,
    FMaskedSoftmax,
    FGelu,
    FLayerNorm,
    FClamp,
    FAvgPool,
    FTable,
    FMul,
)
