"""Fast forward of the ``efficientnet_lite_pytorch`` network, same modules and state dict.

The package's own forward runs every convolution behind a ``ZeroPad2d`` module (TensorFlow
'SAME' padding, computed for one image size) followed by a separate BatchNorm, in NCHW. On a
small CPU that is slow for the depthwise convolutions. This walks the same modules and computes
the same function faster:

- a BatchNorm in eval mode (frozen running statistics) is folded into the preceding conv:
  ``w' = w * gamma / sqrt(var + eps)``, ``b' = beta - mean * gamma / sqrt(var + eps)``
  (differentiable in ``w``, ``gamma``, ``beta``, so gradients still reach them);
  a BatchNorm in train mode is applied as the module itself (batch statistics, running
  statistics updated exactly as in the package);
- symmetric 'SAME' padding becomes the conv's own ``padding``; asymmetric padding (stride-2
  convs) is one ``F.pad`` with the package's values;
- activations are channels-last (NHWC), which the CPU depthwise kernels prefer;
- drop connect (stochastic depth) uses the package's ``drop_connect`` with the package's rate
  schedule, in the same order, so training with it consumes the RNG identically.
"""

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


def _versions(*tensors: torch.Tensor) -> tuple:
    return tuple((id(t), t._version, t.device, t.dtype) for t in tensors)


def _cached_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded weights, cached on the conv while no input tensor changed (in-place optimizer
    steps and ``load_state_dict`` bump ``Tensor._version``). Not cached when autograd records
    (the folded weights must then be part of the graph)."""
    if torch.is_grad_enabled() and (conv.weight.requires_grad or bn.weight.requires_grad):
        return folded_conv_weights(conv, bn)
    tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        tensors.append(conv.bias)
    key = _versions(*tensors)
    cached = getattr(conv, "_fg_folded", None)
    if cached is None or cached[0] != key:
        # never inference tensors: a later grad-mode forward with frozen weights saves them
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = folded_conv_weights(conv, bn)
            weight = weight.contiguous(memory_format=torch.channels_last)
        cached = (key, weight, bias)
        conv.__dict__["_fg_folded"] = cached  # plain attribute: not a buffer, not in state_dict
    return cached[1], cached[2]


def _padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int, int, int] | None]:
    """(conv padding, explicit F.pad or None) equal to the package's static 'SAME' padding."""
    pad = getattr(conv, "static_padding", None)
    if not isinstance(pad, nn.ZeroPad2d):
        return (0, 0), None
    left, right, top, bottom = pad.padding
    if left == right and top == bottom:
        return (top, left), None
    return (0, 0), (left, right, top, bottom)


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """``bn(conv(x))`` as in the package (static 'SAME' padding), BN folded when in eval mode."""
    padding, explicit = _padding(conv)
    if explicit is not None:
        x = F.pad(x, explicit)
    if bn.training:
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)
        return bn(y)
    weight, bias = _cached_folded(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups)


def relu6_(x: torch.Tensor) -> torch.Tensor:
    """The Lite variants' activation (ReLU6), in place on a fresh conv/BN output (autograd-safe:
    neither conv nor BN backward needs its output)."""
    return F.hardtanh_(x, 0.0, 6.0)


def mbconv_forward(block: nn.Module, inputs: torch.Tensor, drop_rate: float) -> torch.Tensor:
    """One ``MBConvBlock`` (Lite: no squeeze-excitation), same function as ``block.forward``."""
    args = block._block_args
    if block.has_se:
        raise ValueError("the fast EfficientNet path supports the Lite variants only (no SE)")
    x = inputs
    if args.expand_ratio != 1:
        x = relu6_(conv_bn(x, block._expand_conv, block._bn0))
    x = relu6_(conv_bn(x, block._depthwise_conv, block._bn1))
    x = conv_bn(x, block._project_conv, block._bn2)
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_rate:
            from efficientnet_lite_pytorch.utils import drop_connect

            x = drop_connect(x, p=drop_rate, training=block.training)
        x = x + inputs
    return x


def extract_features_fast(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``net.extract_features(images)`` (B, 3, H, W) -> (B, C, h, w), computed channels-last."""
    if not isinstance(net._swish, nn.ReLU6):
        raise ValueError("the fast EfficientNet path supports the Lite variants only (ReLU6)")
    x = images.contiguous(memory_format=torch.channels_last)
    x = relu6_(conv_bn(x, net._conv_stem, net._bn0))
    base_rate = net._global_params.drop_connect_rate
    n = len(net._blocks)
    for idx, block in enumerate(net._blocks):
        rate = base_rate * float(idx) / n if base_rate else base_rate
        x = mbconv_forward(block, x, rate)
    return relu6_(conv_bn(x, net._conv_head, net._bn1))  # (B, C, h, w), channels-last
