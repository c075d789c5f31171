"""Segmentation metrics: a confusion matrix over labelled pixels, and mIoU / pixel accuracy from it."""
from __future__ import annotations

import torch

from ..data.segmentation import IGNORE_INDEX
from ..errors import VistuneError


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels left out."""
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.max()) >= num_classes or int(t.min()) < 0):
        raise VistuneError(f"a mask holds label {int(t.max())}, but the model has {num_classes} classes",
                           "masks must hold labels 0..K-1 (or 255 = ignore)")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores_from_confusion(conf) -> dict:
    """mIoU and pixel accuracy from a confusion matrix.

    IoU_k = TP / (TP + FP + FN); mIoU = the mean over classes with TP + FP + FN > 0, i.e. classes present in
    the ground truth or in the prediction (a class absent from both is left out, as mmsegmentation's nanmean)."""
    conf = torch.as_tensor(conf, dtype=torch.float64)
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(len(tp))]
    present = [v for v in iou if v is not None]
    total = float(conf.sum())
    return {"miou": sum(present) / len(present) if present else 0.0,
            "pixel_accuracy": float(tp.sum()) / total if total else 0.0, "iou": iou}
