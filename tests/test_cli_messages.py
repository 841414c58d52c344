"""The CLI's messages for a misspelled problem argument and for a problem without data()."""

from __future__ import annotations

import glob

import pytest
import torch
import yaml

import bilevel
from bilevel.cli import focus_union_error, main


class NoData(bilevel.BilevelProblem):
    """A problem with no data(): the CLI has nothing to feed it."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.lower = bilevel.Hyper(y=torch.zeros(dim))
        self.upper = bilevel.Hyper(x=torch.zeros(dim))

    def lower_objective(self, batch):
        return (self.lower.y - self.upper.x).pow(2).sum()

    def upper_objective(self, batch):
        return (self.lower.y - 1).pow(2).sum()


def _config(tmp_path, problem: dict) -> str:
    config = {"model": {"problem": problem, "engine": {"class_path": "hypergrad.CG"}},
              "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path), "enable_progress_bar": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_misspelled_problem_argument_is_named_without_the_population_noise(tmp_path, capsys):
    path = _config(tmp_path, {"class_path": "problems.reference.QuadraticP1", "init_args": {"bogus": 3}})
    with pytest.raises(SystemExit):
        main(["fit", "--config", path])
    err = capsys.readouterr().err
    assert "Option 'bogus' is not accepted" in err
    assert "problems.reference.QuadraticP1" in err
    assert "Population" not in err and "Union" not in err


def test_problem_without_data_says_how_to_give_it_data(tmp_path):
    path = _config(tmp_path, {"class_path": f"{__name__}.NoData"})
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", path])
    message = str(info.value.code)
    assert "NoData defines no data()" in message
    assert "define NoData.data() returning (lower_data, upper_data)" in message
    assert not glob.glob(str(tmp_path / "lightning_logs" / "*" / "checkpoints"))  # no step ran


def test_focus_keeps_messages_it_cannot_focus():
    both_fail = ('Parser key "model.problem":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
                 "    - Import path a.B does not correspond to a subclass of BilevelProblem\n"
                 "    - Import path a.B does not correspond to a subclass of Population\n  Given value: a.B")
    assert focus_union_error(both_fail) == both_fail
    assert focus_union_error("error: plain") == "error: plain"
