"""Images/s of the engine's training DataLoader alone (no model), e.g. CIFAR-10 at 224 px from memory.

The loader is built exactly as the engine builds it (``crossdistill.engine.loaders.build_train_loader``:
per-sample seeded augmentation, sharded resumable sampler, drop_last, pinned memory on CUDA) over
the dataset and transforms ``crossdistill.data.build_data`` gives (timm's RandomResizedCrop, flip,
ToTensor, Normalize on PIL images of an in-memory uint8 array dataset).

``--device-augment`` also times the engine's ``data.device_augment`` pipeline: workers ship the uint8
32x32 image and five crop numbers, the device crops, resizes, flips and normalises the batch.

``--uint8`` also times the variant the engine does not have yet: workers stop at uint8 tensors
(timm's ``create_transform(use_prefetcher=True)`` + ``fast_collate``, 4x fewer bytes through the
worker queues and the host-to-device copy) and the GPU converts and normalises (timm's
``PrefetchLoader``): the candidate if the float pipeline cannot keep up with the step.

    python benchmarks/loader_bench.py --root ../shared/data/cifar10_jpg.tar.gz --img-size 224 \\
        --batch-size 128 --workers 8 --batches 100 [--device cuda] [--uint8] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from crossdistill.config import DataConfig, ModelConfig
from crossdistill.data import build_data
from crossdistill.engine.loaders import build_train_loader
from crossdistill.engine.setup import student_data_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"


def _time_loader(loader, batches: int, warmup: int, device: torch.device, to_device) -> dict:
    """Seconds per batch (median over windows of 10) after ``warmup`` batches, and the overall rate."""
    it = iter(loader)
    for _ in range(warmup):
        to_device(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times, count, window = [], 0, time.perf_counter()
    start = window
    for i in range(batches):
        try:
            batch = next(it)
        except StopIteration:
            break
        to_device(batch)
        count += 1
        if count % 10 == 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            times.append((now - window) / 10)
            window = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    return {
        "batches": count,
        "s_per_batch_median": statistics.median(times) if times else total / max(count, 1),
        "overall_s": total,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root",
        default=os.environ.get("CROSSDISTILL_CIFAR10_TAR", str(DEFAULT_ROOT)),
        help="ImageFolder archive/directory (default: the shared CIFAR-10 JPEG tarball)",
    )
    parser.add_argument("--dataset", default="folder")
    parser.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="instead of --root: N random 32x32 uint8 images in memory (same cost per image)",
    )
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda: also copy each batch to it")
    parser.add_argument("--uint8", action="store_true", help="also time the uint8 + GPU-normalise variant")
    parser.add_argument(
        "--device-augment",
        action="store_true",
        help="also time the engine's data.device_augment pipeline (uint8 images and crop "
        "parameters from the workers; crop, resize, flip, normalise on the device)",
    )
    parser.add_argument("--student", default="resnet18", help="whose timm data config gives the defaults")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    t0 = time.perf_counter()
    if args.synthetic:
        from crossdistill.data.datasets import ArrayImageDataset
        from crossdistill.data.transforms import build_transforms

        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.synthetic, 32, 32, 3), dtype=np.uint8)
        train = ArrayImageDataset(images, rng.integers(0, 10, args.synthetic).tolist(), [str(i) for i in range(10)])
        cfg = DataConfig(dataset="synthetic", img_size=args.img_size)
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        train.transform, _ = build_transforms(cfg, student_data_config(ModelConfig(name=args.student)), mean, std)
        source = f"synthetic {args.synthetic} x 32x32 uint8"
    else:
        cfg = DataConfig(dataset=args.dataset, root=args.root, img_size=args.img_size, num_workers=args.workers)
        bundle = build_data(cfg, student_data_config(ModelConfig(name=args.student)))
        train, mean, std = bundle.train, bundle.mean, bundle.std
        source = args.root
    load_s = time.perf_counter() - t0
    pin = device.type == "cuda"

    def float_to_device(batch):
        return batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)

    _, sampler, generator, loader = build_train_loader(
        train, seed=0, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin
    )
    sampler.set_epoch(0)
    result = {
        "source": source,
        "images": len(train),
        "img_size": args.img_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": str(device),
        "cpus": os.cpu_count(),
        "dataset_load_s": load_s,
        "torch": torch.__version__,
    }
    timing = _time_loader(loader, args.batches, args.warmup, device, float_to_device)
    result["float"] = {**timing, "img_per_s": args.batch_size / timing["s_per_batch_median"]}

    if args.uint8:
        from timm.data import create_transform
        from timm.data.loader import PrefetchLoader, fast_collate

        train.transform = create_transform(
            (3, args.img_size, args.img_size),
            is_training=True,
            use_prefetcher=True,
            scale=cfg.scale,
            ratio=cfg.ratio,
            hflip=cfg.hflip,
            interpolation=cfg.train_interpolation,
        )
        train_set, sampler, generator, loader = build_train_loader(
            train, seed=0, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin
        )
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=args.workers,
            drop_last=True,
            pin_memory=pin,
            generator=generator,
            collate_fn=fast_collate,
        )
        if device.type == "cuda":
            loader = PrefetchLoader(loader, mean=mean, std=std, device=device)

            def noop(batch):
                return batch

            to_device = noop
        else:
            mean_t = torch.tensor(mean).view(1, 3, 1, 1) * 255
            std_t = torch.tensor(std).view(1, 3, 1, 1) * 255

            def to_device(batch):
                return (batch[0].float() - mean_t) / std_t, batch[1]

        timing = _time_loader(loader, args.batches, args.warmup, device, to_device)
        result["uint8_gpu_normalise"] = {**timing, "img_per_s": args.batch_size / timing["s_per_batch_median"]}

    if args.device_augment:
        from crossdistill.data.device_augment import CropParams, DeviceAugment

        train.transform = CropParams(cfg.scale, cfg.ratio, cfg.hflip)
        augment = DeviceAugment(args.img_size, mean, std)
        _, sampler, generator, loader = build_train_loader(
            train, seed=0, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin
        )
        sampler.set_epoch(0)

        def augment_on_device(batch):
            pixels, params = batch[0]
            images = augment(pixels.to(device, non_blocking=True), params.to(device, non_blocking=True))
            return images, batch[1].to(device, non_blocking=True)

        timing = _time_loader(loader, args.batches, args.warmup, device, augment_on_device)
        result["device_augment"] = {**timing, "img_per_s": args.batch_size / timing["s_per_batch_median"]}

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"loader: {source} ({len(train)} images) at {args.img_size} px, batch {args.batch_size}, "
            f"{args.workers} workers, to {device}"
        )
        for key in ("float", "uint8_gpu_normalise", "device_augment"):
            if key in result:
                print(f"  {key:<22} {result[key]['img_per_s']:10.1f} img/s  ({result[key]['batches']} batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
