"""report.html: what a person reads after a run, checked in a real headless browser."""

import re
import subprocess

import numpy as np
from ux_support import need_program, run_doc

from fedsilo.server.plots import write_artefacts
from fedsilo.server.report_html import class_figures, write_report

CHECK = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
         "const d=document.createElement('div');d.id='check';d.textContent='images '+i.length+"
         "' loaded '+i.filter(x=>x.complete&&x.naturalWidth>0).length;"
         "document.body.appendChild(d);});</script>")


def test_per_class_figures_and_confusion_matrix():
    y_true, y_pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    classes = class_figures(y_true, y_pred, ["a", "b", "c"])
    assert classes["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    a, b, c = classes["per_class"]
    assert (a["recall"], a["precision"], a["support"]) == (0.5, 0.5, 2)
    assert (b["recall"], round(b["precision"], 3), round(b["f1"], 3)) == (1.0, 0.667, 0.8)
    assert c["recall"] == 0.5 and c["precision"] == 1.0


def _page(tmp_path, classes=True):
    doc = run_doc()
    write_artefacts(doc, tmp_path)
    figures = class_figures(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 1]), doc["labels"])
    return write_report(doc, tmp_path, figures if classes else None,
                        {"share": 0.125, "max_length": 64, "median": 40})


def test_report_shows_what_a_privacy_officer_needs(tmp_path):
    text = _page(tmp_path).read_text("utf-8")
    assert "agr-1234" in text and "completed" in text
    assert "12.5% of the coordinator's held-out texts are longer than max-length 64" in text
    for who in ("hospital-c (node 9): rejected", "hospital-d (node 4): declined",
                "hospital-e (node 5): train reply missing"):
        assert who in text
    assert "agreed target ε = 8.0" in text and "9.000" in text  # hospital-b after round 2
    assert "neuro" in text and "confusion matrix" in text
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)  # nothing fetched
    without = _page(tmp_path, classes=False).read_text("utf-8")
    assert "Institutions' local data is never used" in without


def test_report_renders_in_headless_chromium_with_every_image_loaded(tmp_path):
    chromium = need_program("chromium")
    page = _page(tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text("utf-8").replace("</body>", CHECK + "</body>"), "utf-8")
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    found = re.search(r'id="check">images (\d+) loaded (\d+)', done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    total, loaded = map(int, found.groups())
    assert total == loaded == 3  # accuracy/loss, ε, confusion matrix
    assert "fedsilo run report" in done.stdout
