"""What the monitors cost: the kNN monitor and the online probe as a share of a pretraining epoch.

    python -m benchmarks.monitor_cost                                   # every method's tiny preset, CPU
    python -m benchmarks.monitor_cost --models mae_vit_tiny xtra_vit_small_patch16 saim_vit_small_patch16
    python -m benchmarks.monitor_cost --models xtra_vit_base_patch16 --device cuda --batch_size 64

Per image, on random images: a training step (forward, backward, fused AdamW) and the monitors' feature pass
(the encoder in eval mode without gradients, pooled as the linear probe pools it), plus the online probe's own
step. The kNN monitor runs the feature pass on its training and validation images (at most 10,000 each by
default) once per monitored epoch; the online probe runs it, and its own step, on every training image, and its
epoch-end evaluation is that same pass over the kNN images (shared when both are on; the kNN share again when the
probe runs alone). The shares follow for a dataset of a given size: the embedded digits (1,438 training and 359
validation images) and ImageNet-1k (1,281,167 training images, kNN on 10,000 + 10,000).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import models
from engine_monitors import OnlineProbe, encoder_features
from models.stand_ins import stand_in_model, tiny_model_names
from util.train_loop import adamw, clip_gradients, optimizer_step

assert models  # importing the package registers every method

DATASETS = {"digits": (1438, 1438 + 359), "ImageNet-1k": (1_281_167, 20_000)}  # training images, kNN images


def seconds_per_image(step, images: torch.Tensor, repeats: int) -> float:
    step(images)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(images)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / len(images)


def measure(name: str, batch_size: int, repeats: int, device: torch.device) -> dict:
    model = stand_in_model(name).to(device)
    optimizer = adamw(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, model.config.input_size, model.config.input_size, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)

    def train(x: torch.Tensor) -> None:
        loss, _ = model(x)
        loss.backward()
        clip_gradients(list(model.parameters()), None, device)
        optimizer_step(optimizer)

    features = encoder_features(model, "off", device)
    probe = OnlineProbe(features, 10, 1e-3)
    return {"train": seconds_per_image(train, images, repeats),
            "features": seconds_per_image(features, images, repeats),
            "probe": seconds_per_image(lambda x: probe.step(x, labels), images, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=tiny_model_names("pretrain"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {args.device}, {torch.get_num_threads()} threads, batch {args.batch_size}, median of "
          f"{args.repeats}\n")
    names = [f"knn_{d}_% | probe_steps_{d}_%" for d in DATASETS]
    print(f"| model | train_ms_per_img | features_ms_per_img | probe_ms_per_img | {' | '.join(names)} |")
    print("|---|---|---|---|" + "---|---|" * len(DATASETS))
    for name in args.models:
        r = measure(name, args.batch_size, args.repeats, device)
        shares = []
        for train_images, knn_images in DATASETS.values():
            epoch = train_images * r["train"]
            shares += [f"{100 * knn_images * r['features'] / epoch:.2f}",
                       f"{100 * train_images * r['probe'] / epoch:.2f}"]
        print(f"| {name} | {1e3 * r['train']:.3f} | {1e3 * r['features']:.3f} | {1e3 * r['probe']:.3f} | "
              f"{' | '.join(shares)} |", flush=True)


if __name__ == "__main__":
    main()
