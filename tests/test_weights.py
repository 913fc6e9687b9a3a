"""Weight loading: NVlabs, Hugging Face (hub and transformers names), our own, released mmcv."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dida.errors import CheckpointError
from dida.models import DAFormerHead, MiT, Segmentor, build_mit, load_pretrained
from dida.models.weights import (
    convert_hf_mit,
    convert_mmseg_checkpoint,
    convert_nvlabs_to_hf,
    load_state,
)


def tiny_mit(seed: int = 0, depths: list[int] | None = None) -> MiT:
    torch.manual_seed(seed)
    model = MiT(
        embed_dims=[8, 16, 32, 64],
        num_heads=[1, 1, 2, 2],
        depths=depths or [1, 2, 1, 1],
        sr_ratios=[8, 4, 2, 1],
    )
    for p in model.parameters():  # make every tensor distinct from a fresh init
        p.data.normal_()
    return model


def tiny_segmentor(seed: int = 0, num_classes: int = 4) -> Segmentor:
    encoder = tiny_mit(seed)
    return Segmentor(encoder, DAFormerHead(encoder.embed_dims, num_classes, embed_dim=16))


def assert_same_encoder(a: MiT, b: MiT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_nvlabs_file_with_imagenet_head(tmp_path: Path) -> None:
    src = tiny_mit(1)
    state = dict(src.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, 64), torch.randn(1000)
    path = tmp_path / "mit_tiny.pth"
    torch.save({"state_dict": state}, path)
    model = tiny_segmentor(0)
    report = load_pretrained(model, path)
    assert report.layout == "nvlabs" and report.missing == [
        k for k in report.missing if k.startswith("head.")
    ]
    assert report.unexpected == [] and report.ignored == ["head.bias", "head.weight"]
    assert_same_encoder(model.encoder, src)
    encoder_only = tiny_mit(2)
    report = load_pretrained(encoder_only, path)
    assert report.missing == [] and report.unexpected == []
    assert_same_encoder(encoder_only, src)


@pytest.mark.parametrize("prefix", ["segformer.", ""])
def test_hub_layout_safetensors(tmp_path: Path, prefix: str) -> None:
    src = tiny_mit(1)
    hub = convert_nvlabs_to_hf(src.state_dict(), "hub")
    assert "segformer.encoder.block.0.0.attention.self.key.weight" in hub
    assert "segformer.encoder.layer_norm.3.weight" in hub
    hub = {k.replace("segformer.", prefix, 1): v.contiguous() for k, v in hub.items()}
    hub["classifier.weight"] = torch.randn(1000, 64)
    save_file(hub, str(tmp_path / "model.safetensors"))
    model = tiny_mit(2)
    report = load_pretrained(model, tmp_path)  # a folder in the hub layout
    assert report.layout == "huggingface" and report.missing == [] and report.unexpected == []
    assert "classifier.weight" in report.ignored
    assert_same_encoder(model, src)
    report = load_pretrained(tiny_mit(3), tmp_path / "model.safetensors")
    assert report.missing == []


def test_transformers_module_names_round_trip() -> None:
    src = tiny_mit(1)
    names = convert_nvlabs_to_hf(src.state_dict(), "transformers")
    assert "stages.1.blocks.1.attention.sequence_reduction.sequence_reduction.weight" in names
    back = convert_hf_mit(names)
    assert back.keys() == src.state_dict().keys()
    kv = back["block2.1.attn.kv.weight"]
    assert torch.equal(kv, src.state_dict()["block2.1.attn.kv.weight"])


def test_our_checkpoint_student_and_plain(tmp_path: Path) -> None:
    src = tiny_segmentor(1)
    path = tmp_path / "latest.pth"
    torch.save({"student": src.state_dict(), "config": {"model": {"variant": "custom"}}}, path)
    model = tiny_segmentor(0)
    report = load_pretrained(model, path)
    assert report.layout == "dida" and report.missing == [] and report.unexpected == []
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    assert load_pretrained(tiny_segmentor(2), plain).missing == []


def test_checkpoint_config_variant_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    student = {"encoder.patch_embed1.proj.weight": torch.zeros(64, 3, 7, 7)}
    torch.save({"student": student, "config": {"model": {"variant": "mit_b5"}}}, path)
    with torch.device("meta"):
        model = Segmentor(build_mit("mit_b0"), DAFormerHead([32, 64, 160, 256], 4, embed_dim=16))
    with pytest.raises(CheckpointError, match="weights are mit_b5 but the model is mit_b0"):
        load_pretrained(model, path)


def test_released_mmcv_checkpoint_conversion(tmp_path: Path) -> None:
    src = tiny_segmentor(1)
    other = tiny_segmentor(5)
    state = {}
    for k, v in src.state_dict().items():
        mm = k.replace("encoder.", "backbone.", 1).replace("head.", "decode_head.", 1)
        state[f"module.model.{mm}"] = v
        state[f"ema_model.{mm}"] = other.state_dict()[k]
        state[f"imnet_model.{mm}"] = other.state_dict()[k]
    converted = convert_mmseg_checkpoint(state)
    assert converted.keys() == src.state_dict().keys()
    path = tmp_path / "released.pth"
    torch.save({"meta": {"iter": 40000}, "state_dict": state}, path)
    model = tiny_segmentor(0)
    report = load_pretrained(model, path)
    assert report.layout == "mmseg" and report.missing == [] and report.unexpected == []
    assert any(k.startswith("ema_model.") for k in report.ignored)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_wrong_variant_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mit_b0.pth"
    torch.save(build_mit("mit_b0").state_dict(), path)
    with torch.device("meta"):  # only shapes matter: the check runs before any copy
        b1 = build_mit("mit_b1")
    with pytest.raises(CheckpointError, match="weights are mit_b0 but the model is mit_b1"):
        load_pretrained(b1, path)
    deeper = tiny_mit(0, depths=[1, 2, 2, 1])
    torch.save(tiny_mit(1).state_dict(), path)
    with pytest.raises(CheckpointError, match="depths"):
        load_pretrained(deeper, path)


def test_wrong_num_classes_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ck.pth"
    torch.save({"student": tiny_segmentor(1, num_classes=19).state_dict()}, path)
    with pytest.raises(CheckpointError, match="19 classes but the model has 4"):
        load_pretrained(tiny_segmentor(0, num_classes=4), path)


def test_missing_default_file_says_where_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_pretrained(tiny_mit(), "pretrained/mit_b5.pth")
    message = str(err.value)
    assert "pretrained/mit_b5.pth" in message and "nvidia/mit-b5" in message
    assert "\n" not in message


def test_corrupt_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a zip file at all")  # e.g. a text file given as a checkpoint
    with pytest.raises(CheckpointError, match="broken.pth: not a checkpoint") as err:
        load_pretrained(tiny_mit(), path)
    assert "\n" not in str(err.value)
    torch.save(tiny_mit().state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])  # a truncated torch zip
    with pytest.raises(CheckpointError, match="broken.pth: cannot read weights") as err:
        load_pretrained(tiny_mit(), path)
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_pretrained(tiny_mit(), bad)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_mit().state_dict(), "obj": Path("x")}, path)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_pretrained(tiny_mit(), path)


def test_hub_id_offline(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the hub (offline)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="nvidia/mit-b5: cannot download .*offline"):
        load_pretrained(tiny_mit(), "nvidia/mit-b5")


def test_cli_convert_then_load(tmp_path: Path, capsys) -> None:
    from dida.cli.main import main

    src = tiny_segmentor(1)
    state = {
        "model." + k.replace("encoder.", "backbone.", 1).replace("head.", "decode_head.", 1): v
        for k, v in src.state_dict().items()
    }
    torch.save({"state_dict": state}, tmp_path / "released.pth")
    out = tmp_path / "student.safetensors"
    assert main(["weights", "convert", str(tmp_path / "released.pth"), str(out)]) == 0
    assert main(["weights", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mmseg layout" in printed and "num_classes  4" in printed
    model = tiny_segmentor(0)
    assert load_pretrained(model, out).missing == []
    torch.testing.assert_close(model.head.conv_seg.weight, src.head.conv_seg.weight)
    assert main(["weights", "inspect", str(tmp_path / "nothing.pth")]) == 2


def test_released_hrda_checkpoint_key_mapping() -> None:
    """HRDA/MIC(HRDA) mmseg layout: the HRDAHead holds `head.*` and `attention_head.*`."""
    from dida.models.hrda import HRDASegmentor, build_attention_head
    from dida.models.weights import describe_weights

    seg = tiny_segmentor(1)
    model = HRDASegmentor(seg.encoder, seg.head, build_attention_head([8, 16, 32, 64], 4,
                                                                       embed_dim=8))  # fmt: skip
    state = {}
    for k, v in model.state_dict().items():
        part, rest = k.split(".", 1)
        prefix = {"encoder": "backbone.", "head": "decode_head.head.",
                  "attention_head": "decode_head.scale_attention."}[part]  # fmt: skip
        state[f"model.{prefix}{rest}"] = v
        state[f"ema_model.{prefix}{rest}"] = v
    assert "model.decode_head.scale_attention.fuse_layer.conv.weight" in state
    assert "model.decode_head.head.fuse_layer.bottleneck.conv.weight" in state
    converted = convert_mmseg_checkpoint(state)
    assert converted.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(converted[k], v), k
    info = describe_weights(state)
    assert info["layout"] == "mmseg" and info["hrda"] == "classwise attention"
    assert info["num_classes"] == 4 and info["tensors"] == len(converted)
    target = HRDASegmentor(tiny_mit(7), DAFormerHead([8, 16, 32, 64], 4, embed_dim=16),
                           build_attention_head([8, 16, 32, 64], 4, embed_dim=8))  # fmt: skip
    report = load_state(target, state)
    assert report.missing == [] and report.unexpected == []
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert describe_weights(seg.state_dict())["hrda"] is None
