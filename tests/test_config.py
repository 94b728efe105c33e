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


# --------------------------------------------------------------------------------------------
# numbers as Python writes them, non-finite and out-of-range values (issue 12, items 9 and 10)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("2e-4", 2e-4), ("1e9", 1e9), ("2e-05", 2e-5), ("2E-4", 2e-4), ("1.5e3", 1500.0), (".5e1", 5.0), ("-1e-3", -1e-3),
    ("0.0002", 2e-4), ("1_000", 1000),
])
def test_numbers_parse_as_python_writes_them(text, value, tmp_path):
    from alr_fast.config import parse_override, read_yaml

    assert parse_override(f"optim.lr_base={text}") == ("optim.lr_base", value)
    assert read_yaml(f"x: {text}\n", "test") == {"x": value}
    f = tmp_path / "c.yaml"
    f.write_text(f"regularizer:\n  kernel_factor: {text}\n")
    assert load_config(str(f)).regularizer.kernel_factor == pytest.approx(float(value))
    assert isinstance(load_config(str(f)).regularizer.kernel_factor, float)


def test_exponent_spellings_stay_strings_where_a_string_is_meant():
    # an str key keeps the raw text of an override, and YAML words are not numbers
    c = load_config(None, ["run.out_dir=1e9", "data.root=2e-4"])
    assert c.run.out_dir == "1e9" and c.data.root == "2e-4"
    from alr_fast.config import read_yaml

    assert read_yaml("x: e5\ny: 1e\nz: 1.2.3e4\n", "test") == {"x": "e5", "y": "1e", "z": "1.2.3e4"}


# one row per bad value: the override and the exact one-line message it must produce
BAD_VALUES = [
    ("optim.lr_base=.nan", "config key 'optim.lr_base' must be a finite number; got nan"),
    ("optim.lr_base=nan", "config key 'optim.lr_base' must be a finite number; got 'nan'"),
    ("optim.lr_base=inf", "config key 'optim.lr_base' must be a finite number; got 'inf'"),
    ("data.testing_size=.nan", "config key 'data.testing_size' must be a finite number; got nan"),
    ("regularizer.kernel_factor=.nan", "config key 'regularizer.kernel_factor' must be a finite number; got nan"),
    ("optim.adam_eps=-.inf", "config key 'optim.adam_eps' must be a finite number; got -inf"),
    ("model.clip_max=.inf", "config key 'model.clip_max' must be a finite number; got inf"),
    ("optim.lr_base=-1e-4", "config key 'optim.lr_base' must be >= 0; got -0.0001"),
    ("optim.adam_eps=0", "config key 'optim.adam_eps' must be positive; got 0.0"),
    ("optim.adam_beta1=5", "config key 'optim.adam_beta1' must lie in [0, 1); got 5.0"),
    ("optim.adam_beta2=1", "config key 'optim.adam_beta2' must lie in [0, 1); got 1.0"),
    ("optim.label_smoothing=2", "config key 'optim.label_smoothing' must lie in [0, 1); got 2.0"),
    ("model.bn_momentum=1.5", "config key 'model.bn_momentum' must lie in [0, 1]; got 1.5"),
    ("model.neck_eps=0", "config key 'model.neck_eps' must be positive; got 0.0"),
    ("eval.k1=0", "config key 'eval.k1' must be positive; got 0"),
    ("eval.k2=-1", "config key 'eval.k2' must be positive; got -1"),
    ("eval.validation_every_epochs=0", "config key 'eval.validation_every_epochs' must be positive; got 0"),
    ("data.testing_size=2.5",
     "config key 'data.testing_size' above 1 is a number of identities and must be a whole number; got 2.5"),
    ("data.validation_size=10.5",
     "config key 'data.validation_size' above 1 is a number of images and must be a whole number; got 10.5"),
    ("model.clip_min=2",
     "config key 'model.clip_min' (2.0) must be below 'model.clip_max' (1.0): every feature would be the same constant"),
    ("data.images_per_identity=1",
     "config key 'data.images_per_identity' must be >= 2; got 1: with one image per identity no anchor of the "
     "triplet loss has a positive"),
    ("optim.lr_mode=constant", "optim.lr_mode=constant needs optim.lr_start == optim.lr_end; got 0.0002 and 0.0002"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_bad_values_are_refused_with_the_key(override, message):
    if override == "optim.lr_mode=constant":  # the only row whose rule involves two keys that differ
        override, extra = "optim.lr_mode=constant", ["optim.lr_end=1e-3"]
        message = "optim.lr_mode=constant needs optim.lr_start == optim.lr_end; got 0.0002 and 0.001"
    else:
        extra = []
    with pytest.raises(ConfigError) as err:
        load_config(None, [override, *extra])
    assert str(err.value) == message


def test_rules_between_keys():
    with pytest.raises(ConfigError, match=r"^config keys 'optim.freeze_backbone_epochs' and 'optim.epochs' are both 0"):
        load_config(None, ["optim.freeze_backbone_epochs=0", "optim.epochs=0"])
    with pytest.raises(ConfigError, match=r"^optim.lr_mode=cosine needs optim.lr_start > optim.lr_end"):
        load_config(None, ["optim.lr_mode=cosine"])
    with pytest.raises(ConfigError, match=r"^optim.lr_drop_factor=0 derives the factor from optim.epochs - 2"):
        load_config(None, ["optim.lr_drop_factor=0", "optim.epochs=20"])
    # an override may repair what a file set: the rules run once, after everything is merged
    c = load_config(None, ["optim.lr_mode=constant", "optim.lr_start=1e-3", "optim.lr_end=1e-3"])
    assert c.optim.lr_start == c.optim.lr_end == 1e-3
    assert load_config(None, ["optim.freeze_backbone_epochs=0", "optim.epochs=1"]).optim.epochs == 1


def test_non_utf8_config_file_is_named(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("optim:\n  lr_base: 2e-4  # \xe9t\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(str(f))
    assert str(err.value) == f"config file '{f}' is not UTF-8 text (line 2 has the byte 0xe9)"


def test_malformed_yaml_message_is_one_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(f))
    assert "\n" not in str(err.value) and str(err.value).startswith(f"config file '{f}' is not valid YAML: ")


def test_help_spells_defaults_as_yaml():
    from alr_fast.config import describe_keys, format_value, read_yaml

    text = describe_keys()
    assert "data.augmentation=true " in text and "data.identity_balancing=false " in text
    assert "model.neck_eps=2e-5 " in text and "optim.adam_eps=1e-7 " in text and "optim.lr_base=0.0002 " in text
    assert 'run.out_dir="" ' in text and "data.dataset=market1501 " in text
    assert "True" not in text and "False" not in text and "'" not in text.split("KEY")[0].replace("'s", "")
    # every default, spelled that way, reads back as itself
    for section, values in config_to_dict(Config()).items():
        for key, value in values.items():
            spelled = format_value(value)
            assert read_yaml(f"v: {spelled}", "test")["v"] == value, (section, key, spelled)
