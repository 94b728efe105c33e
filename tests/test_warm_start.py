"""model.pretrained=<alr-fast checkpoint or run directory>: the whole task (network, BN statistics,
thetas) starts from it; classifiers of another class count keep their initialisation."""
import pytest
import torch

from alr_fast.config import load_config
from alr_fast.model import PretrainedWeightsError
from alr_fast.runs import load_checkpoint
from alr_fast.task import build_task, is_alr_fast_checkpoint
from run_helpers import TINY

pytestmark = pytest.mark.slow  # the session's tiny run is trained once for several test files


def _cfg(pretrained: str, *extra: str):
    return load_config(None, [o for o in TINY if not o.startswith("model.pretrained")] + [f"model.pretrained={pretrained}", *extra])


def test_a_run_directory_initialises_every_tensor(tiny_run):
    source = load_checkpoint(tiny_run / "best.pt")
    assert is_alr_fast_checkpoint(str(tiny_run)) and is_alr_fast_checkpoint(str(tiny_run / "best.pt"))
    task = build_task(_cfg(str(tiny_run)), int(source["num_classes"]))
    own = task.state_dict()
    assert own.keys() == source["task"].keys()
    for k, v in source["task"].items():
        assert torch.equal(own[k], v), k  # weights, running statistics and thetas alike
    assert any(v.abs().max() > 0 for k, v in own.items() if k.startswith("regularizer.thetas."))  # trained thetas


def test_another_class_count_keeps_the_classifiers_and_their_thetas_at_init(tiny_run):
    source = load_checkpoint(tiny_run / "best.pt")["task"]
    task = build_task(_cfg(str(tiny_run / "best.pt")), int(load_checkpoint(tiny_run / "best.pt")["num_classes"]) + 3)
    own = task.state_dict()
    names = task.regularizer.names()
    for k, v in own.items():
        classifier = k.startswith("model.classifiers.") or (
            k.startswith("regularizer.thetas.") and names[int(k.rsplit(".", 1)[1])].startswith("classifiers."))
        if classifier:
            assert k.startswith("regularizer") and float(v) == 0.0 or v.shape != source[k].shape, k
        else:
            assert torch.equal(v, source[k]), k


def test_a_checkpoint_of_another_backbone_is_refused_by_name(tiny_run, tmp_path):
    cfg = _cfg(str(tiny_run), "model.backbone=resnet34")
    with pytest.raises(PretrainedWeightsError, match=r"does not fit this model .* another backbone"):
        build_task(cfg, 8)
    state = {"conv1.weight": torch.zeros(64, 3, 7, 7)}
    torch.save(state, tmp_path / "plain.pth")
    assert not is_alr_fast_checkpoint(str(tmp_path / "plain.pth"))  # a torchvision state dict stays one
    assert not is_alr_fast_checkpoint("imagenet") and not is_alr_fast_checkpoint("weights.h5")
