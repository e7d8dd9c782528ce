"""Fast forward of the ``efficientnet_lite_pytorch`` network, same modules and state dict.

The package's own forward runs every convolution behind a ``ZeroPad2d`` module (TensorFlow
'SAME' padding, computed for one image size) followed by a separate BatchNorm and ReLU6, in
NCHW. On a small CPU that is slow for the depthwise convolutions. This walks the same modules
and computes the same function faster:

- a BatchNorm in eval mode (frozen running statistics) is folded into the preceding conv:
  ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``
  (differentiable in ``w``, ``gamma``, ``beta``, so gradients still reach them), cached while
  no weight or statistic changes; a BatchNorm in train mode uses batch statistics and updates
  the running statistics exactly as the package (in place when nothing differentiates
  through it, e.g. a frozen bottom in train mode);
- symmetric 'SAME' padding becomes the conv's own ``padding``; TensorFlow's asymmetric
  ``(p, p + 1)`` (stride-2 convs) becomes a kernel with a leading zero row and column and
  symmetric padding ``p + 1`` (same outputs, no padded copy of the input);
- activations are channels-last (NHWC), which the CPU depthwise kernels prefer;
- without autograd (inference, or a frozen bottom fed plain images), float32 CPU convs run as
  oneDNN's fused conv + bias + ReLU6 (or + residual) kernel, the one ``torch.compile`` emits;
  probed once, ``F.conv2d`` + in-place ReLU6 otherwise;
- stride-1 depthwise convs under autograd get their backward from forward convs
  (:class:`_DepthwiseConv`): oneDNN's depthwise backward is 10-40x its forward on CPU;
- under autograd, 1x1 convs on small maps (the trainable top: 5x5 at 160 px) run as
  ``F.linear`` on the channels-last (B, H, W, C) view (two GEMMs in backward), and ReLU6 is
  out of place (in place, autograd would first clone its input);
- drop connect (stochastic depth) uses the package's ``drop_connect`` with the package's rate
  schedule, in the same order, so training with it consumes the RNG identically.
Equality with the package (float64: outputs, gradients, running statistics) is tested in
``tests/test_efficientnet_fast.py``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def folded_conv_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight and bias with an eval-mode BatchNorm folded in (exact up to rounding)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C_out,)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


def _recorded(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these tensors (grad mode on and one needs a grad)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _versions(*tensors: torch.Tensor) -> tuple:
    return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)


def _geometry(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int, int, int] | None, bool]:
    """(conv padding, explicit F.pad or None, zero-extend the kernel) equal to the package's
    static 'SAME' padding ``(left, right, top, bottom)``.

    Symmetric padding is the conv's own. TensorFlow pads one more at the end than at the start
    where the total is odd (the stride-2 convs): ``(p, p + 1)``. A kernel with one zero row and
    column prepended, run with symmetric padding ``p + 1``, computes the same outputs (same
    count, every window shifted by the zero tap) without copying the input into a padded
    buffer; other layouts (never produced by the package) get one ``F.pad``."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d):
        return (0, 0), None, False
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        return (top, left), None, False
    if right == left + 1 and bottom == top + 1 and conv.dilation == (1, 1):
        return (top + 1, left + 1), None, True
    return (0, 0), (left, right, top, bottom), False


def _weights(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, extend: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conv weight (BN folded in when ``bn`` is given, zero-extended when ``extend``) and bias."""
    if bn is None:
        weight, bias = conv.weight, conv.bias
    else:
        weight, bias = folded_conv_weights(conv, bn)
    if extend:
        weight = F.pad(weight, (1, 0, 1, 0))  # (C_out, C_in / g, k + 1, k + 1), zero tap first
    return weight, bias


def _cached_weights(
    conv: nn.Conv2d, bn: nn.BatchNorm2d | None, extend: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_weights`, cached on the conv for frozen weights only, while no input tensor
    changed (``load_state_dict`` and other in-place writes bump ``Tensor._version``). Never
    cached for trainable weights: autograd may record through them (they must then be part of
    the graph), and fused AdamW updates parameters without bumping ``_version``
    (torch 2.14), so an evaluation after training read folds of the weights as they were at
    the cache's first use (measured: a Flickr8k model with tuned Lite0 blocks scored 6.4 T2I
    R@1 in process and 9.9 reloaded). BatchNorm's running statistics are updated by its
    kernel without a version bump either: ``num_batches_tracked`` (incremented in place by
    every train-mode forward) stands in for them in the key."""
    if bn is None and not extend:
        return conv.weight, conv.bias
    params = [conv.weight] + ([bn.weight, bn.bias] if bn is not None else [])
    if any(t is not None and t.requires_grad for t in (*params, conv.bias)):
        return _weights(conv, bn, extend)  # trainable (recorded or not): never cached
    tensors = params + ([bn.running_mean, bn.running_var] if bn is not None else [])
    if bn is not None and bn.num_batches_tracked is not None:
        tensors.append(bn.num_batches_tracked)
    if conv.bias is not None:
        tensors.append(conv.bias)
    key = (_versions(*tensors), bn is not None, extend)
    cached = getattr(conv, "_fg_folded", None)
    if cached is None or cached[0] != key:
        # never inference tensors: a later grad-mode forward with frozen weights saves them
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = _weights(conv, bn, extend)
            weight = weight.contiguous(memory_format=torch.channels_last)
        cached = (key, weight, bias)
        conv.__dict__["_fg_folded"] = cached  # plain attribute: not a buffer, not in state_dict
    return cached[1], cached[2]


_FUSED: dict[str, bool] = {}
try:  # oneDNN's fused conv (CPU builds with mkldnn); absent elsewhere
    _FUSED_OP = torch.ops.mkldnn._convolution_pointwise
except (AttributeError, RuntimeError):
    _FUSED_OP = None


def _fused_available(kind: str = "ok") -> bool:
    """Whether oneDNN's conv + bias + activation op (``torch.ops.mkldnn._convolution_pointwise``,
    the kernel ``torch.compile`` emits for CPU convs; ``kind='add'``: its conv + residual form)
    is present and agrees with ``F.conv2d`` here; probed once, any failure means the plain
    path."""
    if kind not in _FUSED:
        _FUSED[kind] = _probe_fused(kind)
    return _FUSED[kind]


def _probe_fused(kind: str) -> bool:
    # its own generator: a probe at the first forward must not move the global RNG (dropout,
    # drop connect and resumed runs draw from it; a randn_like here shifted every later draw)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 7, 7, generator=gen).contiguous(memory_format=torch.channels_last)
        w = torch.randn(4, 1, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
        b = torch.randn(4, generator=gen)
        geometry = ([1, 1], [2, 2], [1, 1], 4)
        with torch.no_grad():
            want = F.conv2d(x, w, b, 2, 1, 1, 4)
            if kind == "add":
                other = torch.randn(want.shape, generator=gen).to(memory_format=torch.channels_last)
                got = _FUSED_OP.binary(x, other, w, b, *geometry, "add", None, None, [], None)
                want = want + other
            else:
                got = _FUSED_OP(x, w, b, *geometry, "hardtanh", [0.0, 1.0], "")
                want = want.clamp_(0.0, 1.0)
        return got.shape == want.shape and torch.allclose(got, want, atol=1e-5)
    except Exception:  # noqa: BLE001 - missing op or unsupported build: use F.conv2d
        return False


def _use_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inference-only kernel: float32 on CPU, nothing that autograd must record, no CPU
    autocast (which would run ``F.conv2d`` in bfloat16)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if _recorded(x, weight):
        return False
    return _fused_available()


def _depthwise_weight_grad(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, padding: tuple[int, int]
) -> torch.Tensor:
    """d loss / d weight of a stride-1 depthwise conv: per channel, the correlation of the input
    with the output gradient summed over the batch. For 3x3 kernels ATen's own kernel is fast;
    for larger ones (oneDNN's 5x5 backward-weights is ~6x slower than the rest of the block here)
    the correlation runs as one forward depthwise conv over (B * C) groups whose 'kernel' is the
    output gradient: (1, B*C, H, W) * (B*C, 1, h, w) -> (1, B*C, k, k), summed over B."""
    c, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    if kh * kw <= 9:
        return torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            [1, 1],
            list(padding),
            [1, 1],
            False,
            [0, 0],
            c,
            [False, True, False],
        )[1]
    b, _, h, w = x.shape
    xi = x.contiguous().reshape(1, b * c, h, w)  # (1, B*C, H, W), groups of (b, c)
    gi = grad.contiguous().reshape(b * c, 1, grad.shape[2], grad.shape[3])  # (B*C, 1, h, w)
    corr = F.conv2d(xi, gi, None, 1, padding, 1, b * c)  # (1, B*C, kh, kw)
    return corr.reshape(b, c, kh, kw).sum(0).unsqueeze(1)  # (C, 1, kh, kw)


class _DepthwiseConv(torch.autograd.Function):
    """Stride-1 depthwise ``F.conv2d`` whose backward is computed with forward convs: the input
    gradient is the output gradient convolved with the flipped kernel (oneDNN's depthwise
    backward-data is 10-20x slower than that forward conv on CPU), the weight gradient as in
    :func:`_depthwise_weight_grad`. Same values up to rounding (tested in float64)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        out = F.conv2d(x, weight, bias, 1, padding, 1, weight.shape[0])
        ctx.dtype = out.dtype  # under autocast the conv ran in bf16/fp16: so does the backward
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        dtype = ctx.dtype  # backward runs outside autocast: cast as the forward's conv did
        xc, wc, grad = x.to(dtype), weight.to(dtype), grad.to(dtype)
        (ph, pw), (kh, kw) = ctx.padding, weight.shape[2:]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            flipped = wc.flip(2, 3)
            gx = F.conv2d(grad, flipped, None, 1, (kh - 1 - ph, kw - 1 - pw), 1, weight.shape[0])
            gx = gx.to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = _depthwise_weight_grad(xc, grad, wc, ctx.padding).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3)).to(weight.dtype)
        return gx, gw, gb, None


#: feature maps of at most this many positions run their recorded 1x1 convs as ``F.linear``
SMALL_MAP = 100


def _pointwise_as_linear(
    x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, padding: tuple[int, int]
) -> bool:
    """Whether a 1x1 conv that autograd records runs as a matmul on the channels-last map: on a
    small map with wide channels (the trainable top of a partly frozen tower: 5x5 at 160 px)
    ``F.linear``'s backward (two GEMMs) is 10-30% faster than oneDNN's conv backward on CPU
    (1x1 at 5x5, 1152 <-> 192: 6.1 -> 4.8 ms for batch 16); on large maps with few channels
    oneDNN is faster, so those keep ``F.conv2d``."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.shape[2] * x.shape[3] <= SMALL_MAP
        and x.is_contiguous(memory_format=torch.channels_last)
        and weight.shape[2:] == (1, 1)
        and conv.groups == 1
        and conv.stride == (1, 1)
        and tuple(padding) == (0, 0)
    )


def _conv(
    x: torch.Tensor, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, padding
) -> torch.Tensor:
    """``F.conv2d`` with the conv's geometry. Convs that autograd records (trainable, or fed a
    tensor that needs a gradient): 1x1 on small maps run as ``F.linear``
    (:func:`_pointwise_as_linear`), stride-1 depthwise through :class:`_DepthwiseConv`."""
    c, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    records = _recorded(x, weight)
    if records and _pointwise_as_linear(x, conv, weight, padding):
        # (B, C, H, W) channels-last is (B, H, W, C) contiguous: a 1x1 conv is a matmul on it
        out = F.linear(x.permute(0, 2, 3, 1), weight.reshape(c, -1), bias)  # (B, H, W, C')
        return out.permute(0, 3, 1, 2)  # (B, C', H, W), channels-last, no copy
    if (
        records
        and x.device.type == "cpu"
        and conv.groups == c == x.shape[1] > 1
        and weight.shape[1] == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and padding[0] < kh
        and padding[1] < kw
    ):
        return _DepthwiseConv.apply(x, weight, bias, tuple(padding))
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def _batch_norm_train_(y: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(y)`` in train mode, in place, for a ``y`` that autograd does not record (a frozen
    bottom in train mode): the same batch statistics and running-statistics update as the
    module (``torch.batch_norm_update_stats``, the kernel BatchNorm uses), then one scale/shift
    in place instead of a fresh output tensor (large at full resolution)."""
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    mean, var = torch.batch_norm_update_stats(y, bn.running_mean, bn.running_var, factor)  # (C,)
    scale = torch.rsqrt(var + bn.eps)  # var: biased, as BatchNorm normalises with
    if bn.affine:
        scale = scale * bn.weight
    shift = -mean * scale if not bn.affine else bn.bias - mean * scale
    return y.mul_(scale.reshape(1, -1, 1, 1)).add_(shift.reshape(1, -1, 1, 1))


def _bn_in_place_ok(y: torch.Tensor, bn: nn.BatchNorm2d) -> bool:
    if not bn.track_running_stats or bn.running_mean is None:
        return False
    if bn.momentum is None and bn.num_batches_tracked is None:
        return False
    return not _recorded(y, *((bn.weight, bn.bias) if bn.affine else ()))


def conv_bn(
    x: torch.Tensor,
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    act: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bn(conv(x))`` as in the package (static 'SAME' padding), then ReLU6 when ``act``, then
    ``+ residual`` when given (not with ``act``).

    Eval-mode BN is folded into the conv; without autograd (inference, or a frozen bottom fed
    a plain tensor) float32 CPU convs run as one oneDNN conv + bias + ReLU6 (or + residual)
    kernel: fewer passes over memory and fewer thread barriers."""
    padding, explicit, extend = _geometry(conv)
    if explicit is not None:
        x = F.pad(x, explicit)
    if bn.training:
        weight, bias = _cached_weights(conv, None, extend)
        y = _conv(x, conv, weight, bias, padding)
        y = _batch_norm_train_(y, bn) if _bn_in_place_ok(y, bn) else bn(y)
    else:
        weight, bias = _cached_weights(conv, bn, extend)
        if _use_fused(x, weight):
            geometry = (list(padding), list(conv.stride), list(conv.dilation), conv.groups)
            if residual is not None and _fused_available("add") and not residual.requires_grad:
                return _FUSED_OP.binary(
                    x, residual, weight, bias, *geometry, "add", None, None, [], None
                )
            attr, scalars = ("hardtanh", [0.0, 6.0]) if act else ("none", [])
            y = _FUSED_OP(x, weight, bias, *geometry, attr, scalars, "")
            return y if residual is None else y.add_(residual)
        y = _conv(x, conv, weight, bias, padding)
    y = relu6(y) if act else y
    return y if residual is None else y.add_(residual)  # in place: no backward needs y


def relu6(x: torch.Tensor) -> torch.Tensor:
    """The Lite variants' activation (ReLU6) of a fresh conv/BN output: in place when autograd
    does not record it; out of place when it does, since an in-place ``hardtanh_`` there makes
    autograd clone its input first (its backward reads the input), a copy plus the op instead
    of one write (five full-size copies per step of the Flickr8k recipe's trainable top)."""
    if _recorded(x):
        return F.hardtanh(x, 0.0, 6.0)
    return F.hardtanh_(x, 0.0, 6.0)


def mbconv_forward(block: nn.Module, inputs: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """One ``MBConvBlock`` (Lite: no squeeze-excitation), same function as ``block.forward``."""
    args = block._block_args
    if block.has_se:
        raise ValueError("the fast EfficientNet path supports the Lite variants only (no SE)")
    x = inputs
    if args.expand_ratio != 1:
        x = conv_bn(x, block._expand_conv, block._bn0, act=True)
    x = conv_bn(x, block._depthwise_conv, block._bn1, act=True)
    skip = block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
    if skip and drop_rate and block.training:  # drop connect between the BN and the sum
        from efficientnet_lite_pytorch.utils import drop_connect

        x = drop_connect(conv_bn(x, block._project_conv, block._bn2), p=drop_rate, training=True)
        return x.add_(inputs)  # in place on a fresh output: no backward needs it
    return conv_bn(x, block._project_conv, block._bn2, residual=inputs if skip else None)
