"""ICM end to end: label a task with ICM, fine-tune on the labels, evaluate.

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/gsm8k.py --workdir=gs://... \
      --config.model.path=/models/Meta-Llama-3.1-8B --config.search.alpha=30

Stages (--config.stages=label,train,eval) and every other key: see
icm_jax/run_config.py and the README's config reference.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "configs", "demo.py"),
    "Config file (a get_config() returning an ml_collections.ConfigDict).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (labels, checkpoints, report, plots); "
    "default runs/<config name>.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so --help stays fast and absl has parsed the flags first.
  from icm_jax.checkpoints import CheckpointError
  from icm_jax.pipeline import run
  from icm_jax.run_config import ConfigError
  from icm_jax.tasks import DataError

  workdir = _WORKDIR.value or os.path.join(
      "runs", os.path.splitext(os.path.basename(
          config_flags.get_config_filename(flags.FLAGS["config"])))[0])
  try:
    outputs = run(_CONFIG.value, workdir)
  except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(f"error: {e}")
  for name, path in outputs.items():
    print(f"{name}: {path}")


if __name__ == "__main__":
  app.run(main)
