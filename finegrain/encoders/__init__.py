"""Image and text towers. Importing this package registers every tower; the heavy libraries
(timm, open_clip, transformers, efficientnet packages) are imported only inside builders."""

from finegrain.encoders import (  # noqa: F401  (imported to register the towers)
    efficientnet,
    hf_clip,
    hf_text,
    hybrid,
    open_clip_tower,
    st_text,
    text_transformer,
    timm_tower,
    vit,
)
from finegrain.encoders.base import (
    ImageTowerConfig,
    TextTowerConfig,
    build_image_tower,
    build_text_tower,
)

__all__ = ["ImageTowerConfig", "TextTowerConfig", "build_image_tower", "build_text_tower"]
