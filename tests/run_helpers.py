"""A tiny training configuration shared by the end-to-end and reliability tests: ResNet-18 at
64x32 on a synthetic Market-1501 layout, 1 + 2 epochs of 3 steps, evaluated every epoch."""
from pathlib import Path

from alr_fast.cli import main
from alr_fast.synthetic import make_synthetic

TINY = [
    "model.backbone=resnet18",
    "model.pretrained=none",
    "data.height=64",
    "data.width=32",
    "data.identities_per_batch=4",
    "data.images_per_identity=2",
    "data.steps_per_epoch=3",
    "data.num_workers=0",
    "optim.freeze_backbone_epochs=1",
    "optim.epochs=2",
    "optim.lr_warmup_epochs=1",
    "optim.lr_lower_bound=0.0001",
    "eval.every_epochs=1",
    "eval.batch_size=16",
    "run.log_every=2",
    "run.progress=false",
]


def make_tiny_data(root: Path) -> Path:
    make_synthetic(root, "market1501", num_train_ids=8, num_test_ids=6, num_cameras=3, images_per_camera=2,
                   num_distractors=4, seed=3)
    return root


def train(run: Path, data_root: Path, *extra: str) -> int:
    return main(["train", "--out", str(run), f"data.root={data_root}", *TINY, *extra])
