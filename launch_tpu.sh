#!/usr/bin/env bash
# Starts a codit-jax job on every worker of a Cloud TPU VM or pod slice: see usage() or run with --help.
set -euo pipefail

readonly PROG="launch_tpu.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly REPO_ROOT
# The source tarball's name in each worker's home folder, between copy and install.
readonly TARBALL_NAME="codit-jax-src.tar.gz"

usage() {
  cat <<'EOF'
Usage: launch_tpu.sh --name=NAME --zone=ZONE [options] [-- PROGRAM_FLAGS...]

Creates the TPU VM or pod slice NAME (or reuses it when it exists), installs
codit-jax on every worker and runs `python -m codit_jax.generate` (what the
codit-generate console script runs) on all of them at once, each worker with
the same PROGRAM_FLAGS. On a pod slice the workers find each other through
jax.distributed, so all of them must run; output_dir must then be shared
(a gs:// bucket).

Example (v5e is offered in us-central1-a, us-south1-a, us-west1-c and us-west4-a;
us-central2-b serves only v4):
  ./launch_tpu.sh --name=codit-v5e --zone=us-west4-a --accelerator-type=v5litepod-16 -- \
    --config=configs/qwen3_8b.py --config.prompts=gs://bucket/seed.jsonl \
    --config.output_dir=gs://bucket/codit-qwen3-8b

Required:
  --name=NAME               TPU VM / pod slice name
  --zone=ZONE               its zone, one that offers the TYPE, e.g. us-west4-a (v5e);
                            list them: gcloud compute tpus accelerator-types list --zone=ZONE

The TPU (used only when NAME does not exist yet):
  --accelerator-type=TYPE   e.g. v4-8, v5litepod-16, v5p-8, v6e-8; needed to create
  --version=RUNTIME         TPU software version; default by TYPE: v2-alpha-tpuv6e (v6e),
                            v2-alpha-tpuv5 (v5p), v2-alpha-tpuv5-lite (v5e),
                            tpu-ubuntu2204-base (v4 and older)
  --spot                    create it as a Spot TPU (cheaper, can be preempted)
  --project=PROJECT         Google Cloud project (default: gcloud's configured one)

Installing (on every worker, into REMOTE_DIR/src with a virtualenv in REMOTE_DIR/venv):
  --git-url=URL             clone this repository URL on the workers, instead of copying
                            this checkout's committed tree (`git archive` + scp)
  --git-ref=REF             branch, tag or commit to install (default: HEAD, i.e. this
                            checkout's commit, or the default branch of --git-url)
  --remote-dir=DIR          folder on the workers, relative to the home folder
                            (default: codit-jax)
  --python=PYTHON           interpreter for the virtualenv (default: python3.11; JAX needs
                            3.11+, TPU runtimes ship 3.10, so a missing pythonX.Y is
                            installed with apt-get)
  --skip-install            run what is already installed; copy and install nothing

Running:
  --module=MODULE           Python module to run (default: codit_jax.generate), e.g.
                            codit_jax.train for codit-train
  --env=NAME[=VALUE]        set an environment variable for the program on every worker;
                            NAME alone copies its local value (e.g. --env=HF_TOKEN for
                            gated checkpoints); repeatable
  --detach                  start the program in the background on each worker (nohup) and
                            return; its log is REMOTE_DIR/logs/MODULE-TIME.log on each worker
  --dry-run                 print the commands instead of running them
  -h, --help                show this help

Everything after `--` goes to the program unchanged. The program runs in
REMOTE_DIR/src, so `--config=configs/<pair>.py` names a config of the installed
tree; prompts, checkpoints and output_dir should be gs:// paths, Hub ids or
paths that exist on every worker.
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 1
}

usage_error() {
  echo "$PROG: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# One word as the shell reads it: plain words as they are, anything else in single quotes.
shell_quote() {
  local word="$1"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Words joined into one command line that a shell splits back into the same words.
quote_words() {
  local line="" word
  for word in "$@"; do
    line+="${line:+ }$(shell_quote "$word")"
  done
  printf '%s' "$line"
}

# Runs a command, or only prints it with --dry-run. Printed with `+ ` as `set -x` would.
run() {
  if [[ "$dry_run" == true ]]; then
    echo "+ $(quote_words "$@")"
  else
    echo "+ $(quote_words "$@")" >&2
    "$@"
  fi
}

# A remote command run on every worker. The printed form hides environment values copied
# from this machine (tokens), which would otherwise end up in terminals and logs.
run_on_all_workers() {
  local remote_command="$1" shown_command="$2"
  local ssh=(gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all)
  if [[ "$dry_run" == true ]]; then
    echo "+ $(quote_words "${ssh[@]}" --command="$shown_command")"
  else
    echo "+ $(quote_words "${ssh[@]}" --command="$shown_command")" >&2
    "${ssh[@]}" --command="$remote_command"
  fi
}

default_runtime_version() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------

name=""
zone=""
project=""
accelerator_type=""
runtime_version=""
spot=false
git_url=""
git_ref=""
remote_dir="codit-jax"
python="python3.11"
module="codit_jax.generate"
env_specs=()
install=true
detach=false
dry_run=false
program_args=()

set_option() {
  local option="$1" value="$2"
  case "$option" in
    --name) name="$value" ;;
    --zone) zone="$value" ;;
    --project) project="$value" ;;
    --accelerator-type) accelerator_type="$value" ;;
    --version) runtime_version="$value" ;;
    --git-url) git_url="$value" ;;
    --git-ref) git_ref="$value" ;;
    --remote-dir) remote_dir="$value" ;;
    --python) python="$value" ;;
    --module) module="$value" ;;
    --env) env_specs+=("$value") ;;
    --spot | --skip-install | --detach | --dry-run) usage_error "$option takes no value." ;;
    *) usage_error "unknown option $option. Flags for the program go after '--'." ;;
  esac
}

while (($# > 0)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      program_args=("$@")
      break
      ;;
    --spot) spot=true ;;
    --skip-install) install=false ;;
    --detach) detach=true ;;
    --dry-run) dry_run=true ;;
    --*=*) set_option "${1%%=*}" "${1#*=}" ;;
    --*)
      (($# >= 2)) || usage_error "$1 needs a value."
      set_option "$1" "$2"
      shift
      ;;
    *) usage_error "unexpected argument '$1'. Flags for the program go after '--'." ;;
  esac
  shift
done

missing=()
[[ -n "$name" ]] || missing+=("--name")
[[ -n "$zone" ]] || missing+=("--zone")
if ((${#missing[@]} > 0)); then
  usage_error "missing required option(s): ${missing[*]}."
fi
# These end up unquoted in remote paths and commands (and remote_dir in an `rm -rf`), so only
# plain names pass: path components may not be empty, '.' or '..'.
[[ "$remote_dir" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$ ]] ||
  usage_error "--remote-dir=$remote_dir: give a relative folder such as codit-jax (letters, digits, . _ - and /)."
[[ "$module" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$ ]] ||
  usage_error "--module=$module is not a Python module name such as codit_jax.train."
[[ "$python" =~ ^[A-Za-z0-9_./-]+$ ]] || usage_error "--python=$python: give a command or path such as python3.11."

gcloud_flags=(--zone="$zone")
if [[ -n "$project" ]]; then
  gcloud_flags+=(--project="$project")
fi

# ---------------------------------------------------------------------------------------------
# The TPU: reuse it when it exists, else create it.
# ---------------------------------------------------------------------------------------------

create_tpu() {
  [[ -n "$accelerator_type" ]] ||
    die "TPU $name does not exist in $zone. Give --accelerator-type (e.g. v5litepod-16) to create it."
  local create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}"
    --accelerator-type="$accelerator_type"
    --version="${runtime_version:-$(default_runtime_version "$accelerator_type")}")
  if [[ "$spot" == true ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
}

ensure_tpu() {
  local describe=(gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}"
    --format="value(state,acceleratorType)")
  if [[ "$dry_run" == true ]]; then
    run "${describe[@]}"
    if [[ -n "$accelerator_type" ]]; then
      echo "# only if $name does not exist yet:"
      create_tpu
    fi
    return
  fi
  local description state existing_type errors
  errors="$(mktemp)"
  echo "+ $(quote_words "${describe[@]}")" >&2
  if description="$("${describe[@]}" 2>"$errors")"; then
    rm -f "$errors"
    read -r state existing_type <<<"$description" || true
    if [[ -n "$accelerator_type" && -n "$existing_type" && "$existing_type" != "$accelerator_type" ]]; then
      echo "$PROG: warning: TPU $name exists as $existing_type, not $accelerator_type; using it as it is." >&2
    fi
    case "$state" in
      READY) echo "$PROG: reusing TPU $name ($existing_type, $state)." >&2 ;;
      STOPPED) run gcloud compute tpus tpu-vm start "$name" "${gcloud_flags[@]}" ;;
      CREATING | STARTING | RESTARTING | REPAIRING)
        die "TPU $name is $state. Wait until it is READY (gcloud compute tpus tpu-vm describe $name --zone=$zone) and run this again."
        ;;
      *)
        die "TPU $name is ${state:-in an unknown state}, so it cannot run jobs. A preempted Spot TPU must be deleted (gcloud compute tpus tpu-vm delete $name --zone=$zone) before this script can create it again."
        ;;
    esac
  elif grep -qiE 'NOT_FOUND|not found' "$errors"; then
    rm -f "$errors"
    create_tpu
  else
    cat "$errors" >&2
    rm -f "$errors"
    die "could not look up TPU $name in $zone (see gcloud's error above). Check 'gcloud auth login', the project and the zone."
  fi
}

# ---------------------------------------------------------------------------------------------
# Installing: the source on every worker, then a virtualenv with `pip install -e '.[tpu]'`.
# ---------------------------------------------------------------------------------------------

# Copies this checkout's committed tree (`git archive`) to every worker's home folder.
copy_source_tarball() {
  local ref="${git_ref:-HEAD}"
  git -C "$REPO_ROOT" rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
    die "$REPO_ROOT is not a git checkout holding $ref; use --git-url=URL to install from a repository."
  if [[ "$ref" == HEAD ]] && ! git -C "$REPO_ROOT" diff --quiet HEAD --; then
    echo "$PROG: warning: uncommitted changes are not copied; the workers get commit $(git -C "$REPO_ROOT" rev-parse --short HEAD)." >&2
  fi
  local tarball
  if [[ "$dry_run" == true ]]; then
    tarball="/tmp/$TARBALL_NAME"
  else
    work_dir="$(mktemp -d)"
    tarball="$work_dir/$TARBALL_NAME"
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "$ref"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$TARBALL_NAME" "${gcloud_flags[@]}" --worker=all
}

install_command() {
  local src="$remote_dir/src" venv="$remote_dir/venv" lines=()
  lines+=("set -eu")  # POSIX: the login shell of the workers runs this
  if [[ -n "$git_url" ]]; then
    # A shallow fetch of one ref works for branches, tags and (on GitHub and most hosts) commits.
    lines+=("rm -rf $src && mkdir -p $remote_dir && git init -q $src")
    lines+=("git -C $src fetch -q --depth=1 $(quote_words "$git_url" "${git_ref:-HEAD}")")
    lines+=("git -C $src checkout -q --detach FETCH_HEAD")
  else
    lines+=("rm -rf $src && mkdir -p $src")
    lines+=("tar -xzf $TARBALL_NAME -C $src && rm -f $TARBALL_NAME")
  fi
  if [[ "$python" =~ ^python3\.[0-9]+$ ]]; then
    # TPU runtimes are Ubuntu 22.04 with Python 3.10, and JAX >= 0.7 needs 3.11 or newer.
    lines+=("if ! $python -c 'import ensurepip, venv' >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $python $python-venv; fi")
  fi
  lines+=("if [ ! -x $venv/bin/python ]; then $python -m venv $venv; fi")
  lines+=("$venv/bin/python -m pip install -q --upgrade pip")
  lines+=("cd $src && ../venv/bin/python -m pip install -q -e '.[tpu]'")
  lines+=("echo \"\$(hostname): codit-jax installed in $src\"")
  local IFS=$'\n'
  printf '%s' "${lines[*]}"
}

# ---------------------------------------------------------------------------------------------
# Running: the module on every worker, in the installed tree.
# ---------------------------------------------------------------------------------------------

# Sets run_command and shown_run_command (the same, with copied environment values hidden).
build_run_command() {
  local env_words=() shown_env_words=() spec env_name
  for spec in ${env_specs[@]+"${env_specs[@]}"}; do
    env_name="${spec%%=*}"
    [[ "$env_name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || usage_error "--env=$spec: give NAME or NAME=VALUE."
    if [[ "$spec" == *=* ]]; then
      env_words+=("$spec")
      shown_env_words+=("$spec")
    else
      [[ -n "${!env_name+set}" ]] || die "--env=$env_name: $env_name is not set here, so there is no value to copy."
      env_words+=("$env_name=${!env_name}")
      shown_env_words+=("$env_name=<\$$env_name from this machine>")
    fi
  done
  local program=(../venv/bin/python -m "$module" ${program_args[@]+"${program_args[@]}"})
  local prefix="" shown_prefix=""
  if ((${#env_words[@]} > 0)); then
    prefix="env $(quote_words "${env_words[@]}") "
    shown_prefix="env $(quote_words "${shown_env_words[@]}") "
  fi
  local start="cd $remote_dir/src && "
  if [[ "$detach" == true ]]; then
    local log stamp
    stamp="$(date -u +%Y%m%d-%H%M%S)"
    log="logs/$module-$stamp.log"
    start+="mkdir -p ../logs && nohup "
    local end=" >../$log 2>&1 </dev/null & echo \"\$(hostname): started, log in $remote_dir/$log\""
    run_command="$start$prefix$(quote_words "${program[@]}")$end"
    shown_run_command="$start$shown_prefix$(quote_words "${program[@]}")$end"
  else
    start+="exec "
    run_command="$start$prefix$(quote_words "${program[@]}")"
    shown_run_command="$start$shown_prefix$(quote_words "${program[@]}")"
  fi
}

# ---------------------------------------------------------------------------------------------

work_dir=""
cleanup() {
  if [[ -n "$work_dir" ]]; then
    rm -rf "$work_dir"
  fi
}
trap cleanup EXIT

run_command=""
shown_run_command=""
build_run_command  # first: a bad --env fails before anything is created

ensure_tpu
if [[ "$install" == true ]]; then
  if [[ -z "$git_url" ]]; then
    copy_source_tarball
  fi
  install_script="$(install_command)"
  run_on_all_workers "$install_script" "$install_script"
fi
run_on_all_workers "$run_command" "$shown_run_command"
