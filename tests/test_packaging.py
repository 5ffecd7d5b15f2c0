"""What `pip install` ships: the configs (by name, from any folder), their
example data, the bundled tasks, the licence and the `icm-jax` command."""

import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_wheel_ships_configs_data_licence_and_the_command(tmp_path):
  subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                  "--no-build-isolation", REPO, "-w", str(tmp_path)],
                 check=True, capture_output=True, timeout=300)
  (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
  names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
  from icm_jax.cli import SHIPPED_CONFIGS
  assert {"demo", "demo_full", "tiny"} <= set(SHIPPED_CONFIGS)
  shipped = {f"icm_jax/configs/{n}.py" for n in SHIPPED_CONFIGS}
  shipped |= {"icm_jax/configs/examples/claims_train.jsonl",
              "icm_jax/configs/examples/claims_test.jsonl",
              "icm_jax/tasks/data/sentiment/train_sentiment.json",
              "icm_jax/tasks/data/truthfulqa/train_truthfulqa.json",
              "icm_jax/cli.py"}
  assert shipped <= names, sorted(shipped - names)
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
  entry = next(n for n in names if n.endswith("entry_points.txt"))
  text = zipfile.ZipFile(tmp_path / wheel).read(entry).decode()
  assert "icm-jax = icm_jax.cli:main" in text


def test_shipped_config_names_resolve_from_any_folder(tmp_path, monkeypatch):
  from icm_jax.cli import configs_dir, resolve_config_arg
  monkeypatch.chdir(tmp_path)
  for spelling in ("gsm8k", "gsm8k.py", "configs/gsm8k.py",
                   "icm_jax/configs/gsm8k.py"):
    assert resolve_config_arg(spelling + ":llama3.1-8b") == os.path.join(
        configs_dir(), "gsm8k.py") + ":llama3.1-8b"
  (tmp_path / "mine.py").write_text("")
  assert resolve_config_arg("mine.py") == "mine.py"  # a file wins
  assert resolve_config_arg("nosuch") == "nosuch"
