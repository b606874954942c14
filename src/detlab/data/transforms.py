"""Box-safe augmentation on ``torchvision.transforms.v2`` + ``tv_tensors``.

Samples enter as ``(tv_tensors.Image uint8 [3, H, W], {"boxes": BoundingBoxes xyxy, "labels": [N]})``
and leave as a normalised float32 image at the model input size with boxes in input pixels.

Training: [zoom-out] -> [face crop] -> drop boxes whose centre left the crop -> resize -> [flip]
-> [photometric] -> float + ImageNet normalisation. Evaluation: resize the whole image (no crop),
so ``original = input * (W / W_in, H / H_in)`` exactly.
"""

from __future__ import annotations

from typing import Any, Optional

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from detlab.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomFaceCrop(v2.RandomIoUCrop):
    """SSD-style random crop for faces: RandomIoUCrop's crop and centre rule, a faster sampler.

    Kept from ``RandomIoUCrop`` (its ``transform``): boxes are clipped to the crop and those whose
    centre lies outside it are zeroed, for ``SanitizeBoundingBoxes`` to drop. Hand-written here is
    only ``make_params``, because on WIDER-like data RandomIoUCrop's sampler (measured, 1 CPU thread,
    1024x768 image) costs ~10 ms per sample with 20 small faces and with no faces: its min-IoU
    options 0.1..0.9 cannot be met by a face of a few pixels against a crop of >= 30 % of the image,
    so each of those options burns its 40 trials before "no crop" or "IoU >= 0" is drawn, and an
    image without faces is never cropped at all. This sampler draws all trials at once (vectorised),
    keeps the "leave as is" option with probability ``p_keep`` (1/7 as in SSD's option list), needs
    at least one face centre inside the crop, and crops face-less images too.
    """

    def __init__(
        self,
        min_scale: float = 0.3,
        max_scale: float = 1.0,
        min_aspect_ratio: float = 0.5,
        max_aspect_ratio: float = 2.0,
        p_keep: float = 1.0 / 7.0,
        trials: int = 50,
    ) -> None:
        super().__init__(min_scale, max_scale, min_aspect_ratio, max_aspect_ratio, trials=trials)
        self.p_keep = p_keep

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        bboxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        orig_h, orig_w = bboxes.canvas_size
        if float(torch.rand(())) < self.p_keep:
            return {}
        scale = self.min_scale + (self.max_scale - self.min_scale) * torch.rand(self.trials, 2)  # [T, 2]
        new_w = (orig_w * scale[:, 0]).long()  # [T]
        new_h = (orig_h * scale[:, 1]).long()
        offset = torch.rand(self.trials, 2)
        left = ((orig_w - new_w) * offset[:, 0]).long()
        top = ((orig_h - new_h) * offset[:, 1]).long()
        aspect = new_w / new_h.clamp(min=1)
        ok = (new_w > 0) & (new_h > 0) & (aspect >= self.min_aspect_ratio) & (aspect <= self.max_aspect_ratio)
        xyxy = v2.functional.convert_bounding_box_format(
            bboxes.as_subclass(torch.Tensor), bboxes.format, tv_tensors.BoundingBoxFormat.XYXY).float()
        cx = 0.5 * (xyxy[:, 0] + xyxy[:, 2])  # [N]
        cy = 0.5 * (xyxy[:, 1] + xyxy[:, 3])
        inside = ((left[:, None] < cx) & (cx < (left + new_w)[:, None])
                  & (top[:, None] < cy) & (cy < (top + new_h)[:, None]))  # [T, N]
        if len(xyxy):
            ok &= inside.any(dim=1)
        candidates = ok.nonzero()
        if len(candidates) == 0:
            return {}
        t = int(candidates[0])
        return dict(top=int(top[t]), left=int(left[t]), height=int(new_h[t]), width=int(new_w[t]),
                    is_within_crop_area=inside[t])


def adjust_hue_uint8(image: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """``F.adjust_hue`` for a uint8 RGB ``[3, H, W]`` image through OpenCV's 8-bit HSV (hue in 1/256 turns)."""
    hwc = image.permute(1, 2, 0).contiguous().numpy()  # a view when the memory is channels-last
    hsv = cv2.cvtColor(hwc, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(round(hue_factor * 256)) % 256)  # uint8 wraps around: hue is circular
    return torch.from_numpy(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)).permute(2, 0, 1)


class PhotometricDistort(v2.RandomPhotometricDistort):
    """``RandomPhotometricDistort`` with its hue step on OpenCV for uint8 images.

    Measured on a 320x256 uint8 image, 1 thread: torchvision's ``adjust_hue`` (float HSV round
    trip) 4-5 ms, OpenCV's 8-bit HSV 0.2 ms; the other steps take 0.1-0.3 ms each and are kept.
    The parameters, their order (brightness, contrast before or after, saturation, hue, channel
    permutation) and the other kernels are torchvision's.
    """

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        hue = params["hue_factor"]
        if hue is None or not (isinstance(inpt, tv_tensors.Image) and inpt.dtype == torch.uint8
                               and inpt.ndim == 3 and inpt.shape[0] == 3):
            return super().transform(inpt, params)
        before_contrast = params["contrast_factor"] if params["contrast_before"] else None
        out = super().transform(inpt, dict(params, contrast_factor=before_contrast, hue_factor=None,
                                           channel_permutation=None))
        out = tv_tensors.wrap(adjust_hue_uint8(out.as_subclass(torch.Tensor), hue), like=inpt)
        after_contrast = None if params["contrast_before"] else params["contrast_factor"]
        return super().transform(out, dict(brightness_factor=None, contrast_factor=after_contrast,
                                           saturation_factor=None, hue_factor=None, contrast_before=False,
                                           channel_permutation=params["channel_permutation"]))


def build_transforms(augment: Optional[AugmentConfig], input_size: tuple[int, int], train: bool) -> v2.Compose:
    """``input_size`` is ``(W, H)``. ``train=False`` (or ``augment=None``) gives the deterministic path."""
    width, height = input_size
    ops: list[v2.Transform] = []
    if train and augment is not None:
        if augment.zoom_out:
            fill = {tv_tensors.Image: tuple(int(round(255 * m)) for m in IMAGENET_MEAN), "others": 0}
            ops.append(v2.RandomZoomOut(fill=fill, side_range=(1.0, float(augment.zoom_out_max)), p=0.5))
        if augment.random_crop:
            ops.append(RandomFaceCrop())
        # Removes the boxes the crop zeroed (centre outside); in original pixels, before the resize,
        # so a genuinely tiny face (< 1 px after downscaling) is not dropped by it.
        ops += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0, min_area=1.0)]
    # Clamped after the resize too: its float arithmetic can put an edge at W + 1e-5.
    ops += [v2.Resize((height, width), antialias=True), v2.ClampBoundingBoxes()]
    if train and augment is not None:
        # Flip and colour after the resize: the same result per pixel, on 320x256 instead of ~1024x768
        # pixels (RandomPhotometricDistort's hue step is the costliest op on a full-size image).
        if augment.hflip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        if augment.photometric:
            ops.append(PhotometricDistort(p=0.5))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(ops)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: ``[..., 3, H, W]`` -> float in 0..255 (for TensorBoard, drawing)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return ((images * std + mean) * 255.0).clamp(0.0, 255.0)
