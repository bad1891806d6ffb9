"""Entry point: ``python -m score_jax.main --config=configs/<job>.py[:arg] --workdir=DIR
[--config.key=value ...]``.

The only module that reads the ConfigDict: it checks it, turns it into frozen dataclasses,
saves it as ``<workdir>/config.json`` and dispatches on ``config.job``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import typing

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

# Config files import their siblings as `configs.*`: make the checkout importable from anywhere.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# The built-in default: the CPU demo job.
DEFAULT_CONFIG = os.path.join(_ROOT, "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG,
                                          "Job config file, e.g. configs/sft.py:toy.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, exports "
                               "(default runs/<job>_<model_preset>).")


class ConfigError(ValueError):
    pass


def _jobs():
    # Imported here so `--help` and config errors do not pay for importing jax.
    from score_jax.jobs import demo, rl, sft
    from score_jax.jobs import eval as eval_job
    return {"sft": (sft.run, _sft_config), "stage1": (rl.run, _rl_config), "stage2": (rl.run, _rl_config),
            "eval": (eval_job.run, _eval_config), "demo": (demo.run, _demo_config)}


def build(cls, cd, where: str = "config"):
    """Builds frozen dataclass ``cls`` from ConfigDict ``cd``, field by field, recursing into
    nested dataclasses. Missing or unknown keys raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    given = dict(cd.items()) if hasattr(cd, "items") else dict(cd)
    unknown = sorted(set(given) - set(names))
    missing = sorted(set(names) - set(given))
    if unknown:
        raise ConfigError(f"Unknown config key(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"valid keys here are: {', '.join(names)}.")
    if missing:
        raise ConfigError(f"Config is missing {', '.join(f'{where}.{k}' for k in missing)}; "
                          f"add them in configs/ (every default lives there).")
    kwargs = {}
    for name in names:
        value, hint = given[name], hints[name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Invalid {where}: {e}") from e


def _sft_config(cd):
    from score_jax import settings
    return build(settings.SFTTrainConfig, cd)


def _rl_config(cd):
    from score_jax import settings
    return build(settings.RLTrainConfig, cd)


def _eval_config(cd):
    from score_jax import settings
    return build(settings.EvalJobConfig, cd)


# The demo's sub-jobs (configs/demo.py) hold only their own settings; these come from its top
# level, and the per-run ones (init_from, rl.reference, eval.params, run) are set by the demo.
_DEMO_SUBS = {"pretrain": "sft", "sft": "sft", "stage1": "stage1", "stage2": "stage2", "eval": "eval"}
_DEMO_SHARED = ("seed", "model_preset", "model", "mesh", "task", "distributed", "cpu_devices",
                "compilation_cache_dir")
_SET_PER_RUN = "(set per run by the demo)"


def _demo_config(cd):
    from score_jax import settings
    plain = cd.to_dict()
    for sub, job in _DEMO_SUBS.items():
        s = plain[sub]
        s.update({k: plain[k] for k in _DEMO_SHARED}, job=job, run=0)
        s["data"] = dict(plain["data"], **s.get("data", {}))
        if job == "eval":
            del s["data"]["train_split"]
            s["eval"]["params"] = _SET_PER_RUN
        else:
            s["init_from"] = _SET_PER_RUN
        if job in ("stage1", "stage2"):
            s["rl"]["reference"] = _SET_PER_RUN
    for key in ("model", "mesh", "data", "task"):  # only the sub-jobs' copies are typed
        del plain[key]
    return build(settings.DemoConfig, plain)


def main(argv):
    del argv
    # Libraries (Orbax above all) log through absl at INFO; keep their warnings, and our own
    # INFO lines (loggers under "score_jax").
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("score_jax").setLevel(logging.INFO)
    if not os.environ.get("SCORE_JAX_DEBUG"):
        logging.getLogger("absl").addFilter(_orbax_errors_reported_by_us)
        sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
    try:
        has_job = "job" in config  # ml_collections loads the file (lazily) here
    except OSError as e:
        raise ConfigError(_unloadable(e)) from None
    if not has_job:
        raise ConfigError("The config has no `job` field; start from configs/common.py.")
    jobs = _jobs()
    if config.job not in jobs:
        raise ConfigError(f"Unknown job {config.job!r}; choose one of {sorted(jobs)}.")
    run, typed = jobs[config.job]
    cfg = typed(config)  # all config errors surface here, before any work

    from score_jax import checkpoints
    checkpoints.raise_on_signals()  # until a loop can save, a stop signal stops at once
    try:
        _start_and_run(config, cfg, run)
    except checkpoints.Interrupted as e:
        print(f"Stopped by {e}: nothing since the last saved checkpoint or evaluation batch is kept; "
              "run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + e.signum)
    except checkpoints.Stopped as e:
        print(f"Stopped on request: {e}; run the same command again to resume.", file=sys.stderr)
        sys.exit(0)


def _start_and_run(config, cfg, run) -> None:
    import jax
    if cfg.cpu_devices:  # before any JAX operation initialises the CPU backend
        jax.config.update("jax_num_cpu_devices", cfg.cpu_devices)
    if cfg.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", cfg.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    from score_jax import checkpoints
    from score_jax.jobs import harness
    if cfg.distributed:
        try:
            harness.init_distributed()
        except harness.DistributedError as e:
            print(f"Error: {e}", file=sys.stderr)
            sys.exit(2)
    workdir = _WORKDIR.value or os.path.join("runs", f"{cfg.job}_{cfg.model_preset}")
    try:
        # Refuses another run's workdir before config.json is written over.
        harness.start(cfg, workdir, config.to_dict())
        logging.getLogger("score_jax").info("Job %s in %s on %s.", config.job, workdir, jax.devices())
        if cfg.cpu_devices and jax.default_backend() != "cpu":
            logging.getLogger("score_jax").info("cpu_devices=%d splits the CPU backend only; this run uses %s.",
                                                cfg.cpu_devices, jax.default_backend())
        run(cfg, workdir)
    except harness.NonFiniteError as e:
        logging.getLogger("score_jax").error("Training stopped: %s", e)
        sys.exit(3)
    except (checkpoints.MissingExportError, ValueError, OSError) as e:
        # What a user can cause (a missing export, bad data, a config that cannot work) says
        # so in one line; SCORE_JAX_DEBUG=1 shows where it was raised.
        if os.environ.get("SCORE_JAX_DEBUG"):
            raise
        where = f" ({e.filename})" if isinstance(e, OSError) and e.filename and str(e.filename) not in str(e) else ""
        print(f"Error: {e}{where} (SCORE_JAX_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)


def _orbax_errors_reported_by_us(record: logging.LogRecord) -> bool:
    """Drops Orbax's ERROR records (a failed save logs a traceback from each of its threads):
    the failure reaches the job as an exception, which main reports in one line."""
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _quiet_closed_loops(hook):
    """After a failed Orbax read or write, TensorStore's callbacks reach an asyncio loop Orbax
    has closed and each prints "RuntimeError: Event loop is closed" (an unraisable exception):
    noise after the failure, which is reported once, in one line."""
    def quiet(unraisable):
        e = unraisable.exc_value
        if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
            return
        hook(unraisable)
    return quiet


def _unloadable(e: OSError) -> str:
    """The line for a config file that does not exist or cannot be read (ml_collections loads
    it lazily: on the first override or the first read of the config)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    where = next((ln for ln in lines[1:] if ln.endswith(".py")), "")
    return (f"cannot load the config file {where}: {lines[-1]}; pass --config=configs/<job>.py[:arg] "
            "(the job configs are in configs/).")


def _parse_flags(argv):
    """absl's parser, but a bad config file or a misspelt ``--config.x`` override ends with
    one clear line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        # A config file that raised: its own last line says what is wrong.
        first = lines[0].split(": Error whilst")[0] if "Traceback" in str(e) else ""
        _fail(f"{first + ': ' if first else ''}{lines[-1]} (run with --helpshort for usage)")
    except OSError as e:
        _fail(_unloadable(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ")
        _fail(f"{type(e).__name__}: {msg}")


def _fail(msg: str):
    print(f"Config error: {msg}", file=sys.stderr)
    sys.exit(2)


def entry():
    try:
        app.run(main, flags_parser=_parse_flags)
    except ConfigError as e:
        _fail(str(e))


if __name__ == "__main__":
    entry()
