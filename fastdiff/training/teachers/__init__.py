"""Teachers for REPA / HASTE: small ViTs trained on digits (shipped, offline) and a DINOv2 loader.

``digits_mae`` (the default ``align.teacher``) is self-supervised like REPA's DINOv2: a 6-block
``DigitsViT`` (patch 4, so its 4x4 token grid is the patch-4 student's; width 128, 4 heads, no CLS token)
trained as a masked autoencoder on the digits train split, labels unused (:mod:`.mae`; rebuild with
``OMP_NUM_THREADS=1 python -m fastdiff.training.teachers.mae --out fastdiff/training/teachers/digits_mae``).
Its probe (class R^2 of the tokens, attention entropy; :mod:`.probe`) is stored in its ``config.json``.
Variants with class R^2 below 0.5 (``--norm-pix-loss --mask-ratio 0.5``; ``--keep-blocks 3``, the trained
encoder's first 3 blocks, :func:`truncate_teacher`) each missed REPA's speed target on one seed of the
unconditional testbed and HASTE's on another, and are not shipped (measured in :mod:`.mae`'s docstring).

``digits_vit`` is the earlier stand-in: a 4-block ViT (patch 2, width 64, 4 heads, no CLS token) on 16x16
digits, trained with a classification objective on the digits *train* split with random-affine
augmentation (recipe in ``digits_vit/config.json``; rebuild with
``python -m fastdiff.training.teachers --out fastdiff/training/teachers/digits_vit``). It is a different
network, with a different architecture, from the CNN behind FD-digits in :mod:`fastdiff.metrics`.

For real images, :func:`load_dinov2_teacher` wraps a Hugging Face ``transformers`` DINOv2 (REPA's and
HASTE's teacher) so it returns patch tokens and, on request, patch-to-patch attention maps.
"""

from fastdiff.training.teachers.hf import HFViTTeacher, load_dinov2_teacher
from fastdiff.training.teachers.probe import probe_teacher
from fastdiff.training.teachers.vit import (
    MAE_TEACHER_DIR,
    TEACHER_DIR,
    DigitsViT,
    load_digits_teacher,
    save_teacher,
    train_digits_teacher,
    truncate_teacher,
)

SHIPPED_TEACHERS = {"digits_mae": MAE_TEACHER_DIR, "digits_vit": TEACHER_DIR}

__all__ = ["MAE_TEACHER_DIR", "SHIPPED_TEACHERS", "TEACHER_DIR", "DigitsViT", "HFViTTeacher", "load_digits_teacher",
           "load_dinov2_teacher", "probe_teacher", "save_teacher", "train_digits_teacher",
           "truncate_teacher"]
