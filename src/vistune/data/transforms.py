"""Train / eval transforms from a timm data config (VTAB protocol: plain resize; FGVC: crop + flip)."""
from __future__ import annotations

from collections.abc import Callable

from ..errors import VistuneError, suggest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = ("pretrained_cfg", "paper")
DEFAULT_CROP_PCT = 0.875

def _interpolation(name):
    from torchvision.transforms import InterpolationMode  # torchvision is slow to import: only when needed

    if isinstance(name, InterpolationMode):
        return name
    name = str(name or "bilinear").lower()
    if name == "random":  # timm's train-time random choice: use the usual default for deterministic eval
        name = "bilinear"
    modes = {m.value: m for m in InterpolationMode}
    if name not in modes:
        raise VistuneError(
            f"unknown interpolation {name!r} in the data config.{suggest(name, modes)}",
            f"use one of {', '.join(modes)}",
        )
    return modes[name]


def _triple(values, key: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise VistuneError(f"data config {key} must have 3 values (R, G, B), got {list(values)}",
                           "check the backbone's pretrained_cfg")
    return vals  # type: ignore[return-value]


def build_transforms(data_config: dict, *, image_size: int | None = None,
                     normalization: str = "pretrained_cfg", augment: bool = False) -> tuple[Callable, Callable]:
    """(train_transform, eval_transform) mapping an RGB PIL image to a normalized CxHxW float tensor.

    augment=False (VTAB protocol): both resize to image_size × image_size.
    augment=True (FGVC style): train = RandomResizedCrop + horizontal flip; eval = resize by crop_pct + center crop.
    """
    if normalization == "pretrained_cfg":
        mean = _triple(data_config.get("mean", IMAGENET_MEAN), "mean")
        std = _triple(data_config.get("std", IMAGENET_STD), "std")
    elif normalization == "paper":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        raise VistuneError(
            f"unknown normalization {normalization!r}.{suggest(str(normalization), NORMALIZATIONS)}",
            "use 'pretrained_cfg' (the backbone's own mean/std) or 'paper' (ImageNet mean/std)",
        )
    if image_size is None:
        input_size = data_config.get("input_size")
        if not input_size:
            raise VistuneError("the data config has no input_size and no image size was given",
                               "pass image_size (e.g. --image-size 224)")
        image_size = int(input_size[-1])
    if isinstance(image_size, bool) or int(image_size) != image_size or int(image_size) < 1:
        raise VistuneError(f"image size must be a positive integer, got {image_size!r}", "e.g. --image-size 224")
    from torchvision import transforms as T

    size = int(image_size)
    interp = _interpolation(data_config.get("interpolation", "bilinear"))
    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if not augment:
        plain = T.Compose([T.Resize((size, size), interpolation=interp), *normalize])
        return plain, plain
    crop_pct = float(data_config.get("crop_pct") or DEFAULT_CROP_PCT)
    if not 0.0 < crop_pct <= 1.0:
        raise VistuneError(f"data config crop_pct must be in (0, 1], got {crop_pct}", "check the backbone's pretrained_cfg")
    train = T.Compose([T.RandomResizedCrop(size, interpolation=interp), T.RandomHorizontalFlip(), *normalize])
    evaluate = T.Compose([T.Resize(int(size / crop_pct), interpolation=interp), T.CenterCrop(size), *normalize])
    return train, evaluate
