"""The Align/Distill loss of VL2V-ADiP."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def adip_loss(student: torch.Tensor, image_targets: torch.Tensor, text_targets: torch.Tensor, lmd: float = 0.5) -> torch.Tensor:
    """λ·(−cos(s, t_img)) + (1−λ)·(−cos(s, t_txt)), averaged over the batch.

    student: [B, D] projected student features (any norm); image_targets: [B, D] teacher image
    embeddings; text_targets: [B, D] teacher class text embeddings of each sample's label.
    """
    cos_image = F.cosine_similarity(student, image_targets, dim=-1)
    cos_text = F.cosine_similarity(student, text_targets, dim=-1)
    return -(lmd * cos_image + (1.0 - lmd) * cos_text).mean()
