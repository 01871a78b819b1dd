"""Write an ImageFolder (train/, val/) or the embedded digits as WebDataset tar shards that --data_path reads.

    python -m util.make_shards /datasets/imagenet /datasets/imagenet_shards --workers 32
    python -m util.make_shards --dataset digits out/digits_shards --samples_per_shard 200

OUT/<split>/shard-NNNNNN.tar holds ``--samples_per_shard`` consecutive images of the sorted ImageFolder listing,
each as ``<key>.<ext>`` (the file's bytes as they are: JPEGs are not re-encoded; the digits are encoded once as
PNG at ``--digits_size``) and ``<key>.cls`` (the class index), ``<key>`` being the image's number in the listing.
OUT/<split>/index.json, written last, lists the shards with their sample counts, the class names and the images
that were skipped because they do not decode (each is also named on stderr). Shards are written by ``--workers``
processes, each to a temporary name renamed once complete: a killed conversion rerun with the same command keeps
the finished shards and writes the rest, and no half-written shard is ever listed.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Sequence

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm
from webdataset import TarWriter

from util.checkpoint import save_json_atomic
from util.config import check_writable_dir
from util.errors import UserError, run_cli
from util.shards import INDEX

SPLITS = ("train", "val")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m util.make_shards", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("source", nargs="?", default="", help="ImageFolder root with train/ and val/")
    parser.add_argument("output", help="where OUT/train and OUT/val go")
    parser.add_argument("--dataset", choices=("imagefolder", "digits"), default="imagefolder")
    parser.add_argument("--samples_per_shard", type=int, default=1000,
                        help="images per shard (1000 ImageNet JPEGs: about 110 MB)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="writing processes")
    parser.add_argument("--digits_size", type=int, default=32, help="side of the digits, as --input_size reads them")
    return parser


def listing(source: str, split: str, digits_size: int) -> tuple[list[str], list[tuple[str, object, int]]]:
    """(class names, [(key, path or encoded bytes, label)]) of one split of an ImageFolder root, or of the digits
    (``source`` ''), in a fixed order."""
    if not source:
        from util.datasets import DigitsDataset  # lazily: the digits need scikit-learn

        digits = DigitsDataset(split, digits_size)
        items = []
        for i, (image, label) in enumerate(digits):
            encoded = io.BytesIO()
            image.save(encoded, format="PNG")
            items.append((f"{i:09d}", encoded.getvalue(), label))
        return digits.classes, items
    root = os.path.join(source, split)
    classes, class_to_idx = find_classes(root)
    samples = make_dataset(root, class_to_idx, extensions=IMG_EXTENSIONS)
    return classes, [(f"{i:09d}", path, label) for i, (path, label) in enumerate(samples)]


def write_shard(job: tuple[str, int, list]) -> tuple[int, int, list[str]]:
    """Write one shard (to a temporary name, then renamed with its record); returns (shard, written, skipped)."""
    directory, k, items = job
    final = os.path.join(directory, f"shard-{k:06d}.tar")
    record = final.removesuffix(".tar") + ".json"
    if os.path.isfile(final) and os.path.isfile(record):  # written by an earlier run of the same conversion
        with open(record) as f:
            done = json.load(f)
        return k, done["samples"], done["skipped"]
    written, skipped = 0, []
    tmp = f"{final}.tmp.{os.getpid()}"
    with TarWriter(tmp, encoder=False, mtime=0) as sink:
        for key, source, label in items:
            try:
                data = Path(source).read_bytes() if isinstance(source, str) else source
                with Image.open(io.BytesIO(data)) as image:
                    image.convert("RGB")  # what training does: a file that fails here is skipped
                ext = Path(source).suffix.lower().lstrip(".") if isinstance(source, str) else "png"
            except (OSError, ValueError) as e:
                skipped.append(str(source) if isinstance(source, str) else key)
                print(f"warning: skipped unreadable image {skipped[-1]} ({type(e).__name__}: {e})", file=sys.stderr,
                      flush=True)
                continue
            sink.write({"__key__": key, ext: data, "cls": str(label).encode()})
            written += 1
    save_json_atomic({"samples": written, "skipped": skipped}, record)
    os.replace(tmp, final)
    return k, written, skipped


def convert(source: str, output: str, split: str, samples_per_shard: int, digits_size: int, pool) -> None:
    """One split of ``source`` (an ImageFolder root; '': the digits) as shards under ``output``/``split``."""
    classes, items = listing(source, split, digits_size)
    if not items:
        raise UserError(f"no images found for the {split} split of {source or 'the digits'}")
    directory = os.path.join(output, split)
    os.makedirs(directory, exist_ok=True)
    S = samples_per_shard
    conversion = {"source": os.path.abspath(source) if source else "digits", "images": len(items),
                  "samples_per_shard": S}
    marker = os.path.join(directory, "conversion.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) != conversion:
                raise UserError(f"{directory} holds another conversion ({marker}); use another output folder")
    save_json_atomic(conversion, marker)
    for tmp in Path(directory).glob("*.tmp.*"):  # what a killed run left half-written
        tmp.unlink()
    jobs = [(directory, k, items[start:start + S]) for k, start in enumerate(range(0, len(items), S))]
    shards = {}
    with tqdm(total=len(items), unit="img", desc=split, file=sys.stderr) as bar:
        for k, written, skipped in pool.imap_unordered(write_shard, jobs):
            shards[k] = (written, skipped)
            bar.update(len(jobs[k][2]))
    skipped = [name for k in sorted(shards) for name in shards[k][1]]
    save_json_atomic({"format": "webdataset", "classes": classes, "samples": sum(w for w, _ in shards.values()),
                      "shards": [{"name": f"shard-{k:06d}.tar", "samples": shards[k][0]} for k in sorted(shards)],
                      "skipped": skipped}, os.path.join(directory, INDEX))
    print(f"{split}: {sum(w for w, _ in shards.values())} images in {len(shards)} shards under {directory}"
          + (f"; skipped {len(skipped)} unreadable" if skipped else ""), flush=True)


def main(argv: Sequence[str]) -> None:
    flags = get_parser().parse_args(argv)
    if flags.samples_per_shard < 1 or flags.workers < 1:
        raise UserError(f"--samples_per_shard and --workers must be at least 1, got {flags.samples_per_shard} and "
                        f"{flags.workers}")
    source = flags.source if flags.dataset == "imagefolder" else ""
    if flags.dataset == "imagefolder":
        missing = [s for s in SPLITS if not os.path.isdir(os.path.join(source, s))]
        if not source or missing:
            raise UserError(f"the source must be an ImageFolder root with {' and '.join(SPLITS)} folders; "
                            f"not found: {os.path.join(source or '(none given)', missing[0] if missing else '')}")
    try:  # before any image is listed or decoded
        for split in SPLITS:
            check_writable_dir(os.path.join(flags.output, split), "the output folder")
    except ValueError as e:
        raise UserError(str(e)) from None
    with multiprocessing.get_context("spawn").Pool(flags.workers) as pool:
        for split in SPLITS:
            convert(source, flags.output, split, flags.samples_per_shard, flags.digits_size, pool)


if __name__ == "__main__":
    run_cli(main)
