"""Frozen teachers: this project's checkpoints, timm name + local weights, open_clip, errors, normalisation."""
import importlib.util
import json

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import models  # noqa: F401
from models.registry import create_model
from models.teacher import FrozenTeacher, load_teacher, teacher_tokens
from models.vit import VisionTransformer
from util.errors import UserError

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def save_ours(path, model, vit, prefix):
    torch.save({"model": model.state_dict(), "vit_config": dict(vit.config), "vit_prefix": prefix,
                "encoder_mask": None, "model_name": "x", "epoch": 0, "args": {}}, path)


def assert_frozen(teacher):
    assert isinstance(teacher, FrozenTeacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


def test_project_classifier_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                            global_pool="avg", fc_norm=True).eval()
    path = tmp_path / "cls.pth"
    save_ours(path, vit, vit, "")
    teacher = load_teacher(str(path))
    assert_frozen(teacher)
    assert (teacher.kind, teacher.num_classes, teacher.grid_size, teacher.embed_dim) == ("vit", 10, 8, 32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(teacher(x), vit(x))  # logits; ImageNet normalisation passes through unchanged
    cls, patches = teacher_tokens(teacher, x)
    tokens = vit.fc_norm(vit.forward_features(x))  # no final norm in a global-pool ViT: fc_norm per token
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 1:])
    # another resolution: the view is resized to the teacher's own 32 px
    x48 = torch.randn(2, 3, 48, 48)
    resized = F.interpolate(x48, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(teacher_tokens(teacher, x48)[1], teacher_tokens(teacher, resized)[1])
    assert teacher_tokens(teacher, x48)[1].shape == (2, 64, 32)


def test_project_pretraining_checkpoint_uses_the_encoder(tmp_path):
    torch.manual_seed(0)
    model = create_model("digpt_vit_tiny", teacher_dim=64, teacher_grid=8)  # no teacher: its token shape given
    path = tmp_path / "pre.pth"
    save_ours(path, model, model.encoder, "encoder.")
    teacher = load_teacher(str(path))
    assert teacher.num_classes == 0 and teacher.embed_dim == 64
    x = torch.randn(1, 3, 32, 32)
    enc = model.encoder.eval()
    tokens = enc.fc_norm(enc.forward_features(x))
    torch.testing.assert_close(teacher_tokens(teacher, x)[1], tokens[:, 1:])


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_name_with_local_weights(tmp_path, suffix):
    torch.manual_seed(0)
    ref = timm.create_model("test_vit", pretrained=False, num_classes=7).eval()
    path = str(tmp_path / f"w{suffix}")
    if suffix == ".safetensors":
        save_file(ref.state_dict(), path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    teacher = load_teacher("test_vit", path)
    assert_frozen(teacher)
    assert (teacher.kind, teacher.num_classes, teacher.img_size, teacher.grid_size, teacher.embed_dim) == \
        ("timm", 7, 160, 10, 64)
    x = torch.randn(2, 3, 160, 160)
    # test_vit expects mean = std = 0.5: pixels = x·std_in + mean_in, then (pixels − 0.5) / 0.5
    pixels = x * torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    x_t = (pixels - 0.5) / 0.5
    torch.testing.assert_close(teacher(x), ref(x_t), rtol=1e-4, atol=1e-5)
    cls, patches = teacher_tokens(teacher, x)
    tokens = ref.forward_features(x_t)  # final-normed tokens
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(patches, tokens[:, 1:], rtol=1e-4, atol=1e-5)


def test_clip_renormalisation_of_the_imagenet_mean_image():
    teacher = FrozenTeacher(nn.Identity(), "timm", 4, 4, 3, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    out = teacher.prepare(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0131979, -0.0069938, -0.0080164]),
                               rtol=0, atol=1e-6)


def test_clear_errors(tmp_path):
    with pytest.raises(UserError):
        load_teacher(str(tmp_path / "missing.pth"))
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_teacher(str(corrupt))
    with pytest.raises(ValueError, match="cannot read"):
        load_teacher("test_vit", str(corrupt))
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        load_teacher("test_vit", str(bad_st))
    with pytest.raises(ValueError, match="unknown timm model"):  # the name is checked before the file
        load_teacher("no_such_vit_xyz", str(tmp_path / "missing.pth"))
    with pytest.raises(UserError):
        load_teacher("test_vit", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="give its weights file"):
        load_teacher("test_vit")
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_vit2", pretrained=False).state_dict(), other)
    with pytest.raises(ValueError, match="do not fit"):
        load_teacher("test_vit", str(other))
    with pytest.raises(ValueError, match="FrozenTeacher"):
        teacher_tokens(nn.Identity(), torch.zeros(1, 3, 4, 4))


@pytest.mark.skipif(HAS_OPEN_CLIP, reason="open_clip is installed")
def test_open_clip_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="open_clip_torch"):
        load_teacher("open_clip:ViT-H-14", str(tmp_path / "w.pth"))


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip is not installed")
def test_open_clip_tokens_are_ln_post_and_proj_of_all_tokens(tmp_path):
    import open_clip

    cfg = {"embed_dim": 24, "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "patch_size": 7,
                                           "head_width": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 16, "heads": 2, "layers": 1}}
    (tmp_path / "TinyTestCLIP.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    torch.manual_seed(0)
    clip = open_clip.create_model("TinyTestCLIP", pretrained=None).eval()
    path = str(tmp_path / "clip.pth")
    torch.save(clip.state_dict(), path)  # a full CLIP checkpoint: the image tower is taken from visual.*
    teacher = load_teacher("open_clip:TinyTestCLIP", path)
    assert (teacher.kind, teacher.img_size, teacher.grid_size, teacher.embed_dim) == ("open_clip", 28, 4, 24)
    x = torch.randn(2, 3, 28, 28)
    x_t = teacher.prepare(x)
    v = clip.visual
    ref = v.ln_post(v.transformer(v._embeds(x_t))) @ v.proj
    cls, patches = teacher_tokens(teacher, x)
    torch.testing.assert_close(cls, ref[:, 0])
    torch.testing.assert_close(patches, ref[:, 1:])
    torch.testing.assert_close(teacher(x), clip.encode_image(x_t))
    with pytest.raises(ValueError, match="unknown open_clip"):
        load_teacher("open_clip:NoSuchArch", path)
