"""A backbone from the timm hub without a network: it fails at once with the offline names (never after
minutes of download retries), honours HF_HUB_OFFLINE, and loads weights an earlier download cached.
No test here touches the network: "no network" is a patched socket."""
from __future__ import annotations

import socket

import pytest
import timm
import torch
from safetensors.torch import save_file

import vistune.backbones as backbones_mod
from vistune.backbones import load_backbone
from vistune.errors import VistuneError


@pytest.fixture()
def no_network(monkeypatch):
    """HF_HUB_OFFLINE unset, and every connection fails as it does without a network; counts the attempts."""
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backbones_mod._probe_hub.cache_clear()
    yield attempts
    backbones_mod._probe_hub.cache_clear()


@pytest.fixture()
def hub_download_forbidden(monkeypatch):
    """timm.create_model(pretrained=True) without a local file would go to the network: fail the test."""
    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained and "file" not in (kwargs.get("pretrained_cfg_overlay") or {}):
            raise AssertionError(f"tried to download {name}")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def test_a_timm_name_without_network_fails_at_once_naming_the_offline_backbone(no_network,
                                                                              hub_download_forbidden):
    with pytest.raises(VistuneError) as e:
        load_backbone("efficientnet_lite0")  # a real timm name; the offline one is tf_efficientnet_lite0
    assert "needs its pretrained weights from the Hugging Face hub" in e.value.what
    assert "no connection to huggingface.co: Name or service not known" in e.value.what
    assert "Did you mean 'tf_efficientnet_lite0'" in e.value.what
    assert "--checkpoint" in e.value.fix and "tf_efficientnet_lite0" in e.value.fix
    assert no_network == [("huggingface.co", 443)]
    with pytest.raises(VistuneError):
        load_backbone("resnet10t")
    assert len(no_network) == 1  # the hub is probed once per process, not once per backbone


def test_hf_hub_offline_is_honoured_without_any_connection(no_network, hub_download_forbidden, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VistuneError, match="HF_HUB_OFFLINE is set"):
        load_backbone("mobilenetv2_050")
    with pytest.raises(VistuneError, match="HF_HUB_OFFLINE is set"):
        load_backbone("hf-hub:timm/mobilenetv2_050.lamb_in1k")  # even its config would come from the hub
    assert no_network == []


def test_a_misspelt_name_is_still_an_unknown_backbone_with_timm_suggestions(no_network):
    with pytest.raises(VistuneError) as e:
        load_backbone("vit_base_patch16_224.orig_in22k")  # the tag is orig_in21k
    assert "unknown backbone" in e.value.what and "'vit_base_patch16_224.orig_in21k'" in e.value.what
    assert no_network == []  # the name is checked before any connection


def test_weights_in_the_local_hub_cache_load_without_network(no_network, hub_download_forbidden, tmp_path,
                                                             monkeypatch):
    torch.manual_seed(7)
    cached = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in cached.state_dict().items()}, str(path))
    asked = []

    def try_to_load_from_cache(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename))
        return str(path) if filename == "model.safetensors" else None

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", try_to_load_from_cache)
    view = load_backbone("resnet10t")
    assert asked[0] == (timm.create_model("resnet10t").pretrained_cfg["hf_hub_id"], "model.safetensors")
    assert view.spec.source == "hub"
    assert all(torch.equal(view.model.state_dict()[k], v) for k, v in cached.state_dict().items()
               if not k.startswith("fc."))


def test_weights_in_torch_hub_cache_are_found(tmp_path, monkeypatch):
    """Weights timm fetched by URL (not from the HF hub) sit in torch's hub cache under the URL's file name."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"url": "https://example.invalid/releases/w-123.pth"}
    assert backbones_mod._cached_weights(model) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "w-123.pth").write_bytes(b"weights")
    assert backbones_mod._cached_weights(model) == str(tmp_path / "checkpoints" / "w-123.pth")
