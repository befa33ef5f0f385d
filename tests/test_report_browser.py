"""report.html of real runs, opened in a headless browser (Debian's chromium).

One tiny classification simulation (phantoms, 2 sites x 2 rounds, 32 px, with
Grad-CAM maps) and one tiny lung-segmentation simulation; their reports are
loaded in headless Chromium and checked:

* every section is in the rendered DOM with content (figures where there
  should be figures);
* the page makes no network request: the requests it makes while loading are
  recorded through the DevTools protocol (``tests/headless.py``) and must all
  be the page itself or embedded ``data:`` images, and a scan of the HTML finds
  no ``src``/``href``/``url()`` to another host. A negative control, the same
  report with a remote image and stylesheet added, must fail both checks;
* a screenshot is not blank.

In CI chromium is installed by ``.ci/run``; locally the test skips with a
message when it is absent. Run with ``-s`` to see what each section shows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from headless import chromium, dump_dom, page_requests, parse_sections, remote_references, screenshot

from simulation.cli import main as cli_main
from simulation.runner import simulate

pytestmark = pytest.mark.integration

CLASSIFICATION_SECTIONS = ("run", "learning-curves", "classification", "fairness", "privacy", "gradcam", "model-card")
SEGMENTATION_SECTIONS = ("run", "learning-curves", "segmentation", "fairness", "privacy", "gradcam", "model-card")
FIGURES = {"learning-curves": 1, "classification": 3, "segmentation": 2, "fairness": 1, "gradcam": 1}


@pytest.fixture(scope="module")
def browser() -> str:
    """The chromium binary; skips locally (fails in CI) without it."""
    found = chromium()
    if found is None:
        if os.environ.get("CI") or os.environ.get("MEDFED_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is not installed, and CI needs this test (.ci/run installs it with apt-get)")
        pytest.skip("chromium is not installed: apt-get install -y chromium (CI installs it)")
    return found


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory, browser: str) -> Path:
    """The demo's task in miniature, through ``medfed simulate --explain-dir`` (adds the Grad-CAM gallery).

Subgroup cells of 5 images are sent (``fairness.min-cell=5``) so that the tiny sites' phantom sex/age
subgroups reach the report."""
    base = tmp_path_factory.mktemp("cls")
    code = cli_main([
        "simulate", "--sites", "2", "--rounds", "2", "--results-dir", str(base / "results"),
        "--explain-dir", str(base / "cams"), "--explain-samples", "3",
        "--run-config", "phantom-count=240 image-size=32 local-epochs=3 min-partition-size=5 run-name='cls' "
                        "fairness.min-cell=5",
    ])
    assert code == 0
    return base / "results" / "cls"


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory: pytest.TempPathFactory, browser: str) -> Path:
    """lung-seg on phantoms; the report is the one the server wrote at the end of the run."""
    base = tmp_path_factory.mktemp("seg")
    res = simulate({"task": "lung-seg", "num-server-rounds": 2, "phantom-count": 80, "image-size": 32,
                    "local-epochs": 2, "min-partition-size": 5, "results-dir": str(base), "run-name": "seg"},
                   sites=2, echo=False, timeout=900)
    return res.run_dir


def _describe(name: str, page: object) -> None:
    """What each section shows, for the closing notes (``pytest -s``)."""
    print(f"\n=== {name} report ===")
    for sid, text in page.text.items():  # type: ignore[attr-defined]
        words = " ".join(text.split())
        print(f"[{sid}] {page.images[sid]} figure(s); {words[:600]}")  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["classification", "segmentation"])
def test_every_section_renders_with_content(which: str, request: pytest.FixtureRequest) -> None:
    run: Path = request.getfixturevalue(f"{which}_run")
    report = run / "report.html"
    assert report.is_file() and (run / "model-card.json").is_file()
    page = parse_sections(dump_dom(report))
    expected = CLASSIFICATION_SECTIONS if which == "classification" else SEGMENTATION_SECTIONS
    assert tuple(page.text) == expected
    for sid in expected:
        assert len(" ".join(page.text[sid].split())) > 100, (sid, page.text[sid])
        if sid in FIGURES and not (which == "segmentation" and sid == "gradcam"):
            assert page.images[sid] >= FIGURES[sid], (sid, page.images[sid])
    text = page.text
    assert "site-0" in text["run"] and "site-1" in text["run"]
    assert "validation" in text["learning-curves"]
    if which == "classification":
        assert "operating" in text["classification"] and "ECE" in text["classification"]
        assert "sensitivity [95% CI]" in text["fairness"] and page.images["fairness"] >= 2  # subgroups of phantoms
        assert "site-0, round-002" in text["gradcam"]
        card = json.loads((run / "model-card.json").read_text())
        assert card["training"]["total-training-images"] > 0 and card["model"]["model-file-sha256"]
        assert card["training"]["sites"][0]["training-images-per-class"]  # from the sites' roll call
    else:
        assert "no per-image distribution" in text["segmentation"] and "Dice" in text["segmentation"]
        assert "Segmentation tasks write no Grad-CAM maps" in text["gradcam"]
    assert "Differential privacy: none" in text["privacy"]
    _describe(which, page)


@pytest.mark.parametrize("which", ["classification", "segmentation"])
def test_reports_make_no_network_request(which: str, request: pytest.FixtureRequest) -> None:
    report: Path = request.getfixturevalue(f"{which}_run") / "report.html"
    urls = page_requests(report)
    assert urls and urls[0] == report.resolve().as_uri()
    foreign = [u for u in urls[1:] if not u.startswith("data:image/png;base64,")]
    assert foreign == [], foreign
    assert len(urls) > 3  # the embedded figures were loaded (as data: URLs), so requests were seen
    assert remote_references(report.read_text(encoding="utf-8")) == []


def test_negative_control_a_remote_resource_is_caught(classification_run: Path, tmp_path: Path) -> None:
    """The same checks fail on the report with one remote image and one remote stylesheet added."""
    html = (classification_run / "report.html").read_text(encoding="utf-8")
    tampered = html.replace("</head>", '<link rel="stylesheet" href="https://fonts.example.com/medfed.css"></head>', 1)
    tampered = tampered.replace("<section id=\"run\">", '<section id="run"><img src="http://cdn.example.com/logo.png" '
                                                        'alt="">', 1)
    page = tmp_path / "tampered.html"
    page.write_text(tampered, encoding="utf-8")
    urls = page_requests(page)
    assert "http://cdn.example.com/logo.png" in urls  # even though the page's own CSP then blocks it
    assert "https://fonts.example.com/medfed.css" in urls
    assert sorted(remote_references(tampered)) == ["http://cdn.example.com/logo.png",
                                                   "https://fonts.example.com/medfed.css"]


@pytest.mark.parametrize("which", ["classification", "segmentation"])
def test_screenshot_is_not_blank(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    report: Path = request.getfixturevalue(f"{which}_run") / "report.html"
    png = screenshot(report, tmp_path / f"{which}.png", height=2400)
    img = cv2.imread(str(png), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (2400, 1200)
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    assert float(gray.std()) > 10.0  # not one flat colour
    assert float(np.mean(gray < 200)) > 0.01  # text and lines drawn
    saturation = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)[:, :, 1]
    assert float(np.mean(saturation > 80)) > 0.002  # coloured plot lines / bars rendered
