"""SSD models, anchors, box coding and matching (see ``docs/architecture.md``, model contract)."""

from .anchors import default_box_anchors, feature_map_sizes, generate_anchors
from .backbones import BackboneWeightsError, load_backbone_weights
from .box_coder import BoxCoder
from .matching import assign_targets
from .ssd import SSD, architecture_config, build_model

__all__ = [
    "SSD",
    "BackboneWeightsError",
    "BoxCoder",
    "architecture_config",
    "assign_targets",
    "build_model",
    "default_box_anchors",
    "feature_map_sizes",
    "generate_anchors",
    "load_backbone_weights",
]
