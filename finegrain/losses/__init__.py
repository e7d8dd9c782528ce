"""Losses. ``contrastive`` holds the softmax/sigmoid/multi-positive image-text losses;
``distributed`` is the one module that communicates across ranks."""

from finegrain.losses.contrastive import clip_loss, multi_positive_sigmoid_loss, siglip_loss
from finegrain.losses.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    neighbour_exchange_with_grad,
    world_info,
)

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "clip_loss",
    "multi_positive_sigmoid_loss",
    "neighbour_exchange_with_grad",
    "siglip_loss",
    "world_info",
]
