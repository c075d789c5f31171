"""Float error of PGN's prompt inversion: latent-token forward vs input-only pixel deployment (fp32).

For each ViT shape: a random-weight model, a PGN (T=4, M=16, ResNet-10 width 8) after one SGD step,
three random images; prints the patch projection's shape and condition number, the library space
`auto` picks, and the max |logit| and max |logit difference| of the two forwards.

  python benchmarks/pgn_inversion.py
"""
from __future__ import annotations

import torch

from vistune.backbones import load_backbone
from vistune.methods import adapt, make_config
from vistune.methods.pgn import patch_projection

SHAPES = {  # name: (timm architecture, timm kwargs, image size)
    "ViT-B/32 224 px": ("vit_base_patch32_224", {}, 224),
    "ViT-B/16 224 px": ("vit_base_patch16_224", {}, 224),
    "p14, D=588, registers, avg-pool": ("vit_base_patch16_224", dict(
        img_size=56, patch_size=14, embed_dim=588, depth=1, num_heads=4, reg_tokens=4, class_token=False,
        global_pool="avg"), 56),
    "p8, D=96, CLS + register": ("vit_small_patch16_224", dict(
        img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=2, reg_tokens=1), 32),
    "p4, D=64 (tall)": ("vit_small_patch16_224", dict(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2), 32),
}


def measure(arch: str, kwargs: dict, size: int) -> dict:
    torch.manual_seed(0)
    backbone = load_backbone(arch, random_init=True, model_kwargs=kwargs)
    weight, _ = patch_projection(backbone)
    singular = torch.linalg.svdvals(weight.double())
    model = adapt(backbone, make_config("pgn", {"num_prompts": 4, "library_size": 16, "generator_width": 8}), 5)
    x = torch.randn(4, 3, size, size)
    loss = torch.nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
        model.eval()
        x = torch.randn(3, 3, size, size)
        latent = model(x)
        model.deploy = True
        deployed = model(x)
    return {"W": f"{weight.shape[0]} × {weight.shape[1]}", "cond": float(singular[0] / singular[-1]),
            "library": model.library_space, "max_logit": latent.abs().max().item(),
            "max_diff": (latent - deployed).abs().max().item()}


def main():
    print("| shape | W | cond(W) | library | max abs logit | max abs diff |")
    print("|---|---|---:|---|---:|---:|")
    for name, spec in SHAPES.items():
        r = measure(*spec)
        print(f"| {name} | {r['W']} | {r['cond']:,.1f} | {r['library']} | {r['max_logit']:.1f} | {r['max_diff']:.1e} |")


if __name__ == "__main__":
    main()
