"""Losses as pure functions: VL2V-ADiP's Align/Distill cosine loss and the KD baseline's."""

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


def kd_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, weight: float) -> torch.Tensor:
    """Knowledge distillation (Hinton et al.): (1 − w)·CE(logits, y) + w·T²·KL(p_t^T ‖ p_s^T).

    logits: [B, C] student; labels: [B]; teacher_logits: [B, C]; p^T = softmax(· / T). The T² keeps
    the soft term's gradient on the scale of the hard one whatever T is.
    """
    hard = F.cross_entropy(logits, labels)
    log_p_student = F.log_softmax(logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2
    return (1.0 - weight) * hard + weight * soft
