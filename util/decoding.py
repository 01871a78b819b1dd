"""Images decoded from their bytes and cropped as uint8 tensors: ``--decode fast`` and ``--decode gpu`` for the
transforms that only crop, resize and flip (pretraining, evaluation, the MAE linear probe, the kNN monitor).

``fast``: in the loader worker, a JPEG in colour or greyscale is decoded by ``torchvision.io.decode_jpeg`` and
cropped, resized (bicubic, antialiased) and flipped by ``torchvision.transforms.v2``'s functional ops on uint8.
Anything else (PNG, CMYK, a JPEG that decode_jpeg refuses, images already in memory such as the digits) is decoded
by PIL and goes through the PIL transforms, exactly as with ``--decode pil``; what PIL cannot read either is
unreadable, as before. ``gpu`` (training only): the worker reads the JPEG's header, draws the crop and passes the
file's bytes on; the batch (an :class:`EncodedBatch`) is decoded on the device with one batched ``decode_jpeg`` and
each image cropped there (``util.images.device_images``).

The random draws are those of the PIL transforms, one for one: timm's ``RandomResizedCropAndInterpolation.get_params``
(python's ``random``) and then RandomHorizontalFlip's ``torch.rand(1) < p``. Under the per-sample seed
(util.rng.seeded_cpu_rng) every path gives a sample the same crop box and flip.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import Compose, InterpolationMode
from torchvision.transforms.v2 import functional as TF

from util.errors import UserError

JPEG_END = b"\xff\xd9"  # the end-of-image marker: a file cut short lacks it


def read_pil(data: bytes) -> Image.Image:
    """PIL's decoding in RGB, as torchvision's ImageFolder loader gives it (OSError or ValueError if unreadable)."""
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def jpeg_header(data: bytes) -> Image.Image | None:
    """The image in ``data`` opened by PIL without decoding (its header read) when it is a colour or greyscale JPEG
    (see :func:`decode_rgb`); None for other formats, CMYK and what PIL does not identify."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img if img.format == "JPEG" and img.mode in ("RGB", "L") else None
    except (OSError, ValueError):
        return None


def decode_rgb(data: bytes) -> torch.Tensor | Image.Image:
    """A colour or greyscale JPEG as decode_jpeg's uint8 [3, H, W] (greyscale repeated, as PIL's RGB conversion
    does); anything else (other formats, CMYK, a JPEG that decode_jpeg refuses) as PIL's RGB image (OSError or
    ValueError when PIL cannot read it either)."""
    try:
        pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # 1, 3 or 4 (CMYK) channels
    except (RuntimeError, ValueError):  # not a JPEG, or one libjpeg-turbo refuses (cut short): PIL has the last word
        return read_pil(data)
    return pixels.expand(3, -1, -1) if pixels.shape[0] in (1, 3) else read_pil(data)


@dataclass(frozen=True)
class Crop:
    """What the tensor path does to one decoded image [3, H, W]: in training, ``box`` (top, left, height, width)
    resized to ``size`` × ``size``, mirrored if ``flip``; in evaluation (no box), the shorter side resized to
    ``resize`` and the centre ``size`` × ``size`` kept. Bicubic with antialiasing, as PIL resizes."""

    size: int
    box: tuple[int, int, int, int] | None = None
    flip: bool = False
    resize: int = 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.box is None:
            image = TF.resize(image, [self.resize], InterpolationMode.BICUBIC, antialias=True)
            return TF.center_crop(image, [self.size, self.size])
        image = TF.resized_crop(image, *self.box, [self.size, self.size], InterpolationMode.BICUBIC, antialias=True)
        return TF.horizontal_flip(image) if self.flip else image


@dataclass(frozen=True)
class JpegFile:
    """A JPEG the device decodes (--decode gpu), in the worker: its bytes and its header (the size the crop needs)."""

    data: bytes
    header: Image.Image


@dataclass(frozen=True)
class EncodedImage:
    """A training sample of --decode gpu as it leaves the worker: the JPEG's bytes and the crop drawn for it."""

    data: bytes
    crop: Crop


class TensorCrop:
    """The tensor twin of timm's crop-only transform ``pil`` (training: RandomResizedCropAndInterpolation, then
    RandomHorizontalFlip; evaluation: Resize of the shorter side, then CenterCrop), with the same parameters and
    random draws. Datasets decode a sample's bytes with :meth:`decode` and pass the result to the transform.
    ``on_device``: JPEGs leave the worker undecoded (:class:`EncodedImage`)."""

    def __init__(self, pil: Compose, on_device: bool):
        self.pil, self.on_device = pil, on_device
        first, second = pil.transforms[:2]
        train = isinstance(first, RandomResizedCropAndInterpolation)
        self.random_crop, self.flip_p = (first, second.p) if train else (None, 0.0)
        self.fixed = None if train else Crop(second.size[0], resize=first.size)

    def decode(self, data: bytes) -> torch.Tensor | Image.Image | JpegFile:
        """``data`` as the transform takes it (see :func:`decode_rgb`); on the device path, a whole colour or
        greyscale JPEG stays encoded (one cut short is decoded here, where it can be named as unreadable)."""
        if self.on_device:
            header = jpeg_header(data)
            if header is not None and data.endswith(JPEG_END):
                return JpegFile(data, header)
        return decode_rgb(data)

    def draw(self, image: torch.Tensor | Image.Image) -> Crop:
        """The sample's crop, drawn as the PIL transform draws it (the same calls to python's random and torch's)."""
        if self.random_crop is None:
            return self.fixed
        box = self.random_crop.get_params(image, self.random_crop.scale, self.random_crop.ratio)
        return Crop(self.random_crop.size[0], box, bool(torch.rand(1) < self.flip_p))

    def __call__(self, image: torch.Tensor | Image.Image | JpegFile) -> torch.Tensor | EncodedImage:
        if isinstance(image, Image.Image):  # what PIL decoded takes the PIL path whole
            return self.pil(image)
        if isinstance(image, JpegFile):
            return EncodedImage(image.data, self.draw(image.header))
        return self.draw(image)(image)


def decode_for(transform: Callable, data: bytes) -> Any:
    """A sample's bytes decoded for ``transform``: by a :class:`TensorCrop` itself, else by PIL (RGB). Raises
    OSError or ValueError when the image is unreadable."""
    return transform.decode(data) if isinstance(transform, TensorCrop) else read_pil(data)


class EncodedBatch:
    """A --decode gpu batch: per sample an :class:`EncodedImage`, or the uint8 image the worker finished (what only
    PIL reads). :meth:`decode` gives the uint8 batch on a device."""

    def __init__(self, images: list[EncodedImage | torch.Tensor]):
        self.images = images

    def decode(self, device: torch.device) -> torch.Tensor:
        """[B, 3, size, size] uint8 on ``device``: the JPEGs decoded there in one decode_jpeg call, each cropped."""
        encoded = [x.data for x in self.images if isinstance(x, EncodedImage)]
        frames = iter(decode_jpegs(encoded, device) if encoded else [])
        return torch.stack([x.crop(next(frames)) if isinstance(x, EncodedImage) else x.to(device, non_blocking=True)
                            for x in self.images])


def decode_jpegs(data: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """The JPEGs in ``data`` decoded on ``device`` (one batched call), uint8 [3, H, W] each. If the device's decoder
    refuses the batch, each is decoded on the CPU as --decode fast decodes it and copied over."""
    try:
        return decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data],
                           mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    frames = []
    for d in data:
        try:
            frame = decode_rgb(d)
        except (OSError, ValueError) as e:
            raise UserError(f"a JPEG with a whole header and end marker does not decode ({type(e).__name__}: {e}); "
                            "--decode fast names and replaces such images") from None
        frames.append((frame if isinstance(frame, torch.Tensor) else TF.pil_to_tensor(frame)).to(device))
    return frames


def collate(batch: list[tuple]) -> Any:
    """The loaders' collate: default_collate, except that a batch holding an :class:`EncodedImage` becomes
    (:class:`EncodedBatch`, labels)."""
    if any(isinstance(sample[0], EncodedImage) for sample in batch):
        images, labels = zip(*batch)
        return EncodedBatch(list(images)), torch.tensor(labels)
    return default_collate(batch)
