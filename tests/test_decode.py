"""--decode: JPEGs decoded by torchvision.io.decode_jpeg and cropped as uint8 tensors (fast), or decoded and cropped
in batches on the device (gpu, tested through its CPU twin), against the PIL path: the same crop boxes and flips for
the same seeds, the pixel difference of the resampling, the fallbacks to PIL and the unreadable images."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TVF
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from benchmarks.decode_difference import difference_counts, photos
from tests.helpers import FAST, one_error_line, read_log, run_script
from util import decoding
from util.config import checkpoint_layer
from util.datasets import build_dataset, build_loader, build_transform
from util.decoding import Crop, EncodedBatch, EncodedImage, JpegFile, decode_rgb, read_pil
from util.errors import UserError
from util.rng import seeded_cpu_rng


def _jpeg(width: int, height: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A smooth random colour field with noise (JPEG-like content), encoded as ``fmt`` in ``mode``."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.clip(np.asarray(coarse, float) + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format=fmt, quality=90)
    return out.getvalue()


def _pil_crops(monkeypatch, transform, image: Image.Image, seeds) -> list[tuple]:
    """(box, flipped) of each seed as the PIL transform applies them (torchvision's functional ops, recorded)."""
    applied = []
    resized_crop, hflip = TVF.resized_crop, TVF.hflip
    monkeypatch.setattr(TVF, "resized_crop", lambda img, *box, **kw: applied.append([box[:4], False]) or
                        resized_crop(img, *box, **kw))
    monkeypatch.setattr(TVF, "hflip", lambda img: applied[-1].__setitem__(1, True) or hflip(img))
    for seed in seeds:
        with seeded_cpu_rng(seed):
            transform(image)
    monkeypatch.undo()
    return [(tuple(box), flipped) for box, flipped in applied]


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0), (0.9, 1.0)])
def test_the_tensor_paths_crop_and_flip_as_the_pil_path_for_the_same_seeds(monkeypatch, scale):
    """300 seeds on four image shapes (a panorama and a tall strip reach timm's central fallback crop): the fast path
    and the device path's worker draw the PIL transform's boxes and flips, from the same RNG calls (the RNGs end in
    the same state)."""
    pil = build_transform(32, True, scale, decode="pil")
    fast = build_transform(32, True, scale, decode="fast")
    gpu = build_transform(32, True, scale, decode="gpu")
    seeds, boxes = range(300), set()
    for width, height in ((500, 375), (375, 500), (640, 60), (40, 300)):
        data = _jpeg(width, height)
        expected = _pil_crops(monkeypatch, pil, read_pil(data), seeds)
        pixels, header = fast.decode(data), gpu.decode(data)
        assert isinstance(pixels, torch.Tensor) and isinstance(header, JpegFile)
        for seed, (box, flipped) in zip(seeds, expected):
            with seeded_cpu_rng(seed):
                crop = fast.draw(pixels)
                after = torch.rand(1)
            with seeded_cpu_rng(seed):
                sample = gpu(header)
                assert torch.equal(torch.rand(1), after)
            assert (crop.box, crop.flip) == (box, flipped) and sample.crop == crop
        assert {flipped for _, flipped in expected} == {False, True}
        boxes |= {box for box, _ in expected}
    assert len(boxes) > 300


def test_the_fast_crop_is_the_pil_crop_within_the_resampling_difference():
    """scikit-learn's two sample photographs (640 × 427): decode_jpeg's pixels are PIL's, and on 60 training crops of
    224 px torchvision's antialiased bicubic resampling on uint8 differs from PIL's by at most 10 levels, 0.03 on
    average, in fewer than 0.1 % of the values by more than 1; the evaluation crops by at most 2. A crop box one
    pixel off would differ far more."""
    for data in photos():
        assert torch.equal(decode_rgb(data), TVF.pil_to_tensor(read_pil(data)))
    counts = difference_counts(224, True, 60)
    assert np.flatnonzero(counts).max() <= 10 and counts[2:].sum() < 1e-3 * counts.sum()
    assert (counts * np.arange(256)).sum() < 0.03 * counts.sum()
    assert np.flatnonzero(difference_counts(224, False, 2)).max() <= 2
    frame = decode_rgb(photos()[0])
    one_off = Crop(224, (1, 0, 400, 600))(frame).int() - Crop(224, (0, 0, 400, 600))(frame).int()
    assert one_off.abs().float().mean() > 1


@pytest.mark.parametrize("size, crop_pct", [(224, None), (224, 1.0), (32, 0.9)])
def test_the_evaluation_crop_is_the_centre_of_the_resized_image(size, crop_pct):
    """Resize of the shorter side to floor(size / crop_pct), then the centre size × size, on odd and even shapes
    both ways round: within two levels of PIL's, the exact centre of the resized image."""
    pil = build_transform(size, False, crop_pct=crop_pct, decode="pil")
    fast = build_transform(size, False, crop_pct=crop_pct, decode="fast")
    assert build_transform(size, False, crop_pct=crop_pct, decode="gpu").on_device is False  # evaluation: the CPU
    for width, height in ((500, 375), (375, 500), (333, 501), (260, 257)):
        data = _jpeg(width, height, seed=width)
        expected, ours = pil(read_pil(data)), fast(fast.decode(data))
        assert ours.shape == expected.shape == (3, size, size) and ours.dtype == torch.uint8
        assert (ours.int() - expected.int()).abs().max() <= 2
        resized = fast.fixed.resize
        assert resized == int(size / (crop_pct or 0.875))
        short = TF.resize(decode_rgb(data), [resized], TF.InterpolationMode.BICUBIC, antialias=True)
        h, w = short.shape[-2:]
        top, left = round((h - size) / 2), round((w - size) / 2)
        assert torch.equal(ours, short[:, top:top + size, left:left + size])


def test_what_decode_jpeg_does_not_read_like_pil_goes_through_pil(monkeypatch):
    """Greyscale JPEGs: decode_jpeg, equal to PIL's RGB conversion. PNG, CMYK JPEG, a JPEG that decode_jpeg refuses:
    PIL, and then the PIL transforms whole (their output equals --decode pil's). A truncated JPEG: unreadable
    (OSError) on every path; on the device path it is decoded in the worker, where it can be named."""
    pil, fast, gpu = (build_transform(32, True, decode=d) for d in ("pil", "fast", "gpu"))
    grey = _jpeg(60, 50, mode="L")
    assert torch.equal(decode_rgb(grey), TVF.pil_to_tensor(read_pil(grey)))
    assert isinstance(gpu.decode(grey), JpegFile)
    with seeded_cpu_rng(1):
        ours = fast(fast.decode(grey))
    with seeded_cpu_rng(1):
        assert (ours.int() - pil(read_pil(grey)).int()).abs().max() <= 10
    for data in (_jpeg(60, 50, fmt="PNG"), _jpeg(60, 50, mode="CMYK")):
        for transform in (fast, gpu):
            assert isinstance(transform.decode(data), Image.Image)
            with seeded_cpu_rng(1):
                ours = transform(transform.decode(data))
            with seeded_cpu_rng(1):
                assert torch.equal(ours, pil(read_pil(data)))
    data = _jpeg(60, 50)
    refused = decoding.decode_jpeg
    monkeypatch.setattr(decoding, "decode_jpeg", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("refused")))
    assert isinstance(fast.decode(data), Image.Image)
    monkeypatch.setattr(decoding, "decode_jpeg", refused)
    for transform in (pil, fast, gpu):
        with pytest.raises(OSError):
            decoding.decode_for(transform, data[: len(data) // 2])


def _folder(root, n: int = 24, bad: bool = False) -> None:
    """n JPEGs of 40 × 36 in 2 classes per split, plus a greyscale JPEG and a PNG; ``bad``: one truncated JPEG in each
    split."""
    for split in ("train", "val"):
        for i in range(n):
            folder = root / split / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.jpg").write_bytes(_jpeg(40, 36, seed=i))
        (root / split / "class0" / "png.png").write_bytes(_jpeg(40, 36, seed=99, fmt="PNG"))
        (root / split / "class1" / "grey.jpg").write_bytes(_jpeg(40, 36, seed=98, mode="L"))
        if bad:
            data = _jpeg(40, 36, seed=7)
            (root / split / "class1" / "cut.jpg").write_bytes(data[: len(data) // 2])


def _batches(root, decode: str, workers: int, start: int = 0, train: bool = True) -> list:
    dataset = build_dataset("imagefolder", "train" if train else "val", build_transform(16, train, decode=decode), 16,
                            str(root))
    loader = build_loader(dataset, 5, workers, is_train=train, seed=3)
    if train:
        loader.sampler.set_epoch(2, start)
    return list(loader)


def test_the_device_path_on_the_cpu_gives_the_fast_paths_batches(tmp_path, monkeypatch):
    """--decode gpu's CPU twin: the workers pass JPEG bytes and crops (the PNG decoded and cropped there), the
    batch is decoded in one decode_jpeg call and cropped: the fast path's batches, bit for bit, with or without
    workers. When the device's decoder refuses a batch, each JPEG is decoded alone; one that does not decode at all
    is one error line."""
    _folder(tmp_path)
    fast = _batches(tmp_path, "fast", 0)
    for workers in (0, 2):
        encoded = _batches(tmp_path, "gpu", workers)
        assert all(isinstance(images, EncodedBatch) for images, _ in encoded)
        assert any(isinstance(x, torch.Tensor) for images, _ in encoded for x in images.images)  # the PNG
        for (images, labels), (expected, expected_labels) in zip(encoded, fast, strict=True):
            assert torch.equal(images.decode(torch.device("cpu")), expected) and torch.equal(labels, expected_labels)
    images = encoded[0][0]
    batched = decoding.decode_jpeg
    monkeypatch.setattr(decoding, "decode_jpeg", lambda data, **kw: batched(data, **kw) if torch.is_tensor(data) else
                        (_ for _ in ()).throw(RuntimeError("refused")))
    assert torch.equal(images.decode(torch.device("cpu")), fast[0][0])
    crop = next(x.crop for x in images.images if isinstance(x, EncodedImage))
    broken = EncodedBatch([EncodedImage(b"\xff\xd8" + b"\x00" * 64 + decoding.JPEG_END, crop)])
    with pytest.raises(UserError, match="--decode fast"):
        broken.decode(torch.device("cpu"))


def test_the_fast_paths_batches_do_not_depend_on_workers_or_where_the_epoch_starts(tmp_path):
    """What exact resume needs: each sample's crop comes from its own seed, whichever process decodes it."""
    _folder(tmp_path)
    plain, workers, later = _batches(tmp_path, "fast", 0), _batches(tmp_path, "fast", 2), \
        _batches(tmp_path, "fast", 0, start=2 * 5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, workers, strict=True))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain[2:], later, strict=True))
    pil = _batches(tmp_path, "pil", 0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, pil, strict=True))
    assert all((a[0].int() - b[0].int()).abs().max() <= 10 for a, b in zip(plain, pil))


def test_unreadable_jpegs_are_named_once_and_replaced_or_left_out_as_before(tmp_path, capfd):
    _folder(tmp_path, n=8, bad=True)
    for decode in ("fast", "gpu"):
        train = _batches(tmp_path, decode, 0)
        assert sum(len(labels) for _, labels in train) == 10  # 10 readable and 1 replaced, whole batches of 5
        val = [label for _, labels in _batches(tmp_path, decode, 0, train=False) for label in labels.tolist()]
        assert val.count(-1) == 1 and len(val) == 11
    err = capfd.readouterr().err
    for split in ("train", "val"):
        assert err.count(f"unreadable image {tmp_path / split / 'class1' / 'cut.jpg'}") == 2  # once per dataset


def test_pretraining_trains_with_either_decode_and_gpu_without_cuda_is_one_error_line(tmp_path):
    _folder(tmp_path / "data", n=40)
    flags = ["--model", "mae_vit_tiny", *FAST, "--dataset", "imagefolder", "--data_path", tmp_path / "data",
             "--epochs", "1", "--batch_size", "8"]
    losses = {}
    for decode in ("pil", None):
        out = tmp_path / str(decode)
        proc = run_script("main_pretrain.py", *flags, *(["--decode", decode] if decode else []), "--output_dir", out)
        assert re.search(rf"decode +\= '{decode or 'fast'}'", proc.stdout)
        losses[decode] = read_log(out)[0]["train_loss"]
        assert np.isfinite(losses[decode])
    assert losses["pil"] != losses[None]  # other pixels (the resampling), the same crops
    proc = run_script("main_pretrain.py", *flags, "--decode", "gpu", "--output_dir", tmp_path / "gpu", check=False)
    assert one_error_line(proc).startswith("error: --decode gpu")
    assert not (tmp_path / "gpu").exists()


def test_a_checkpoint_without_decode_resumes_on_the_pil_path():
    assert checkpoint_layer({"epochs": 3}) == ("checkpoint", {"decode": "pil", "epochs": 3})
    assert checkpoint_layer({"decode": "fast", "device": "cpu"}) == ("checkpoint", {"decode": "fast"})
    assert checkpoint_layer(None) == ("checkpoint", {})
