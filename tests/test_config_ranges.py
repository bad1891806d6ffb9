"""Numeric config values that cannot work are refused where the config is typed, with one
line naming the field and the range (score_jax/ranges.py), for every job's config."""

import importlib.util
import pathlib

import pytest

from score_jax import main, ranges

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _set(cd, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        cd = cd[p]
    cd[leaf] = value


@pytest.mark.parametrize("job, arg, build", [("sft", "tiny", main._sft_config), ("stage1", "tiny", main._rl_config),
                                             ("stage2", "tiny", main._rl_config), ("eval", "tiny", main._eval_config)])
def test_the_shipped_configs_are_in_range(job, arg, build):
    build(_config(job, arg))


@pytest.mark.parametrize("arg", ["", "table", "tiny"])
def test_the_demo_configs_are_in_range(arg):
    main._demo_config(_config("demo", arg))


@pytest.mark.parametrize("field, value, message", [
    ("optim.learning_rate", -1.0, "Invalid config.optim: optim.learning_rate=-1.0 must be > 0."),
    ("optim.learning_rate", float("nan"), "optim.learning_rate=nan must be > 0."),
    ("optim.learning_rate", float("inf"), "optim.learning_rate=inf must be > 0."),
    ("optim.b2", 1.0, "optim.b2=1.0 must be in [0, 1)."),
    ("optim.warmup_steps", -1, "optim.warmup_steps=-1 must be >= 0."),
    ("optim.max_nonfinite_steps", 0, "optim.max_nonfinite_steps=0 must be >= 1."),
    ("total_steps", -5, "Invalid config: total_steps=-5 must be >= 1."),
    ("total_steps", 0, "total_steps=0 must be >= 1."),
    ("log_every", 0, "log_every=0 must be >= 1."),
    ("batch_size", 0, "batch_size=0 must be >= 1."),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be >= 1."),
    ("checkpoint.every_steps", -1, "checkpoint.every_steps=-1 must be >= 0."),
    ("model.dtype", "float9", "model.dtype='float9'; choose one of float32, bfloat16, float16."),
    ("model.num_layers", 0, "model.num_layers=0 must be >= 1."),
    ("data.seq_len", 1, "data.seq_len=1 must be >= 2."),
    ("cpu_devices", -1, "Invalid config: cpu_devices=-1 must be >= 0."),
])
def test_sft_values_out_of_range_are_one_line(field, value, message):
    cd = _config("sft", "tiny")
    _set(cd, field, value)
    with pytest.raises(main.ConfigError) as e:
        main._sft_config(cd)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("field, value, message", [
    ("rl.alpha", -1.0, "rl.alpha=-1.0 must be >= 0."),
    ("rl.beta2", float("nan"), "rl.beta2=nan must be >= 0."),
    ("rl.sampling.temperature", -0.5, "sampling.temperature=-0.5 must be >= 0."),
    ("rl.sampling.top_p", 0.0, "sampling.top_p=0.0 must be in (0, 1]."),
])
def test_rl_values_out_of_range_are_one_line(field, value, message):
    cd = _config("stage2", "tiny")
    _set(cd, field, value)
    with pytest.raises(main.ConfigError, match=None) as e:
        main._rl_config(cd)
    assert message in str(e.value)


def test_eval_values_out_of_range_are_one_line():
    cd = _config("eval", "tiny")
    _set(cd, "eval.num_problems", -3)
    with pytest.raises(main.ConfigError) as e:
        main._eval_config(cd)
    assert "eval.num_problems=-3 must be >= 0." in str(e.value)
    cd = _config("eval", "tiny")
    cd.cpu_devices = -2
    with pytest.raises(main.ConfigError, match=r"cpu_devices=-2 must be >= 0."):
        main._eval_config(cd)


def test_the_demo_refuses_a_negative_cpu_device_count():
    cd = _config("demo", "tiny")
    cd.cpu_devices = -1
    with pytest.raises(main.ConfigError, match=r"cpu_devices=-1 must be >= 0."):
        main._demo_config(cd)


def test_ranges_check_refuses_non_numbers_and_bools():
    class C:
        x, y = "3", True
    with pytest.raises(ValueError, match=r"^c.x='3' must be a number.$"):
        ranges.check("c", C, x="[0, inf)")
    with pytest.raises(ValueError, match=r"^c.y=True must be a number.$"):
        ranges.check("c", C, y="[0, inf)")


def test_a_chat_template_unknown_for_the_preset_can_be_set_by_override():
    cd = _config("stage1", "tiny,math")
    with pytest.raises(main.ConfigError, match=r"task.chat_template is empty .* set --config.task.chat_template"):
        main._rl_config(cd)
    cd.task.chat_template = "gemma"  # what --config.task.chat_template=gemma does
    assert main._rl_config(cd).task.chat_template == "gemma"
    cd.task.chat_template = "gemmma"
    with pytest.raises(main.ConfigError, match=r"task.chat_template='gemmma' is unknown"):
        main._rl_config(cd)


def test_dataset_names_are_the_builders_and_a_wrong_one_is_refused_when_typed():
    from score_jax import data, settings
    assert settings.DATASETS == tuple(sorted(data.BUILDERS))
    cd = _config("sft", "tiny")
    cd.data.name = "nope"
    with pytest.raises(main.ConfigError, match=r"data.name='nope'; choose one of gsm8k, humaneval, math"):
        main._sft_config(cd)
