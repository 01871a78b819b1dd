"""Frozen teachers: D-iGPT's feature targets and Scala's classification teacher.

``load_teacher`` accepts
  (a) a checkpoint written by this project (any model: the ViT stored under ``vit_prefix`` is rebuilt from
      ``vit_config``; official checkpoints with a registered converter work too),
  (b) a timm model name plus a local ``weights`` file (``.pth``/``.pt``/``.bin`` or ``.safetensors``; nothing is
      downloaded; the number of classes is read from the file's classifier),
  (c) ``open_clip:<arch>`` plus a local ``weights`` file (a full CLIP state dict or the visual tower alone),
      when open_clip is installed.
The result is a ``FrozenTeacher``: eval mode, no trainable parameters, inputs always ImageNet-normalised at any
resolution (it converts them to its own mean/std and resolution), ``forward`` = logits (pooled embedding when
the teacher has no classifier) and ``teacher_tokens`` = (cls feature, patch-token features).
"""
from __future__ import annotations

import os

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

from models.formats import load_vit, official_state_dict
from models.vit import upcast
from util.checkpoint import load_file
from util.errors import UserError

OPEN_CLIP_PREFIX = "open_clip:"


class FrozenTeacher(nn.Module):
    """A frozen network plus what is needed to feed it: its mean/std, input side and token grid.

    ``kind``: ``'vit'`` (this project's VisionTransformer), ``'timm'`` or ``'open_clip'`` (a CLIP visual tower).
    ``embed_dim`` is the width of the features returned by ``teacher_tokens``; ``grid_size`` their grid side.
    """

    def __init__(self, model: nn.Module, kind: str, img_size: int, grid_size: int, embed_dim: int,
                 mean: tuple[float, ...], std: tuple[float, ...], num_classes: int = 0):
        super().__init__()
        if kind not in ("vit", "timm", "open_clip"):
            raise ValueError(f"unknown teacher kind {kind!r}")
        self.model, self.kind = model, kind
        self.img_size, self.grid_size, self.embed_dim, self.num_classes = img_size, grid_size, embed_dim, num_classes
        # Affine map from ImageNet normalisation to the teacher's: x_t = x * scale + shift.
        in_mean, in_std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", (in_std / std_t).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((in_mean - mean_t) / std_t).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        return super().train(False)  # a frozen teacher never switches to training behaviour (dropout, BN)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images -> the teacher's normalisation and input resolution."""
        x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", align_corners=False,
                              antialias=True)
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or the pooled embedding of a head-less teacher) for ImageNet-normalised images."""
        return self.model(self.prepare(x))

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cls [B, T], patch tokens [B, grid², T]) for already ``prepare``d images."""
        m = self.model
        if self.kind == "open_clip":
            # D-iGPT's target: ln_post + proj applied to ALL tokens of the last block (the official
            # DiGPT_torch teacher wrapper).
            out = m.forward_intermediates(x, indices=1, normalize_intermediates=True, intermediates_only=True,
                                          output_fmt="NLC", output_extra_tokens=True)
            patches, cls = out["image_intermediates"][0], out["image_intermediates_prefix"][0][:, 0]
            return (cls @ m.proj, patches @ m.proj) if m.proj is not None else (cls, patches)
        feats = m.forward_features(x)
        if feats.ndim == 4:  # a convolutional timm teacher: the final feature map, mean-pooled as "cls"
            patches = feats.flatten(2).transpose(1, 2)
            return patches.mean(1), patches
        # Final-normed tokens. A global-pool ViT (fc_norm, no final norm) gets its fc_norm per token instead.
        if isinstance(getattr(m, "norm", None), nn.Identity) and not isinstance(getattr(m, "fc_norm", None),
                                                                                 (nn.Identity, type(None))):
            feats = m.fc_norm(feats)
        prefix = m.num_prefix_tokens
        patches = feats[:, prefix:]
        has_cls = getattr(m, "has_class_token", getattr(m, "cls_token", None) is not None)
        return (feats[:, 0] if has_cls else patches.mean(1)), patches


def teacher_tokens(teacher: FrozenTeacher, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's (cls [B, T], patch tokens [B, Gt*Gt, T]) for ImageNet-normalised images ``x`` at any
    resolution, in at least float32 (the teacher's dtype if wider); computed without gradients, in the caller's
    precision (the training step's autocast, --amp: bf16 or fp16 autocast, or float32 with --amp off)."""
    if not isinstance(teacher, FrozenTeacher):
        raise ValueError(f"expected a FrozenTeacher from load_teacher, got {type(teacher).__name__}")
    with torch.no_grad():
        cls, patches = teacher.tokens(teacher.prepare(x))
    if patches.shape[1] != teacher.grid_size ** 2:
        raise ValueError(f"teacher returned {patches.shape[1]} patch tokens, expected {teacher.grid_size}²")
    return upcast(cls), upcast(patches)


def load_teacher(teacher: str, weights: str | None = None) -> FrozenTeacher:
    """Frozen teacher from (a) a checkpoint of this project, (b) a timm model name + local ``weights``, or
    (c) ``open_clip:<arch>`` + local ``weights``. Missing files, unreadable files and unknown names raise one
    clear error before any model is built."""
    if teacher.startswith(OPEN_CLIP_PREFIX):
        return _load_open_clip(teacher[len(OPEN_CLIP_PREFIX):], weights)
    if weights is not None:
        return _load_timm(teacher, weights)
    if not os.path.isfile(teacher) and timm.is_model(teacher):
        raise UserError(f"teacher {teacher!r} is a timm model name: give its weights file too (nothing is "
                        "downloaded)")
    vit, _ = load_vit(teacher)  # FileNotFoundError / ValueError for a missing or foreign file
    return FrozenTeacher(vit, "vit", vit.config["img_size"], vit.grid_size, vit.embed_dim,
                         IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, vit.config["num_classes"])


def _read_state_dict(path: str) -> dict:
    """Tensors of a local weights file (torch or safetensors), wrappers and DDP-style prefixes removed."""
    if path.endswith(".safetensors"):
        if not os.path.isfile(path):
            raise UserError(f"teacher weights not found: {path}")
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(path)
        except Exception as e:  # truncated or not a safetensors file
            raise UserError(f"cannot read teacher weights {path}: {type(e).__name__}: {e}") from None
    return official_state_dict(load_file(path))


def _load_strict(module: nn.Module, state_dict: dict, what: str) -> None:
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # the official D-iGPT loads non-strictly and can silently keep a random teacher
        raise UserError(f"weights do not fit teacher {what}: {' '.join(str(e).split())[:500]}") from None


def _load_timm(name: str, weights: str) -> FrozenTeacher:
    if not timm.is_model(name):
        raise UserError(f"unknown timm model {name!r} (see timm.list_models())")
    state_dict = _read_state_dict(weights)
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier") or "head"
    classifier = classifier[0] if isinstance(classifier, (tuple, list)) else classifier
    head = state_dict.get(f"{classifier}.weight")
    num_classes = head.shape[0] if head is not None else 0
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    _load_strict(model, state_dict, name)
    cfg = resolve_data_config({}, model=model)
    img_size = cfg["input_size"][-1]
    if hasattr(model, "patch_embed"):
        grid = img_size // model.patch_embed.patch_size[0]
    else:
        grid = img_size // model.feature_info[-1]["reduction"]
    return FrozenTeacher(model, "timm", img_size, grid, model.num_features, cfg["mean"], cfg["std"], num_classes)


def _load_open_clip(arch: str, weights: str | None) -> FrozenTeacher:
    try:
        import open_clip  # optional dependency, only for CLIP teachers
    except ImportError:
        raise UserError("open_clip teachers need the open_clip_torch package (pip install open_clip_torch)") from None
    if arch not in open_clip.list_models():
        raise UserError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    if weights is None:
        raise UserError(f"open_clip teacher {arch!r} needs a local weights file (nothing is downloaded)")
    state_dict = _read_state_dict(weights)
    if any(k.startswith("visual.") for k in state_dict):  # a full CLIP checkpoint: keep the image tower
        state_dict = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
    visual = open_clip.create_model(arch, pretrained=None).visual
    if not hasattr(visual, "forward_intermediates") or getattr(visual, "attn_pool", None) is not None:
        raise UserError(f"open_clip {arch!r}: only plain ViT image towers give per-token features")
    _load_strict(visual, state_dict, f"open_clip:{arch}")
    img_size, grid = visual.image_size[0], visual.grid_size[0]
    dim = visual.proj.shape[1] if visual.proj is not None else visual.ln_post.normalized_shape[0]
    return FrozenTeacher(visual, "open_clip", img_size, grid, dim, tuple(visual.image_mean),
                         tuple(visual.image_std))
