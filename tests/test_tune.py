"""``medfed tune`` without Flower: the search space, the study loop, pruning, resuming, outputs.

Trials run through a stand-in for :func:`simulation.runner.simulate` that
writes a real results folder (``RunFolder``) round by round and feeds the
server's tagged round lines to ``on_line``, exactly what the real runner
does; its figure is a known function of the trial's values. The real thing
(Flower simulations) is ``tests/test_tune_sim.py``.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

import pytest

from shared.config import ConfigError, parse_overrides
from shared.console import console_line
from shared.results import RunFolder
from simulation.errors import SimulationError
from simulation.tune import TuneError, TunePlan, objective_value, run_config_line, run_tune
from simulation.tune_space import TuneSpaceError, load_space_file, parse_param, parse_space, validate_space

BASE = {"num-server-rounds": 3, "image-size": 32, "phantom-count": 100}


# ---------------------------------------------------------------------------
# A stand-in for the simulation runner
# ---------------------------------------------------------------------------


def quality(lr: float, epochs: int) -> float:
    """The final AUROC of the stand-in: best near lr = 1e-2 with more epochs; lr <= 1e-5 learns nothing."""
    closeness = max(0.0, 1.0 - abs(math.log10(lr) + 2.0) / 3.0)
    return 0.5 + 0.45 * closeness * min(1.0, 0.4 + 0.2 * epochs)


class FakeSimulate:
    """Writes ``metrics.json`` round by round and emits the tagged round lines, like a real run."""

    def __init__(self, fail_when: Any = None, interrupt_on_call: int | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail_when = fail_when
        self.interrupt_on_call = interrupt_on_call

    def __call__(self, overrides: dict[str, Any], *, sites: int, cpus_per_site: int, on_line: Any,
                 timeout: Any = None, ray_address: Any = None) -> Any:
        self.calls.append(dict(overrides))
        if self.interrupt_on_call is not None and len(self.calls) == self.interrupt_on_call:
            raise KeyboardInterrupt
        if self.fail_when is not None and self.fail_when(overrides):
            raise SimulationError("the simulation did not finish (stand-in failure)")
        folder = RunFolder.create(str(overrides["results-dir"]), str(overrides["run-name"]))
        folder.write_config(overrides)
        n = int(overrides["num-server-rounds"])
        final = quality(float(overrides.get("lr", 1e-3)), int(overrides.get("local-epochs", 1)))
        for k in range(1, n + 1):
            value = 0.5 + (final - 0.5) * k / n
            folder.add_round({"round": k, "evaluate": {"auroc": value},
                              "fairness": {"sites": {"worst": value - 0.05}}, "test": {"auroc": value - 0.01}})
            on_line(f"\x1b[92mINFO \x1b[0m:      {console_line('round', 'stand-in', round=k, num_rounds=n)}\n")
        folder.write_summary({})
        return type("Result", (), {"run_dir": folder.path})()


def plan(tmp_path: Path, **kw: Any) -> TunePlan:
    defaults: dict[str, Any] = {
        "out_dir": tmp_path / "study",
        "space": tuple(parse_space(["lr=loguniform(1e-6,3e-2)", "local-epochs=int(1,4)"])),
        "base": dict(BASE), "trials": 8, "sites": 2, "random_trials": 4, "prune_after": 2, "seed": 3,
    }
    defaults.update(kw)
    return TunePlan(**defaults)


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------


def test_parameters_on_the_command_line_and_in_toml() -> None:
    lr = parse_param("lr=loguniform(1e-4, 1e-2)")
    assert (lr.key, lr.kind, lr.low, lr.high) == ("lr", "loguniform", 1e-4, 1e-2)
    ep = parse_param("local-epochs=int(1,9,2)")
    assert (ep.kind, ep.low, ep.high, ep.step) == ("int", 1, 9, 2)
    model = parse_param("model=categorical(small-cnn, 'resnet18')")
    assert model.choices == ("small-cnn", "resnet18")
    flag = parse_param("class-weighting=categorical(true,false)")
    assert flag.choices == (True, False)
    assert parse_param("momentum=float(0.5,0.99)").kind == "uniform"
    assert ep.contains(5) and not ep.contains(4) and not ep.contains(11)
    assert model.contains("resnet18") and not model.contains("unet")
    assert flag.contains(True) and not flag.contains(1)


def test_space_file_forms(tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text('[space]\nlr = "loguniform(1e-4, 1e-2)"\nmodel = ["small-cnn", "resnet18"]\n'
                    '"fedopt.eta" = { type = "uniform", low = 0.001, high = 0.1 }\n'
                    'local-epochs = { type = "int", low = 1, high = 5 }\n')
    specs = load_space_file(path)
    assert [s.describe() for s in specs] == [
        "lr=loguniform(0.0001,0.01)", "model=categorical(small-cnn,resnet18)", "fedopt.eta=uniform(0.001,0.1)",
        "local-epochs=int(1,5)"]
    both = parse_space(["seed=int(0,3)"], path)
    assert [s.key for s in both][-1] == "seed"
    with pytest.raises(TuneSpaceError, match="given twice"):
        parse_space(["lr=uniform(0.1,0.2)"], path)


@pytest.mark.parametrize("text, fragment", [
    ("lr=0.1", "expected KEY=DISTRIBUTION"),
    ("lr=logunifrom(1e-4,1e-2)", "Did you mean 'loguniform'"),
    ("lr=loguniform(0,1e-2)", "needs low > 0"),
    ("lr=uniform(0.2,0.1)", "low < high"),
    ("local-epochs=int(1.5,3)", "must be integers"),
    ("model=categorical(a,a)", "twice"),
])
def test_malformed_parameters_say_what_is_expected(text: str, fragment: str) -> None:
    with pytest.raises(TuneSpaceError, match=fragment):
        parse_param(text)


@pytest.mark.parametrize("params, fragment", [
    (["lerning-rate=uniform(0.1,0.2)"], "unknown run-config key 'lerning-rate'"),
    (["lr2=uniform(0.1,0.2)"], "Did you mean"),
    (["run-name=categorical(a,b)"], "cannot be searched"),
    (["data-path=categorical(a,b)"], "holds a path"),
    (["local-epochs=uniform(1,3)"], "does not fit this key"),
    (["model=uniform(1,3)"], "does not fit this key"),
    (["lr=uniform(1e-3,100)"], "the value 100.0 is refused"),
    (["model=categorical(small-cnn,resnet1008)"], "resnet1008"),
    (["model=categorical(small-cnn,unet)"], "segmentation model"),
    (["image-size=categorical(32,64)"], "also set with --run-config"),
])
def test_space_is_checked_against_the_run_config_keys(params: list[str], fragment: str) -> None:
    with pytest.raises(TuneSpaceError, match=fragment):
        validate_space(parse_space(params), BASE)


def test_objective_values_from_a_round_record() -> None:
    record = {"round": 2, "evaluate": {"auroc": 0.8, "dice": math.nan},
              "fairness": {"sites": {"worst": 0.7}}, "test": {"auroc": 0.75}}
    assert objective_value(record, "val", "auroc") == 0.8
    assert objective_value(record, "worst-site", "auroc") == 0.7
    assert objective_value(record, "test", "auroc") == 0.75
    assert objective_value(record, "val", "dice") is None  # NaN: undefined
    assert objective_value({"round": 1}, "val", "auroc") is None


def test_run_config_line_round_trips_through_the_override_parser() -> None:
    values = {"lr": 0.012345678901, "local-epochs": 4, "model": "resnet18", "augment": False}
    line = run_config_line(values)
    assert line.startswith('--run-config "') and line.endswith('"')
    assert parse_overrides(line[len('--run-config "'):-1]) == values


# ---------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------


def test_study_beats_its_baseline_prunes_and_writes_its_outputs(tmp_path: Path) -> None:
    fake, lines = FakeSimulate(), []
    p = plan(tmp_path)
    result = run_tune(p, simulate_fn=fake, log=lines.append)

    # trial 0 is the base config itself (lr 1e-3, 1 epoch)
    assert fake.calls[0]["lr"] == 1e-3 and fake.calls[0]["local-epochs"] == 1
    assert result.baseline is not None and result.baseline.number == 0
    assert result.baseline.value == pytest.approx(quality(1e-3, 1))
    assert result.best is not None and result.best.value > result.baseline.value
    assert result.best.value == pytest.approx(quality(result.best.params["lr"], result.best.params["local-epochs"]))
    # every trial runs in its own folder under the study, with the base config and its own values
    for call in fake.calls:
        assert call["image-size"] == 32 and call["results-dir"] == str(p.trials_dir)
    assert len({c["run-name"] for c in fake.calls}) == len(fake.calls) == 8

    # median pruning stopped at least one poor trial after its first round (its folder holds 1 of 3 rounds)
    pruned = [o for o in result.outcomes if o.state == "pruned"]
    assert pruned, [(o.number, o.state, o.value) for o in result.outcomes]
    for o in pruned:
        assert o.pruned_at is not None and o.pruned_at < 3
        assert len(RunFolder(p.out_dir / o.run_dir).read_rounds()) == o.pruned_at
    assert result.count("complete") + result.count("pruned") == 8

    # outputs
    table = rows(p.out_dir / "trials.csv")
    assert [int(r["number"]) for r in table] == list(range(8))
    assert table[0]["baseline"] == "yes" and table[0]["state"] == "complete"
    assert {r["state"] for r in table} <= {"complete", "pruned"}
    best_line = (p.out_dir / "best.txt").read_text().strip()
    assert parse_overrides(best_line[len('--run-config "'):-1]) == {**BASE, **result.best.params}
    for png in ("optimization_history.png", "param_importances.png"):
        assert (p.out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (p.out_dir / "study.db").is_file() and not (p.out_dir / "tune.lock").exists()
    assert sum(1 for line in lines if line.startswith("[trial ")) == 8
    assert any("pruned at round" in line for line in lines)


def test_resume_keeps_earlier_trials_and_runs_only_the_rest(tmp_path: Path) -> None:
    first = run_tune(plan(tmp_path, trials=3), simulate_fn=FakeSimulate(), log=lambda _: None)
    fake, lines = FakeSimulate(), []
    second = run_tune(plan(tmp_path, trials=5), simulate_fn=fake, log=lines.append)
    assert len(fake.calls) == 2  # only the two missing trials ran
    kept = [(o.number, o.state, o.params, o.value) for o in first.outcomes]
    assert [(o.number, o.state, o.params, o.value) for o in second.outcomes[:3]] == kept
    assert len(second.outcomes) == 5 and not any(o.baseline for o in second.outcomes[3:])
    assert any("resuming the study" in line for line in lines)
    # the resumed sampler is re-seeded: it does not replay the first trials' random values
    assert {c["lr"] for c in fake.calls}.isdisjoint({o.params["lr"] for o in first.outcomes})
    # the same command once more: nothing left to do
    again = FakeSimulate()
    run_tune(plan(tmp_path, trials=5), simulate_fn=again, log=lambda _: None)
    assert again.calls == []


def test_an_interrupted_trial_runs_again_first_when_resumed(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run_tune(plan(tmp_path, trials=5), simulate_fn=FakeSimulate(interrupt_on_call=3), log=lambda _: None)
    table = rows(tmp_path / "study" / "trials.csv")  # written although interrupted
    assert [r["state"] for r in table] == ["complete", "complete", "failed"] and table[2]["error"] == "interrupted"
    interrupted = float(table[2]["lr"])
    fake = FakeSimulate()
    result = run_tune(plan(tmp_path, trials=5), simulate_fn=fake, log=lambda _: None)
    assert fake.calls[0]["lr"] == interrupted  # the interrupted values first
    assert len(fake.calls) == 3 and result.count("complete") + result.count("pruned") == 5
    assert result.count("failed") == 1  # the interrupted one stays in the record, not counted


def test_a_trial_left_running_by_a_crash_is_failed_and_retried(tmp_path: Path) -> None:
    import optuna

    p = plan(tmp_path, trials=2)
    run_tune(p, simulate_fn=FakeSimulate(), log=lambda _: None)
    study = optuna.load_study(study_name=p.study_name, storage=p.storage_url)
    crashed = study.ask()  # what a killed 'medfed tune' leaves behind
    crashed.suggest_float("lr", 1e-6, 3e-2, log=True)
    crashed.suggest_int("local-epochs", 1, 4)
    fake, lines = FakeSimulate(), []
    run_tune(plan(tmp_path, trials=3), simulate_fn=fake, log=lines.append)
    assert fake.calls[0]["lr"] == crashed.params["lr"]
    assert any(f"trial {crashed.number} was interrupted" in line for line in lines)


def test_failed_trials_are_recorded_and_counted(tmp_path: Path) -> None:
    fake = FakeSimulate(fail_when=lambda o: o["local-epochs"] == 4)
    result = run_tune(plan(tmp_path, trials=6), simulate_fn=fake, log=lambda _: None)
    failed = [o for o in result.outcomes if o.state == "failed"]
    assert len(fake.calls) == 6
    assert all("stand-in failure" in o.error and o.params["local-epochs"] == 4 for o in failed)
    assert len(result.outcomes) == 6


def test_worst_site_and_test_objectives(tmp_path: Path) -> None:
    result = run_tune(plan(tmp_path, trials=2, objective="worst-site", prune=False), simulate_fn=FakeSimulate(),
                      log=lambda _: None)
    assert result.baseline is not None and result.baseline.value == pytest.approx(quality(1e-3, 1) - 0.05)
    assert "worst-site" in result.label
    with pytest.raises(TuneError, match="test-path"):
        run_tune(plan(tmp_path / "t", objective="test"), simulate_fn=FakeSimulate(), log=lambda _: None)


def test_baseline_outside_the_space_is_skipped_with_a_note(tmp_path: Path) -> None:
    lines: list[str] = []
    p = plan(tmp_path, trials=1, space=tuple(parse_space(["lr=loguniform(1e-2,3e-2)"])))
    result = run_tune(p, simulate_fn=FakeSimulate(), log=lines.append)
    assert result.baseline is None and any("no baseline trial" in line for line in lines)


def test_a_study_is_resumed_only_by_the_command_that_started_it(tmp_path: Path) -> None:
    run_tune(plan(tmp_path, trials=1), simulate_fn=FakeSimulate(), log=lambda _: None)
    with pytest.raises(TuneError, match="search space"):
        run_tune(plan(tmp_path, trials=2, space=tuple(parse_space(["lr=loguniform(1e-5,3e-2)"]))),
                 simulate_fn=FakeSimulate(), log=lambda _: None)
    with pytest.raises(TuneError, match="base run config"):
        run_tune(plan(tmp_path, trials=2, base={**BASE, "phantom-count": 200}), simulate_fn=FakeSimulate(),
                 log=lambda _: None)


def test_a_running_study_is_not_run_twice(tmp_path: Path) -> None:
    out = tmp_path / "study"
    out.mkdir()
    (out / "tune.lock").write_text(str(os.getppid()))  # a live process holds the study
    with pytest.raises(TuneError, match="is running this study"):
        run_tune(plan(tmp_path), simulate_fn=FakeSimulate(), log=lambda _: None)


def test_bad_plans_fail_before_any_trial(tmp_path: Path) -> None:
    fake = FakeSimulate()
    with pytest.raises(TuneError, match="min-sites"):
        run_tune(plan(tmp_path, sites=1), simulate_fn=fake, log=lambda _: None)
    with pytest.raises(TuneError, match="run-name"):
        run_tune(plan(tmp_path, base={**BASE, "run-name": "x"}), simulate_fn=fake, log=lambda _: None)
    with pytest.raises(ConfigError):
        run_tune(plan(tmp_path, base={**BASE, "lr": -1.0}, space=tuple(parse_space(["seed=int(0,2)"]))),
                 simulate_fn=fake, log=lambda _: None)
    assert fake.calls == [] and not (tmp_path / "study" / "study.db").exists()


def test_verbose_shows_each_trials_round_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_tune(plan(tmp_path, trials=1, show_rounds=True), simulate_fn=FakeSimulate(), log=print)
    out = capsys.readouterr().out
    assert "    [round 1/3] stand-in" in out and "    [round 3/3] stand-in" in out and "[trial 0, 1/1]" in out


def test_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import simulation.runner
    from simulation.cli import main

    fake = FakeSimulate()
    monkeypatch.setattr(simulation.runner, "simulate", fake)
    out = tmp_path / "cli-study"
    argv = ["tune", "--sites", "2", "--rounds", "2", "--trials", "3", "--out", str(out), "--prune-after", "1",
            "--run-config", "image-size=32", "--param", "lr=loguniform(1e-6,3e-2)", "--param", "local-epochs=int(1,4)"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.count("\n[trial ") == 3 and "Best pooled validation AUROC" in text and "baseline (trial 0)" in text
    assert f"Best config: medfed simulate --sites 2 {(out / 'best.txt').read_text().strip()}" in text
    assert len(fake.calls) == 3 and all(c["num-server-rounds"] == 2 for c in fake.calls)
    assert main(["tune", "--param", "lerning-rate=uniform(0.1,0.2)", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed tune: search space: unknown run-config key 'lerning-rate'") and err.count("\n") == 1
