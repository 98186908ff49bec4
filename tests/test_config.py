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
    assert q.alpha is None and q.act_order is True


@pytest.mark.parametrize("quant,alpha", [("w4", 1e-6), ("w3", 1e-6), ("w4a4", 1e-3), ("w4a4_mxfp4", 1e-3),
                                         ("w16a16kv4", 1e-6)])
def test_qronos_alpha_follows_the_paper_per_setting(quant, alpha):
    from qbench.config import solver_options

    assert solver_options(make("algorithm=qronos", f"quant={quant}"))["alpha"] == alpha
    assert solver_options(make("algorithm=qronos", f"quant={quant}", "algorithm.alpha=0.5"))["alpha"] == 0.5


@pytest.mark.parametrize("quant", ["w4a4", "w4a4_mxfp4", "w4a8", "w16a16kv4", "w4a4kv4"])
def test_activation_and_kv_presets_validate(quant):
    validate(make(f"quant={quant}"))


@pytest.mark.parametrize("override,message", [
    ("quant.w_bits=0", "quant.w_bits=0"),
    ("quant.w_bits=9", "quant.w_bits=9"),
    ("quant.w_bits=2.5", "quant.w_bits=2.5"),
    ("quant.w_group_size=0", "quant.w_group_size=0"),
    ("quant.w_scale=l1", "quant.w_scale"),
    ("quant.a_bits=3", "quant.a_bits=3 has no activation grid"),
    ("quant.kv_bits=2", "quant.kv_bits=2 has no KV-cache grid"),
    ("quant.w_format=nf4", "quant.w_format='nf4'"),
    ("quant.a_format=fp8", "quant.a_format='fp8'"),
    ("quant=w4a4_mxfp4 quant.w_bits=3", "quant.w_format=mxfp4 has 4-bit elements"),
    ("quant=w4a4_mxfp4 quant.w_group_size=64", "quant.w_format=mxfp4 uses blocks of 32"),
    ("quant=w4a4_mxfp4 quant.a_bits=8", "quant.a_format=mxfp4 has 4-bit elements"),
    ("quant.a_clip_ratio=1.5", "quant.a_clip_ratio=1.5"),
    ("quant.kv_group_size=0", "quant.kv_group_size=0"),
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
    cfg = make(*override.split())
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
