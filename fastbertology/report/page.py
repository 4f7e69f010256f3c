"""``report.html``: one self-contained page for a run — inline CSS, inline SVG and a few lines of script; nothing is
fetched from anywhere. Built only from the run's files (:class:`~fastbertology.report.run_files.RunFiles`).

A run directory can come from someone else, so every value read from a file is written as text (:func:`_text`:
HTML-escaped, quotes included, whatever its type), and the page's Content-Security-Policy (:data:`POLICY`) lets
only its own script and its own style run: no other script (inline, event handler or file), no network, images
from ``data:`` only."""

from __future__ import annotations

import base64
import hashlib
from html import escape

import numpy as np

from . import svg
from .run_files import RunFiles
from .scales import format_value

STYLE = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 0; color: #222; background: #f4f5f7; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 60px; }
header h1 { font-size: 24px; margin: 8px 0 4px; }
.lede { color: #555; margin: 0 0 12px; }
nav a { margin-right: 14px; color: #1f5f8b; text-decoration: none; font-size: 14px; }
section { background: #fff; border-radius: 8px; padding: 14px 20px 18px; margin: 16px 0;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
h2 { font-size: 19px; margin: 4px 0 6px; }
h3 { font-size: 15px; margin: 14px 0 4px; }
p.note { color: #555; font-size: 13.5px; margin: 4px 0 10px; max-width: 900px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { border: 1px solid #e2e4e8; border-radius: 6px; padding: 8px 14px; min-width: 150px; }
.card b { display: block; font-size: 20px; }
.card span { color: #666; font-size: 12.5px; }
table.kv { border-collapse: collapse; font-size: 13.5px; }
table.kv td, table.kv th { border-bottom: 1px solid #eee; padding: 3px 14px 3px 0; text-align: left;
                           vertical-align: top; }
table.kv td.num { text-align: right; font-variant-numeric: tabular-nums; }
.readout { font-family: ui-monospace, monospace; font-size: 13px; color: #333; min-height: 18px; margin: 2px 0 6px; }
.figure { overflow-x: auto; }
.pair { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
svg .cell:hover { stroke: #000; stroke-width: 1.5; }
code { background: #f0f1f3; padding: 1px 4px; border-radius: 3px; }
.warnings { background: #fff7e0; border: 1px solid #f0d48a; border-radius: 6px; padding: 8px 14px; margin: 12px 0;
            font-size: 14px; }
.warnings ul { margin: 4px 0 0; padding-left: 20px; }
"""

SCRIPT = """
document.querySelectorAll('svg[data-table]').forEach(function (figure) {
  var out = document.getElementById('readout-' + figure.getAttribute('data-table'));
  if (!out) { return; }
  figure.addEventListener('mouseover', function (event) {
    var cell = event.target.closest('.cell');
    var title = cell && cell.querySelector('title');
    if (title) { out.textContent = title.textContent; }
  });
});
document.body.setAttribute('data-ready', 'yes');
"""



def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


# Only the page's own <script> and <style> (by their hashes); nothing fetched, no forms, no <base>.
POLICY = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; img-src data:; "
          "base-uri 'none'; form-action 'none'")

TABLES = {  # name -> (heading, what, colour map, explanation)
    "importance": ("Head importance", "importance", "viridis",
                   "|dL/dmask| per head, summed over the data and divided by the number of tokens (run_bertology; "
                   "Michel et al. 2019), normalised as the options say. High: masking the head changes the loss."),
    "entropy": ("Attention entropy", "entropy (nats)", "magma",
                "Mean entropy of each head's attention distribution per real query token. Low: the head looks at "
                "few tokens; log(N) would be uniform attention."),
    "max_prob": ("Max attention probability", "max probability", "viridis",
                 "Mean of each head's largest attention probability per real query token. 1: all attention on one "
                 "token."),
}


def _text(value) -> str:
    """Any value from a file as HTML text (also safe inside a quoted attribute)."""
    return escape(str(value), quote=True)


def _fmt(value, digits: int = 4) -> str:
    """A number as short text; None (NaN in summary.json) as an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _number(value, decimals: int) -> str:
    return "–" if value is None else format_value(value, decimals)


def _kv_table(rows) -> str:
    cells = "".join(f"<tr><th>{_text(k)}</th><td>{_text(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{cells}</table>'


def _readout(table: str) -> str:
    return f'<div class="readout" id="readout-{_text(table)}">Hover a cell for its exact value.</div>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_text(anchor)}"><h2>{_text(title)}</h2>{body}</section>'


def _subtitle(setup: dict) -> str:
    return (f"{setup.get('model_label', setup.get('model', '?'))} · {setup.get('task_name', '?')} "
            f"({setup.get('metric', '?')}) · {setup.get('examples', '?')} examples")


def _head_tables(run: RunFiles) -> list[tuple[str, str, str]]:
    sections = []
    for name, (title, what, colormap, note) in TABLES.items():
        if name not in run.tables:
            continue
        values = np.asarray(run.tables[name])
        body = (f'<p class="note">{_text(note)}</p>{_readout(name)}<div class="figure">'
                f'{svg.head_heatmap(values, table=name, colormap=colormap, what=what)}</div>')
        sections.append((name, title, body))
    return sections


def _patterns(run: RunFiles) -> str:
    patterns = run.patterns
    if not patterns or not patterns.get("examples"):
        return ""
    heads = patterns["heads"]
    parts = ['<p class="note">What the most and the least important head attend to on a few examples of the first '
             "batch (rows: query tokens; columns: key tokens; darker = more attention). Probabilities from the "
             "patched model's <code>output_attentions=True</code>.</p>"]
    for number, example in enumerate(patterns["examples"]):
        tokens = [str(token) for token in example["tokens"]]
        cut = "" if example["shown"] == example["length"] else \
            f" (the first {example['shown']} of its {example['length']} tokens)"
        parts.append(f"<h3>Example {number + 1}: {_text(' '.join(tokens[:24]))}"
                     f"{' …' if len(tokens) > 24 else ''}{_text(cut)}</h3><div class=\"pair\">")
        for index, head in enumerate(heads):
            table = f"pattern-{number}-{index}"
            label = (f"layer {head['layer']}, head {head['head']}: {head['role']} (importance "
                     f"{_number(head['importance'], 3)})")
            figure = svg.attention_map(np.asarray(example["maps"][index], dtype=np.float64), tokens,
                                       table=table, label=label)
            parts.append(f'<div><b>{_text(label)}</b>{_readout(table)}<div class="figure">{figure}</div></div>')
        parts.append("</div>")
    return "".join(parts)


def _masking(run: RunFiles) -> str:
    masking = run.summary.get("masking")
    if not masking:
        return ""
    metric = str((run.summary.get("setup") or {}).get("metric", "score"))
    body = [f'<p class="note">Mask the {100 * masking["amount"]:.0f}% least important remaining heads, recompute '
            f"importance, repeat while {_text(metric)} stays within {100 * masking['threshold']:.0f}% of the "
            f"original ({_text(_fmt(masking['original_score']))}). Kept: {_text(masking['heads_remaining'])} of "
            f"{_text(masking['heads_total'])} heads, scoring {_text(_fmt(masking['final_score']))}.</p>",
            _readout("masking_curve")]
    curve = svg.masking_curve(masking["curve"], metric=metric, threshold=masking.get("threshold_score"))
    body.append(f'<div class="figure">{curve}</div>')
    if "head_mask" in run.tables:
        body.append("<h3>Final head mask (1 = kept, 0 = masked)</h3>" + _readout("head_mask") +
                    '<div class="figure">' + svg.head_heatmap(np.asarray(run.tables["head_mask"]), table="head_mask",
                                                              colormap="Blues", what="kept") + "</div>")
    return "".join(body)


def _sweep(run: RunFiles) -> str:
    sweep = run.summary.get("sweep")
    if not sweep or "sweep_delta" not in run.tables:
        return ""
    delta = np.asarray(run.tables["sweep_delta"])
    kind, metric = str(sweep["kind"]), str(sweep["metric"])
    row_title = "mask" if kind == "masks" else "layer"
    figure = svg.head_heatmap(delta, table="sweep_delta", colormap="RdBu_r", centre=0.0, row_title=row_title,
                              what=f"change of {metric}")
    harmful = ", ".join(f"{' '.join(f'{k} {v}' for k, v in entry.items() if k != 'delta')} "
                        f"({'–' if entry['delta'] is None else format(entry['delta'], '+.4g')})"
                        for entry in (sweep.get("most_harmful") or [])[:5])
    direction = "higher is better" if sweep["higher_is_better"] else "lower is better"
    ablation = str(sweep.get("ablation", "zero"))
    replaced = {"zero": "zeroed", "mean": "replaced by its mean over the data",
                "resample": "resampled from another example"}.get(ablation, ablation)
    return (f'<p class="note">{_text(metric)} with each {_text(kind[:-1])} masked (its heads\' outputs '
            f"{_text(replaced)}: {_text(ablation)} ablation) minus the unmasked "
            f"{_text(_fmt(sweep['baseline_score']))} ({direction}; blue: it went down, red: up, white: no change). "
            f"Most harmful to mask: {_text(harmful)}.</p>{_readout('sweep_delta')}"
            f'<div class="figure">{figure}</div>')


HEAD_TYPE_NOTES = {  # score -> its definition, in a few words
    "previous_token": "p(i → i−1)",
    "first_token": "p(i → first token): attention-sink mass",
    "duplicate_token": "Σ p(i → earlier tokens with i's id)",
    "induction": "p(i → i−P+1) on a random block of P tokens repeated twice",
}


def _head_types(run: RunFiles) -> str:
    if not run.head_scores:
        return ""
    info = run.summary.get("head_types", {})
    figures = []
    for name, values in run.head_scores.items():
        heading = f"{name.replace('_', '-')}: {HEAD_TYPE_NOTES.get(name, '')}"
        figures.append(f"<div><h3>{_text(heading)}</h3>{_readout('head_' + name)}<div class=\"figure\">"
                       f"{svg.head_heatmap(values, table='head_' + name, colormap='viridis', what=name)}</div></div>")
    period, count = info.get("induction_period", "P"), info.get("induction_sequences", "?")
    return ('<p class="note">Mean attention probability per head, over the real query tokens i of the data '
            f"(induction: over the second copy of {_text(count)} made-up sequences, P = {_text(period)}), "
            "from the fused pass's queries, keys and log-sum-exps (no attention maps); the "
            "softmax before any head mask. Empty cells: rows not scored (cross-attention, decoder of an "
            'encoder-decoder model). Definitions: docs/head-types.md.</p><div class="pair">'
            + "".join(figures) + "</div>")
def _heatmap(run: RunFiles, name: str, *, colormap: str, what: str, centre: float | None = None) -> str:
    return (_readout(name) + '<div class="figure">' +
            svg.head_heatmap(np.asarray(run.tables[name], dtype=np.float64), table=name, colormap=colormap,
                             centre=centre, what=what) + "</div>")


def _gates(run: RunFiles) -> str:
    gates = run.summary.get("gates")
    if not gates or "head_gates" not in run.tables:
        return ""
    metric = gates.get("metric", "score")
    if gates["mode"] == "target":
        goal = (f"a Lagrangian towards {gates['target_heads']} expected open gates (multipliers trained by gradient "
                f"ascent); the mask keeps the {gates['target_heads']} gates of largest log_alpha")
    else:
        goal = f"loss + {_fmt(gates['l0_penalty'])} × L0; the mask keeps the gates with log_alpha > 0"
    unit = "key/value group" if gates.get("per_kv_group") else "head"
    note = (f"One hard-concrete gate per {unit} (Louizos et al. 2018, as Voita et al. 2019; temperature 2/3, "
            f"stretch (−0.1, 1.1)) learned with frozen weights over {gates['steps']} steps: {goal}. ")
    body = [f'<p class="note">{_text(note)}'
            "Shown: each gate's probability of being open, P(z ≠ 0).</p>",
            _heatmap(run, "head_gates", colormap="viridis", what="open probability")]
    rows = [("all heads", "", _fmt(gates["original_score"], 6)),
            ("gate mask", gates["heads_kept"], _fmt(gates["masked_score"], 6)),
            ("the same number of heads by importance", gates["heads_kept"],
             _fmt(gates["importance_masked_score"], 6))]
    cells = "".join(f"<tr><th>{_text(a)}</th><td class=\"num\">{_text(b)}</td><td class=\"num\">"
                    f"{_text(c)}</td></tr>" for a, b, c in rows)
    body.append(f"<h3>Gate mask against importance-based masking</h3><p class=\"note\">The importance mask keeps the "
                f"{_text(gates['heads_kept'])} heads ranked highest by this run's importance table (same count as the "
                f"gate mask); {_text(gates['heads_in_common'])} heads are in both.</p><table class=\"kv\"><tr>"
                f"<th>mask</th><th>heads kept</th><th>{_text(metric)}</th></tr>{cells}</table>")
    if "head_mask" in run.tables:
        body.append("<h3>Gate mask (1 = kept; head_mask.npy, for prune --head-mask)</h3>"
                    + _heatmap(run, "head_mask", colormap="Blues", what="kept"))
    curve = gates.get("curve") or []
    if curve:
        body.append("<h3>Training: expected open gates (L0) per step</h3>" + _readout("gates_curve") +
                    '<div class="figure">' + svg.line_chart(
                        [p["step"] for p in curve], [p["l0"] for p in curve], table="gates_curve", x_label="step",
                        y_label="expected open gates", reference=gates.get("target_heads"),
                        reference_label="target") + "</div>")
    return "".join(body)


def _patching(run: RunFiles) -> str:
    patching = run.summary.get("patching")
    if not patching or "patching_scores" not in run.tables:
        return ""
    base, source = ("corrupted", "clean") if patching["direction"] == "denoising" else ("clean", "corrupted")
    metric = _text(patching["metric"])
    body = [f'<p class="note">{_text(patching["direction"].capitalize())}: the {base} input is run with one head\'s '
            f"output (its context vector before the output projection) taken from the {source} run, for every head. "
            f"Score: (value patched − value {base}) / (value {source} − value {base}) of the "
            f"{_text(patching['score'])}, scored against the clean targets: the share of the gap this head carries "
            f"(1: all of it). Clean: loss {_text(_fmt(patching['clean_loss']))}, {metric} "
            f"{_text(_fmt(patching['clean_metric']))}; corrupted: loss {_text(_fmt(patching['corrupted_loss']))}, "
            f"{metric} {_text(_fmt(patching['corrupted_metric']))}.</p>"]
    figures = [("Activation patching", _heatmap(run, "patching_scores", colormap="RdBu_r", centre=0.0,
                                                what="share recovered"))]
    if "attribution_scores" in run.tables:
        figures.append(("Attribution patching (first-order estimate)",
                        _heatmap(run, "attribution_scores", colormap="RdBu_r", centre=0.0,
                                 what="estimated share recovered")))
        correlation = patching.get("rank_correlation")
        body.append('<p class="note">Attribution patching: (source − base head output) · dL/d(head output) summed '
                    "over tokens, from one forward and one backward pass of the base input, divided by the loss gap. "
                    f"Spearman rank correlation with activation patching: {_text(_fmt(correlation, 3))}.</p>")
    body.append('<div class="pair">' + "".join(f"<div><h3>{_text(title)}</h3>{figure}</div>"
                                               for title, figure in figures) + "</div>")
    return "".join(body)


def _pruning(run: RunFiles) -> str:
    pruning = run.summary.get("pruning")
    if not pruning:
        return ""
    before, after = pruning["parameters_before"], pruning["parameters_after"]
    rows = [("heads pruned", f"{pruning['heads_pruned']} of {pruning.get('heads_total', '?')}"),
            ("parameters", f"{before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer)"),
            ("score with the heads masked", _fmt(pruning["masked_score"], 6)),
            ("score of the pruned model", _fmt(pruning["pruned_score"], 6)),
            ("evaluation time, masked / pruned",
             f"{pruning['masked_seconds']:.2f} s / {pruning['pruned_seconds']:.2f} s"),
            ("saved to", pruning["model_dir"])]
    return ('<p class="note">The masked heads are removed from the weights (rows of Q, K, V and columns of the '
            "output projection); the pruned model must score what the masked model did.</p>" + _kv_table(rows))


def _timings(summary: dict) -> str:
    rows, known = [], 0.0
    for label, section, key in (("importance + entropy + metric", "importance", "seconds"),
                                ("attention patterns", "patterns", "seconds"),
                                ("head-type scores", "head_types", "seconds"),
                                ("iterative masking", "masking", "seconds"),
                                ("evaluation with the mask", "pruning", "masked_seconds"),
                                ("evaluation of the pruned model", "pruning", "pruned_seconds"),
                                ("sweep", "sweep", "seconds"),
                                ("learning the gates", "gates", "seconds"),
                                ("evaluating the gate and importance masks", "gates", "evaluation_seconds"),
                                ("activation patching", "patching", "seconds")):
        value = (summary.get(section) or {}).get(key)
        if value is not None:
            rows.append((label, f"{value:.2f} s"))
            known += value if section != "sweep" else 0.0
    total = summary.get("seconds_total")
    if total is not None:
        if "sweep" not in summary:
            rows.append(("loading, data, writing outputs", f"{max(total - known, 0.0):.2f} s"))
        rows.append(("total", f"{total:.2f} s"))
    return _kv_table(rows)


def _cards(summary: dict) -> str:
    setup = summary.get("setup") or {}
    cards = []
    importance = summary.get("importance")
    if importance:
        cards.append((_number(importance["metric"], 4), f"{setup.get('metric', 'metric')}, all heads"))
    if summary.get("masking"):
        masking = summary["masking"]
        cards.append((f"{masking['heads_remaining']} / {masking['heads_total']}", "heads kept by masking"))
    if summary.get("pruning"):
        pruning = summary["pruning"]
        cards.append((_number(pruning["pruned_score"], 4), "score of the pruned model"))
    if summary.get("sweep"):
        sweep = summary["sweep"]
        cards.append((_number(sweep["baseline_score"], 4), f"{sweep['metric']}, unmasked"))
        cards.append((str(sweep["masks"]), f"masks swept ({sweep['kind']})"))
    if summary.get("gates"):
        gates = summary["gates"]
        cards.append((f"{gates['heads_kept']} / {gates['heads_total']}", "heads kept by the gates"))
        cards.append((format_value(gates["masked_score"], 4), "score with the gate mask"))
    if summary.get("patching") and summary["patching"].get("rank_correlation") is not None:
        cards.append((format_value(summary["patching"]["rank_correlation"], 3),
                      "rank correlation, activation vs attribution"))
    if summary.get("seconds_total") is not None:
        cards.append((f"{summary['seconds_total']:.0f} s", "total time"))
    return '<div class="cards">' + "".join(f"<div class=\"card\"><b>{_text(v)}</b><span>{_text(k)}</span></div>"
                                           for v, k in cards) + "</div>"


def _warnings(summary: dict) -> str:
    """The run's warnings (``setup.warnings``, what the console printed before the work), or nothing."""
    warnings = (summary.get("setup") or {}).get("warnings") or []
    if not warnings:
        return ""
    items = "".join(f"<li>{_text(warning)}</li>" for warning in warnings)
    return f'<div class="warnings" role="note"><b>Warnings about this run</b><ul>{items}</ul></div>'


def _run_details(summary: dict) -> str:
    setup = summary.get("setup") or {}
    versions = summary.get("versions") or {}
    environment = [("command", summary.get("command")), ("date", str(summary.get("date", "")).replace("T", " ")),
                   ("device", setup.get("device")), ("dtype", setup.get("dtype")),
                   ("attention", setup.get("attention", setup.get("backend"))), ("platform", summary.get("platform")),
                   *((name, version or "not installed") for name, version in versions.items())]
    data = [("model", setup.get("model")), ("model directory", setup.get("model_dir")),
            ("model type", setup.get("model_type")), ("task", setup.get("task")), ("data", setup.get("data")),
            ("batches", f"{setup.get('batches')} of up to {setup.get('batch_size')} examples, at most "
                        f"{setup.get('max_seq_length')} tokens each")]
    labels = setup.get("labels")
    if isinstance(labels, dict) and isinstance(labels.get("ids"), dict):
        data.append(("labels -> class ids", ", ".join(f"{k} -> {v}" for k, v in labels["ids"].items())
                     + f" ({labels.get('order', '?')})"))
    elif labels:
        data.append(("labels", labels))
    random_head = setup.get("random_head")
    if random_head:
        data.append(("random task head", ", ".join(map(str, random_head)) if isinstance(random_head, list)
                     else random_head))
    options = sorted((summary.get("options") or {}).items())
    return ("<h3>Setup</h3>" + _kv_table(data) + "<h3>Environment</h3>" + _kv_table(environment)
            + "<h3>Options</h3>" + _kv_table(options))


def build_html(run: RunFiles) -> str:
    """The whole page for ``run``."""
    summary = run.summary
    setup = summary.get("setup") or {}
    command = summary.get("command", "run")
    sections = [(name, title, body) for name, title, body in _head_tables(run)]
    for anchor, title, body in (("patterns", "Attention patterns", _patterns(run)),
                                ("masking", "Iterative masking", _masking(run)),
                                ("pruning", "Pruning", _pruning(run)),
                                ("sweep", "Ablation sweep", _sweep(run)),
                                ("head-types", "Head types", _head_types(run)),
                                ("gates", "Learned head gates", _gates(run)),
                                ("patching", "Activation patching", _patching(run))):
        if body:
            sections.append((anchor, title, body))
    sections.append(("timings", "Timings", _timings(summary)))
    sections.append(("run", "Run", _run_details(summary)))
    nav = "".join(f'<a href="#{_text(anchor)}">{_text(title)}</a>' for anchor, title, _ in sections)
    layers = next((t.shape for t in run.tables.values() if np.asarray(t).ndim == 2), None)
    shape = f" · {layers[0]} layers × {layers[1]} heads" if layers else ""
    title = f"fastbertology {command} — {setup.get('model_label', setup.get('model', ''))}"
    return "".join([
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{POLICY}\">",
        f"<title>{_text(title)}</title><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<style>{STYLE}</style></head><body><main>",
        f"<header><h1>{_text(title)}</h1><p class=\"lede\">{_text(_subtitle(setup))}{_text(shape)} · "
        f"{_text(setup.get('device', ''))} · {_text(str(summary.get('date', '')).replace('T', ' '))}</p>",
        f"{_cards(summary)}{_warnings(summary)}<nav>{nav}</nav></header>",
        *(_section(anchor, title, body) for anchor, title, body in sections),
        f"<script>{SCRIPT}</script></main></body></html>\n",
    ])

