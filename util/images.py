"""Labelled figures of image panels (what a pretraining model sees and predicts, attention maps)."""
from __future__ import annotations

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


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


def panels_figure(panels: dict[str, torch.Tensor], title: str, overlays: dict[str, torch.Tensor] | None = None,
                  min_panel_px: int = 128):
    """A matplotlib figure: one row per image, one column per panel ([B, 3 or 1, H, W] each, ImageNet-normalised),
    each column titled with its panel's name, the figure with ``title``. Images are drawn pixel for pixel (nearest)
    and enlarged to at least ``min_panel_px`` so that small images stay legible. ``overlays``: panel name -> maps
    [B, 1, h, w] in [0, 1], drawn over that panel with a colour map (attention maps)."""
    from matplotlib.figure import Figure  # lazily: only pictures need matplotlib

    overlays = overlays or {}
    rows, side = next(iter(panels.values())).shape[0], next(iter(panels.values())).shape[-1]
    panel_in = max(side, min_panel_px) / 100  # inches at 100 dpi
    height = rows * panel_in + 0.75  # inches: the panels, then the column titles and the figure title above
    fig = Figure(figsize=(len(panels) * panel_in, height), dpi=100)
    axes = fig.subplots(rows, len(panels), squeeze=False)
    for col, (name, images) in enumerate(panels.items()):
        images = imagenet_unnormalize(images.detach().float().expand(-1, 3, -1, -1)).cpu()
        for row in range(rows):
            ax = axes[row][col]
            ax.imshow(images[row].permute(1, 2, 0).numpy(), interpolation="nearest")
            if name in overlays:
                heat = torch.nn.functional.interpolate(overlays[name][row:row + 1].float(), size=images.shape[-2:],
                                                       mode="nearest")[0, 0].cpu().numpy()
                ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name.replace("_", " "), fontsize=9)
    fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.6 / height, wspace=0.04, hspace=0.04)
    return fig


def panels_image(panels: dict[str, torch.Tensor], title: str,
                 overlays: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    """:func:`panels_figure` rendered to an RGB array [H, W, 3] (uint8), as TensorBoard's add_image takes it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(panels_figure(panels, title, overlays))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_panels(panels: dict[str, torch.Tensor], path: str, title: str,
                overlays: dict[str, torch.Tensor] | None = None) -> None:
    """:func:`panels_figure` as a PNG file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(panels_figure(panels, title, overlays)).print_png(path)
    print(f"wrote {path} (columns: {', '.join(panels)})")
