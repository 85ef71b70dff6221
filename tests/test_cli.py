"""The two command-line programs as a user meets them: a clean console, --help, one-line errors, Ctrl-C.

The programs run as subprocesses from the repository root, as README.md gives them. The runs that
stand for a newcomer's drop the test settings of conftest.py (JAX_PLATFORMS, XLA_FLAGS,
TF_CPP_MIN_LOG_LEVEL) from their environment, so that what they print is what a plain run prints.
"""

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from codit_jax import checkpoints, demo, runtime
from codit_jax.errors import CheckpointError

REPO = Path(__file__).resolve().parent.parent
# Lines of other libraries that must not reach a plain run's console (issue: README's first command).
NOISE = ("Traceback (most recent call last)", "oneDNN custom operations", "absl::InitializeLog()",
         "Unable to initialize backend", "FeatureConnector.dtype", "differ on disk and in the code",
         "PyTorch was not found")
_TEST_SETTINGS = ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")


def _env(newcomer: bool) -> dict:
  env = dict(os.environ, HF_HUB_OFFLINE="1")
  if newcomer:
    for name in _TEST_SETTINGS:
      env.pop(name, None)
  else:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return env


def _run(args, newcomer=False, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(newcomer), capture_output=True, text=True,
                        timeout=timeout)


def _start(args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], cwd=REPO, env=_env(False), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _assert_one_error_line(result, *fragments) -> str:
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0
  assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _assert_clean(console: str) -> None:
  for line in NOISE:
    assert line not in console, f"{line!r} in the console:\n{console}"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """The Quick start's codit-generate demo, as a newcomer runs it (only its output folder moved)."""
  out = tmp_path_factory.mktemp("demo") / "codit"
  result = _run(["-m", "codit_jax.generate", "--config=configs/demo.py", f"--config.output_dir={out}"],
                newcomer=True)
  assert result.returncode == 0, result.stderr
  return out, result


def test_quick_start_console_shows_only_our_lines(demo_run):
  out, result = demo_run
  console = result.stdout + result.stderr
  _assert_clean(console)
  assert f"codit-generate: wrote 48 rows to {out}" in result.stdout
  assert "48 prompts; 0 already written, 48 to do." in result.stderr  # our own progress lines stay


def test_verbosity_brings_the_full_logs_back(demo_run):
  out, _ = demo_run  # finished: this run only re-reads it
  result = _run(["-m", "codit_jax.generate", "--config=configs/demo.py", f"--config.output_dir={out}",
                 "--verbosity=0"], newcomer=True)
  assert result.returncode == 0, result.stderr
  assert "dataset_info.py" in result.stderr  # TFDS's INFO lines
  assert any(line in result.stderr for line in NOISE[1:4]), result.stderr  # TensorFlow's or JAX's start-up


def test_train_demo_console_is_clean_and_export_is_world_readable(demo_run, tmp_path):
  out, _ = demo_run
  result = _run(["-m", "codit_jax.train", "--config=configs/sft_demo.py", f"--config.datasets={out}",
                 f"--config.output_dir={tmp_path / 'sft'}", "--config.max_steps=2"], newcomer=True)
  assert result.returncode == 0, result.stderr
  _assert_clean(result.stdout + result.stderr)
  hf = tmp_path / "sft" / "hf"
  weights, config = (stat.S_IMODE((hf / name).stat().st_mode) for name in ("model.safetensors", "config.json"))
  assert weights == config and weights & stat.S_IROTH, (oct(weights), oct(config))


@pytest.mark.parametrize("module, typo, right, keys_file", [
    ("codit_jax.generate", "max_new_token", "max_new_tokens", "configs/default.py"),
    ("codit_jax.train", "max_step", "max_steps", "configs/sft_default.py"),
])
def test_mistyped_config_key_is_one_line(module, typo, right, keys_file):
  config = "configs/demo.py" if module == "codit_jax.generate" else "configs/sft_demo.py"
  result = _run(["-m", module, f"--config={config}", f"--config.{typo}=8"])
  _assert_one_error_line(result, f"unknown config key '{typo}'", f"did you mean '{right}'?", keys_file)


def test_unknown_key_message_names_the_dotted_path():
  config = ConfigDict({"decode": {"alpha": 0.1}})
  with pytest.raises(AttributeError) as error:
    getattr(config.decode, "alpah")
  message = runtime.unknown_key_message(error.value, ["prog", "--config.decode.alpah=2"], "configs/default.py")
  assert message == ("unknown config key 'decode.alpah' (did you mean 'decode.alpha'?); the keys are listed in "
                     "configs/default.py.")
  # Not a user's override: left to the traceback, since it is a bug.
  assert runtime.unknown_key_message(error.value, ["prog", "--config.seed=2"], "configs/default.py") is None


def test_missing_config_file_is_one_line():
  result = _run(["-m", "codit_jax.generate", "--config=configs/no_such_config.py"])
  _assert_one_error_line(result, "could not load --config=configs/no_such_config.py", "No such file")


@pytest.mark.parametrize("module, text, fragments", [
    ("codit_jax.generate", "def get_config(:\n  pass\n", ("bad.py, line 1: invalid syntax",)),
    ("codit_jax.train", "def get_config(:\n  pass\n", ("bad.py, line 1: invalid syntax",)),
    ("codit_jax.generate", "SEED = 1\n", ("bad.py has no get_config()", "as in configs/default.py")),
    ("codit_jax.generate", "def get_config():\n  x = 1\n  return x.keys()\n",
     ("bad.py, line 3: AttributeError: 'int' object has no attribute 'keys'",)),
    # A config that extends another one beside it: the error is in that one.
    ("codit_jax.generate", "from codit_jax import config_files\n\ndef get_config():\n"
     "  return config_files.sibling_config(__file__, 'base.py')\n", ("base.py, line 2: NameError",)),
])
def test_an_error_in_the_config_file_is_one_line_naming_file_and_line(tmp_path, module, text, fragments):
  (tmp_path / "bad.py").write_text(text)
  (tmp_path / "base.py").write_text("def get_config():\n  return undefined_name\n")
  result = _run(["-m", module, f"--config={tmp_path / 'bad.py'}"])
  _assert_one_error_line(result, "error: config file", *fragments)


# The console scripts are `codit_jax.generate:run` and `codit_jax.train.app:run`; called with the script's
# name in argv[0] they behave as the installed scripts do.
@pytest.mark.parametrize("args, program, keys_file", [
    (["-c", "import sys; sys.argv[0] = 'codit-generate'; from codit_jax.generate import run; run()"],
     "codit-generate", "configs/default.py"),
    (["-c", "import sys; sys.argv[0] = 'codit-train'; from codit_jax.train.app import run; run()"],
     "codit-train", "configs/sft_default.py"),
    (["-m", "codit_jax.generate"], "codit-generate", "configs/default.py"),
    (["-m", "codit_jax.train"], "codit-train", "configs/sft_default.py"),
    (["-m", "codit_jax.train.app"], "codit-train", "configs/sft_default.py"),  # launch_tpu.sh --module=
])
def test_help_names_config_overrides_and_keys(args, program, keys_file):
  result = _run([*args, "--help"])
  assert result.returncode == 0, result.stderr
  for fragment in (f"USAGE: {program} --config=FILE", "--config.KEY=VALUE", keys_file, "README.md", "--verbosity"):
    assert fragment in result.stdout, result.stdout


def test_train_app_module_runs_the_trainer():
  # It used to exit 0 without doing anything; now it is codit-train, which asks for a config.
  result = _run(["-m", "codit_jax.train.app"])
  _assert_one_error_line(result, "codit-train: error: no config")


def _interrupt_after(process: subprocess.Popen, marker: str) -> subprocess.CompletedProcess:
  seen = []
  for line in process.stderr:  # absl writes our progress lines to stderr
    seen.append(line)
    if marker in line:
      process.send_signal(signal.SIGINT)
      break
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, "".join(seen) + stderr)


def test_ctrl_c_during_generate_says_a_rerun_resumes(tmp_path):
  process = _start(["-m", "codit_jax.generate", "--config=configs/demo.py", f"--config.output_dir={tmp_path}",
                    "--config.max_new_tokens=900", "--config.log_every_seconds=0.1"])
  result = _interrupt_after(process, "already written")
  assert result.returncode == 130, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("codit-generate: error: interrupted; rerun the same command to resume"), last
  assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr


def test_ctrl_c_during_train_says_a_rerun_resumes(demo_run, tmp_path):
  out, _ = demo_run
  process = _start(["-m", "codit_jax.train", "--config=configs/sft_demo.py", f"--config.datasets={out}",
                    f"--config.output_dir={tmp_path}", "--config.max_steps=100000"])
  result = _interrupt_after(process, "step 0 | eval_loss")
  assert result.returncode == 130, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("codit-train: error: interrupted; rerun the same command to resume from the latest "
                         "checkpoint"), last
  assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr


_MISSING_TORCH_APP = """
import sys
sys.modules["torch"] = None  # as if torch were not installed
from codit_jax import runtime

def main(argv):
  import torch  # noqa: F401

runtime.run_app(main, "codit-generate", "help", keys_file="configs/default.py", resume_hint="rerun",
                out_of_memory_hint="use less")
"""


def test_missing_optional_package_names_the_pip_command():
  result = _run(["-c", _MISSING_TORCH_APP])
  _assert_one_error_line(result, "codit-generate: error:", "'torch'", 'pip install torch==2.13.0 && pip install -e ".[test]"')


# The program's own entry point, around a main that asks the CPU device for 4 TiB: XLA's real
# RESOURCE_EXHAUSTED (or, with "other", an XLA error that is not about memory).
_OUT_OF_MEMORY_APP = """
import sys
import {module} as app
import jax
OTHER = "other" in sys.argv[1:]

def main(argv):
  if OTHER:
    raise jax.errors.JaxRuntimeError("INTERNAL: something else broke")
  jax.numpy.zeros((1 << 40,), jax.numpy.float32).block_until_ready()

app.main = main
sys.argv = ["prog", "--config={config}"]
app.run()
"""


@pytest.mark.parametrize("module,config,program,hint", [
    ("codit_jax.generate", "configs/demo.py", "codit-generate", "--config.kv_cache_gib"),
    ("codit_jax.train.app", "configs/sft_demo.py", "codit-train", "--config.grad_accumulation"),
])
def test_devices_out_of_memory_is_one_line_naming_the_settings(module, config, program, hint):
  result = _run(["-c", _OUT_OF_MEMORY_APP.format(module=module, config=config)])
  line = _assert_one_error_line(result, f"{program}: error: the devices ran out of memory (RESOURCE_EXHAUSTED:", hint)
  assert result.returncode == 1, line
  other = _run(["-c", _OUT_OF_MEMORY_APP.format(module=module, config=config), "other"])
  assert other.returncode == 1 and "Traceback" in other.stderr and "something else broke" in other.stderr  # not hidden


def test_folder_without_tokenizer_is_refused_by_name(tmp_path):
  source = Path(demo.resolve("builtin:demo-post"))
  folder = tmp_path / "no_tokenizer"
  folder.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(source / name, folder)
  with pytest.raises(CheckpointError, match=f"student: the checkpoint folder {folder} has no tokenizer"):
    checkpoints.load_tokenizer(folder, "student")
  assert checkpoints.load_tokenizer(source, "student").chat_template  # a whole folder loads


def test_unreachable_hub_id_suggests_hf_auth_login():
  # Tests run with HF_HUB_OFFLINE=1: the Hub cannot be reached.
  with pytest.raises(CheckpointError, match="`hf auth login`") as error:
    checkpoints.resolve("no-such-org/no-such-model")
  assert "huggingface-cli" not in str(error.value)


def test_quiet_environment_leaves_accelerators_and_user_settings_alone(monkeypatch):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", "cuda:/opt/pjrt_cuda.so")  # a PJRT plugin is present
  runtime.quiet_environment(["codit-generate"])
  assert "JAX_PLATFORMS" not in os.environ
  monkeypatch.delenv("PJRT_NAMES_AND_LIBRARY_PATHS")
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
  runtime.quiet_environment(["codit-generate"])
  assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"  # the user's own setting wins
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
  runtime.quiet_environment(["codit-generate", "--verbosity=1"])
  assert "TF_CPP_MIN_LOG_LEVEL" not in os.environ  # --verbosity: nothing is quieted


@pytest.mark.parametrize("package", ["jax_plugins/xla_cuda12", "libtpu"])  # jax[cuda12]'s PJRT plugin; jax[tpu]
def test_jax_platform_left_to_jax_where_an_accelerator_runtime_is_installed(package, tmp_path):
  (tmp_path / package).mkdir(parents=True)
  (tmp_path / package / "__init__.py").write_text("")
  env = {k: v for k, v in os.environ.items() if k not in _TEST_SETTINGS}
  show = "import os, codit_jax; print(os.environ.get('JAX_PLATFORMS'))"
  runs = {path: subprocess.run([sys.executable, "-c", show], cwd=REPO, env=dict(env, PYTHONPATH=path),
                               capture_output=True, text=True, timeout=300) for path in (str(tmp_path), "")}
  assert runs[str(tmp_path)].stdout.strip() == "None", runs[str(tmp_path)].stderr  # JAX picks the GPU/TPU
  assert runs[""].stdout.strip() == "cpu", runs[""].stderr  # nothing but the CPU here: no TPU probe
