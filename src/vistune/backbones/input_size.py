"""Which input sizes a backbone can take: checked before any data is loaded, so a size the model cannot use
is a clear error rather than timm's AssertionError in the first batch or a run that trains at chance."""
from __future__ import annotations

import timm

from ..errors import VistuneError
from .base import BackboneView

# 4× the largest input of any timm pretrained model (1024 px: the SAM and Sapiens ViTs); larger sizes are typos
MAX_IMAGE_SIZE = 4096


def pretrained_input_size(view: BackboneView) -> int:
    """The input size of the backbone's pretrained config (timm's data config)."""
    return int(timm.data.resolve_data_config({}, model=view.model)["input_size"][-1])


def minimum_input_size(view: BackboneView) -> int:
    """The smallest input whose last feature map still has one cell: the model's total stride (timm's
    ``feature_info`` reduction: 32 for the usual CNNs and Swin, the patch size for a ViT)."""
    reductions = [info.get("reduction") for info in getattr(view.model, "feature_info", None) or []
                  if isinstance(info, dict)]
    return max([r for r in reductions if isinstance(r, int)] or [1])


def check_image_size(size, where: str = "--image-size") -> int:
    """``size`` as an int in 1 … MAX_IMAGE_SIZE, else a VistuneError naming ``where``."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise VistuneError(f"{where} {size!r} is not a whole number of pixels", f"e.g. {where} 224")
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise VistuneError(f"{where} {size} is out of range: an input size is 1 to {MAX_IMAGE_SIZE} pixels",
                           f"e.g. {where} 224 (or leave it out: the backbone's pretrained size)")
    return size


def check_input_size(view: BackboneView, size: int) -> None:
    """Refuse an input size ``view`` cannot take (a ViT/Swin built for one fixed size, a size that is not a
    multiple of the patch size) or cannot use sensibly (below its total stride), saying which sizes work."""
    check_image_size(size)
    name, native = view.spec.name, pretrained_input_size(view)
    embed = getattr(view.model, "patch_embed", None)
    fixed = getattr(embed, "img_size", None) if getattr(embed, "strict_img_size", False) else None
    patch = max(getattr(embed, "patch_size", None) or (1,))
    if fixed is not None and tuple(fixed) != (size, size):
        raise VistuneError(
            f"--image-size {size}: {name} (timm {view.spec.architecture}) is built for {fixed[0]}×{fixed[1]} "
            "inputs only (a fixed img_size; timm's patch embedding refuses any other size)",
            f"use --image-size {fixed[0]}, or create the timm model with dynamic_img_size=True (model_kwargs "
            f"in the Python API), which takes any multiple of its patch size {patch} and resamples the position "
            "embedding",
        )
    minimum = minimum_input_size(view)
    if size < minimum:
        raise VistuneError(
            f"--image-size {size} is below the smallest input {name} can use, {minimum} px (its total stride: "
            "a smaller image leaves its last feature map less than one cell)",
            f"use --image-size {minimum} or more (its pretrained size is {native})",
        )
    if embed is not None and not getattr(embed, "dynamic_img_pad", False) and size % patch:
        lower, upper = size - size % patch, size - size % patch + patch
        raise VistuneError(
            f"--image-size {size} is not a multiple of the patch size {patch} of {name}",
            f"use --image-size {max(lower, minimum)} or {upper} (any multiple of {patch})",
        )
