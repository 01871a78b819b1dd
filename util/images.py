"""PNG grids of image panels (what a pretraining model sees and predicts, attention maps)."""
from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.utils import make_grid, save_image


def _imagenet_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1))


def imagenet_unnormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images -> [0, 1]."""
    mean, std = _imagenet_mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (or maps, broadcast to 3 channels) -> ImageNet-normalised, as panels take them."""
    mean, std = _imagenet_mean_std(x.device)
    return (x - mean) / std


def first_images(dataset, n: int, device: torch.device) -> torch.Tensor:
    return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)


def save_panels(panels: dict[str, torch.Tensor], path: str) -> None:
    """One row per image, one column per panel ([B, 3 or 1, H, W] each, ImageNet-normalised)."""
    rows = torch.stack([imagenet_unnormalize(p.float().expand(-1, 3, -1, -1)) for p in panels.values()], dim=1)
    save_image(make_grid(rows.flatten(0, 1), nrow=len(panels), padding=2, pad_value=1.0), path)
    print(f"wrote {path} (columns: {', '.join(panels)})")
