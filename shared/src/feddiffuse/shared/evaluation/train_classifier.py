"""Train the Fashion-MNIST feature classifier deterministically and write its weights.

    python -m feddiffuse.shared.evaluation.train_classifier --out PATH [--epochs 10]

Same seed, same torch version and same thread count give the same bytes: every random draw
comes from seeded generators, deterministic algorithms are enforced, and the data order is
drawn up front. The weights are stored as fp16 safetensors (half the size; the accuracy is
measured after that rounding). The script prints the sha256 and the test accuracy to record
in ``fmnist_classifier.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save
from torch.nn import functional as F

from ..data import load_fashion_mnist
from ..wire import atomic_write_bytes, sha256_hex
from .fmnist_classifier import FashionMNISTClassifier

SEED = 2024
THREADS = 1  # also the fastest on a shared 2-core machine


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips per image and one random shift of up to 2 pixels per batch."""
    flip = torch.rand(batch.shape[0], generator=generator) < 0.5
    batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    padded = F.pad(batch, (2, 2, 2, 2), value=float(batch.min()))
    h, w = batch.shape[-2:]
    return padded[..., 2 + dy:2 + dy + h, 2 + dx:2 + dx + w].contiguous()


@torch.inference_mode()
def accuracy(model: FashionMNISTClassifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        x = FashionMNISTClassifier.prepare(images[start:start + batch_size])
        correct += int((model(x).argmax(1) == labels[start:start + batch_size]).sum())
    return correct / images.shape[0]


def train(epochs: int = 10, batch_size: int = 128, lr: float = 2e-3, seed: int = SEED,
          max_steps: int | None = None, log=print) -> FashionMNISTClassifier:
    """Train on the 60,000 training images; `max_steps` cuts it short (for tests)."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    train_set = load_fashion_mnist("train")
    x_all = FashionMNISTClassifier.prepare(train_set.images)
    y_all = train_set.labels
    model = FashionMNISTClassifier()
    steps_per_epoch = math.ceil(x_all.shape[0] / batch_size)
    total = epochs * steps_per_epoch if max_steps is None else min(max_steps,
                                                                   epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    generator = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(x_all.shape[0], generator=generator)
        started, loss_sum = time.perf_counter(), 0.0
        for i in range(steps_per_epoch):
            if step >= total:
                return model.eval()
            idx = order[i * batch_size:(i + 1) * batch_size]
            x = augment(x_all.index_select(0, idx), generator)
            loss = F.cross_entropy(model(x), y_all.index_select(0, idx), label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach())
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / steps_per_epoch:.4f} "
            f"({x_all.shape[0] / (time.perf_counter() - started):.0f} img/s)")
    return model.eval()


def to_fp16_bytes(model: FashionMNISTClassifier, metadata: dict[str, str]) -> bytes:
    state = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    return st_save(state, metadata=metadata)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the weights")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    model = train(epochs=args.epochs, seed=args.seed)
    # One metadata key: safetensors writes several keys in a random order, which would
    # change the file's bytes (and hash) from run to run.
    recipe = {"epochs": args.epochs, "seed": args.seed, "threads": THREADS,
              "torch": torch.__version__}
    data = to_fp16_bytes(model, {"feddiffuse.fmnist_classifier": json.dumps(recipe,
                                                                             sort_keys=True)})
    # Measure the accuracy of exactly what ships: the fp16 weights read back.
    from .fmnist_classifier import load_classifier

    buffer_path = args.out.with_suffix(".tmp-check")
    atomic_write_bytes(buffer_path, data)
    shipped = load_classifier(buffer_path, check_hash=False)
    buffer_path.unlink()
    test = load_fashion_mnist("test")
    acc = accuracy(shipped, test.images, test.labels)
    atomic_write_bytes(args.out, data)
    print(json.dumps({"path": str(args.out), "bytes": len(data), "sha256": sha256_hex(data),
                      "test_accuracy": round(acc, 4), "epochs": args.epochs, "seed": args.seed,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
