"""Random resized crops as boxes, applied to any spatial tensor: pixels or a feature map.

``sample_crop_boxes`` draws RandomResizedCrop boxes (torchvision's rule: area fraction in
``scale``, aspect ratio log-uniform in ``ratio``, 10 tries, else the whole image) in units of
the image side, so one box cuts the same region out of an image and out of its feature map
(any resolution). ``crop_resize`` cuts each box out of its row of a (N, C, H, W) tensor and
resizes it to ``size`` by bilinear sampling (``grid_sample``, ``align_corners=False``: box
edges on pixel edges). DetailCLIP's ``views="tokens"`` uses both: the views of an image are
cut from the cached feature map of its frozen bottom, the pixel targets from the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_crop_boxes(
    n: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """(n, 4) boxes (x0, y0, x1, y1) in [0, 1] (fractions of width and height) of a square
    image: area fraction uniform in ``scale``, aspect ratio w/h log-uniform in ``ratio``; a row
    whose ``tries`` draws all fall outside the image is the whole image (torchvision RRC)."""
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1 and ratio 0 < min <= max, "
                         f"got scale {scale} and ratio {ratio}")  # fmt: skip
    u = torch.rand(n, tries, 4, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * u[..., 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()  # (n, tries)
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))  # (n,)
    rows = torch.arange(n)
    pick = first.clamp(min=0)
    w, h = w[rows, pick], h[rows, pick]
    x0, y0 = (1 - w) * u[rows, pick, 2], (1 - h) * u[rows, pick, 3]
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)
    boxes[first < 0] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    return boxes.float()


def crop_resize(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W), boxes (N, 4) in [0, 1] -> (N, C, size): each row's box, resized
    (bilinear; a box of the whole tensor at the same size returns it unchanged)."""
    if boxes.shape != (x.shape[0], 4):
        raise ValueError(f"crop_resize: boxes must be ({x.shape[0]}, 4), got {tuple(boxes.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16/fp16 resampled in fp32
    b = boxes.to(x.device, dtype)
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device, dtype=dtype)
    theta[:, 0, 0] = b[:, 2] - b[:, 0]  # output [-1, 1] -> input box, in normalised coords
    theta[:, 1, 1] = b[:, 3] - b[:, 1]
    theta[:, 0, 2] = b[:, 0] + b[:, 2] - 1
    theta[:, 1, 2] = b[:, 1] + b[:, 3] - 1
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], *size], align_corners=False)
    out = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # fmt: skip
    return out.to(x.dtype)
