"""Data layer: WIDER FACE (official layout), the embedded synthetic default, augmentation, loaders.

See docs/architecture.md, "Data contract".
"""

from detlab.data.loader import (
    build_datasets,
    build_loader,
    build_predict_dataset,
    collate_detection,
    dataset_root,
    load_split,
)
from detlab.data.splits import split_records
from detlab.data.synthetic import ensure_synthetic_dataset
from detlab.data.transforms import build_transforms, denormalize
from detlab.data.wider import (
    ATTRIBUTE_NAMES,
    AnnotationError,
    BadImageError,
    EmptyDatasetError,
    ImageRecord,
    MissingAnnotationError,
    MissingImagesError,
    WiderFaceDataset,
    check_images_exist,
    parse_wider_annotations,
    parse_wider_filelist,
)

__all__ = [
    "ATTRIBUTE_NAMES",
    "AnnotationError",
    "BadImageError",
    "EmptyDatasetError",
    "ImageRecord",
    "MissingAnnotationError",
    "MissingImagesError",
    "WiderFaceDataset",
    "build_datasets",
    "build_loader",
    "build_predict_dataset",
    "build_transforms",
    "check_images_exist",
    "collate_detection",
    "dataset_root",
    "denormalize",
    "ensure_synthetic_dataset",
    "load_split",
    "parse_wider_annotations",
    "parse_wider_filelist",
    "split_records",
]
