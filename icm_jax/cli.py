"""The `icm-jax` command (and main.py): label, fine-tune and evaluate with ICM.

  icm-jax --config=demo --workdir=runs/demo
  icm-jax --config=gsm8k:llama3.1-8b --workdir=gs://bucket/gsm8k \
      --config.model.path=/models/Meta-Llama-3.1-8B \
      --config.data.test=/data/icm/test_gsm8k.json

--config takes a config file, or the name of a shipped one (demo,
demo_full, custom, gsm8k, truthfulqa, alpaca, tiny, truthfulqa_demo;
`icm_jax/configs/`),
optionally with `:PRESET` (a model preset such as llama3.1-8b). Every key
is listed in the README's config reference.
"""

from __future__ import annotations

import glob
import logging as std_logging
import os
import re
import sys
from typing import List, Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

SHIPPED_CONFIGS = ("alpaca", "custom", "demo", "demo_full", "gsm8k", "tiny",
                   "truthfulqa", "truthfulqa_demo")
# A gs:// probe without credentials warns once per metadata-server retry;
# the probe's own one-line error says what happened.
_ERROR_ONLY_LOGGERS = ("google.auth", "google.auth.compute_engine._metadata")


def configs_dir() -> str:
  """The shipped configs: `configs/` of a checkout, `icm_jax/configs/` of an
  install (setup.py maps one onto the other)."""
  from importlib import resources
  return str(resources.files("icm_jax.configs"))


def resolve_config_arg(value: str, directory: Optional[str] = None) -> str:
  """`--config` as a file path: a file that exists is kept; otherwise a
  shipped config's name (demo, gsm8k.py, configs/gsm8k.py,
  icm_jax/configs/gsm8k.py) maps to its file. ':PRESET' is kept."""
  path, sep, preset = value.partition(":")
  if os.path.isfile(path):
    return value
  name = os.path.basename(path)
  if name.endswith(".py"):
    name = name[:-3]
  if name in SHIPPED_CONFIGS:
    path = os.path.join(directory or configs_dir(), name + ".py")
  return path + sep + preset


def _rewrite_config_flag(argv: Sequence[str]) -> List[str]:
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + resolve_config_arg(arg[len("--config="):])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = resolve_config_arg(out[i + 1])
  return out


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (a get_config() returning an "
    "ml_collections.ConfigDict) or a shipped config's name, e.g. demo or "
    "gsm8k:llama3.1-8b.", lock_config=True)
_CHECK_ONLY = flags.DEFINE_bool(
    "check_only", False, "Run every check that needs no weights (config, "
    "data, workdir, tokenizer, prompt lengths, mesh), then exit.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory, local or gs:// (labels, checkpoints, "
    "report, plots); default runs/<config name>.")


class _OwnInfoOnly(std_logging.Filter):
  """INFO and below only from icm_jax's own modules (however they log:
  orbax and our trainer both log through absl's logger)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING or
            record.name.startswith("icm_jax") or
            record.pathname.startswith(_PACKAGE_DIR))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _quiet_third_party() -> None:
  """Third-party INFO off unless --verbosity was given on the command line."""
  if any(a.startswith(("--verbosity", "-v=", "--v=")) for a in sys.argv):
    return
  own_only = _OwnInfoOnly()
  for handler in [logging.get_absl_handler(), *std_logging.getLogger().handlers]:
    handler.addFilter(own_only)
  for name in _ERROR_ONLY_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.ERROR)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _quiet_third_party()
  # Imported here so --help stays fast and absl has parsed the flags first.
  from icm_jax.checkpoints import CheckpointError
  from icm_jax.pipeline import run
  from icm_jax.run_config import ConfigError
  from icm_jax.storage import StorageError
  from icm_jax.tasks import DataError

  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=demo")
  try:
    _CONFIG.value.keys()  # a config file that failed to load raises here
  except OSError as e:
    sys.exit(_config_file_error(flags.FLAGS["config"].config_filename, e))
  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(
          config_flags.get_config_filename(flags.FLAGS["config"])))[0])
  try:
    outputs = run(_CONFIG.value, workdir, check_only=_CHECK_ONLY.value)
  except (ConfigError, DataError, CheckpointError, StorageError,
          FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  except (ValueError, OSError) as e:
    # Bad input found deep in a stage (a workdir holding another run's
    # checkpoints, ...): one line; the traceback with --verbosity=1.
    logging.debug("traceback", exc_info=True)
    sys.exit(f"error: {type(e).__name__}: {e} (--verbosity=1 shows where)")
  for name, path in outputs.items():
    print(f"{name}: {path}")


def _flags_parser(argv):
  """absl's parsing, with a bad flag, an unknown --config.KEY or a config
  file that raises (a bad FILE:PRESET) as one line instead of a traceback."""
  argv = _rewrite_config_flag(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {_root_cause(e)}\nPass --help for usage.")
  except OSError as e:  # ml_collections: the config file does not load
    value = next((a.split("=", 1)[1] for a in argv
                  if a.startswith("--config=")), "")
    sys.exit(_config_file_error(value, e))
  except (AttributeError, KeyError) as e:  # ml_collections: no such key
    key = str(e).strip("\"'").split("'")[0]
    where = [a for a in argv if a.startswith("--config.") and
             f".{key}" in a.split("=", 1)[0]]
    sys.exit(f"error: {where[0] if where else '--config'}: the config has "
             f"no key {key!r} (README, config reference)")


def _config_file_error(value: str, error: OSError) -> str:
  if "No such file" in str(error):
    return (f"error: --config={value}: no such config file, and not a "
            f"shipped config ({', '.join(SHIPPED_CONFIGS)})")
  return f"error: --config={value}: {_root_cause(error)}"


def _root_cause(error: BaseException) -> str:
  """Our own error in `error`'s chain (a config that raised), else the
  message's last line (ml_collections embeds the traceback's text)."""
  from icm_jax.checkpoints import CheckpointError
  from icm_jax.run_config import ConfigError
  seen = error
  while seen is not None:
    if isinstance(seen, (ConfigError, CheckpointError)):
      error = seen
      break
    seen = seen.__cause__ or seen.__context__
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  # "...Traceback...\n  icm_jax.run_config.ConfigError: the message"
  return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])


def _skip_accelerator_probe() -> None:
  """On a machine with no accelerator device at all, jax would still try an
  installed libtpu and print its failed probe (a dozen lines); ask for the
  CPU backend there, before jax loads. JAX_PLATFORMS set by the user wins."""
  if "JAX_PLATFORMS" in os.environ:
    return
  for pattern in ("/dev/accel*", "/dev/vfio/*", "/dev/nvidia*"):
    if glob.glob(pattern):
      return
  os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Console-script entry point."""
  _skip_accelerator_probe()
  app.run(_main, argv=list(sys.argv if argv is None else argv),
          flags_parser=_flags_parser)


if __name__ == "__main__":
  main()
