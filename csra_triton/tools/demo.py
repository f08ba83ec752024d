"""A small multi-label problem for examples and demos: synthetic shapes, a CNN trunk, training, mAP.

``make_shapes(n)`` draws images with 1-3 coloured shapes (circle, square, triangle, cross, ring)
at random places and sizes on a noisy background with small blobs of clutter; the label is the set
of shapes present, and each
shape's bounding box is kept (the attention-map demo measures how much attention falls inside it).
Everything is generated in code: no download, no torchvision.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
from torch import Tensor, nn

from .. import ops
from ..module import CSRATriton

CLASSES = ("circle", "square", "triangle", "cross", "ring")


def cpu_backend(t: Tensor):
    """The PyTorch fallback for CPU tensors even where TRITON_INTERPRET=1 is set (the tests set
    it): interpreting the kernels through a training loop would take hours."""
    return ops.use_backend("torch" if t.device.type == "cpu" else "auto")


@dataclasses.dataclass
class Shapes:
    images: Tensor                # (n, 3, size, size) float32 in [0, 1]
    labels: Tensor                # (n, len(CLASSES)) float32 multi-hot
    boxes: list                   # per image: [(class, x0, y0, x1, y1)], inclusive pixel bounds


def _mask(kind: str, size: int, cx: float, cy: float, r: float) -> Tensor:
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    dx, dy = xx - cx, yy - cy
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    if kind == "triangle":  # apex up
        return (dy <= r * 0.8) & (dy >= -r) & (dx.abs() <= (dy + r) * 0.6)
    if kind == "cross":
        arm = r * 0.3
        return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))
    if kind == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def make_shapes(n: int, size: int = 32, seed: int = 0, clutter: int = 6,
                radius: tuple = (0.09, 0.16)) -> Shapes:
    """``clutter`` small blobs of random colour (no class) per image; shape radii are drawn as
    fractions of ``size`` from ``radius``."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=gen) * 0.25
    labels = torch.zeros(n, len(CLASSES))
    boxes = []
    for i in range(n):
        for _ in range(clutter):
            x0, y0 = torch.randint(0, size - 3, (2,), generator=gen).tolist()
            w, h = torch.randint(1, 4, (2,), generator=gen).tolist()
            images[i, :, y0:y0 + h, x0:x0 + w] = torch.rand(3, 1, 1, generator=gen) * 0.7 + 0.3
        k = int(torch.randint(1, 4, (1,), generator=gen))
        kinds = torch.randperm(len(CLASSES), generator=gen)[:k].tolist()
        img_boxes = []
        for c in kinds:
            r = float(torch.empty(1).uniform_(size * radius[0], size * radius[1], generator=gen))
            cx, cy = (float(torch.empty(1).uniform_(r, size - 1 - r, generator=gen))
                      for _ in range(2))
            m = _mask(CLASSES[c], size, cx, cy, r)
            colour = torch.rand(3, generator=gen) * 0.7 + 0.3
            images[i][:, m] = colour[:, None]
            ys, xs = m.nonzero(as_tuple=True)
            img_boxes.append((c, int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
            labels[i, c] = 1.0
        boxes.append(img_boxes)
    return Shapes(images, labels, boxes)


def trunk(width: int = 64) -> nn.Sequential:
    """A small CNN: (B, 3, S, S) -> (B, width, S/4, S/4) feature maps."""
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2),
                         *block(32, width))


class GapLinear(nn.Module):
    """The usual head: global average pooling and a linear classifier."""

    def __init__(self, in_ch: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(in_ch, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class Classifier(nn.Module):
    def __init__(self, head: str = "csra", width: int = 64, heads: int = 4, lam: float = 0.1):
        super().__init__()
        self.trunk = trunk(width)
        self.head = (CSRATriton(width, len(CLASSES), heads=heads, lam=lam) if head == "csra"
                     else GapLinear(width, len(CLASSES)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x))


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Per-class AP: the mean, over positives, of the precision at each positive's rank."""
    order = scores.argsort(dim=0, descending=True)
    hits = labels.gather(0, order)
    ranks = torch.arange(1, len(scores) + 1, dtype=torch.float32)[:, None]
    precision = hits.cumsum(0) / ranks
    return (precision * hits).sum(0) / hits.sum(0).clamp_min(1)


def train(model: Classifier, data: Shapes, epochs: int = 12, batch: int = 64, lr: float = 0.02,
          seed: int = 0, log=None) -> float:
    """SGD with momentum, cosine schedule, the official recipe's 10x learning rate on the head.
    Returns seconds spent."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([{"params": model.trunk.parameters(), "lr": lr},
                           {"params": model.head.parameters(), "lr": 10 * lr}],
                          momentum=0.9, weight_decay=1e-4)
    steps = epochs * math.ceil(len(data.images) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, 10 * lr], total_steps=steps,
                                                pct_start=0.15)
    loss_fn = nn.BCEWithLogitsLoss()
    t0 = time.perf_counter()
    model.train()
    with cpu_backend(data.images):
        _epochs(model, data, epochs, batch, opt, sched, loss_fn, log)
    return time.perf_counter() - t0


def _epochs(model, data, epochs, batch, opt, sched, loss_fn, log):
    from .progress import progress

    for epoch in progress(range(epochs), "train", unit="epoch"):
        perm = torch.randperm(len(data.images))
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = data.images[idx]
            if torch.rand(()) < 0.5:  # horizontal flip: shapes are symmetric, labels unchanged
                x = x.flip(3)
            loss = loss_fn(model(x), data.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if log:
            log(f"  epoch {epoch + 1}/{epochs}: loss {total / len(perm):.4f}")


@torch.no_grad()
def evaluate(model: Classifier, data: Shapes, batch: int = 256) -> float:
    """mAP (%) over the classes."""
    model.eval()
    with cpu_backend(data.images):
        scores = torch.cat([model(data.images[i:i + batch]).float()
                            for i in range(0, len(data.images), batch)])
    return 100.0 * average_precision(scores, data.labels).mean().item()


def in_box_ratio(amaps: Tensor, data: Shapes) -> float:
    """Mean over (image, present shape) of: attention mass inside the shape's bounding box (on the
    map's grid) divided by the box's share of the map's area. 1.0 means no localisation.
    amaps: (B, C, h, w) attention maps of one head, rows summing to 1."""
    size = data.images.shape[-1]
    h, w = amaps.shape[-2:]
    ratios = []
    for i, boxes in enumerate(data.boxes[: amaps.shape[0]]):
        for c, x0, y0, x1, y1 in boxes:
            mask = torch.zeros(h, w)
            mask[y0 * h // size: y1 * h // size + 1, x0 * w // size: x1 * w // size + 1] = 1
            a = amaps[i, c].float()
            ratios.append(((a * mask).sum() / a.sum() / mask.mean()).item())
    return sum(ratios) / len(ratios)
