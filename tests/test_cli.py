"""The ``bilevel`` command: a tiny config trains; bad configs fail naming the key, before training."""

from __future__ import annotations

import glob
import subprocess
import sys

import pytest
import yaml

from bilevel.cli import main


def _config(tmp_path, engine: dict, problem: str = "problems.reference.QuadraticP1", steps: int = 4) -> str:
    config = {
        "model": {"problem": {"class_path": problem}, "engine": engine},
        "trainer": {"max_steps": steps, "default_root_dir": str(tmp_path), "enable_progress_bar": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_tiny_config_trains_and_checkpoints(tmp_path):
    path = _config(tmp_path, {"class_path": "hypergrad.CG", "init_args": {"iters": 3, "inner_steps": 5}})
    main(["fit", "--config", path])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=4.ckpt")
    assert glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "events.*"))


def test_short_engine_name_and_command_line_override(tmp_path):
    path = _config(tmp_path, {"class_path": "Neumann", "init_args": {"terms": 2}})
    main(["fit", "--config", path, "--model.engine.init_args.terms", "4", "--trainer.max_steps", "2"])
    (ckpt,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=2.ckpt")


@pytest.mark.parametrize(("engine", "names"), [
    ({"class_path": "hypergrad.CG", "init_args": {"itters": 3}}, ["model.engine", "itters"]),
    ({"class_path": "hypergrad.Newton"}, ["model.engine", "hypergrad.Newton"]),
])
def test_bad_engine_config_names_the_key(tmp_path, capsys, engine, names):
    path = _config(tmp_path, engine)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", path])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    for name in names:
        assert name in err
    assert not glob.glob(str(tmp_path / "lightning_logs"))  # nothing ran


def test_misspelled_trainer_key_fails_before_training(tmp_path, capsys):
    path = _config(tmp_path, {"class_path": "hypergrad.CG"})
    text = open(path).read().replace("max_steps", "max_stepz")
    open(path, "w").write(text)
    with pytest.raises(SystemExit):
        main(["fit", "--config", path])
    assert "max_stepz" in capsys.readouterr().err


def test_invalid_engine_hyperparameter_fails_with_its_message(tmp_path, capsys):
    path = _config(tmp_path, {"class_path": "hypergrad.Neumann", "init_args": {"alpha": -0.5}})
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", path])
    message = str(info.value) + capsys.readouterr().err
    assert "alpha must be a finite number > 0" in message


def test_help_lists_every_engine_hyperparameter():
    out = subprocess.run([sys.executable, "-m", "bilevel.cli", "fit", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for text in ("hypergrad.Neumann(terms=10, alpha=None", "hypergrad.CG(iters=10, tol=", "hypergrad.Exact(",
                 "hypergrad.Unrolled(inner_steps=10, inner_lr=0.1, truncate=None", "outer_optimizer='adam'"):
        assert text in out


def test_resume_continues_the_run_and_checks_the_engine(tmp_path, capsys):
    path = _config(tmp_path, {"class_path": "hypergrad.CG", "init_args": {"iters": 3, "inner_steps": 5}}, steps=5)
    main(["fit", "--config", path, "--model.checkpoint_every", "2"])
    version = tmp_path / "lightning_logs" / "version_0"
    (ckpt,) = glob.glob(str(version / "checkpoints" / "*.ckpt"))
    assert ckpt.endswith("step=5.ckpt")  # the last step, besides steps 2 and 4 (the latest kept)
    changed = ["--model.engine.init_args.inner_lr", "0.05", "--trainer.max_steps", "7", "--ckpt_path", ckpt]
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path, *changed])
    assert isinstance(info.value.code, str) and "\n" not in info.value.code
    assert "this run has inner_lr=0.05 (checkpoint: 0.1)" in info.value.code
    assert "--model.resume_changed_engine true" in info.value.code
    main(["fit", "--config", path, *changed, "--model.resume_changed_engine", "true"])
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # the same run
    assert glob.glob(str(version / "checkpoints" / "*step=7.ckpt"))
