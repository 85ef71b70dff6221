"""Start-up shared by codit-generate and codit-train: a quiet console, one-line errors, --help.

`quiet_environment()` runs from codit_jax/__init__.py, so before TensorFlow,
absl, JAX or transformers are imported by anything of ours: the variables they
read at import time must be set by then, and in codit-train TensorFlow is
imported right there, with its native start-up lines dropped. codit-generate
does not import TensorFlow at all (seconds of start-up) unless it reads TFDS
prompts or writes to gs://; those paths call import_tensorflow_quietly() first.
Every setting is a default (os.environ.setdefault), so a user's own
TF_CPP_MIN_LOG_LEVEL or JAX_PLATFORMS wins, and `--verbosity=N` on the command
line turns all of it off.

`run_app(main, ...)` is the console entry point of both programs: it prints the
program's --help and exits 0, and turns what a user can act on (a CoditError, a
mistyped config key, a flag error, a missing extra, Ctrl-C, the devices out of
memory) into one line on stderr instead of a traceback.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import contextlib
import fcntl
import logging as std_logging
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_VERBOSITY_FLAGS = ("verbosity", "v")  # absl's --verbosity and its short name
# Module -> console script.
_PROGRAMS = {"codit_jax.generate": "codit-generate", "codit_jax.train": "codit-train",
             "codit_jax.train.app": "codit-train"}
# The programs that always import TensorFlow (codit-train reads its data with TFDS's tf.data).
_TENSORFLOW_PROGRAMS = frozenset({"codit-train"})
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")

# Known-harmless lines, matched by their exact text so that any other warning still shows.
# transformers, at import, when torch is absent (torch is only the tests' reference here).
_TRANSFORMERS_NO_TORCH = ("PyTorch was not found. Models won't be available and only tokenizers, configuration "
                          "and file/data utilities can be used.")
# tensorflow_datasets, reading back a dataset whose features were declared with NumPy dtypes.
_HARMLESS_ABSL_WARNINGS = frozenset(
    f"`{cls}.dtype` is deprecated. Please change your code to use NumPy with the field `{cls}.np_dtype` "
    f"or use TensorFlow with the field `{cls}.tf_dtype`." for cls in ("FeatureConnector", "Tensor", "Text"))

# TensorFlow's native start-up lines (absl C++ logging, which TF_CPP_MIN_LOG_LEVEL no longer reaches).
_HARMLESS_NATIVE_LINES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on. You may see slightly different numerical results due to floating-point "
    "round-off errors from different computation orders. To turn them off, set the environment variable "
    "`TF_ENABLE_ONEDNN_OPTS=0`.",
)

# Optional packages a run may reach, and the command that installs them.
_EXTRAS = {
    "torch": 'pip install torch==2.13.0 && pip install -e ".[test]"',
    "scipy": 'pip install -e ".[test]"',
    "pytest": 'pip install -e ".[test]"',
    "libtpu": 'pip install -e ".[tpu]"',
}


def wants_full_logs(argv: Sequence[str]) -> bool:
  """True when the command line sets absl's verbosity: then nothing is filtered."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and name in _VERBOSITY_FLAGS:
      return True
  return False


def quiet_environment(argv: Sequence[str] | None = None) -> None:
  """Defaults that keep other libraries' start-up lines off a plain run's console."""
  if wants_full_logs(sys.argv if argv is None else argv):
    return
  # TensorFlow's C++ INFO lines, for the TF versions whose logging still reads it (see
  # import_tensorflow_quietly for 2.21); its warnings and errors stay.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if _only_cpu_possible():
    # Otherwise JAX probes for libtpu.so and logs "Unable to initialize backend 'tpu'".
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  std_logging.getLogger("transformers").addFilter(_DropExact({_TRANSFORMERS_NO_TORCH}))
  if _our_program() in _TENSORFLOW_PROGRAMS:
    # It imports TensorFlow anyway; importing it here is what keeps its native start-up lines off
    # the console.
    import_tensorflow_quietly()


def hide_unused_torch() -> None:
  """In codit-generate and codit-train, torch looks absent to transformers (`sys.modules["torch"] = None`).

  Neither program uses torch, but transformers 5 imports it whenever it is installed (its
  configuration_utils imports modeling_rope_utils, which imports torch): measured, the first
  `load_config` takes 2.19 s with torch installed and 0.24 s with it hidden, on every start of a run.
  Only the programs: code that imports codit_jax itself, the tests (torch is their reference) among
  it, keeps torch, and so does a program that imported it first.
  """
  if _our_program() and "torch" not in sys.modules:
    sys.modules["torch"] = None


def _our_program() -> str | None:
  """The program's name (codit-generate, codit-train) when run as its console script or with python -m;
  None otherwise."""
  if os.path.basename(sys.argv[0]) in _PROGRAMS.values():
    return os.path.basename(sys.argv[0])
  orig = getattr(sys, "orig_argv", [])
  return next((_PROGRAMS[b] for a, b in zip(orig, orig[1:]) if a == "-m" and b in _PROGRAMS), None)


def _only_cpu_possible() -> bool:
  """True when JAX could find no accelerator here: no TPU runtime or device, no PJRT plugin.

  jax[tpu] installs the libtpu package and a TPU VM has /dev/accel* (v2-v4) or /dev/vfio (v5e and
  later); jax[cuda12] and other accelerators come as PJRT plugins, which JAX finds by the
  `jax_plugins` entry points or namespace package. Where any of these is present nothing is set and
  JAX picks its backend as usual, so TPU and GPU runs are untouched.
  """
  if os.environ.get("TPU_LIBRARY_PATH") or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
    return False
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return False
  if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (if it is not yet) with its harmless native start-up lines dropped.

  TensorFlow 2.21 writes them with absl's C++ logging straight to file descriptor 2, so they can only
  be caught there: stderr goes to a temporary file during the import, and every other line is
  written back once it is done.
  """
  if "tensorflow" in sys.modules or wants_full_logs(sys.argv) or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
    return
  with _native_stderr_without(_HARMLESS_NATIVE_LINES):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,redefined-outer-name


@contextlib.contextmanager
def _native_stderr_without(lines: Sequence[str]):
  """Holds back what is written to fd 2 inside the block; writes it back without the given lines.

  A line is dropped when it is one of `lines`, or is an absl log line ("I0000 ... file.cc:N] ")
  whose message is one of them.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      held.seek(0)
      for line in held.read().decode(errors="replace").splitlines(keepends=True):
        message = line.rstrip("\n").split("] ", 1)[-1]
        if line.rstrip("\n") not in lines and message not in lines:
          sys.stderr.write(line)
      sys.stderr.flush()


class _DropExact(std_logging.Filter):
  """Drops log records whose formatted message is one of `messages`."""

  def __init__(self, messages):
    super().__init__()
    self.messages = frozenset(messages)

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.getMessage() not in self.messages


def quiet_console() -> None:
  """Keeps a plain run's console to the program's own lines (see _ConsoleFilter); --verbosity=0 shows all."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not wants_full_logs(sys.argv):
    logging.get_absl_handler().addFilter(_ConsoleFilter())


class _ConsoleFilter(std_logging.Filter):
  """What a plain run prints: our own INFO lines, and every library's warnings but the known-harmless."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return record.getMessage() not in _HARMLESS_ABSL_WARNINGS
    return record.pathname.startswith(_PACKAGE_DIR + os.sep)


# The lock file a run's process 0 holds in its local output folder (flock), and the ones this process holds.
LOCK_FILE = ".codit-lock"
_LOCKS: dict[str, Any] = {}


def lock_folder(folder: str, program: str) -> None:
  """Takes `folder`'s lock (creating the folder) for this process, or refuses with one line naming the
  run that holds it: two runs writing one folder would do the same work side by side.

  flock: the kernel releases it when the process ends, kill -9 included; a lock left by a dead run is
  taken over. Held until release_folder_locks(). Nothing is locked on gs:// (no flock there) or
  where a file is in the way (the caller's checks explain that).
  """
  if "://" in folder or (os.path.exists(folder) and not os.path.isdir(folder)):
    return
  key = os.path.realpath(folder)
  if key in _LOCKS:
    return
  from codit_jax.errors import CoditError  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, LOCK_FILE), "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  except OSError as e:
    raise CoditError(f"output_dir {folder} cannot be written ({e.strerror}). Choose a writable folder.") from None
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or "another process"
    lock.close()
    raise CoditError(f"another {program} run ({holder}) is writing to {folder}. Wait for it to end (then rerun "
                     "to resume after it), or choose another output_dir.") from None
  except OSError as e:  # a file system without locks (some NFS mounts): run as before there were locks
    lock.close()
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("%s cannot be locked (%s): a second run on it would not be stopped.", folder, e.strerror)
    return
  lock.seek(0)
  lock.truncate()
  lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
  lock.flush()
  _LOCKS[key] = lock


def release_folder_locks() -> None:
  """Releases every folder lock this process took (lock_folder)."""
  while _LOCKS:
    _LOCKS.popitem()[1].close()


def run_app(main: Callable[[list[str]], None], program: str, help_text: str, keys_file: str,
            resume_hint: str, out_of_memory_hint: str) -> None:
  """Runs `main` as an absl app, with one-line errors; never returns.

  program: the console script's name, which starts every error line.
  help_text: what --help prints before the program's flags.
  keys_file: where the config keys are listed, named in the message of a mistyped key.
  resume_hint: what a rerun after Ctrl-C does, e.g. "rerun the same command to resume".
  out_of_memory_hint: which settings to change, and what a rerun with them does, when XLA runs out of
    device memory (RESOURCE_EXHAUSTED, at compile time or run time).
  """
  from absl import app  # pylint: disable=g-import-not-at-top  (after quiet_environment)
  from codit_jax.errors import CoditError  # pylint: disable=g-import-not-at-top

  def parse(argv):
    return _parse_flags(argv, main, program, help_text, keys_file)

  def checked_main(argv):
    quiet_console()
    _check_config_loaded()
    if program in _TENSORFLOW_PROGRAMS:
      import_tensorflow_quietly()  # codit-train reads its data with TFDS, which imports TensorFlow late
    main(argv)

  try:
    app.run(checked_main, flags_parser=parse)
  except CoditError as e:
    _fail(program, str(e), 1)
  except KeyboardInterrupt:
    _fail(program, f"interrupted; {resume_hint}.", 130)
  except ModuleNotFoundError as e:
    top = (e.name or "").split(".")[0]
    if top not in _EXTRAS:
      raise
    _fail(program, f"this needs the optional package {top!r}, which is not installed: {_EXTRAS[top]}", 1)
  except Exception as e:  # pylint: disable=broad-except
    if not _is_out_of_memory(e):
      raise
    _fail(program, f"the devices ran out of memory ({_first_line(e)}). {out_of_memory_hint}.", 1)


def _is_out_of_memory(error: BaseException) -> bool:
  """XLA's out-of-memory error, from a compile (TPU: "Ran out of memory in memory space hbm") or an
  allocation ("Out of memory while trying to allocate ...")."""
  jax = sys.modules.get("jax")
  return jax is not None and isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def _first_line(error: BaseException, limit: int = 300) -> str:
  line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return line if len(line) <= limit else line[:limit] + "..."


def _fail(program: str, message: str, code: int):
  print(f"{program}: error: {message}", file=sys.stderr)
  sys.exit(code)


def _parse_flags(argv: list[str], main, program: str, help_text: str, keys_file: str) -> list[str]:
  """absl's flag parsing, with our --help, and one line for a bad flag or config key."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(arg in HELP_ARGS for arg in args):
    print(_help(main, help_text, full=any(arg.lstrip("-") == "helpfull" for arg in args)))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(program, f"{e}. See {program} --help.", 2)
  except Exception as e:  # pylint: disable=broad-except  (the config file is Python, run while parsing)
    message = (unknown_key_message(e, argv, keys_file) if isinstance(e, (KeyError, AttributeError)) else None) \
        or config_file_message(e, argv, keys_file)
    if message is None:
      raise
    _fail(program, message, 2)


def unknown_key_message(error: Exception, argv: Sequence[str], keys_file: str) -> str | None:
  """The one line for ml_collections' error on an unknown --config.<key>; None if it is not that."""
  inner = error
  while inner.args and isinstance(inner.args[0], BaseException):
    inner = inner.args[0]
  text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
  key = re.match(r"""\s*["']*([^'"\n]+)""", text)
  if key is None:
    return None
  key = key.group(1)
  suggestion = re.search(r'Did you mean "([^"]+)"', text)
  for arg in argv[1:]:
    override = re.match(r"--?config\.([^=\s]+)", arg)
    if override is None:
      continue
    path = override.group(1).split(".")
    if key in path:
      dotted = ".".join(path[:path.index(key) + 1])
      hint = ""
      if suggestion:
        hint = f" (did you mean {'.'.join(path[:path.index(key)] + [suggestion.group(1)])!r}?)"
      return f"unknown config key {dotted!r}{hint}; the keys are listed in {keys_file}."
  return None


def config_file_message(error: BaseException, argv: Sequence[str], keys_file: str) -> str | None:
  """The one line for an error in the --config file's own code (a syntax error, no get_config(), an
  exception its code raised), naming the file and line; None if the error did not come from it.

  Files beside it count as its own: a config loads its base config from there (sibling_config).
  """
  path = _config_file(argv)
  if path is None:
    return None
  folder = os.path.dirname(path)
  if isinstance(error, SyntaxError) and error.filename and os.path.dirname(os.path.abspath(error.filename)) == folder:
    return f"config file {error.filename}, line {error.lineno}: {error.msg}. Fix the file."
  frames = [frame for frame in traceback.extract_tb(error.__traceback__)
            if os.path.dirname(os.path.abspath(frame.filename)) == folder]
  if frames:
    return (f"config file {frames[-1].filename}, line {frames[-1].lineno}: {type(error).__name__}: "
            f"{_first_line(error)}. Fix the file.")
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return (f"config file {path} has no get_config(): a config file is Python whose get_config() returns "
            f"the ConfigDict, as in {keys_file}.")
  return None


def _config_file(argv: Sequence[str]) -> str | None:
  """The absolute path of the --config file in argv (ml_collections' `path.py:arguments` form too)."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    value = None
    if re.match(r"--?config=", arg):
      value = arg.split("=", 1)[1]
    elif arg in ("--config", "-config") and i + 1 < len(args):
      value = args[i + 1]
    if value:
      if not os.path.exists(value) and ":" in value:
        value = value.split(":", 1)[0]
      return os.path.abspath(value)
  return None


def _check_config_loaded() -> None:
  """ml_collections defers a --config file's load error to the first use; report it as one line here."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  from codit_jax.errors import CoditError  # pylint: disable=g-import-not-at-top

  if "config" not in flags.FLAGS or flags.FLAGS["config"].value is None:
    return
  try:
    flags.FLAGS["config"].value.keys()
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise CoditError(f"could not load --config={flags.FLAGS['config'].config_filename}: {reason}") from None


def _help(main, help_text: str, full: bool) -> str:
  from absl import flags  # pylint: disable=g-import-not-at-top

  if full:
    listing = flags.FLAGS.get_help()
  else:
    # absl files flags under the defining module's name, or its file when it runs as __main__.
    module = sys.modules.get(main.__module__)
    keys = {main.__module__, sys.argv[0], getattr(module, "__file__", None)}
    by_module = flags.FLAGS.flags_by_module_dict()
    lines = []
    for key in sorted(k for k in keys if k in by_module):  # without absl's "<module path>:" header
      lines += [line for line in flags.FLAGS.module_help(key).splitlines() if line.strip() and line != f"{key}:"]
    listing = "\n".join(lines)
  return (f"{help_text.strip()}\n\nFlags:\n{listing}\n\n"
          "  --verbosity=N: show every library's full logs (TensorFlow, JAX, TFDS, orbax); 0 is INFO.\n"
          "  --helpfull: list absl's own flags too.")
