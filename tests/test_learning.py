"""The whole method learns: a short run on synthetic identities lifts test mAP far above chance."""
import pytest

from alr_fast.config import load_config
from alr_fast.runs import JsonlLog
from alr_fast.synthetic import make_synthetic
from alr_fast.trainer import fit


@pytest.mark.slow
def test_short_training_run_learns_the_synthetic_identities(tmp_path):
    root = tmp_path / "data"
    make_synthetic(root, "market1501", seed=11)
    cfg = load_config("quickstart", [
        f"data.root={root}", "optim.freeze_backbone_epochs=1", "optim.epochs=3", "optim.lr_steady_epochs=10",
        "eval.every_epochs=1", "run.progress=false", "run.plots=false",
    ])
    summary = fit(cfg, tmp_path / "run")
    metrics = [m for m in JsonlLog(tmp_path / "run" / "metrics.jsonl").read() if m["split"] == "test"]
    first, last = metrics[0]["mAP"], metrics[-1]["mAP"]
    # chance is about 0.05 on this split; phase A (frozen random backbone) stays low
    assert last >= 0.4, metrics
    assert last >= first + 0.15, metrics
    assert summary["best"]["mAP"] == max(m["mAP"] for m in metrics if m["phase"] == "B")
