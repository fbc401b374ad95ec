"""Sampling and feature-extraction speed on this machine's CPU.

Two comparisons, each measured in one process so that the ratios compare like with like:

1. images/s of DDIM with 50 steps against ancestral DDPM over all 1000 steps, for one UNet
   preset and one batch, plus DDIM-50 in the memory formats and precisions that may help
   (channels_last, bf16 autocast) against the plain fp32 baseline;
2. images/s of the two feature extractors: TF-FID Inception-v3 (images resized to 299) and
   the Fashion-MNIST classifier behind ``fd_fmnist``.

The ancestral sampler runs all 1000 steps unless ``--ancestral-steps`` cuts it short, in
which case its images/s is extrapolated from the measured steps (and says so). Run
``.venv/bin/python benchmarks/sample_speed.py --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from feddiffuse.shared.diffusion import DiffusionSchedule, ddim_sample, ddpm_sample, make_generator
from feddiffuse.shared.evaluation import FashionMNISTFeatures, Unavailable, inception_extractor
from feddiffuse.shared.model import build_unet, get_preset


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def load_line() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


VARIANTS = (("DDIM-50 fp32", False, False),
            ("DDIM-50 fp32 channels_last", True, False),
            ("DDIM-50 bf16 autocast", False, True),
            ("DDIM-50 bf16 + channels_last", True, True))


def sampler_speeds(preset: str, batch: int, ancestral_steps: int, repeats: int) -> list[dict]:
    """DDIM-50 variants interleaved (order rotated each round; medians), then ancestral."""
    model = build_unet(get_preset(preset), seed=0).eval()
    schedule = DiffusionSchedule.linear()
    cfg = model.config
    shape = (batch, cfg.channels, cfg.image_size, cfg.image_size)

    def ddim(channels_last: bool, bf16: bool, steps: int = 50) -> float:
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        amp = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
               else contextlib.nullcontext())
        with amp:
            return timed(lambda: ddim_sample(model, schedule, shape, make_generator(1),
                                             steps=steps))

    for _, cl, bf16 in VARIANTS:  # warm-up: oneDNN builds its kernels on first use
        ddim(cl, bf16, steps=2)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in VARIANTS}
    for r in range(repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        this_round = {name: ddim(cl, bf16) for name, cl, bf16 in order}
        for name, value in this_round.items():
            seconds[name].append(value)
            ratios[name].append(this_round[VARIANTS[0][0]] / value)
    rows = [{"sampler": name, "steps": 50, "seconds": statistics.median(seconds[name]),
             "images_per_s": batch / statistics.median(seconds[name]),
             "speedup": statistics.median(ratios[name]),
             "speedup_range": [min(ratios[name]), max(ratios[name])], "extrapolated": False}
            for name, _, _ in VARIANTS]
    model.to(memory_format=torch.contiguous_format)
    total = schedule.timesteps
    measured = min(ancestral_steps, total)

    class Enough(Exception):
        pass

    def stop(step: int, _total: int) -> None:
        if step >= measured:
            raise Enough

    started = time.perf_counter()
    with contextlib.suppress(Enough):
        ddpm_sample(model, schedule, shape, make_generator(2), on_step=stop)
    elapsed = (time.perf_counter() - started) * total / measured
    rows.append({"sampler": f"ancestral DDPM-{total} fp32", "steps": total, "seconds": elapsed,
                 "images_per_s": batch / elapsed, "speedup": rows[0]["seconds"] / elapsed,
                 "extrapolated": measured < total, "measured_steps": measured})
    return rows


def feature_speeds(inception_images: int, domain_images: int) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    domain = FashionMNISTFeatures()
    images = torch.randint(0, 256, (domain_images, 1, 28, 28), dtype=torch.uint8, generator=g)
    domain.extract(images[:200])  # warm-up
    seconds = timed(lambda: domain.extract(images))
    rows.append({"features": "fmnist classifier (128-d)", "images": domain_images,
                 "seconds": seconds, "images_per_s": domain_images / seconds})
    inception = inception_extractor()
    if isinstance(inception, Unavailable):
        rows.append({"features": "Inception-v3 (2048-d)", "unavailable": inception.reason})
        return rows
    small = images[:inception_images]
    inception.extract(small[:2])  # warm-up
    seconds = timed(lambda: inception.extract(small))
    rows.append({"features": "Inception-v3 (2048-d, 299x299)", "images": inception_images,
                 "seconds": seconds, "images_per_s": inception_images / seconds})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="UNet preset (default tiny)")
    parser.add_argument("--batch", type=int, default=100, help="images per sampling batch")
    parser.add_argument("--ancestral-steps", type=int, default=1000,
                        help="measure this many of the 1000 ancestral steps, extrapolate")
    parser.add_argument("--inception-images", type=int, default=100)
    parser.add_argument("--domain-images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds over the DDIM variants (medians)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes for a smoke run (batch 16, 50 ancestral steps)")
    parser.add_argument("--json", dest="json_path", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.ancestral_steps, args.repeats = 16, 50, 1
        args.inception_images, args.domain_images = 10, 1000
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, Python {platform.python_version()}, "
          f"{args.threads} thread(s), {load_line()} at start")
    samplers = sampler_speeds(args.preset, args.batch, args.ancestral_steps, args.repeats)
    base = samplers[0]["images_per_s"]
    print(f"\nSampling, preset {args.preset}, batch {args.batch}, medians of {args.repeats} "
          "interleaved round(s) (untrained weights: speed does not depend on them)")
    for r in samplers:
        spread = (f" [{r['speedup_range'][0]:.2f}-{r['speedup_range'][1]:.2f}]"
                  if "speedup_range" in r else "")
        note = (f"  (extrapolated from {r['measured_steps']} steps)" if r["extrapolated"]
                else "")
        print(f"  {r['sampler']:<30} {r['images_per_s']:8.2f} images/s  "
              f"{r['speedup']:6.3f}x DDIM-50 fp32{spread}{note}")
    ancestral = samplers[-1]["images_per_s"]
    print(f"  DDIM-50 fp32 is {base / ancestral:.1f}x faster than 1000-step ancestral sampling")
    features = feature_speeds(args.inception_images, args.domain_images)
    print("\nFeature extraction (uint8 28x28 grey images in, batched, inference mode)")
    for r in features:
        if "unavailable" in r:
            print(f"  {r['features']:<32} unavailable: {r['unavailable']}")
        else:
            print(f"  {r['features']:<32} {r['images_per_s']:9.1f} images/s")
    if len(features) == 2 and "unavailable" not in features[1]:
        ratio = features[0]["images_per_s"] / features[1]["images_per_s"]
        print(f"  the domain features are {ratio:.0f}x faster than Inception")
    print(f"\n{load_line()} at the end")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"samplers": samplers, "features": features, "threads": args.threads},
                      f, indent=2)


if __name__ == "__main__":
    main()
