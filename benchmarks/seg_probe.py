"""A quick learning probe on seg-digits: decoder-only vs an adapted model, val mIoU after every epoch.

Real ImageNet EfficientNet-Lite0 at 128 px, the first 128 training images, AdamW (lr as given, no scaling),
batch 16, one torch thread; val mIoU on the first 64 val images. Prints one line per epoch.

  python benchmarks/seg_probe.py linear 0.01 25
  python benchmarks/seg_probe.py pro-tuning 0.01 25
"""
from __future__ import annotations

import sys
import time

import torch

from vistune.backbones import load_backbone
from vistune.data.segmentation import load_seg_digits, seg_transforms
from vistune.methods import adapt, make_config
from vistune.run import Job, preprocessing_for
from vistune.training.metrics import confusion_matrix, scores_from_confusion


def main(method: str, lr: float, epochs: int) -> None:
    torch.set_num_threads(1)
    backbone = load_backbone("tf_efficientnet_lite0")
    pre = preprocessing_for(backbone, Job(backbone="tf_efficientnet_lite0", method=method, data="seg-digits",
                                          image_size=128, task="segmentation"))
    train_tf, eval_tf = seg_transforms(pre)
    data = load_seg_digits()
    x, y = zip(*[train_tf(*data["train"].pair(i)) for i in range(128)])
    x, y = torch.stack(x), torch.stack(y).long()
    vx, vy = zip(*[eval_tf(*data["val"].pair(i)) for i in range(64)])
    vx, vy = torch.stack(vx), torch.stack(vy).long()
    torch.manual_seed(0)
    model = adapt(backbone, make_config(method), len(data["class_names"]), task="segmentation")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(16):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx], ignore_index=255)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            conf = confusion_matrix(model(vx).argmax(1), vy, len(data["class_names"]))
        print(f"{method} epoch {epoch + 1}: last loss {loss.item():.3f}, val mIoU "
              f"{scores_from_confusion(conf)['miou']:.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
