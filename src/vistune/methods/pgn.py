"""Prompt Generation Networks (Loedeman et al., 2022) with prompt inversion.

A small CNN reads the image and emits T×M logits; a softmax over M mixes a learned library of
M tokens into T input-dependent prompts. The prompts enter the frozen ViT after the positional
embedding, after the prefix tokens, with no positional embedding of their own; their outputs
are dropped before the final norm and pooling, so the frozen backbone's pooled feature feeds
the head.

Prompt inversion (deploy mode). The patch embedding is linear, e = W·vec(patch) + b, so a prompt
t is the embedding of the pixel patch W⁺(t − b) whenever W (D × C·ph·pw) has full row rank:
square on ViT-B/16 (768 = 3·16·16), wide on ViT-B/32 or ViT-S/16. Deploy mode turns the T
prompts into a strip of T pixel patches (C × ph × T·pw, in the backbone's normalised input
space) and runs the frozen backbone from pixels only: the stock patch projection embeds the
image and the strip, the stock position table is added to the image patches, none to the strip
patches (exactly as the latent prompts get none), and no learned tensor enters the backbone.
When W is tall (D > C·ph·pw: ViT-L/14, ViT-S/8, vistune's own 4-pixel-patch ViT) most tokens have
no pixel preimage; ``library_space=pixel`` then learns the library as pixel patches and embeds
the mixture through W during training, so deployment is exact on every ViT. ``auto`` picks token
space when W has full row rank, pixel space otherwise.

Generator. ``resnet10`` is PGN's own ResNet-10 (official code, jochemloedeman/PGN
``pgn/pgn_models/resnet.py`` with its training scripts' defaults): a 3×3 stride-2 convolution 3→w, BatchNorm,
ReLU, a 3×3 stride-2 max-pool, then four stages of one basic block with w/2w/4w/8w channels (stages 2-4 stride
2, their shortcut a strided 1×1 convolution with a bias and no norm; stage 1's the identity), global average
pooling; convolutions kaiming-normal (fan-out), BatchNorm weight 1 and bias 0. w = 16: 307,312 parameters.
timm's ``ResNet`` class cannot express it (its stem is 7×7 with 64 channels whatever ``stem_width`` says, and its
downsample has a norm), so it is assembled here from timm's ``BasicBlock``. vistune 0.1.0 used that timm
``ResNet`` (324,576 parameters at w = 16); it is ``generator=resnet10-timm`` now, and an artifact holding it
(recognised by its tensors) loads as such, computing what it computed.

Hybrid ViTs (timm ``HybridEmbed``: a CNN stem before the patch projection) train PGN in latent mode with a token
library; their patch embedding is not linear in the pixels, so the pixel library and deploy mode are refused.

Tuned parameters (excluding the head): generator + (F + 1)·T·M for the logits layer (F the
generator's pooled width) + M·D (token library) or M·C·ph·pw (pixel library).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from ..errors import VistuneError
from ..backbones import load_backbone
from ..backbones.input_size import MAX_IMAGE_SIZE
from .base import MethodConfig, TokenTuner, check_at_most, option, register

RESNET10 = "resnet10"
RESNET10_TIMM = "resnet10-timm"


@dataclass
class PGNConfig(MethodConfig):
    num_prompts: int = option(16, "T: prompts generated per image")
    library_size: int = option(256, "M: learned tokens that every prompt is a softmax mixture of")
    generator: str = option(
        RESNET10,
        "the prompt generator: 'resnet10' (PGN's official ResNet-10: 3×3 stride-2 stem, max-pool, one basic block "
        "per stage, random init), 'resnet10-timm' (vistune 0.1.0's: timm's ResNet, 7×7 64-channel stem, not "
        "PGN's) or any timm CNN name (offline pretrained: tf_efficientnet_lite0, mobilenetv2_100)",
    )
    generator_width: int = option(
        16, "resnet10 and resnet10-timm: channels of stage 1, doubling per stage (PGN: 16/32/64/128)")
    generator_pretrained: bool = option(True, "timm generators: load pretrained weights (offline or hub cache)")
    generator_resolution: int | None = option(
        None, "resize images to this size for the generator only (PGN: 224); default: as given"
    )
    library_space: Literal["auto", "token", "pixel"] = option(
        "auto",
        "token: library of M×D tokens, init N(0, 0.02) (PGN); pixel: library of M pixel patches embedded by the "
        "frozen patch projection (exact deploy on any ViT); auto: token when the projection is invertible",
    )

    def validate(self):
        for name in ("num_prompts", "library_size", "generator_width"):
            if getattr(self, name) < 1:
                raise VistuneError(f"pgn: {name}={getattr(self, name)} must be ≥ 1", f"use --set {name}=16")
        if self.generator_resolution is not None and self.generator_resolution < 8:
            raise VistuneError(f"pgn: generator_resolution={self.generator_resolution} is too small",
                               "use ≥ 32, or none to feed the images as given")
        check_at_most("pgn", "num_prompts", self.num_prompts, 1000,
                      "every prompt joins the attention of every block", 16)
        check_at_most("pgn", "library_size", self.library_size, 16384, "64× PGN's 256 tokens", 256)
        check_at_most("pgn", "generator_width", self.generator_width, 256,
                      "16× PGN's 16; the generator's width doubles with every stage", 16)
        if self.generator_resolution is not None:
            check_at_most("pgn", "generator_resolution", self.generator_resolution, MAX_IMAGE_SIZE,
                          "vistune's largest input size", 224)


class ResNet10(nn.Module):
    """PGN's ResNet-10 (see the module docstring), widths w/2w/4w/8w: image → (B, 8w) pooled feature."""

    def __init__(self, width: int = 16):
        super().__init__()
        widths = [width * 2**i for i in range(4)]
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(3, width, kernel_size=3, stride=2, padding=1, bias=False),
            bn=nn.BatchNorm2d(width),
            act=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ))
        blocks = []
        for i, out in enumerate(widths):
            inp = widths[max(i - 1, 0)]
            stride = 1 if i == 0 else 2
            shortcut = None if i == 0 else nn.Conv2d(inp, out, kernel_size=1, stride=stride)
            blocks.append(BasicBlock(inp, out, stride=stride, downsample=shortcut))
        self.stages = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]
        for m in self.modules():  # as the official code; the shortcut biases keep torch's default init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x)))


def resnet10_timm(width: int) -> nn.Module:
    """vistune 0.1.0's generator, kept so its artifacts load: timm's ``ResNet`` with one basic block per stage.
    timm ignores ``stem_width`` for this stem (7×7, 64 channels) and puts a BatchNorm after each 1×1 shortcut."""
    return ResNet(BasicBlock, (1, 1, 1, 1), channels=tuple(width * 2**i for i in range(4)), stem_width=width,
                  num_classes=0)


def _make_generator(config: PGNConfig) -> nn.Module:
    if config.generator == RESNET10:
        return ResNet10(config.generator_width)
    if config.generator == RESNET10_TIMM:
        return resnet10_timm(config.generator_width)
    if config.generator_pretrained:
        net = load_backbone(config.generator).model
        net.requires_grad_(True)
        return net
    try:
        return timm.create_model(config.generator, pretrained=False, num_classes=0)
    except RuntimeError as e:
        raise VistuneError(f"pgn: unknown generator {config.generator!r} ({e})",
                           "use resnet10 or a timm CNN name, e.g. tf_efficientnet_lite0") from None


def nonlinear_patch_embedding(backbone) -> str | None:
    """Why the patch embedding of ``backbone`` is not one linear projection of pixel patches, or None if it is."""
    pe = backbone.model.patch_embed
    if not isinstance(pe, PatchEmbed):  # e.g. timm's HybridEmbed: a CNN stem, then the projection
        return f"it is a {type(pe).__name__}, not timm's PatchEmbed (a hybrid ViT's CNN stem comes before the projection)"
    if not isinstance(pe.norm, nn.Identity) or not isinstance(pe.proj, nn.Conv2d):
        return f"it is a {type(pe.proj).__name__} followed by a {type(pe.norm).__name__}"
    conv = pe.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding != (0, 0) or conv.groups != 1:
        return "its projection is not a patchify convolution (kernel = stride, no padding, one group)"
    return None


def no_pixel_preimage(backbone, reason: str, refused: str = "prompts cannot be inverted to pixels") -> VistuneError:
    """The error for a patch embedding that is not linear in the pixels (``reason``: why)."""
    return VistuneError(
        f"pgn: the patch embedding of {backbone.spec.name!r} is not a linear projection of pixel patches "
        f"({reason}), so {refused}",
        "train and evaluate in latent mode (--set library_space=token or auto, no --deploy), or use a ViT whose "
        "patch_embed is one patchify Conv2d with no norm (most timm ViTs) to deploy as pixels",
    )


def patch_projection(backbone) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch embedding as a matrix W (D × C·ph·pw) and bias b (D); VistuneError if it is not linear."""
    reason = nonlinear_patch_embedding(backbone)
    if reason is not None:
        raise no_pixel_preimage(backbone, reason)
    conv = backbone.model.patch_embed.proj
    weight = conv.weight.reshape(conv.out_channels, -1)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels, device=weight.device)
    return weight, bias


@register("pgn", category="prompt", families=("vit",),
          description="PGN: a small CNN generates input-dependent prompts from a token library; "
                      "deployable as extra input pixel patches to the unmodified frozen ViT")
class PGN(TokenTuner):
    Config = PGNConfig
    default_lrs = {"sgd": 0.8}  # PGN's lr 0.1 at batch 32 after the trainer's lr × batch/256 scaling
    deployable = True  # eval/predict --deploy: prompts as extra input pixel patches

    @classmethod
    def artifact_config(cls, config: dict, tensor_shapes: Mapping[str, Sequence[int]]) -> dict:
        """vistune 0.1.0 built ``resnet10`` with timm's ResNet (its tensors: generator.conv1, …): such an
        artifact is rebuilt with that generator, ``resnet10-timm``."""
        if config.get("generator") == RESNET10 and "generator.conv1.weight" in tensor_shapes:
            return {**config, "generator": RESNET10_TIMM}
        return config

    def attach(self):
        backbone, config = self.backbone, self.config
        self.nonlinear_embedding = nonlinear_patch_embedding(backbone)  # why prompts have no pixels, or None
        space = config.library_space
        if self.nonlinear_embedding is not None:
            if space == "pixel":
                raise no_pixel_preimage(backbone, self.nonlinear_embedding,
                                        "library_space=pixel (a library of pixel patches) is impossible")
            d, invertible, space = backbone.embed_dim, False, "token"
        else:
            weight, bias = patch_projection(backbone)
            d = weight.shape[0]
            invertible = bool(torch.linalg.matrix_rank(weight.detach().double()) == d)
            if space == "auto":
                space = "token" if invertible else "pixel"
        self.library_space = space
        self.exact_inversion = space == "pixel" or invertible
        self.generator = _make_generator(config)
        t, m = config.num_prompts, config.library_size
        self.to_logits = nn.Linear(self.generator.num_features, t * m)
        tokens = torch.randn(m, d) * 0.02
        if space == "token":
            self.library = nn.Parameter(tokens)
        else:  # the least-squares pixel preimages of PGN's token init
            self.library = nn.Parameter((tokens - bias.detach()) @ torch.linalg.pinv(weight.detach().double()).T.float())
        self.deploy = False  # True: the frozen backbone runs from pixels only (eval/predict --deploy)
        self._pinv_cache: torch.Tensor | None = None

    # ---- the generator ---------------------------------------------------------------------
    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, M) softmax weights over the library, one row per prompt."""
        res = self.config.generator_resolution
        if res is not None and x.shape[-2:] != (res, res):
            x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=True)
        logits = self.to_logits(self.generator(x))
        return logits.reshape(x.shape[0], self.config.num_prompts, self.config.library_size).softmax(-1)

    def prompt_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D): the prompts as tokens (what latent mode inserts)."""
        mixed = self.mixture(x) @ self.library
        if self.library_space == "pixel":
            weight, bias = patch_projection(self.backbone)
            mixed = F.linear(mixed, weight, bias)
        return mixed

    def _pinv(self, weight: torch.Tensor) -> torch.Tensor:
        # the frozen projection never changes: invert once per device, kept (and applied) in float64,
        # as a float32 inverse of an ill-conditioned projection loses digits
        if self._pinv_cache is None or self._pinv_cache.device != weight.device:
            self._pinv_cache = torch.linalg.pinv(weight.double())
        return self._pinv_cache

    def prompt_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, ph, T·pw): the prompts as a strip of pixel patches in the normalised input space."""
        if self.library_space == "pixel":
            vecs = self.mixture(x) @ self.library
        else:
            weight, bias = patch_projection(self.backbone)
            tokens = self.prompt_tokens(x)
            vecs = ((tokens - bias).double() @ self._pinv(weight).T).to(tokens.dtype)
        conv = self.backbone.model.patch_embed.proj
        (ph, pw), c, (b, t) = conv.kernel_size, conv.in_channels, vecs.shape[:2]
        return vecs.reshape(b, t, c, ph, pw).permute(0, 2, 3, 1, 4).reshape(b, c, ph, t * pw)

    # ---- the two forwards ------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            if self.nonlinear_embedding is not None:
                raise no_pixel_preimage(self.backbone, self.nonlinear_embedding,
                                        "its prompts cannot be inverted to pixels and deploy mode is impossible")
            if not self.exact_inversion:
                raise VistuneError(
                    f"pgn: the patch projection of {self.backbone.spec.name!r} has rank < D, so token-space "
                    "prompts have no exact pixel preimage",
                    "train with --set library_space=pixel (or auto) to deploy as pixels",
                )
            return self.backbone.forward_with_extra_patches(x, self.prompt_pixels(x))
        return self.backbone.forward_tokens(x, self.prompt_tokens(x))
