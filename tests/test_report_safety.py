"""report.html from a run directory someone else wrote: every value read from a file is shown as text (never as
markup), the page carries a Content-Security-Policy that allows only its own script, and a run directory of the
wrong structure is refused naming the file and the field (issue 19)."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest
from report_runs import patterns, summary, write_run

from fastbertology.report import build_html, read_run
from fastbertology.report.page import SCRIPT

# Markup that would run script, load something or change the page if it were written into the page unescaped.
PAYLOAD = ("\"'><img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
           "<script>document.body.setAttribute('data-pwned','script');document.title='PW'+'NED'</script>"
           "</title></style></textarea></script><svg onload=\"document.body.setAttribute('data-pwned','svg')\">"
           "<b id=\"injected\">x</b>]]><!--")


class _Markup(HTMLParser):
    """Every element and attribute of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.ids = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += [name for name, _ in attrs]
        self.ids += [value for name, value in attrs if name == "id"]


def _markup(html: str) -> _Markup:
    parser = _Markup()
    parser.feed(html)
    parser.close()
    return parser


def _assert_inert(html: str) -> None:
    """No payload markup made it into the page as markup."""
    assert PAYLOAD not in html
    page = _markup(html)
    assert "img" not in page.tags and page.tags.count("script") == 1
    assert page.tags.count("style") == 1 and "injected" not in page.ids
    assert not [name for name in page.attributes if name.startswith("on")]


def _leaves(value, path=()):
    """``(path, kind)`` of every value and every key in a JSON document; kind is "value" or "key"."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield (*path, key), "key"
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, "value"


def _replaced(document, path, kind, payload=PAYLOAD):
    document = copy.deepcopy(document)
    parent = document
    for step in path[:-1]:
        parent = parent[step]
    if kind == "key":
        parent[payload] = parent.pop(path[-1])
    else:
        parent[path[-1]] = payload
    return document


def _field(path) -> str:
    text = ""
    for step in path:
        text += f"[{step}]" if isinstance(step, int) else f".{step}"
    return text.lstrip(".")


def _check_each_field(tmp_path, which: str, document) -> tuple[int, int]:
    """Put the payload into each value and each key of ``which`` (summary / patterns) in turn: the page shows it
    as text, or the run is refused naming the file and the field. Returns (shown, refused)."""
    shown = refused = 0
    for index, (path, kind) in enumerate(_leaves(document)):
        changed = _replaced(document, path, kind)
        directory = write_run(tmp_path / f"{which}-{index}", **{f"{which}_payload": changed})
        try:
            run = read_run(directory)
        except ValueError as error:
            file = "summary.json" if which == "summary" else "attention_patterns.json"
            assert file in str(error), (path, str(error))
            assert _field(path[:-1] if kind == "key" else path).split(".")[-1].split("[")[0] in str(error) \
                or (kind == "key" and "must have" in str(error)), (path, str(error))
            refused += 1
            continue
        _assert_inert(build_html(run))
        shown += 1
    return shown, refused


def test_every_summary_field_is_shown_as_text_or_refused(tmp_path):
    shown, refused = _check_each_field(tmp_path, "summary", summary())
    assert shown > 40 and refused > 10  # both: text fields shown escaped, numbers refused when they are not numbers


def test_every_pattern_field_is_shown_as_text_or_refused(tmp_path):
    shown, refused = _check_each_field(tmp_path, "patterns", patterns())
    assert shown >= 5 and refused >= 5


def test_the_page_forbids_every_script_but_its_own(tmp_path):
    html = build_html(read_run(write_run(tmp_path / "run")))
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', html).group(1)
    directives = dict((part.split()[0], part.split()[1:]) for part in policy.split(";") if part.strip())
    assert directives["default-src"] == ["'none'"]
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert directives["script-src"] == [f"'sha256-{digest}'"]
    assert directives["img-src"] == ["data:"] and directives["base-uri"] == ["'none'"]
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy
    assert html.index("Content-Security-Policy") < html.index("<style>") < html.index("<script>")
    assert html.count(f"<script>{SCRIPT}</script>") == 1


# ---------------------------------------------------------------------------------------------- run-dir schema
def _refused(tmp_path, name, message_parts, **files):
    directory = write_run(tmp_path / name, **files)
    with pytest.raises(ValueError) as caught:
        read_run(directory)
    for part in message_parts:
        assert part in str(caught.value), str(caught.value)
    return str(caught.value)


def test_a_section_without_its_keys_names_the_file_and_field(tmp_path):
    for section, key in (("masking", "heads_remaining"), ("pruning", "parameters_before"), ("sweep", "kind"),
                         ("masking", "curve"), ("importance", "metric")):
        document = summary()
        del document[section][key]
        _refused(tmp_path, f"{section}-{key}", ["summary.json", f"{section}.{key}", "missing"],
                 summary_payload=document)
    document = summary()
    document["masking"] = ["not", "an", "object"]
    _refused(tmp_path, "list", ["summary.json", "masking", "must be a JSON object"], summary_payload=document)
    document = summary()
    document["sweep"]["kind"] = "<b>heads</b>"
    _refused(tmp_path, "kind", ["summary.json", "sweep.kind", "one of heads, layers, masks"], summary_payload=document)


def test_tables_of_the_wrong_structure_name_the_file(tmp_path):
    tables = {"head_importance.npy": np.array(0.5, dtype=np.float32)}
    _refused(tmp_path, "zero-d", ["head_importance.npy", "0-d", "[layers, heads]"], tables=tables,
             summary_payload={"command": "importance"})
    _refused(tmp_path, "strings", ["attn_entropy.npy", "dtype <U1"],
             tables={"attn_entropy.npy": np.array([["a", "b"]])}, summary_payload={"command": "importance"})
    _refused(tmp_path, "empty", ["head_mask.npy", "no values"],
             tables={"head_mask.npy": np.zeros((0, 3), dtype=np.float32)}, summary_payload={"command": "mask"})


def test_a_mix_of_two_runs_is_refused(tmp_path):
    """Tables of another run beside summary.json (what an interrupted --overwrite run used to leave)."""
    from report_runs import TABLES

    other = dict(TABLES, **{"head_importance.npy": np.ones((4, 4), dtype=np.float32)})
    _refused(tmp_path, "mix", ["head_importance.npy", "(4, 4)", "summary.json", "importance.importance",
                               "different runs"], tables=other)
    same_shape = dict(TABLES, **{"attn_entropy.npy": TABLES["attn_entropy.npy"] + 1})
    _refused(tmp_path, "values", ["attn_entropy.npy", "importance.entropy", "different runs"], tables=same_shape)
    missing = {name: array for name, array in TABLES.items() if name != "head_mask.npy"}
    _refused(tmp_path, "missing", ["head_mask.npy", "missing", "masking.head_mask"], tables=missing)


def test_json_that_python_reads_but_no_run_writes(tmp_path):
    for name, text, message in (("digits", '{"command": ' + "9" * 5000 + "}", "summary.json"),
                                ("deep", "[" * 100_000 + "]" * 100_000, "summary.json"),
                                ("surrogate", '{"command": "\\ud800"}', "summary.json"),
                                ("nan", '{"seconds_total": NaN}', "seconds_total")):
        directory = tmp_path / name
        directory.mkdir()
        (directory / "summary.json").write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            read_run(directory)


def test_a_forged_npy_header_is_refused_without_allocating(tmp_path):
    directory = write_run(tmp_path / "run", summary_payload={"command": "importance"}, tables={})
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000, 1000000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    (directory / "head_importance.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                                    + header.encode() + b"\x00" * 64)
    with pytest.raises(ValueError, match="head_importance.npy is damaged"):
        read_run(directory)


def test_links_out_of_the_run_directory_are_not_followed(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({**summary(), "command": "my secret"}))
    for name, target in (("summary.json", secret), ("head_importance.npy", tmp_path / "elsewhere.npy")):
        directory = write_run(tmp_path / name)
        (directory / name).unlink()
        (directory / name).symlink_to(target)
        with pytest.raises(ValueError, match="is a symbolic link to .*outside the run directory"):
            read_run(directory)
    inside = write_run(tmp_path / "inside")  # a link within the directory is fine
    (inside / "summary.json").rename(inside / "real-summary.json")
    (inside / "summary.json").symlink_to(inside / "real-summary.json")
    read_run(inside)


# ------------------------------------------------------------------------------------------------------ browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _dump_dom(page) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                               page.as_uri()], capture_output=True, text=True, timeout=180)


class _Body(HTMLParser):
    def __init__(self):
        super().__init__()
        self.body, self.title, self.in_title, self.ids = {}, "", False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.body = attrs if tag == "body" else self.body
        self.in_title = tag == "title"
        self.ids += [attrs["id"]] if "id" in attrs else []

    def handle_data(self, data):
        if self.in_title:
            self.title += data

    def handle_endtag(self, tag):
        self.in_title = False if tag == "title" else self.in_title


def _body(dom: str) -> _Body:
    parser = _Body()
    parser.feed(dom)
    return parser


def _all_text_fields(document, payload):
    """``document`` with every string value (and every key of the free-form sections) replaced by ``payload``
    plus a number, so each stays distinct."""
    counter = iter(range(10**6))

    def walk(value, free):
        if isinstance(value, dict):
            return {(f"{payload}{next(counter)}" if free else key): walk(item, free or key in ("options", "versions"))
                    for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, free) for item in value]
        return f"{payload}{next(counter)}" if isinstance(value, str) else value

    return walk(document, False)


@pytest.fixture
def browser():
    if _chromium() is None:
        pytest.skip("no Chromium to render report.html: install Debian's chromium (apt-get install -y chromium; "
                    ".ci/run does) or set CHROMIUM to a Chrome/Chromium executable")


def test_injected_markup_stays_inert_in_a_browser(tmp_path, browser):
    document = _all_text_fields(summary(), PAYLOAD)
    document["sweep"]["kind"] = "heads"  # the one text field with fixed values
    directory = write_run(tmp_path / "run", summary_payload=document,
                          patterns_payload=_all_text_fields(patterns(), PAYLOAD))
    page = directory / "report.html"
    page.write_text(build_html(read_run(directory)))
    dumped = _dump_dom(page)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    body = _body(dumped.stdout)
    assert body.body.get("data-ready") == "yes"  # the page's own script ran, under the policy
    assert "data-pwned" not in body.body and "PWNED" not in body.title and "injected" not in body.ids
    assert "document.body.setAttribute('data-pwned','script')" in dumped.stdout  # shown, as text


def test_the_policy_blocks_markup_that_escaping_missed(tmp_path, browser):
    """Second line of defence: markup forced into the page unescaped does not run, the page's script does."""
    html = build_html(read_run(write_run(tmp_path / "run")))
    forced = ("<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">"
              "<script>document.body.setAttribute('data-pwned','script');document.title='PW'+'NED'</script>"
              "<svg onload=\"document.body.setAttribute('data-pwned','svg')\"></svg><img src=\"https://example.com/x.png\">")
    page = tmp_path / "forced.html"
    page.write_text(html.replace("<main>", "<main>" + forced, 1))
    dumped = _dump_dom(page)
    body = _body(dumped.stdout)
    assert body.body.get("data-ready") == "yes"
    assert "data-pwned" not in body.body and "PWNED" not in body.title
    assert "Content Security Policy" in dumped.stderr  # the browser says what it blocked


def test_the_hover_readout_works_under_the_policy(tmp_path, browser):
    """The page's own script, not just its last line: a hover over a cell fills the read-out line. A probe script
    (allowed by adding its hash to the policy) sends the mouseover and copies the read-out into the body."""
    html = build_html(read_run(write_run(tmp_path / "run")))
    probe = ("var cell = document.querySelector('svg[data-table=\"importance\"] .cell');"
             "cell.dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));"
             "document.body.setAttribute('data-readout', document.getElementById('readout-importance').textContent);")
    digest = base64.b64encode(hashlib.sha256(probe.encode()).digest()).decode()
    html = html.replace("script-src ", f"script-src 'sha256-{digest}' ", 1)
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", f"<script>{probe}</script></body>"))
    body = _body(_dump_dom(page).stdout)
    assert body.body.get("data-readout", "").startswith("layer 0, head 0: importance ")


# ------------------------------------------------------------------ the gates, patching and warnings sections
def _analyses_run() -> tuple[dict, dict]:
    """A summary with the ``gates`` and ``patching`` sections and ``setup.warnings`` as the commands write them,
    and the tables, their copies, that go with it."""
    from report_runs import TABLES, _table

    gates, scores, attribution = _table(5), _table(6, -1.0, 1.0), _table(7, -1.0, 1.0)
    document = summary()
    document["setup"]["warnings"] = ["the data holds one class only"]
    document["gates"] = {"mode": "target", "target_heads": 4, "per_kv_group": False, "steps": 30, "seconds": 1.5,
                         "metric": "accuracy", "original_score": 0.9, "masked_score": 0.8,
                         "importance_masked_score": 0.7, "heads_kept": 4, "heads_total": 12, "heads_in_common": 3,
                         "curve": [{"step": 1, "l0": 11.5}, {"step": 2, "l0": 10.0}], "gates": gates.tolist(),
                         "head_mask": document["masking"]["head_mask"]}
    document["patching"] = {"direction": "denoising", "score": "loss", "metric": "accuracy", "clean_loss": 0.1,
                            "corrupted_loss": 0.9, "clean_metric": 1.0, "corrupted_metric": 0.5,
                            "rank_correlation": 0.8, "seconds": 2.0, "scores": scores.tolist(),
                            "attribution": attribution.tolist()}
    tables = {**TABLES, "head_gates.npy": gates, "patching_scores.npy": scores,
              "attribution_scores.npy": attribution}
    return document, tables


def test_gates_patching_and_warnings_fields_are_shown_as_text_or_refused(tmp_path):
    """The sections of the gates and patching commands and the run's warnings: a payload in any of their fields is
    shown as text or refused naming summary.json and the field."""
    document, tables = _analyses_run()
    document["setup"]["warnings"].append("labels <b>a</b> & <script>")
    html = build_html(read_run(write_run(tmp_path / "plain", summary_payload=document, tables=tables)))
    assert "Learned head gates" in html and "Activation patching" in html
    # the warnings are on the page, as text
    assert "<li>the data holds one class only</li><li>labels &lt;b&gt;a&lt;/b&gt; &amp; &lt;script&gt;</li>" in html
    shown = refused = 0
    for index, (path, kind) in enumerate(_leaves(document)):
        if path[0] not in ("gates", "patching") and path[:2] != ("setup", "warnings"):
            continue
        if path[-1] in ("gates", "scores", "attribution", "head_mask") or "gates" in path[1:2] and \
                isinstance(path[-1], int) and len(path) > 3:
            continue  # the table copies: checked against their .npy files (test_a_mix_of_two_runs_is_refused)
        changed = _replaced(document, path, kind)
        directory = write_run(tmp_path / f"run-{index}", summary_payload=changed, tables=tables)
        try:
            run = read_run(directory)
        except ValueError as error:
            assert "summary.json" in str(error), (path, str(error))
            refused += 1
            continue
        _assert_inert(build_html(run))
        shown += 1
    assert shown >= 5 and refused >= 10, (shown, refused)


def test_the_new_sections_without_their_keys_name_the_file_and_field(tmp_path):
    for section, key in (("gates", "heads_kept"), ("gates", "mode"), ("patching", "direction"),
                         ("patching", "clean_loss")):
        document, tables = _analyses_run()
        del document[section][key]
        _refused(tmp_path, f"{section}-{key}", ["summary.json", f"{section}.{key}"], summary_payload=document,
                 tables=tables)
    document, tables = _analyses_run()
    document["setup"]["warnings"] = [3]
    _refused(tmp_path, "warnings", ["summary.json", "warnings[0]"], summary_payload=document, tables=tables)
