"""The ``medfed`` command line: light help, --version, one error path, the quiet run display."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import ConfigError
from shared.console import console_line
from shared.errors import UserError
from shared.formatting import fmt_metric
from simulation import cli
from simulation.cli import main
from simulation.commands.common import collect_overrides
from simulation.commands.simulate import summary_lines
from simulation.display import RunDisplay
from simulation.errors import SimulationError, SimulationPlanError
from simulation.flower_output import read_console_line, strip_ansi

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "data" / "flower_stream_2sites_1round.log"
HEAVY = ("torch", "torchvision", "monai", "timm", "opacus", "flwr", "ray", "matplotlib", "cv2", "pydicom",
         "sklearn", "optuna", "mlflow", "tensorboard", "sqlalchemy")


# ---------------------------------------------------------------------------
# Help and --version: nothing heavy imported
# ---------------------------------------------------------------------------

_RENDER_ALL_HELP = """
import argparse, json, sys
from simulation.cli import build_parser

def walk(parser, out):
    out.append((parser.prog, parser.format_help()))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                walk(sub, out)
    return out

helps = walk(build_parser(), [])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"progs": [p for p, _ in helps], "empty": [p for p, h in helps if "usage:" not in h],
                  "heavy": heavy}))
"""


def _fresh_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120, check=False)


def test_every_help_renders_without_heavy_imports() -> None:
    proc = _fresh_python(_RENDER_ALL_HELP, json.dumps(HEAVY))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["heavy"] == [], f"building the parser / rendering help imported {report['heavy']}"
    assert report["empty"] == []
    expected = {"medfed", "medfed simulate", "medfed data", "medfed data check", "medfed predict", "medfed evaluate",
                "medfed privacy", "medfed privacy plan", "medfed study", "medfed study privacy", "medfed audit",
                "medfed audit membership", "medfed report"}
    assert expected <= set(report["progs"])


def test_help_and_version_through_main_import_nothing_heavy() -> None:
    code = (
        "import json, sys\n"
        "from simulation.cli import main\n"
        "codes = [main(['--help']), main(['simulate', '--help']), main(['study', 'privacy', '--help']), "
        "main(['--version'])]\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & set(json.loads(sys.argv[1])))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy}), file=sys.stderr)\n"
    )
    proc = _fresh_python(code, json.dumps(HEAVY))
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report == {"codes": [0, 0, 0, 0], "heavy": []}
    assert "usage: medfed simulate" in proc.stdout and "--verbose" in proc.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"medfed {importlib.metadata.version('medfed')} (")
    assert f"Flower {importlib.metadata.version('flwr')}" in out
    assert f"torch {importlib.metadata.version('torch')}" in out
    assert len(out.splitlines()) == 1


# ---------------------------------------------------------------------------
# One error path
# ---------------------------------------------------------------------------

RAISED: dict[str, BaseException] = {}


def _fake_command(args: argparse.Namespace) -> int:
    raise RAISED["exc"]


def register_fake(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """A command registered the way simulation/deploy_cli.py will be: one "module:function" line."""
    p = subparsers.add_parser("fake", help="raises what the test asks")
    sub = p.add_subparsers(dest="fake_command", required=True)
    sub.add_parser("boom").set_defaults(func=_fake_command)


@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, f"{__name__}:register_fake"))


@pytest.mark.parametrize("exc, code", [
    (UserError("expected a folder,\n  got a file: pass the folder"), 2),
    (ConfigError("unknown run config key 'modle'. Did you mean 'model'?"), 2),
    (SimulationPlanError("min-sites is 4 but only 3 sites are simulated"), 2),
    (SimulationError("the simulation did not finish (flwr exit code 1). Last lines:\nTraceback ...\n"
                     "Full output: x"), 1),
])
def test_errors_are_mapped_in_one_place(fake_cli: None, capsys: pytest.CaptureFixture[str], exc: BaseException,
                                        code: int) -> None:
    RAISED["exc"] = exc
    assert main(["fake", "boom"]) == code
    out, err = capsys.readouterr()
    assert out == ""
    if code == 2:  # a user error: exactly one line, named after the (sub)command
        assert err.count("\n") == 1 and err.startswith("medfed fake boom: ")
        assert " ".join(str(exc).split()) in err
    else:  # a failed run: its whole message (Flower's last lines, where the log is)
        assert err == f"medfed fake boom: {exc}\n"


def test_a_bug_keeps_its_traceback(fake_cli: None) -> None:
    RAISED["exc"] = ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        main(["fake", "boom"])


def test_keyerror_based_user_errors_are_not_quoted(fake_cli: None, capsys: pytest.CaptureFixture[str]) -> None:
    from shared.registry import UnknownNameError

    RAISED["exc"] = UnknownNameError("unknown task 'pneumonia-cx'; did you mean 'pneumonia-cxr'?")
    assert main(["fake", "boom"]) == 2
    assert capsys.readouterr().err == "medfed fake boom: unknown task 'pneumonia-cx'; did you mean 'pneumonia-cxr'?\n"


@pytest.mark.parametrize("argv, expected", [
    (["simulate", "--bogus"], "medfed simulate: unrecognized arguments: --bogus"),
    (["simulate", "--sites", "0"], "medfed simulate: argument --sites: expected an integer >= 1, got '0'"),
    (["data", "check"], "medfed data check: the following arguments are required: path"),
    (["data", "check", "x", "--val-fraction", "1.5"],
     "medfed data check: argument --val-fraction: expected a number strictly between 0 and 1, got '1.5'"),
    (["predict", "--model", "m", "x", "--threshold", "1.5"],
     "medfed predict: argument --threshold: expected a number in [0, 1], got '1.5'"),
    (["simulate", "--verbose", "--quiet"],
     "medfed simulate: argument --quiet/-q: not allowed with argument --verbose/-v"),
    (["simulat"], "medfed: argument COMMAND: invalid choice: 'simulat'"),
    ([], "medfed: the following arguments are required: COMMAND"),
])
def test_usage_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(expected), err
    assert "--help'" in err


def test_a_missing_input_file_fails_before_flower_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-weights.pt"
    assert main(["simulate", "--results-dir", str(tmp_path / "results"), "-c", f"init-weights='{missing}'"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"medfed simulate: init-weights '{missing}' does not exist: give an existing path, "
                                 "or init-weights='' for random initial weights\n")
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------
# Shared helpers: overrides, metric formatting
# ---------------------------------------------------------------------------


def test_collect_overrides_merges_texts_and_options() -> None:
    got = collect_overrides(["model='resnet18' lr=0.01", "lr=0.1"],
                            {"num-server-rounds": 5, "results-dir": None, "sim-explain-dir": ""})
    assert got == {"model": "resnet18", "lr": 0.1, "num-server-rounds": 5}
    assert collect_overrides(["num-server-rounds=5"], {"num-server-rounds": 5}) == {"num-server-rounds": 5}
    with pytest.raises(ConfigError, match=r"--rounds 3 and --run-config num-server-rounds=5 disagree"):
        collect_overrides(["num-server-rounds=5"], {"num-server-rounds": 3})


def test_fmt_metric_and_headline() -> None:
    import numpy as np

    from shared.metrics.presentation import BINARY, MULTICLASS, SEGMENTATION_VIEW

    assert fmt_metric(0.84312) == "0.843" and fmt_metric(np.float32(0.5), 2) == "0.50" and fmt_metric(3) == "3.000"
    for missing in (None, float("nan"), float("inf"), -float("inf"), np.nan, "0.5", True):
        assert fmt_metric(missing) == "n/a"
    assert fmt_metric(1e-5, spec=".1e") == "1.0e-05" and fmt_metric(3.0, spec="g") == "3"
    # the task's view words the headline; the kind is the task's, never guessed from the metric names
    assert BINARY.headline({"auroc": 0.8431, "accuracy": 0.8, "sensitivity": None, "specificity": 0.96}) == (
        "AUROC 0.843, accuracy 0.800, sensitivity n/a, specificity 0.960")
    assert MULTICLASS.headline({"auroc": 0.7, "accuracy": 0.5}).startswith("macro AUROC 0.700, accuracy 0.500, "
                                                                           "macro sensitivity n/a")
    assert SEGMENTATION_VIEW.headline({"dice": 0.81234, "iou": float("nan")}) == "Dice 0.812, IoU n/a, HD95 n/a px"


def test_summary_lines_from_summary_json(tmp_path: Path) -> None:
    summary = {"rounds": 3, "final": {"auroc": 0.843, "accuracy": 0.804, "sensitivity": 0.632, "specificity": 0.96},
               "headline": "final pooled validation AUROC 0.843, accuracy 0.804, sensitivity 0.632, specificity 0.960",
               "privacy": {"epsilon": 7.91, "delta": 1e-5, "accountant": "rdp", "unit": "image",
                           "budget-refusals": {"site-2": {}}},
               "stopped-early": "every site refused: privacy budget"}
    lines = summary_lines(summary, sites=3, seconds=48.2, run_dir=tmp_path)
    assert lines == [
        "medfed simulate: 3 rounds x 3 sites in 48 s. Final pooled validation AUROC 0.843, accuracy 0.804, "
        "sensitivity 0.632, specificity 0.960.",
        f"Results: {tmp_path}",
        "Privacy: epsilon <= 7.910 at delta 1e-05 (rdp), per image, max over sites; 1 site(s) hit their budget.",
        "Stopped early: every site refused: privacy budget",
    ]
    assert summary_lines(summary, sites=3, seconds=1, run_dir=tmp_path, with_metrics=False)[0] == f"Results: {tmp_path}"


# ---------------------------------------------------------------------------
# The line filter and display, on real captured Flower output
# ---------------------------------------------------------------------------


def _fixture_lines() -> list[str]:
    return FIXTURE.read_text().splitlines(keepends=True)


def test_fixture_is_real_flower_output_without_machine_details() -> None:
    text = FIXTURE.read_text()
    assert "Aggregated MetricRecord" in text and "FutureWarning" in text and "(ClientAppActor pid=" in text
    assert "/work/" not in text and "/tmp/cli" not in text and "\x1b[92mINFO" in text


def test_read_console_line_picks_only_the_progress_line_of_todays_server() -> None:
    picked = [(n, read_console_line(raw)) for n, raw in enumerate(_fixture_lines())]
    picked = [(n, line) for n, line in picked if line is not None]
    assert len(picked) == 1
    line = picked[0][1]
    assert (line.kind, line.round, line.num_rounds) == ("round", 1, 1)
    assert line.text.startswith("train loss 0.699 | val AUROC 0.587") and line.text.endswith("elapsed 48.2 s")
    # Flower's own "[ROUND 1/1]" banner is not a medfed line
    assert read_console_line("\x1b[92mINFO \x1b[0m:      [ROUND 1/1]\n") is None


def test_plain_display_of_todays_output_is_one_line() -> None:
    out, err = io.StringIO(), io.StringIO()
    with RunDisplay(num_rounds=1, out=out, err=err, live=False) as display:
        for raw in _fixture_lines():
            display.feed(raw)
    assert out.getvalue().splitlines() == [
        "[round 1/1] train loss 0.699 | val AUROC 0.587 acc 0.438 sens 1.000 spec 0.000 F1 0.609 | @thr 0.506: "
        "sens 0.143 spec 1.000 | 2 sites, 16 val images | round 48.1 s, elapsed 48.2 s"]
    assert err.getvalue() == "" and display.rounds_done == 1 and not display.saw_summary


def _with_tags(lines: list[str]) -> list[str]:
    """The fixture as it reads once the server and sites emit tagged lines (same Flower/Ray prefixes)."""
    server = "\x1b[92mINFO \x1b[0m:      "
    actor = "\x1b[36m(ClientAppActor pid=2002)\x1b[0m " + server
    out: list[str] = []
    for raw in lines:
        plain = strip_ansi(raw)
        if "[round 1/1]" in plain:
            text = plain.split("[round 1/1] ", 1)[1].rstrip("\n")
            out.append(server + console_line("round", text, round=1, num_rounds=1) + "\n")
            continue
        if "medfed: pneumonia-cxr with small-cnn" in plain:
            out.append(server + console_line("header", "pneumonia-cxr with small-cnn, fedavg, 1 round, 2 sites") + "\n")
        if "site site-1 data:" in plain:
            site = console_line("site", "site-1 train 32 [16, 16], validation 8 [4, 4]")
            out += [actor + site + "\n", actor + site + " \x1b[32m[repeated 2x across cluster]\x1b[0m\n"]
            out.append("\x1b[33m(ClientAppActor pid=2002)\x1b[0m \x1b[93mWARNING \x1b[0m:   "
                       + console_line("warning", "site-1 has only 32 training images") + "\n")
        if "medfed: finished 1 rounds" in plain:
            out.append(server + console_line("summary", "finished 1 round in 48 s; final pooled validation "
                                             "AUROC 0.587, accuracy 0.438") + "\n")
        out.append(raw)
    return out


def test_plain_display_of_tagged_output() -> None:
    out, err = io.StringIO(), io.StringIO()
    with RunDisplay(out=out, err=err, live=False) as display:
        for raw in _with_tags(_fixture_lines()):
            display.feed(raw)
    assert out.getvalue().splitlines() == [
        "pneumonia-cxr with small-cnn, fedavg, 1 round, 2 sites",
        "  site-1 train 32 [16, 16], validation 8 [4, 4]",  # once, though Ray repeated it
        "[round 1/1] train loss 0.699 | val AUROC 0.587 acc 0.438 sens 1.000 spec 0.000 F1 0.609 | @thr 0.506: "
        "sens 0.143 spec 1.000 | 2 sites, 16 val images | round 48.1 s, elapsed 48.2 s",
        "finished 1 round in 48 s; final pooled validation AUROC 0.587, accuracy 0.438",
    ]
    assert err.getvalue() == "warning: site-1 has only 32 training images\n"
    assert display.saw_summary and display.num_rounds == 1 and display.rounds_done == 1
    assert [line.kind for line in display.recent] == ["header", "site", "warning", "round", "summary"]


def test_live_display_draws_a_bar_and_keeps_the_lines() -> None:
    out = io.StringIO()
    with RunDisplay(num_rounds=1, out=out, live=True) as display:
        for raw in _with_tags(_fixture_lines()):
            display.feed(raw)
    text = strip_ansi(out.getvalue())
    assert "round 0/1" in text and "━" in text  # the bar, before and after the round
    assert "round 1/1 " in text
    for shown in ("pneumonia-cxr with small-cnn, fedavg", "  site-1 train 32", "warning: site-1 has only 32",
                  "[round 1/1] train loss 0.699", "finished 1 round in 48 s"):
        assert shown in text
    assert "Aggregated" not in text and "pid=" not in text and "FutureWarning" not in text


# ---------------------------------------------------------------------------
# Real runs (Flower simulation)
# ---------------------------------------------------------------------------


@pytest.mark.integration
def test_simulate_is_quiet_and_keeps_flowers_output_in_flower_log(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--sites", "2", "--rounds", "1", "--results-dir", str(tmp_path),
                 "--run-config", "phantom-count=80 image-size=32 min-partition-size=5 run-name='quiet'"])
    out, err = capsys.readouterr()
    assert code == 0, err
    run_dir = tmp_path / "quiet"
    lines = out.splitlines()
    assert lines[0] == "medfed simulate: pneumonia-cxr with small-cnn at 32 px, fedavg, 2 sites x 1 round"
    assert f"  results: {run_dir}" in lines
    assert sum(1 for line in lines if line.startswith("[round 1/1] train loss")) == 1
    assert f"Results: {run_dir}" in lines
    assert f"Report: {run_dir / 'report.html'}" in lines
    assert any(line.startswith("finished 1 round in ") for line in lines)
    for noise in ("INFO", "Aggregated", "pid=", "FutureWarning", "Starting FedAvg"):
        assert noise not in out
    assert len(lines) <= 14, out  # 4 header, 2 sites + 2 small-split warnings, round, summary, results, report
    log = (run_dir / "flower.log").read_text()
    assert "Successfully started run" in log and "[round 1/1]" in log and "INFO" in log
    assert not (run_dir / "superlink.log").exists()


@pytest.mark.integration
def test_a_failed_run_keeps_its_log_and_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "bogus-weights.pt"  # exists, so the plan passes; the server fails to read it
    bogus.write_text("not a torch file")
    code = main(["simulate", "--sites", "2", "--rounds", "1", "--results-dir", str(tmp_path / "results"),
                 "--run-config", f"init-weights='{bogus}' run-name='broken'"])
    out, err = capsys.readouterr()
    assert code == 1, err
    run_dir = tmp_path / "results" / "broken"
    log_file = run_dir / "flower.log"
    assert log_file.is_file() and "bogus-weights.pt" in log_file.read_text()
    assert (run_dir / "superlink.log").is_file()
    assert err.startswith("medfed simulate: the simulation did not finish: the server wrote no summary.json")
    assert f"Full output: {log_file}" in err
    assert "ModelWeightsError" in err and "bogus-weights.pt" in err  # the tail of Flower's output names the cause
    assert "\x1b[" not in err
    assert out.splitlines()[0].startswith("medfed simulate: pneumonia-cxr with small-cnn")
    assert not re.search(r"^Results:", out, re.M)
