"""Batch-wise training augmentation on float pixels in [0, 1], drawn from torch's global RNG (kiln seeds it per
epoch and rank, so runs repeat exactly). Nothing here runs at evaluation time."""

from __future__ import annotations

import math

import torch
from torch import nn

from kiln.core.params import AugmentParams


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image shifted by up to `padding` pixels per axis, zeros filling in (a padded random crop)."""
    n, _, height, width = images.shape
    padded = nn.functional.pad(images, (padding,) * 4)
    rows = torch.randint(0, 2 * padding + 1, (n, 1, 1)) + torch.arange(height).view(1, -1, 1)
    cols = torch.randint(0, 2 * padding + 1, (n, 1, 1)) + torch.arange(width).view(1, 1, -1)
    batch = torch.arange(n).view(-1, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_affine(images: torch.Tensor, rotation: float, translate: float, scale: float) -> torch.Tensor:
    """Per-image rotation, translation and zoom by bilinear resampling (zeros outside)."""
    n = len(images)
    angle = (torch.rand(n) * 2 - 1) * math.radians(rotation)
    zoom = 1 + (torch.rand(n) * 2 - 1) * scale
    shift = (torch.rand(n, 2) * 2 - 1) * translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid.to(images.device), align_corners=False)


def random_erasing(images: torch.Tensor, probability: float) -> torch.Tensor:
    """With `probability`, zero one rectangle of 2-20% of the image area (aspect 0.3-3.3) in each image."""
    n, _, height, width = images.shape
    area = (torch.rand(n) * 0.18 + 0.02) * height * width
    aspect = torch.exp(torch.empty(n).uniform_(math.log(0.3), math.log(3.3)))
    h = (area * aspect).sqrt().round().clamp(1, height).long()
    w = (area / aspect).sqrt().round().clamp(1, width).long()
    top = (torch.rand(n) * (height - h + 1)).long()
    left = (torch.rand(n) * (width - w + 1)).long()
    rows, cols = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    inside = ((rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
              & (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1)))
    erase = (inside & (torch.rand(n) < probability).view(-1, 1, 1)).unsqueeze(1)
    return images.masked_fill(erase.to(images.device), 0.0)


def augment(images: torch.Tensor, settings: AugmentParams) -> torch.Tensor:
    """Apply the augmentations `settings` turns on, in the order crop, flip, affine, erasing (none: `images`
    itself, no random draw)."""
    if settings.crop_padding:
        images = random_crop(images, settings.crop_padding)
    if settings.hflip:
        flip = (torch.rand(len(images)) < 0.5).view(-1, 1, 1, 1).to(images.device)
        images = torch.where(flip, images.flip(-1), images)
    if settings.rotation or settings.translate or settings.scale:
        images = random_affine(images, settings.rotation, settings.translate, settings.scale)
    if settings.erasing:
        images = random_erasing(images, settings.erasing)
    return images
