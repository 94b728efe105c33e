"""Config loading: defaults are the seed's, errors name the key, recipes stay in sync."""
import dataclasses

import pytest
import yaml

from alr_fast.config import (
    Config,
    ConfigError,
    apply_overrides,
    bundled_config_names,
    config_to_dict,
    dump_config,
    load_config,
)


def test_defaults_are_the_seeds():
    c = Config()
    assert (c.data.height, c.data.width, c.data.identities_per_batch, c.data.images_per_identity) == (384, 128, 16, 4)
    assert c.data.steps_per_epoch == 200 and c.optim.freeze_backbone_epochs == 20 and c.optim.epochs == 200
    assert c.optim.adam_eps == 1e-7 and c.optim.lr_base == 2e-4 and c.optim.lr_lower_bound == 2e-6
    assert c.regularizer.kernel_factor == 0.005 and c.regularizer.adaptive
    assert c.model.neck_eps == 2e-5 and (c.model.clip_min, c.model.clip_max) == (0.0, 1.0)
    assert c.eval.every_epochs == 10 and c.eval.metric == "cosine" and (c.eval.k1, c.eval.k2, c.eval.lambda_value) == (20, 6, 0.3)


def test_unknown_key_names_it_and_suggests(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.epoch'.*did you mean epochs"):
        load_config(str(f))
    f.write_text("optimizer:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'"):
        load_config(str(f))


@pytest.mark.parametrize(
    "override,match",
    [
        ("optim.epochs=abc", "'optim.epochs' expects int"),
        ("optim.epochs=1.5", "'optim.epochs' expects int"),
        ("data.augmentation=3", "'data.augmentation' expects bool"),
        ("model.backbone=vgg16", "'model.backbone' must be one of"),
        ("data.height=0", "'data.height' must be positive"),
        ("epochs=3", "must be section.key"),
        ("optim.epochs", "not of the form"),
    ],
)
def test_bad_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_overrides_and_int_to_float():
    c = load_config(None, ["optim.lr_base=1", "run.out_dir=2024", "data.testing_size=0.5", "eval.re_ranking=true"])
    assert c.optim.lr_base == 1.0 and isinstance(c.optim.lr_base, float)
    assert c.run.out_dir == "2024" and c.data.testing_size == 0.5 and c.eval.re_ranking is True


def test_dump_roundtrip():
    c = load_config(None, ["optim.epochs=7", "model.backbone=resnet101"])
    again = load_config(None)
    again = apply_overrides(again, [])
    assert again == Config()
    from alr_fast.config import config_from_dict

    assert config_from_dict(yaml.safe_load(dump_config(c))) == c


def test_bad_yaml_file_named(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("dataset", ["market1501", "dukemtmc_reid", "msmt17"])
@pytest.mark.parametrize("backbone", ["resnet50", "resnet101", "resnet152"])
@pytest.mark.parametrize("style", ["torchvision", "keras"])
def test_recipes_are_the_seed_defaults(dataset, backbone, style):
    name = f"{dataset}_{backbone}" + ("_keras" if style == "keras" else "")
    assert name in bundled_config_names()
    c = load_config(name)
    expected = dataclasses.replace(
        Config(),
        data=dataclasses.replace(Config().data, dataset=dataset),
        model=dataclasses.replace(Config().model, backbone=backbone, backbone_style=style),
    )
    assert config_to_dict(c) == config_to_dict(expected)


def test_quickstart_recipe_loads():
    c = load_config("quickstart")
    assert c.model.pretrained == "none" and c.data.dataset == "market1501"


def test_every_key_is_explained_in_help():
    from alr_fast.config import KEY_HELP

    keys = {f"{s}.{k}" for s, v in config_to_dict(Config()).items() for k in v}
    assert keys == set(KEY_HELP), sorted(keys ^ set(KEY_HELP))
