"""Every preset of every group composes and validates; impossible settings fail with one clear line."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from qbench.config import ConfigError, register_configs, validate

CONF = Path(__file__).resolve().parent.parent / "conf"
HUB_MODELS = {"llama3.2-1b", "llama3.2-3b", "llama3.1-8b"}


def make(*overrides):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def presets(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "quant", "algorithm", "preprocess", "data", "eval", "tracking"])
def test_every_preset_composes_and_validates(group, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert presets(group), f"conf/{group} is empty"
    for name in presets(group):
        cfg = make(f"{group}={name}")
        assert cfg[group].get("name", name) == name
        if group == "model" and name in HUB_MODELS:
            # no hub here: a hub id that is not cached must be refused before loading
            with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
                validate(cfg)
        else:
            validate(cfg)


def test_defaults_are_the_embedded_model_rtn_w4():
    cfg = make()
    assert cfg.model.embedded == "smollm2-135m" and cfg.algorithm.name == "rtn" and cfg.quant.w_bits == 4
    assert cfg.data.source == "enwiki-excerpt" and cfg.tracking.wandb_mode == "offline"
    assert cfg.model.trust_remote_code is False


def test_paper_defaults_of_the_algorithms():
    assert make("algorithm=optq").algorithm.percdamp == 0.01
    q = make("algorithm=qronos").algorithm
    assert q.alpha == 1e-6 and q.act_order is True


@pytest.mark.parametrize("override,message", [
    ("quant.w_bits=0", "quant.w_bits=0"),
    ("quant.w_bits=9", "quant.w_bits=9"),
    ("quant.w_bits=2.5", "quant.w_bits=2.5"),
    ("quant.w_group_size=0", "quant.w_group_size=0"),
    ("quant.w_scale=l1", "quant.w_scale"),
    ("quant.a_bits=4", "quant.a_bits=4"),
    ("data.nsamples=0", "data.nsamples=0"),
    ("data.source=ptb", "data.source='ptb'"),
    ("calibration.stream=both", "calibration.stream"),
    ("eval.protocols=[lm-eval]", "eval.protocols"),
    ("eval.seqlen=7", "eval.seqlen=7"),
    ("tracking.wandb_mode=cloud", "tracking.wandb_mode"),
    ("model.path=/nonexistent", "model.path='/nonexistent' does not exist"),
    ("device=tpu", "device='tpu'"),
    ("algorithm.name=nope", "algorithm.name='nope' is unknown"),
    ("preprocess.rotation=spin", "preprocess.rotation='spin' is unknown"),
    ("preprocess.smoothquant_alpha=1.5", "preprocess.smoothquant_alpha=1.5"),
])
def test_impossible_settings_fail_in_one_line(override, message):
    cfg = make(override)
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_online_wandb_needs_a_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        validate(make("tracking.wandb_mode=online"))


def test_ternary_needs_symmetric_grid():
    with pytest.raises(ConfigError, match="w_sym=true"):
        validate(make("quant=w1.58", "quant.w_sym=false"))


def test_unknown_field_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="w_bitz"):
        make("quant.w_bitz=3")
