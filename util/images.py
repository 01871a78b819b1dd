"""Images on the device (the decoding of --decode gpu batches, the normalisation of uint8 batches) and labelled
figures of image panels (what a pretraining model sees and predicts, attention maps)."""
from __future__ import annotations

import functools
import math
import textwrap
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from util.decoding import EncodedBatch, collate

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@functools.cache
def _imagenet_mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] each, made once per device (a copy to the GPU for every batch would wait for it)."""
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


def device_images(images: torch.Tensor | EncodedBatch, device: torch.device) -> torch.Tensor:
    """A batch on ``device``, ImageNet-normalised there when it arrives as uint8 pixels (the loaders send uint8
    where the transform ends with the crop: a quarter of float32's bytes through host memory and PCIe). The same
    float32 operations as torchvision's ToTensor and Normalize, in the same order, so the result equals the old
    host-side normalisation bit for bit. Batches that are already normalised (random erasing, synthetic data) pass
    unchanged. A --decode gpu batch of JPEG bytes and crops is decoded and cropped on ``device`` first."""
    if isinstance(images, EncodedBatch):
        images = images.decode(device)
    images = images.to(device, non_blocking=True)
    return imagenet_normalize(images.float().div(255)) if images.dtype == torch.uint8 else images


def first_images(dataset, n: int, device: torch.device) -> torch.Tensor:
    return device_images(collate([dataset[i] for i in range(min(n, len(dataset)))])[0], device)


def panels_figure(panels: dict[str, torch.Tensor], title: str, overlays: dict[str, torch.Tensor] | None = None,
                  min_panel_px: int = 128, min_width_px: int = 400) -> Figure:
    """A matplotlib figure: one row per image, one column per panel ([B, 3 or 1, H, W] each, ImageNet-normalised),
    each column titled with its panel's name, the figure with ``title``. Images are enlarged by a whole factor
    (nearest: every pixel a sharp square) until a panel is ``min_panel_px`` wide and the figure ``min_width_px``,
    so that 32-px digits are legible and the titles fit; 224-px images stay as they are. ``overlays``: panel name
    -> maps [B, 1, h, w] in [0, 1], drawn over that panel with a colour map (attention maps)."""
    from matplotlib.figure import Figure  # lazily: only pictures need matplotlib

    overlays = overlays or {}
    rows, side = next(iter(panels.values())).shape[0], next(iter(panels.values())).shape[-1]
    cols, dpi, gap = len(panels), 100, 4  # gap: pixels between and around panels
    scale = max(1, math.ceil(max(min_panel_px, min_width_px / cols) / side))
    panel = side * scale
    width = cols * panel + (cols + 1) * gap
    # long names wrap under the panel's width (~7 px a character at 9 pt); the header is as tall as its lines
    names = [textwrap.fill(name.replace("_", " "), max(8, panel // 7)) for name in panels]
    title = textwrap.fill(title, max(16, width // 8))
    header = 8 + 17 * (title.count("\n") + 1) + 15 * max(n.count("\n") + 1 for n in names) + 6
    height = header + rows * panel + rows * gap
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    fig.suptitle(title, fontsize=10, y=1 - 6 / height, va="top")
    images = {name: imagenet_unnormalize(x.detach().float().expand(-1, 3, -1, -1)).cpu() for name, x in panels.items()}
    for row in range(rows):
        for col, (name, x) in enumerate(images.items()):
            # axes placed in whole pixels, so each image pixel covers exactly scale × scale of them
            left, top = gap + col * (panel + gap), header + row * (panel + gap)
            ax = fig.add_axes((left / width, 1 - (top + panel) / height, panel / width, panel / height))
            ax.imshow(x[row].permute(1, 2, 0).numpy(), interpolation="nearest")
            if name in overlays:
                heat = F.interpolate(overlays[name][row:row + 1].float(), size=x.shape[-2:], mode="nearest")
                ax.imshow(heat[0, 0].cpu().numpy(), cmap="inferno", alpha=0.5, vmin=0.0, vmax=1.0,
                          interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(names[col], fontsize=9, pad=4)
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
