"""The TPU-pod scripts against a fake ``gcloud``: the commands they issue, and what those commands do.

The fake ``gcloud`` (first on ``PATH``) records every argument vector. ``tpu-vm scp`` copies into a fake
worker home directory and ``tpu-vm ssh --command=...`` runs the command there with ``bash``, so the remote
shell commands are executed too (with a fake ``python3`` that records its arguments).
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
SCRIPT_NAMES = ("create", "setup", "run", "logs", "delete")
# Settings the scripts read from the environment; cleared so the tests see the defaults.
SETTINGS = ("TPU_NAME", "ZONE", "PROJECT_ID", "REMOTE_DIR", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
            "SPOT", "BUCKET", "REPO_URL", "BRANCH", "SOURCE_DIR", "PYTHON_VERSION", "CONFIG",
            "WORKDIR", "WORKER", "LOG_LINES", "TOPOLOGY", "PREFLIGHT", "LOCAL_PYTHON")
CONFIGURED_PROJECT = "configured-project"

FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
home = os.environ["FAKE_WORKER_HOME"]
if args[:3] == ["config", "get-value", "project"]:
    print(os.environ.get("FAKE_GCLOUD_PROJECT", ""))
elif args[:3] == ["storage", "buckets", "describe"]:
    sys.exit(0 if os.environ.get("FAKE_BUCKET_EXISTS") == "1" else 1)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    print("ACTIVE")
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
    command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
    env = dict(os.environ, HOME=home)
    sys.exit(subprocess.run(["bash", "-c", command], cwd=home, env=env).returncode)
"""

FAKE_PYTHON3 = """#!{python}
import json, os, sys
with open(os.environ["FAKE_PYTHON_LOG"], "a") as log:
    log.write(json.dumps({{"cwd": os.getcwd(), "args": sys.argv[1:],
                          "jax_platforms": os.environ.get("JAX_PLATFORMS")}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_PYTHON_EXIT", "0")))
"""

FAKE_TRAINER = """#!{python}
import sys
print("trainer", *sys.argv[1:], flush=True)
"""


class Pod:
    """A fake Cloud project: ``gcloud`` and ``python3`` fakes on PATH and one worker home directory."""

    def __init__(self, root: pathlib.Path):
        self.bin = root / "bin"
        self.home = root / "worker-home"
        self.tmp = root / "tmp"
        for d in (self.bin, self.home, self.tmp):
            d.mkdir()
        self.gcloud_log = root / "gcloud.jsonl"
        self.python_log = root / "python3.jsonl"
        _write_executable(self.bin / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
        _write_executable(self.bin / "python3", FAKE_PYTHON3.format(python=sys.executable))
        self.env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
        self.env.update(
            PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
            TMPDIR=str(self.tmp),
            FAKE_GCLOUD_LOG=str(self.gcloud_log),
            FAKE_PYTHON_LOG=str(self.python_log),
            FAKE_WORKER_HOME=str(self.home),
            FAKE_GCLOUD_PROJECT=CONFIGURED_PROJECT,
            # run.sh's preflight runs on this machine: the fake python3 records it.
            LOCAL_PYTHON=str(self.bin / "python3"),
        )

    def run(self, script: str, *args: str, check: bool = True, **env: str):
        result = subprocess.run(
            ["bash", str(SCRIPTS / f"{script}.sh"), *args], env={**self.env, **env},
            capture_output=True, text=True, timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{script}.sh failed ({result.returncode}):\n{result.stderr}")
        return result

    def gcloud_calls(self) -> list[list[str]]:
        if not self.gcloud_log.exists():
            return []
        return [json.loads(line) for line in self.gcloud_log.read_text().splitlines()]

    def calls_to(self, *prefix: str) -> list[list[str]]:
        return [c for c in self.gcloud_calls() if c[: len(prefix)] == list(prefix)]

    def python_calls(self) -> list[dict]:
        return [json.loads(line) for line in self.python_log.read_text().splitlines()]


def _write_executable(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _remote_command(call: list[str]) -> str:
    [command] = [a[len("--command="):] for a in call if a.startswith("--command=")]
    return command


def _shell_words(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def _contains_run(words: list[str], run: list[str]) -> bool:
    return any(words[i : i + len(run)] == run for i in range(len(words) - len(run) + 1))


@pytest.fixture
def pod(tmp_path):
    return Pod(tmp_path)


@pytest.fixture
def installed_pod(pod):
    """A pod after setup.sh: the checkout's venv python is a fake trainer that prints its arguments."""
    (pod.home / "moejax" / ".venv" / "bin").mkdir(parents=True)
    _write_executable(pod.home / "moejax" / ".venv" / "bin" / "python",
                      FAKE_TRAINER.format(python=sys.executable))
    return pod


@pytest.fixture
def checkout(tmp_path):
    """A minimal source tree for setup.sh to copy."""
    src = tmp_path / "checkout"
    (src / "moejax").mkdir(parents=True)
    (src / "setup.cfg").write_text("[metadata]\nname = moejax\n")
    (src / "moejax" / "__init__.py").write_text("")
    (src / ".venv").mkdir()
    (src / ".venv" / "big-file").write_text("not to be copied")
    return src


# --- create.sh --------------------------------------------------------------------------------------


def test_create_without_arguments_requests_the_default_slice_in_the_configured_project(pod):
    pod.run("create")
    assert pod.calls_to("compute", "tpus", "queued-resources", "create") == [[
        "compute", "tpus", "queued-resources", "create", "moejax", "--node-id=moejax",
        "--zone=us-central2-b", f"--project={CONFIGURED_PROJECT}", "--accelerator-type=v4-16",
        "--runtime-version=tpu-ubuntu2204-base",
    ]]
    assert pod.calls_to("config", "get-value", "project")


def test_create_flags_set_name_type_runtime_zone_project_and_spot(pod):
    pod.run("create", "--name=pod1", "--accelerator-type=v5litepod-16",
            "--runtime-version=v2-alpha-tpuv5-lite", "--zone=us-west4-a", "--project=p1", "--spot")
    assert pod.calls_to("compute", "tpus", "queued-resources", "create") == [[
        "compute", "tpus", "queued-resources", "create", "pod1", "--node-id=pod1",
        "--zone=us-west4-a", "--project=p1", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]]
    assert not pod.calls_to("config", "get-value", "project")


def test_create_reads_settings_from_environment_variables(pod):
    pod.run("create", TPU_NAME="envpod", ZONE="europe-west4-a", PROJECT_ID="envproj",
            ACCELERATOR_TYPE="v5p-16", RUNTIME_VERSION="v2-alpha-tpuv5", SPOT="1")
    [call] = pod.calls_to("compute", "tpus", "queued-resources", "create")
    assert call[4:] == ["envpod", "--node-id=envpod", "--zone=europe-west4-a", "--project=envproj",
                        "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5", "--spot"]


def test_flags_override_environment_variables(pod):
    pod.run("create", "--zone=asia-east1-c", ZONE="europe-west4-a")
    [call] = pod.calls_to("compute", "tpus", "queued-resources", "create")
    assert "--zone=asia-east1-c" in call


def test_create_makes_the_bucket_in_the_zone_region_when_it_is_missing(pod):
    pod.run("create", FAKE_BUCKET_EXISTS="0")
    assert pod.calls_to("storage", "buckets", "create") == [[
        "storage", "buckets", "create", f"gs://{CONFIGURED_PROJECT}-moejax",
        f"--project={CONFIGURED_PROJECT}", "--location=us-central2",
    ]]


def test_create_leaves_an_existing_bucket_alone(pod):
    pod.run("create", "--bucket=gs://mine", FAKE_BUCKET_EXISTS="1")
    assert pod.calls_to("storage", "buckets", "describe")[0][3] == "gs://mine"
    assert not pod.calls_to("storage", "buckets", "create")


def test_create_wait_polls_the_queued_resource_until_it_is_active(pod):
    pod.run("create", "--wait")
    [describe] = pod.calls_to("compute", "tpus", "queued-resources", "describe")
    assert describe[4] == "moejax" and "--format=value(state.state)" in describe


# --- setup.sh ---------------------------------------------------------------------------------------


def test_setup_copies_the_checkout_to_all_workers_without_the_local_venv(pod, checkout):
    pod.run("setup", f"--source-dir={checkout}")
    [scp] = pod.calls_to("compute", "tpus", "tpu-vm", "scp")
    assert "--worker=all" in scp and "--zone=us-central2-b" in scp
    assert scp[5] == "moejax:moejax-src.tar.gz"
    copied = pod.home / "moejax"
    assert (copied / "setup.cfg").is_file() and (copied / "moejax" / "__init__.py").is_file()
    assert not (copied / ".venv" / "big-file").exists()
    assert not (pod.home / "moejax-src.tar.gz").exists()
    assert not any(pod.tmp.iterdir())


def test_setup_installs_the_tpu_extras_in_a_venv_on_all_workers(pod, checkout):
    pod.run("setup", f"--source-dir={checkout}")
    [ssh] = pod.calls_to("compute", "tpus", "tpu-vm", "ssh")
    assert ssh[4] == "moejax" and "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    install = pod.python_calls()[-1]
    assert install["args"][:4] == ["-m", "uv", "pip", "install"]
    assert install["args"][-2:] == ["-e", ".[tpu]"]
    assert "--python" in install["args"] and ".venv/bin/python" in install["args"]
    assert install["cwd"] == str(pod.home / "moejax")
    [venv] = [c["args"] for c in pod.python_calls() if c["args"][:3] == ["-m", "uv", "venv"]]
    assert venv[-1] == "moejax/.venv" and "3.11" in venv


def test_setup_with_a_repo_url_clones_on_the_workers_instead_of_copying(pod):
    result = pod.run("setup", "--repo-url=https://example.com/moejax.git", "--branch=dev",
                     "--dry-run", "--project=p")
    [ssh_line] = [line for line in result.stdout.splitlines() if "tpu-vm ssh" in line]
    remote = _remote_command(shlex.split(ssh_line))
    assert _contains_run(_shell_words(remote), [
        "git", "clone", "--quiet", "--branch", "dev", "https://example.com/moejax.git", "moejax"])
    assert "tar" not in result.stdout


# --- run.sh -----------------------------------------------------------------------------------------


def test_run_launches_the_trainer_on_all_workers_with_a_gcs_workdir(installed_pod):
    pod = installed_pod
    pod.run("run")
    [ssh] = pod.calls_to("compute", "tpus", "tpu-vm", "ssh")
    assert ssh[4] == "moejax"
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    assert f"--project={CONFIGURED_PROJECT}" in ssh
    assert _contains_run(_shell_words(_remote_command(ssh)), [
        ".venv/bin/python", "-m", "moejax.main", "--config=experiments/default.py",
        f"--workdir=gs://{CONFIGURED_PROJECT}-moejax/moejax/default",
    ])


def test_run_takes_config_workdir_and_trainer_overrides(installed_pod):
    pod = installed_pod
    pod.run("run", "--config=experiments/smoke.py", "--workdir=gs://b/run1", "--",
            "--config.num_train_steps=5", "--config.model.name=a b")
    words = _shell_words(_remote_command(pod.calls_to("compute", "tpus", "tpu-vm", "ssh")[0]))
    assert _contains_run(words, [
        "-m", "moejax.main", "--config=experiments/smoke.py", "--workdir=gs://b/run1",
        "--config.num_train_steps=5", "--config.model.name=a b",
    ])


def test_run_default_workdir_follows_bucket_name_and_config(installed_pod):
    pod = installed_pod
    pod.run("run", "--bucket=gs://bk", "--name=pod7", "--config=experiments/smoke.py:variant=S")
    words = _shell_words(_remote_command(pod.calls_to("compute", "tpus", "tpu-vm", "ssh")[0]))
    assert "--workdir=gs://bk/pod7/smoke" in words


def test_run_rejects_a_workdir_outside_gcs(pod):
    result = pod.run("run", "--workdir=/tmp/run", check=False)
    assert result.returncode != 0
    assert "--workdir must be a gs:// path" in result.stderr
    assert not pod.calls_to("compute", "tpus", "tpu-vm", "ssh")


def test_run_starts_the_trainer_detached_and_logs_to_train_log(installed_pod):
    pod = installed_pod
    result = pod.run("run", "--workdir=gs://b/w")
    assert "started" in result.stdout
    log = pod.home / "moejax" / "train.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.read_text().split() == [
        "trainer", "-m", "moejax.main", "--config=experiments/default.py", "--workdir=gs://b/w"]


def _preflights(pod):
    return [c for c in pod.python_calls() if c["args"][:2] == ["-m", "moejax.preflight"]]


def test_run_preflights_the_config_here_before_launching(installed_pod):
    pod = installed_pod
    pod.run("run", "--config=experiments/pod/olmoe_1b_7b.py:slice=v5p-64", "--topology=v5p:2x4x4",
            "--", "--config.batch_size=64")
    [preflight] = _preflights(pod)
    assert preflight["args"] == [
        "-m", "moejax.preflight", "--config=experiments/pod/olmoe_1b_7b.py:slice=v5p-64",
        "--topology=v5p:2x4x4", "--config.batch_size=64"]
    assert preflight["cwd"] == str(REPO) and preflight["jax_platforms"] == "cpu"
    assert pod.calls_to("compute", "tpus", "tpu-vm", "ssh")


def test_run_preflights_the_default_slice_without_arguments(installed_pod):
    pod = installed_pod
    pod.run("run")
    [preflight] = _preflights(pod)
    assert preflight["args"][2:] == ["--config=experiments/default.py", "--topology=v4:2x2x2"]


def test_a_failed_preflight_stops_the_launch(installed_pod):
    pod = installed_pod
    result = pod.run("run", "--topology=v5e:16x16", check=False, FAKE_PYTHON_EXIT="1")
    assert result.returncode == 2
    assert "preflight failed for experiments/default.py on v5e:16x16" in result.stderr
    assert "--no-preflight" in result.stderr
    assert not pod.calls_to("compute", "tpus", "tpu-vm", "ssh")


def test_no_preflight_launches_without_it(installed_pod):
    pod = installed_pod
    pod.run("run", "--no-preflight", FAKE_PYTHON_EXIT="1")
    assert not pod.python_log.exists() or not _preflights(pod)
    assert pod.calls_to("compute", "tpus", "tpu-vm", "ssh")


def test_dry_run_prints_the_preflight_and_runs_nothing(pod):
    result = pod.run("run", "--dry-run", "--project=p", "--topology=v6e:16x16")
    [line] = [line for line in result.stdout.splitlines() if "moejax.preflight" in line]
    assert shlex.split(line)[:3] == ["env", "JAX_PLATFORMS=cpu", str(pod.bin / "python3")]
    assert "--topology=v6e:16x16" in shlex.split(line)
    assert not pod.python_log.exists()


# --- logs.sh, delete.sh -----------------------------------------------------------------------------


def test_logs_prints_the_end_of_worker_0s_train_log(pod):
    (pod.home / "moejax").mkdir()
    (pod.home / "moejax" / "train.log").write_text("".join(f"line {i}\n" for i in range(50)))
    result = pod.run("logs", "--lines=3")
    [ssh] = pod.calls_to("compute", "tpus", "tpu-vm", "ssh")
    assert "--worker=0" in ssh and "--zone=us-central2-b" in ssh
    assert result.stdout.splitlines() == ["line 47", "line 48", "line 49"]


def test_logs_follow_on_all_workers_uses_tail_follow(pod):
    result = pod.run("logs", "--worker=all", "--follow", "--dry-run")
    [ssh_line] = result.stdout.splitlines()
    call = shlex.split(ssh_line)
    assert "--worker=all" in call
    assert _shell_words(_remote_command(call)) == ["tail", "-n", "100", "-F", "moejax/train.log"]


def test_delete_force_deletes_the_queued_resource_without_prompting(pod):
    pod.run("delete", "--name=pod1", "--zone=us-west4-a")
    assert pod.calls_to("compute", "tpus", "queued-resources", "delete") == [[
        "compute", "tpus", "queued-resources", "delete", "pod1", "--zone=us-west4-a",
        f"--project={CONFIGURED_PROJECT}", "--force", "--quiet",
    ]]


# --- every script -----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_dry_run_prints_the_gcloud_commands_and_runs_none(pod, script):
    result = pod.run(script, "--dry-run", "--project=p")
    assert "gcloud compute tpus" in result.stdout
    assert pod.gcloud_calls() == []
    assert not any(pod.tmp.iterdir()) and not any(pod.home.iterdir())


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_dry_run_prints_exactly_the_commands_a_real_run_issues(pod, script, checkout):
    args = ("--project=p", f"--source-dir={checkout}") if script == "setup" else ("--project=p",)
    printed = pod.run(script, "--dry-run", *args, FAKE_BUCKET_EXISTS="0").stdout
    printed_calls = [shlex.split(line)[1:] for line in printed.splitlines()
                     if line.startswith("gcloud ")]
    pod.run(script, *args, FAKE_BUCKET_EXISTS="0", check=False)
    issued = [c for c in pod.gcloud_calls() if c[:2] != ["storage", "buckets"] or c[2] == "create"]
    assert printed_calls == issued


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_without_a_configured_project_the_error_says_how_to_set_one(pod, script):
    result = pod.run(script, check=False, FAKE_GCLOUD_PROJECT="")
    assert result.returncode == 2
    assert "--project=PROJECT" in result.stderr
    assert pod.gcloud_calls() == [["config", "get-value", "project"]]


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_help_lists_the_flags_and_runs_nothing(pod, script):
    result = pod.run(script, "--help")
    assert result.stdout.startswith(f"Usage: bash tpu_scripts/{script}.sh")
    for flag in ("--name=", "--zone=", "--project=", "--dry-run"):
        assert flag in result.stdout
    assert pod.gcloud_calls() == []


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_unknown_arguments_are_rejected(pod, script):
    result = pod.run(script, "--no-such-flag", check=False)
    assert result.returncode == 2
    assert "unknown argument '--no-such-flag'" in result.stderr


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_a_value_flag_without_a_value_is_rejected(pod, script):
    result = pod.run(script, "--zone", "us-west4-a", check=False)
    assert result.returncode == 2
    assert "--zone takes a value: --zone=VALUE" in result.stderr


def test_scripts_are_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed (.ci/run installs Debian's package)")
        pytest.skip("shellcheck is not installed")
    scripts = sorted(str(p.relative_to(REPO)) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) == 6
    result = subprocess.run([shellcheck, "--external-sources", *scripts], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
