"""The HTML report in headless Chromium, with the network cut: plots render, nothing is fetched, no errors."""

from __future__ import annotations

from simfluence.evaluate import split_runs
from simfluence.report import write_report
from simfluence.simulators import LinearIdentitySimulator


NUM_EXAMPLES = 3
NUM_RUNS = 2


def _open_offline(browser, path, width: int = 1280):
    """A page showing ``path`` with every non-file request aborted; returns (page, problems, requests)."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
            if message.type in ("error", "warning") else None)
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))

    def route(route):
        requests.append(route.request.url)
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", route)
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems, requests


def _plots(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('div.plot')].map(plot => ({
        kind: plot.dataset.plot,
        graphs: plot.querySelectorAll('.js-plotly-plot').length,
        svgs: plot.querySelectorAll('.main-svg').length,
        traces: plot.querySelectorAll('.scatterlayer .trace').length,
        heatmaps: plot.querySelectorAll('.heatmaplayer image').length,
        width: plot.getBoundingClientRect().width,
        height: plot.getBoundingClientRect().height,
    }))""")


def test_report_renders_offline_in_chromium(browser, digits_fit, artifacts, tmp_path):
    path = write_report(digits_fit.simulator, digits_fit.heldout, tmp_path / "report.html", num_examples=NUM_EXAMPLES,
                        num_runs=NUM_RUNS, progress=False)
    page, problems, requests = _open_offline(browser, path)
    try:
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {1 + NUM_EXAMPLES}")
        plots = _plots(page)
        assert [plot["kind"] for plot in plots] == ["heatmap"] + ["trajectory"] * NUM_EXAMPLES
        for plot in plots:
            assert plot["graphs"] == 1 and plot["svgs"] >= 2, plot
            assert plot["width"] > 600 and plot["height"] > 250, plot
        assert plots[0]["heatmaps"] == 1
        assert all(plot["traces"] == 2 * NUM_RUNS for plot in plots[1:])   # true and simulated per run
        # Every example image decoded (8x8 digits), and the metric table is there.
        sizes = page.evaluate("[...document.querySelectorAll('img.ex-image')].map(i => [i.complete, i.naturalWidth])")
        assert sizes and all(size == [True, 8] for size in sizes)
        assert page.locator("table.metrics tbody tr").count() == 3
        page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    finally:
        page.close()
    assert not problems
    assert requests == [path.resolve().as_uri()]


def test_hostile_ids_are_shown_as_text(browser, hostile, tmp_path):
    fitting, heldout = split_runs(hostile.runs, num_heldout=3)
    simulator = LinearIdentitySimulator(ridge=0.1).fit(fitting)
    path = write_report(simulator, heldout, tmp_path / "hostile.html", test_ids=[hostile.test_id], top=12,
                        progress=False)
    page, problems, requests = _open_offline(browser, path, width=1000)
    try:
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2")
        assert page.locator("h3 code.ex-id").inner_text() == hostile.test_id
        assert hostile.train_id in page.locator("#example-0").inner_text()
        assert page.locator("body img").count() == 0 and page.locator("script").count() == 4
    finally:
        page.close()
    assert not problems, problems
    assert all(url.startswith("file:") for url in requests)
