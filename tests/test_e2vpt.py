"""E²VPT: the ViT-B/16 count, key-value prompts + masked visual prompts against the blocks written out by hand, and
the pruning with rewinding (prepare)."""
from __future__ import annotations

import pytest
import torch

from conftest import IMAGE_SIZE
from vistune.errors import VistuneError
from vistune.methods import adapt, count_parameters, make_config
from vistune.methods.e2vpt import PIECES, KVPromptedAttention
from vit_math import block_math, cls_feature, embed

X = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """All tests here run on one torch thread (conftest.one_thread)."""


def test_vit_b16_count(vit_b16):
    # official ChengHan111/E2VPT: prompt_embeddings (1, P, 768) + deep_prompt_embeddings (11, P, 768) and, per block,
    # deep_QKV_embeddings (12 heads, T, 64); P = 10, T = 5 (command.txt's VTAB setting on most tasks)
    counts = count_parameters(adapt(vit_b16, make_config("e2vpt"), 100))
    assert counts["tuned_params_excluding_head"] == 12 * 10 * 768 + 12 * 12 * 5 * 64 == 138_240


def _reference(model, kv=True):
    vit, p = model.backbone.model, model.config.num_prompts
    masks = model.token_mask[:, None] * model.piece_mask.repeat(1, 32 // PIECES)
    x = embed(vit, X)
    for i, block in enumerate(vit.blocks):
        prompts = (model.prompts[i] * masks).expand(2, -1, -1)
        x = torch.cat([x[:, :1], prompts, x[:, 1 + p if i else 1:]], dim=1)
        inner = type("Block", (), {"attn": block.attn.inner, "mlp": block.mlp, "norm1": block.norm1,
                                    "norm2": block.norm2})
        x = block_math(inner, x, kv=block.attn.kv if kv else None)
    return model.head(cls_feature(vit, torch.cat([x[:, :1], x[:, 1 + p:]], dim=1)))


def test_forward_matches_the_blocks_by_hand(tiny_backbones):
    torch.manual_seed(0)
    model = adapt(tiny_backbones("vit"), make_config("e2vpt", {"num_prompts": 3, "num_kv": 2}), 3).eval()
    assert all(isinstance(b.attn, KVPromptedAttention) for b in model.backbone.model.blocks)
    model.token_mask[1] = 0  # a pruned token, and pruned pieces of another (piece k: dimensions ≡ k mod 16)
    model.piece_mask[0, :5] = 0
    with torch.no_grad():
        logits = model(X)
        assert (logits - _reference(model)).abs().max() < 1e-5
        assert (logits - _reference(model, kv=False)).abs().max() > 1e-3  # negative control: no key-value prompts
        masked = model.prompts.clone()
        model.prompts[:, 1] += 1.0  # a pruned token's parameters change nothing
        model.prompts[:, 0, :5] += 1.0
        model.prompts[:, 0, 16:21] += 1.0
        assert torch.equal(model(X), logits)
        model.prompts.copy_(masked)


def test_pruning_zeroes_the_lowest_scored_masks_and_rewinds(tiny_backbones):
    backbone = tiny_backbones("vit")
    sets = {"num_prompts": 4, "num_kv": 2, "prune_tokens": 0.5, "prune_pieces": 0.25, "prune_epochs": 1}
    torch.manual_seed(0)
    model = adapt(backbone, make_config("e2vpt", sets), 3)
    initial = {k: v.clone() for k, v in model.tuned_state_dict().items()}
    images = torch.randn(12, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    train_set = [(images[i], i % 3) for i in range(12)]
    model.prepare(train_set, device=torch.device("cpu"), batch_size=4, progress=False)
    assert int((model.token_mask == 0).sum()) == 2  # half of the 4 tokens
    assert ((model.piece_mask == 0).sum(dim=1) == 4).all()  # a quarter of the 16 pieces of every token
    rewound = model.tuned_state_dict()
    for key, value in initial.items():  # every prompt, key-value prompt and the head back at its initial value
        if not key.endswith("_mask"):
            assert torch.equal(rewound[key], value), key


def test_refuses_attention_it_cannot_extend(tiny_backbones):
    with pytest.raises(VistuneError, match="does not support the swin family"):
        adapt(tiny_backbones("swin"), make_config("e2vpt"), 3)
