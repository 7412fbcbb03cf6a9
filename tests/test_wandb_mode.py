"""W&B without credentials logs offline and never prompts (README "Weights & Biases"): ``configure_wandb``
chooses offline unless the user has an API key, a ``wandb login`` entry in ~/.netrc, or a mode of
their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest

from samflow.cli import configure_wandb


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    return tmp_path


def test_no_credentials_means_offline(clean_env):
    configure_wandb()
    assert os.environ["WANDB_MODE"] == "offline"


def test_an_api_key_or_a_wandb_login_keeps_the_mode_unset(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    configure_wandb()
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_API_KEY")
    (clean_env / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    configure_wandb()
    assert "WANDB_MODE" not in os.environ
    (clean_env / ".netrc").write_text("machine example.com\n  login user\n  password secret\n")
    configure_wandb()  # another machine's entry is no W&B login
    assert os.environ["WANDB_MODE"] == "offline"


def test_a_login_to_a_self_hosted_server_or_in_another_netrc_counts(clean_env, monkeypatch):
    """``WANDB_BASE_URL`` names the server whose netrc entry counts, and ``NETRC`` the file, as for W&B
    itself (and ``samflow sweep --backend wandb``)."""
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    (clean_env / ".netrc").write_text("machine wandb.example.org\n  login user\n  password secret\n")
    configure_wandb()
    assert "WANDB_MODE" not in os.environ
    monkeypatch.delenv("WANDB_BASE_URL")
    configure_wandb()  # api.wandb.ai has no entry
    assert os.environ.pop("WANDB_MODE") == "offline"
    other = clean_env / "elsewhere" / "netrc"
    other.parent.mkdir()
    other.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(other))
    configure_wandb()
    assert "WANDB_MODE" not in os.environ


def test_the_users_mode_is_kept(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    configure_wandb()
    assert os.environ["WANDB_MODE"] == "disabled"


def test_a_run_without_credentials_writes_an_offline_run_and_never_reads_stdin(tmp_path):
    """The quickstart, one step, no WANDB_* variables, stdin closed: exit 0 and an offline run folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_SILENT": "true"}
    args = [
        "fit", "--experiment", "quickstart", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--data.init_args.quickstart.n_train", "2", "--data.init_args.quickstart.n_val", "2",
        "--data.init_args.quickstart.root", str(tmp_path / "data"), "--quiet",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "samflow", *args],
        check=False,
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = list(Path(tmp_path, "runs", "wandb").glob("**/offline-run-*"))
    assert runs, sorted(str(p) for p in Path(tmp_path, "runs").rglob("*"))[:20]


class _Run:
    """LightningCLI's stand-in: records W&B's mode during the run, then ends as told."""

    modes: ClassVar[list[str | None]] = []

    def __init__(self, run_name: str, args: list[str] | None, fail: bool = False) -> None:
        self.modes.append(os.environ.get("WANDB_MODE"))
        if fail:
            raise RuntimeError("the run failed")


@pytest.mark.parametrize("fails", [False, True])
@pytest.mark.parametrize("mode", [None, "disabled"])
def test_a_run_leaves_the_environment_as_it_found_it(clean_env, monkeypatch, fails, mode):
    """The offline mode is the run's own: ``samflow fit`` (``run_cli``) puts W&B's mode back (unset, or
    the user's), also when the run fails, so the next run of the process (a notebook, a sweep agent's
    function, a test) decides afresh. So are the verbosity and ``sys.argv`` (rewritten for DDP)."""
    from samflow import lightning_cli
    from samflow.cli import main

    if mode is not None:
        monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.setattr(sys, "argv", ["samflow"])
    _Run.modes = []
    monkeypatch.setattr(lightning_cli, "SamflowCLI", lambda **kw: _Run(**kw, fail=fails))
    before = dict(os.environ)
    args = ["fit", "--experiment", "quickstart", "--quiet"]
    if fails:
        with pytest.raises(RuntimeError, match="the run failed"):
            main(args)
    else:
        assert main(args) == 0
    assert _Run.modes == [mode or "offline"]  # offline during the run, without an account
    after = dict(os.environ)
    assert {
        k: (before.get(k), after.get(k))
        for k in before.keys() | after.keys()
        if before.get(k) != after.get(k)
    } == {}
    assert sys.argv == ["samflow"]


def test_a_logger_starts_its_run_in_the_mode_and_folder_of_its_start(tmp_path, monkeypatch):
    """W&B reads its environment once a process (its setup singleton): after a disabled run (a test, a
    notebook cell), a run with ``WANDB_MODE=offline`` was disabled too. And the W&B service, started in
    another working directory, resolved the run's relative folder there ("...wandb.syncstate: no such
    file or directory"). ``SamflowWandbLogger`` gives ``wandb.init`` the mode and an absolute folder."""
    import wandb

    from samflow.callbacks.wandb_run import SamflowWandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    had_service = bool(os.environ.get("WANDB_SERVICE"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    wandb.init(project="p", dir=str(tmp_path / "first")).finish()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    wandb.init(mode="offline", project="p", dir=str(tmp_path / "service")).finish()  # a service, started here
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = SamflowWandbLogger(project="p", save_dir="runs", name="x")
    try:
        assert logger.experiment.settings.mode == "offline"
        logger.experiment.log({"metric/x": 1.0})
    finally:
        logger.experiment.finish()
        if not had_service:
            wandb.teardown()  # this test's own service
    runs = list((tmp_path / "runs").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and b"metric/x" in runs[0].read_bytes()
