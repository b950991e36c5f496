"""Teachers for REPA / HASTE: a small ViT trained on digits (shipped, offline) and a DINOv2 loader.

``DigitsViT`` is the offline teacher: a 4-block ViT (patch 2, width 64, 4 heads, no CLS token) on 16x16
digits, trained with a classification objective on the digits *train* split with random-affine
augmentation (recipe in ``digits_vit/config.json``; rebuild with
``python -m fastdiff.training.teachers --out fastdiff/training/teachers/digits_vit``). It is a different
network, with a different architecture, from the CNN behind FD-digits in :mod:`fastdiff.metrics`.

For real images, :func:`load_dinov2_teacher` wraps a Hugging Face ``transformers`` DINOv2 (REPA's and
HASTE's teacher) so it returns patch tokens and, on request, patch-to-patch attention maps.
"""

from fastdiff.training.teachers.hf import HFViTTeacher, load_dinov2_teacher
from fastdiff.training.teachers.vit import (
    TEACHER_DIR,
    DigitsViT,
    load_digits_teacher,
    save_teacher,
    train_digits_teacher,
)

__all__ = ["TEACHER_DIR", "DigitsViT", "HFViTTeacher", "load_digits_teacher", "load_dinov2_teacher",
           "save_teacher", "train_digits_teacher"]
