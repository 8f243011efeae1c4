from pathlib import Path

import pytest

from graftline.config import ConfigError, load_params, parse_params
from tests.conftest import ROOT


def test_repo_params_are_valid() -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.finetune.strategy in {"full", "linear_probe", "gradual"}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"finetune": {"train": {"lr": -1}}}, "finetune.train.lr"),
        ({"finetune": {"train": {"epochs": "ten"}}}, "finetune.train.epochs"),
        ({"pretrain": {"modle": {}}}, "pretrain.modle: unknown key"),
        ({"finetune": {"strategy": "half"}}, "finetune.strategy"),
        ({"preprocess": {"task": {"val_fraction": 0.5, "test_fraction": 0.5}}}, "preprocess.task"),
        ({"preprocess": {"task": {"source": {"kind": "idx", "images": "x"}}}}, "labels"),
        ({"preprocess": {"task": {"labels_per_class": 0}}}, "labels_per_class"),
        ({"distill": {"enabled": True, "teacher": "nb_em"}}, "naive Bayes + EM reads words"),
        ({"distill": {"nb_em": {"ngrams": 4}}}, "distill.nb_em.ngrams"),
        ({"finetune": {"nb_em": {"enabled": True}}}, "finetune.nb_em.enabled: naive Bayes"),
        (
            {
                "finetune": {"nb_em": {"enabled": True}},
                "distill": {"enabled": True, "teacher": "both"},
            },
            "would count naive Bayes + EM twice",
        ),
        ({"distill": {"nb_em": {"components": {"other": 0}}}}, "distill.nb_em.components.other"),
    ],
)
def test_bad_params_name_the_key(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(data, "params.yaml")
    assert needle in str(err.value)
    assert str(err.value).startswith("params.yaml")


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_defaults_fill_missing_sections() -> None:
    params = parse_params({"finetune": {"strategy": "linear_probe"}})
    assert params.finetune.strategy == "linear_probe"
    assert params.preprocess.image_size == 28
