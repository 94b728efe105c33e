"""Every bad input a new user tried gets one line ``alr-fast CMD: error: ...`` and exit 2, raised
before training (most before any image is read), and nothing is left behind (issue 12 item 10).

Each row is (command line, the exact last line of stderr). ``{data}``, ``{tmp}`` and ``{run}``
stand for the tiny synthetic dataset, the test's folder and a copy of a finished run."""
import shutil

import pytest
import torch

from alr_fast.cli import main
from alr_fast.config import config_to_dict, load_config

from run_helpers import TINY

TRAIN = ["train", "--out", "{tmp}/r", "data.root={data}", *TINY]

CASES = [
    (TRAIN + ["optim.adam_beta1=5"], "alr-fast train: error: config key 'optim.adam_beta1' must lie in [0, 1); got 5.0"),
    (TRAIN + ["optim.label_smoothing=2"],
     "alr-fast train: error: config key 'optim.label_smoothing' must lie in [0, 1); got 2.0"),
    (TRAIN + ["optim.lr_base=2e-4", "model.neck_eps=2e-05", "optim.adam_eps=.nan"],
     "alr-fast train: error: config key 'optim.adam_eps' must be a finite number; got nan"),
    (TRAIN + ["model.clip_min=1.5"],
     "alr-fast train: error: config key 'model.clip_min' (1.5) must be below 'model.clip_max' (1.0): every feature "
     "would be the same constant"),
    (TRAIN + ["data.images_per_identity=1"],
     "alr-fast train: error: config key 'data.images_per_identity' must be >= 2; got 1: with one image per identity "
     "no anchor of the triplet loss has a positive"),
    (TRAIN + ["optim.freeze_backbone_epochs=0", "optim.epochs=0"],
     "alr-fast train: error: config keys 'optim.freeze_backbone_epochs' and 'optim.epochs' are both 0: there is "
     "nothing to train"),
    (TRAIN + ["data.testing_size=2.5"],
     "alr-fast train: error: config key 'data.testing_size' above 1 is a number of identities and must be a whole "
     "number; got 2.5"),
    # the feature map of a 64-row input is 4 rows high (stride 16 with last_stride 1, 32 with 2)
    (TRAIN + ["model.region_num=1000", "data.root=/nonexistent"],  # found before the data is even looked for
     "alr-fast train: error: config key 'model.region_num'=1000 exceeds the 4 rows of the 4x2 feature map that the "
     "regional branch cuts into stripes (data.height=64, model.last_stride=1); use at most 4, or a larger data.height"),
    (TRAIN + ["model.region_num=3", "model.last_stride=2"],
     "alr-fast train: error: config key 'model.region_num'=3 exceeds the 2 rows of the 2x1 feature map that the "
     "regional branch cuts into stripes (data.height=64, model.last_stride=2); use at most 2, or a larger data.height"),
    (TRAIN + ["data.testing_size=100000"],
     "alr-fast train: error: data.testing_size=100000 does not fit the test split: it has 7 identity groups (15 query "
     "+ 19 gallery images, distractors one group), and the subset must leave at least one of them out"),
    (TRAIN + ["data.images_per_identity=7"],  # 2 or 3 cameras x 2 images: at most 6 per identity
     "alr-fast train: error: config key 'data.images_per_identity'=7: only 0 of 8 training identities have 7 or more "
     "images (the most any has is 6), but data.identities_per_batch=4 needs 4 of them per batch; lower one of the two"),
    (TRAIN + ["data.identities_per_batch=8", "data.images_per_identity=6"],
     "alr-fast train: error: config key 'data.images_per_identity'=6: only 4 of 8 training identities have 6 or more "
     "images (the most any has is 6), but data.identities_per_batch=8 needs 8 of them per batch; lower one of the two"),
    (TRAIN + ["data.root={single_camera}"],
     "alr-fast train: error: the test split cannot be evaluated: none of its 15 queries has a gallery image of the same "
     "identity from another camera (cameras present: 1); check the dataset, or change 'data.testing_size'"),
    (["train", "--config", "{tmp}/latin1.yaml"],
     "alr-fast train: error: config file '{tmp}/latin1.yaml' is not UTF-8 text (line 2 has the byte 0xe9)"),
    (["train", "--resume", "{tmp}/nothing"], "alr-fast train: error: cannot resume {tmp}/nothing: no such run directory"),
    (["evaluate", "{tmp}/latin1.yaml"],
     "alr-fast evaluate: error: {tmp}/latin1.yaml is not a readable checkpoint archive (File is not a zip file): "
     "damaged, truncated, or another kind of file; nothing was loaded from it"),
    (["evaluate", "{tmp}/weights.pth"],
     "alr-fast evaluate: error: {tmp}/weights.pth is a torch file but not an alr-fast checkpoint (keys fc.weight)"),
    (["evaluate", "{tmp}/mismatched.pt", "data.root={data}", "run.progress=false"],
     "alr-fast evaluate: error: {tmp}/mismatched.pt does not fit the model its config describes: 342 tensor(s) "
     "missing (first model.layer1.0.conv3.weight), 49 of another shape (first model.layer1.0.conv1.weight: "
     "[64, 64, 3, 3] in the file, [64, 64, 1, 1] in the model)"),
    (["evaluate", "{run}", "--config", "quickstart"],
     "alr-fast evaluate: error: --config cannot be used with {run}/best.pt: an alr-fast checkpoint carries the config "
     "it was trained with. Overrides of data.root, run.device, eval.* and the like still apply"),
    (["evaluate", "{run}", "model.backbone=resnet50"],
     "alr-fast evaluate: error: model.backbone cannot be overridden when evaluating {run}/best.pt: the checkpoint "
     "fixes the model (its config says model.backbone=... as trained)"),
    (["evaluate", "{run}", "data.height=128"],
     "alr-fast evaluate: error: data.height would change the input size the model in {run}/best.pt was trained with "
     "(64x32); pass --allow-input-change to evaluate it anyway"),
    (["make-synthetic", "--cameras", "1", "--out", "{tmp}/s"],
     "alr-fast make-synthetic: error: argument --cameras: must be at least 2, got 1 (see alr-fast make-synthetic --help)"),
    (["make-synthetic", "--train-ids", "-3", "--out", "{tmp}/s"],
     "alr-fast make-synthetic: error: argument --train-ids: must be at least 1, got -3 (see alr-fast make-synthetic "
     "--help)"),
    (["make-synthetic", "--cameras", "12", "--out", "{tmp}/s"],
     "alr-fast make-synthetic: error: num_cameras must be <= 9 for market1501 file names, got 12"),
]


@pytest.fixture(scope="module")
def inputs(tiny_data, tiny_run, tmp_path_factory):
    """The bad files of the table, made once."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "latin1.yaml").write_bytes("optim:\n  lr_base: 2e-4  # \xe9t\xe9\n".encode("latin-1"))
    torch.save({"fc.weight": torch.ones(2)}, tmp / "weights.pth")
    # a dataset whose every image comes from camera 1: no query can have a valid match
    single = tmp / "single"
    shutil.copytree(tiny_data, single)
    for image in sorted(single.rglob("*.jpg")):
        image.rename(image.with_name(image.name[:6] + "1" + image.name[7:]))
    # an alr-fast checkpoint whose config says resnet50 around a resnet18's weights
    best = torch.load(tiny_run / "best.pt", weights_only=True)
    cfg = load_config(None, ["model.backbone=resnet50", "model.pretrained=none", "data.height=64", "data.width=32"])
    best["config"] = config_to_dict(cfg)
    torch.save(best, tmp / "mismatched.pt")
    run = tmp / "run"
    run.mkdir()
    shutil.copy(tiny_run / "best.pt", run / "best.pt")
    return {"tmp": tmp, "data": tiny_data, "single_camera": single, "run": run}


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_clean_line(argv, expected, inputs, capsys):
    def fill(text: str) -> str:
        return text.format(**{k: str(v) for k, v in inputs.items()})

    before = sorted(p.name for p in inputs["tmp"].iterdir())
    try:
        code = main([fill(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == fill(expected)
    assert sorted(p.name for p in inputs["tmp"].iterdir()) == before  # no run directory, no dataset left behind


def test_a_failed_start_leaves_no_run_directory(tiny_data, tmp_path, capsys):
    """A start that fails once the data is read (here: weights that cannot be loaded, as when
    the ImageNet download is unreachable) creates nothing, so the corrected command just works."""
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), f"data.root={tiny_data}", *TINY, "model.pretrained=/nonexistent/w.pth"]) == 2
    assert "model.pretrained='/nonexistent/w.pth': no such file" in capsys.readouterr().err
    assert not run.exists()


def test_help_shows_yaml_spelled_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "data.augmentation=true" in out and "model.neck_eps=2e-5" in out and "True" not in out
    with pytest.raises(SystemExit):
        main(["make-synthetic", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--train-ids", 32), ("--test-ids", 32), ("--cameras", 4), ("--images-per-camera", 3),
                          ("--distractors", 16)):
        assert f"{flag} N" in out and f"(default: {default};" in out


def test_only_rank_0_prints_the_summary(tiny_run, tmp_path, monkeypatch, capsys):
    """Under torchrun every rank returns a summary; rank 1's has no metrics and must stay quiet."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    monkeypatch.setenv("RANK", "1")
    assert main(["train", "--resume", str(run), "run.progress=false", "run.plots=false"]) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--resume", str(run), "run.progress=false", "run.plots=false"]) == 0
    out = capsys.readouterr().out
    assert '"run_dir"' in out and '"mAP": -1.0' not in out
