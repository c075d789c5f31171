"""One small configuration per timm model family: what `vistune backbones --all` checks every method on and
what the backbone × method matrix test (tests/test_backbone_matrix.py) runs.

Each entry is a registered timm architecture shrunk through timm's own model options (``depth``,
``embed_dim``, ``img_size``, ...), so that a random-weight copy builds and trains a step in well under a
second; the family is the architecture's timm class. ``TIMM_FAMILIES`` (40) run in the fast matrix;
``SLOW_FAMILIES`` in the slow one: more tiny families, and families whose timm entry points fix their sizes
(no smaller configuration can be asked for).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TinyConfig:
    architecture: str
    model_kwargs: dict = field(default_factory=dict)
    image_size: int = 32
    note: str = ""


_VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
_STAGES4 = (1, 1, 1, 1)
_DIMS4 = (16, 32, 48, 64)

TIMM_FAMILIES: dict[str, TinyConfig] = {
    # token families (ViT & kin)
    "vit": TinyConfig("vit_tiny_patch16_224", _VIT, note="CLS token"),
    "vit-reg-avg": TinyConfig("vit_tiny_patch16_224", dict(_VIT, reg_tokens=2, class_token=False,
                                                            global_pool="avg"), note="registers, no CLS, avg pool"),
    "deit-distilled": TinyConfig("deit_tiny_distilled_patch16_224", _VIT, note="distillation token"),
    "deit3": TinyConfig("deit3_small_patch16_224", _VIT, note="layer scale"),
    "clip": TinyConfig("vit_base_patch16_clip_224", _VIT, note="pre-norm (norm_pre)"),
    "siglip": TinyConfig("vit_base_patch16_siglip_224", _VIT, note="attention-pool head (map)"),
    "vit-hybrid": TinyConfig("vit_tiny_r_s16_p8_224", dict(img_size=64, embed_dim=32, depth=2, num_heads=2),
                             image_size=64, note="ResNet stem in HybridEmbed"),
    "eva02": TinyConfig("eva02_tiny_patch14_224", _VIT, note="RoPE, SwiGLU, q/v biases"),
    "eva": TinyConfig("eva_giant_patch14_224", dict(_VIT, mlp_ratio=2), note="EVA-01: no RoPE"),
    "vit-rope": TinyConfig("vit_medium_patch16_rope_reg1_gap_256", _VIT, note="Eva class: RoPE, register, avg"),
    "beit": TinyConfig("beit_base_patch16_224", _VIT, note="relative position bias per block"),
    "beitv2": TinyConfig("beitv2_base_patch16_224", _VIT),
    # window attention
    "swin": TinyConfig("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                            depths=(1, 1), num_heads=(1, 2))),
    "swinv2": TinyConfig("swinv2_tiny_window8_256", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                         depths=(1, 1), num_heads=(1, 2)),
                         note="cosine attention, continuous position bias"),
    # every other timm model: the generic view
    "efficientnet": TinyConfig("tf_efficientnet_lite0"),
    "mobilenetv2": TinyConfig("mobilenetv2_050"),
    "mobilenetv3": TinyConfig("mobilenetv3_small_050"),
    "mobilenetv4": TinyConfig("mobilenetv4_conv_small_050"),
    "resnet": TinyConfig("resnet10t", note="basic blocks"),
    "resnet-bottleneck": TinyConfig("resnet50", dict(layers=_STAGES4, base_width=16)),
    "convnext": TinyConfig("convnext_atto"),
    "convnextv2": TinyConfig("convnextv2_atto", dict(dims=_DIMS4, depths=_STAGES4)),
    "regnet": TinyConfig("regnetx_002"),
    "ghostnet": TinyConfig("ghostnet_050"),
    "dla": TinyConfig("dla46_c"),
    "mobilevit": TinyConfig("mobilevit_xxs", note="ByobNet"),
    "levit": TinyConfig("levit_128s", dict(img_size=32, embed_dim=(32, 48, 64), key_dim=8, num_heads=(1, 1, 1),
                                           depth=(1, 1, 1)), note="LevitDistilled: token stages"),
    "maxvit": TinyConfig("maxvit_nano_rw_256", dict(img_size=32, embed_dim=_DIMS4, depths=_STAGES4, stem_width=16,
                                                    transformer_dim_head=8), note="MaxxVit"),
    "fastvit": TinyConfig("fastvit_t8", dict(layers=_STAGES4, embed_dims=(16, 32, 64, 128), mlp_ratios=_STAGES4)),
    "caformer": TinyConfig("caformer_s18", note="MetaFormer; timm fixes its size (26M)"),
    "hiera": TinyConfig("hiera_tiny_224", dict(img_size=32, embed_dim=16, num_heads=1, stages=_STAGES4),
                        note="token stages in mask-unit order"),
    "pvt-v2": TinyConfig("pvt_v2_b0", dict(embed_dims=_DIMS4, depths=_STAGES4, num_heads=_STAGES4)),
    "twins": TinyConfig("twins_pcpvt_small", dict(embed_dims=_DIMS4, depths=_STAGES4, num_heads=_STAGES4),
                        note="feature levels that are not modules"),
    "edgenext": TinyConfig("edgenext_xx_small", dict(dims=_DIMS4, depths=_STAGES4, heads=_STAGES4)),
    "davit": TinyConfig("davit_tiny", dict(embed_dims=_DIMS4, depths=_STAGES4, num_heads=_STAGES4)),
    "mambaout": TinyConfig("mambaout_femto", dict(dims=_DIMS4, depths=_STAGES4), note="NHWC stages"),
    "efficientvit": TinyConfig("efficientvit_b0", dict(widths=(8, 16, 24, 32, 48), depths=(1, 1, 1, 1, 1),
                                                       head_dim=8), note="EfficientViT (MIT)"),
    "pit": TinyConfig("pit_ti_224", dict(img_size=32, depth=(1, 1, 1), base_dims=(8, 8, 8), heads=(1, 2, 4)),
                      note="stages return (tokens, cls) tuples"),
    "cait": TinyConfig("cait_xxs24_224", _VIT, note="class-attention blocks"),
    "xcit": TinyConfig("xcit_nano_12_p16_224", _VIT, note="cross-covariance attention"),
}

# checked by the slow matrix only: further tiny families (the fast matrix keeps to 40, for time), and timm
# entry points that fix their sizes (too large for the fast matrix)
SLOW_FAMILIES: dict[str, TinyConfig] = {
    "swinv2-cr": TinyConfig("swinv2_cr_tiny_224", dict(img_size=32, patch_size=2, window_size=4, embed_dim=16,
                                                       depths=(1, 1), num_heads=(1, 2))),
    "mnasnet": TinyConfig("mnasnet_small"),
    "lcnet": TinyConfig("lcnet_035"),
    "vovnet": TinyConfig("ese_vovnet19b_slim_dw"),
    "fasternet": TinyConfig("fasternet_t0", dict(embed_dim=16, depths=_STAGES4)),
    "starnet": TinyConfig("starnet_s050"),
    "repvit": TinyConfig("repvit_m0_9", dict(embed_dim=_DIMS4, depth=_STAGES4)),
    "mobilevitv2": TinyConfig("mobilevitv2_050", note="ByobNet"),
    "coatnet": TinyConfig("coatnet_nano_rw_224", dict(img_size=32, embed_dim=_DIMS4, depths=_STAGES4, stem_width=16,
                                                      transformer_dim_head=8), note="MaxxVit"),
    "inception-next": TinyConfig("inception_next_atto", dict(dims=_DIMS4, depths=_STAGES4)),
    "sequencer": TinyConfig("sequencer2d_s", dict(layers=_STAGES4, embed_dims=(16, 32, 32, 32),
                                                  hidden_sizes=(8, 16, 16, 16)), note="NHWC stages"),
    "tiny-vit": TinyConfig("tiny_vit_5m_224", dict(embed_dims=_DIMS4, depths=_STAGES4, num_heads=_STAGES4)),
    "efficientvit-msra": TinyConfig("efficientvit_m0", dict(img_size=32)),
    "vit-relpos": TinyConfig("vit_relpos_small_patch16_224", _VIT, note="relative position"),
    "naflexvit": TinyConfig("naflexvit_base_patch16_gap", _VIT),
    "poolformer": TinyConfig("poolformerv2_s12", note="MetaFormer"),
    "densenet": TinyConfig("densenet121"),
    "rexnet": TinyConfig("rexnetr_100"),
    "hgnet": TinyConfig("hgnetv2_b0"),
    "nfnet": TinyConfig("nf_regnet_b0"),
    "cspnet": TinyConfig("cspresnet50"),
    "dpn": TinyConfig("dpn48b"),
    "hrnet": TinyConfig("hrnet_w18_small"),
    "res2net": TinyConfig("res2net50_14w_8s", dict(layers=_STAGES4)),
    "resnest": TinyConfig("resnest14d"),
    "mlp-mixer": TinyConfig("mixer_s32_224", dict(img_size=32)),
    "shvit": TinyConfig("shvit_s1"),
    "swiftformer": TinyConfig("swiftformer_xs"),
}
