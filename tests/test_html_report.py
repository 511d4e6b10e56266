"""The HTML report: every section from the report dict, inline SVG plots, nothing fetched from the network.

The report dict is built the way `optimize` builds its own: `api.run` for the pipeline and verification,
`api.estimate` before and after for the estimate objects, and a small synthetic Pareto list.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from hwnas import api, models
from hwnas.errors import BadInputError
from hwnas.report.html import AFTER_COLOR, CHOSEN_COLOR, render_html, write_html
from hwnas.report.json_report import dumps

TARGET = "npu-32x32"
PIPELINE = "fold-bn,replace-conv{mode=grouped,group_size=8}"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def optimize_like_report() -> dict:
    model = models.build("mobilenetv2", width=0.35, resolution=64)
    result = api.run(model, PIPELINE)
    before, after = api.estimate(model, TARGET), api.estimate(result.model, TARGET)
    run = result.to_dict()
    pareto = [
        {"latency_ms": after.latency_ms * f, "drift": drift, "memory_bytes": int(after.params_bytes * m),
         "pipeline": pipeline, "chosen": chosen}
        for f, drift, m, pipeline, chosen in [
            (1.25, 0.0, 1.00, "fold-bn", False),
            (1.00, 0.0, 1.05, PIPELINE, True),
            (0.92, 0.002, 1.10, PIPELINE + ",fuse-ibn{mode=mbconv,sites=0:2}", False),
            (0.80, 0.015, 0.90, PIPELINE + ",scale-depth{multiplier=0.75,round_to=8}", False),
            (1.10, 0.010, 1.30, "fold-bn,replace-conv{mode=dense}", False),
        ]
    ]
    report = {
        "input": "mobilenetv2.onnx", "output": "mobilenetv2.opt.onnx", "target": TARGET, **run,
        "baseline": {**run["baseline"], **before.to_dict()}, "optimized": {**run["optimized"], **after.to_dict()},
        "latency_reduction": 1 - after.latency_ms / before.latency_ms,
        "search": {"algorithm": "evolution", "candidates_evaluated": 12, "wall_s": 12.5, "space": "curated", "seed": 0,
                   "best_so_far": [float("inf")] * 2 + [before.latency_ms * 0.8] * 4 + [after.latency_ms] * 6},
        "pareto": pareto,
        "recipe": {"pipeline": PIPELINE, "model_fingerprint": "sha256:0123abcd"},
        "warnings": ["a report-level warning with <markup> & stuff"],
    }
    return json.loads(dumps(report))  # exactly what a JSON report on disk holds


@pytest.fixture(scope="module")
def report() -> dict:
    return optimize_like_report()


@pytest.fixture(scope="module")
def page(report) -> str:
    return render_html(report)


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict]]:
    collector = _Collector()
    collector.feed(page)
    return collector.tags


def test_sections_are_present(page):
    ids = {attrs.get("id") for tag, attrs in parse(page) if tag == "section"}
    assert {"summary", "latency", "search", "pipeline", "verification", "warnings"} <= ids
    for heading in ("Before / after", "Per-layer latency on npu-32x32", "Pareto front", "Pipeline and recipe",
                    "Verification", "Warnings"):
        assert heading in page
    for row in ("estimated latency (ms)", "parameter bytes", "peak activation bytes", "MACs", "FLOPs", "nodes"):
        assert f"<td>{row}</td>" in page


def test_summary_numbers_come_from_the_report(report, page):
    assert f"{report['baseline']['latency_ms']:.4f}" in page
    assert f"{report['optimized']['latency_ms']:.4f}" in page
    assert f"{report['latency_reduction'] * 100:.1f}%" in page
    assert f"{report['baseline']['params_bytes']:,} B" in page


def test_plots_are_inline_svg(page):
    plots = [attrs.get("data-plot") for tag, attrs in parse(page) if tag == "svg"]
    assert plots == ["kernels", "kinds", "pareto", "convergence"]
    assert "<img" not in page and "<script" not in page.lower() and "<link" not in page.lower()
    assert page.count("<path") > 50  # bars, markers and text as paths


def test_no_network_references(page):
    for tag, attrs in parse(page):
        for name in ("src", "href", "xlink:href", "action", "srcset", "data", "poster"):
            value = attrs.get(name) or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value!r}> reaches the network"
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page)
    assert "@import" not in page and "@font-face" not in page
    # the only http:// strings left are the SVG/XLink namespace names, which are never fetched
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_element_ids_are_unique_across_plots(page):
    ids = [attrs["id"] for _, attrs in parse(page) if "id" in attrs]
    assert len(ids) == len(set(ids))
    defined = set(ids)
    for ref in re.findall(r'href="#([^"]+)"', page) + re.findall(r"url\(#([^)]+)\)", page):
        assert ref in defined


def test_chosen_point_is_highlighted_and_text_is_escaped(page):
    assert page.count('class="chosen"') == 1
    assert "a report-level warning with &lt;markup&gt; &amp; stuff" in page
    assert "<markup>" not in page
    assert "fuse-ibn{mode=mbconv,sites=0:2}" in page


def test_verification_and_pipeline_tables(report, page):
    assert "equivalent" in page and "within tolerance" in page
    assert "<code>fold-bn</code>" in page and "sites rewritten" in page
    assert "model_fingerprint" in page  # the recipe
    assert "12 values (plotted below)" in page  # search.best_so_far: a curve, not a table cell


def test_run_report_renders_without_search_or_latency():
    result = api.run(models.build("mobilenetv2", width=0.35, resolution=64), "fold-bn")
    page = render_html(json.loads(dumps(result.to_dict())))
    ids = {attrs.get("id") for tag, attrs in parse(page) if tag == "section"}
    assert {"summary", "pipeline", "verification"} <= ids
    assert "search" not in ids and "latency" not in ids and "<svg" not in page
    assert "hwnas run report" in page


def test_unverified_report_says_so():
    page = render_html({"pipeline": "fold-bn", "exact": True, "verification": None,
                        "baseline": {"nodes": 3}, "optimized": {"nodes": 2}})
    assert "Not verified" in page and "not verified" in page


def test_exact_search_plots_memory_not_a_flat_drift(report):
    exact = dict(report, pareto=[dict(p, drift=0.0) for p in report["pareto"]])
    page = render_html(exact)
    assert "pareto" in [a.get("data-plot") for t, a in parse(page) if t == "svg"]
    assert "estimated latency and memory;" in page
    assert "estimated latency and drift and by memory;" in render_html(report)


def test_write_html_is_atomic_and_checks_the_path(tmp_path):
    report = {"pipeline": "fold-bn", "baseline": {"nodes": 3}, "optimized": {"nodes": 2}}
    path = write_html(tmp_path / "r.html", report)
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    with pytest.raises(BadInputError):
        write_html(tmp_path / "no-such-dir" / "r.html", report)


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i:i + 2], 16) for i in (1, 3, 5))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium); "
                                               "the headless rendering check needs it")
def test_renders_in_headless_chromium(tmp_path, page):
    import matplotlib.image
    import numpy as np

    html_path = tmp_path / "report.html"
    html_path.write_text(page, encoding="utf-8")
    png = tmp_path / "report.png"
    shot = _chromium(f"--screenshot={png}", "--dump-dom", "--window-size=1280,2000", html_path.as_uri(),
                     user_data=tmp_path / "ud")
    assert png.exists(), shot.stderr[-2000:]
    dom = shot.stdout  # the DOM as rendered, after parsing: the SVG elements must be in it
    assert dom.count("<svg") == 4
    assert all(f'data-plot="{p}"' in dom for p in ("kernels", "kinds", "pareto", "convergence"))
    assert CHOSEN_COLOR.lower() in dom.lower()  # the chosen point's star
    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(np.uint8)
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 245).any(axis=-1)
    assert non_white.mean() > 0.03, "the page rendered (nearly) blank"
    colours = np.unique((pixels[..., 0].astype(np.uint32) << 16) | (pixels[..., 1].astype(np.uint32) << 8) | pixels[..., 2])
    assert len(colours) > 100, f"only {len(colours)} distinct colours: plots missing?"
    # the per-kernel bars (the 'after' colour) made it onto the screen
    after = np.abs(pixels.astype(int) - _hex_rgb(AFTER_COLOR)).sum(axis=-1) <= 6
    assert after.sum() > 2000
    if os.environ.get("HWNAS_SAVE_SCREENSHOT"):  # docs/screenshot-report.png is made this way
        shutil.copyfile(png, os.environ["HWNAS_SAVE_SCREENSHOT"])


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
def test_a_real_optimize_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image
    import numpy as np

    model = models.build("mobilenetv2", width=0.35, resolution=64)
    result = api.optimize(model, TARGET, trials=12, workers=1, seed=0)
    html_path = tmp_path / "optimize.html"
    write_html(html_path, json.loads(dumps(result.to_dict())))
    png = tmp_path / "optimize.png"
    shot = _chromium(f"--screenshot={png}", "--dump-dom", "--window-size=1280,2000", html_path.as_uri(),
                     user_data=tmp_path / "ud")
    assert png.exists(), shot.stderr[-2000:]
    assert all(f'data-plot="{p}"' in shot.stdout for p in ("kernels", "pareto", "convergence"))
    pixels = (matplotlib.image.imread(str(png))[..., :3] * 255).round().astype(np.uint8)
    assert (pixels < 245).any(axis=-1).mean() > 0.03, "the page rendered (nearly) blank"
