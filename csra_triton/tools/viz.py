"""Heat-map overlays of class attention, and a top-k grid saved as PNG (matplotlib + Pillow,
the optional ``viz`` extra: ``pip install 'csra-triton[viz]'``)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _require():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import colormaps
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("csra_triton.tools.viz needs matplotlib and Pillow: "
                          "pip install 'csra-triton[viz]'") from exc
    return plt, colormaps


def resize_map(amap: Tensor, size: tuple[int, int]) -> Tensor:
    """(h, w) map -> (H, W), bilinear, then scaled to [0, 1]."""
    m = F.interpolate(amap.detach().float()[None, None], size=size, mode="bilinear",
                      align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return (m - lo) / (hi - lo) if hi > lo else torch.zeros_like(m)


def overlay(image: Tensor, amap: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Blends a colour-mapped ``amap`` (h, w) over ``image`` (3, H, W) in [0, 1]; returns
    (H, W, 3) in [0, 1]."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W), got shape {tuple(image.shape)}")
    if amap.dim() != 2:
        raise ValueError(f"amap: expected (h, w), got shape {tuple(amap.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha}")
    _, colormaps = _require()
    heat = resize_map(amap, tuple(image.shape[1:]))
    coloured = torch.from_numpy(colormaps[cmap](heat.cpu().numpy())[..., :3]).float()
    base = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1)
    return (1 - alpha) * base + alpha * coloured


def topk_grid(images: Tensor, logits: Tensor, amaps: Tensor, class_names: Sequence[str],
              path, k: int = 3, alpha: float = 0.5, truth: Sequence[Sequence[str]] | None = None,
              title: str | None = None) -> Path:
    """One row per image: the image, then its top-k predicted classes with their attention
    overlays. images (B, 3, H, W) in [0, 1], logits (B, C), amaps (B, C, h, w) (one map per
    class, e.g. a head's attention). Saves a PNG at ``path`` and returns it."""
    plt, _ = _require()
    B = images.shape[0]
    k = min(k, logits.shape[1])
    fig, axes = plt.subplots(B, k + 1, figsize=(2.2 * (k + 1), 2.3 * B), squeeze=False)
    probs = torch.sigmoid(logits.detach().float())
    for i in range(B):
        ax = axes[i][0]
        ax.imshow(images[i].detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy(),
                  interpolation="nearest")
        label = "image" if truth is None else "true: " + ", ".join(truth[i])
        ax.set_title(label, fontsize=8)
        top = probs[i].topk(k)
        for j, (p, c) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            ax = axes[i][j + 1]
            ax.imshow(overlay(images[i], amaps[i, c], alpha).numpy(), interpolation="nearest")
            ax.set_title(f"{class_names[c]} {p:.2f}", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
