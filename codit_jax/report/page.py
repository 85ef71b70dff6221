"""The report page: one self-contained HTML file (inline CSS, inline script, inline SVG, no fetches)."""

from __future__ import annotations

import datetime
import html
import json
from typing import Any, Sequence

import numpy as np

from codit_jax.report import svg
from codit_jax.report.scan import CONTRAST_EDGES, Dataset, Row
from codit_jax.report.tokens import Pieces

COLORS = ("#3b6fb6", "#d9822b")            # dataset A, dataset B
REASON_COLORS = {"stop": "#5a9e6f", "length": "#d9a23b"}
BUCKETS = 4                                 # shading classes s0..s8 (s4: no contrast) and q0..q4

_CONTROL = {i: chr(0x2400 + i) for i in range(32) if i not in (9, 10)}
_CONTROL[127] = "\u2421"


def esc(text: Any) -> str:
  return html.escape(str(text), quote=True)


def piece_html(piece: str) -> str:
  """A token's text, escaped; control characters as their visible symbols, newlines marked."""
  if piece == "":
    return '<i class="e">\u00b7</i>'
  text = esc(piece.translate(_CONTROL))
  return text.replace("\n", '<i class="nl">\u21b5</i>\n')


def num(value: float, digits: int = 4) -> str:
  return f"{value:.{digits}f}"


def _label(dataset: Dataset, index: int) -> str:
  return f"{'AB'[index]}: {dataset.mode}"


# ---------------------------------------------------------------------------------------------- summary

def summary_rows(d: Dataset) -> list[tuple[str, str, str]]:
  """(key, label, value) of the summary table; `key` is the cell's data-stat for the tests."""
  s = d.stats
  rows = [("rows", "rows", str(s.rows)), ("tokens", "response tokens", str(s.tokens))]
  for reason, count in sorted(s.finish.items()):
    rows.append((f"finish_{reason}", f"finish '{reason}'",
                 f"{count} ({100 * count / max(s.rows, 1):.1f}%)"))
  rows.append(("repetitive_fraction", "repetitive", f"{100 * s.repetitive_fraction:.1f}% ({s.repetitive})"))
  rows.append(("mean_length", "mean length (tokens)", f"{s.mean_length:.1f}"))
  for key, value in s.percentiles().items():
    rows.append((f"length_{key}", f"length {key}", str(value)))
  if s.tokens:
    rows.append(("mean_post", "mean log p_post per token", num(s.sum_post / s.tokens, 3)))
  rows.append(("mean_contrast", "mean contrast per token",
               num(s.sum_contrast / s.tokens_with_pre, 3) if s.has_pre else "— (no pre log-probs)"))
  rows.append(("mean_codit", "mean CoDIT log-prob per token",
               num(s.sum_codit / s.tokens_with_codit, 3) if s.tokens_with_codit else "— (not recorded)"))
  return rows


def summary_table(datasets: Sequence[Dataset]) -> str:
  tables = [summary_rows(d) for d in datasets]
  keys = list(dict.fromkeys(k for t in tables for k, _, _ in t))
  labels = {k: label for t in tables for k, label, _ in t}
  head = "".join(f'<th><span class="sw" style="background:{COLORS[i]}"></span>{esc(_label(d, i))}</th>'
                 for i, d in enumerate(datasets)) if len(datasets) > 1 else "<th></th>"
  out = [f'<table class="kv"><thead><tr><th></th>{head}</tr></thead><tbody>']
  for key in keys:
    cells = []
    for i, t in enumerate(tables):
      value = next((v for k, _, v in t if k == key), "—")
      cells.append(f'<td data-stat="{esc(key)}" data-ds="{i}">{esc(value)}</td>')
    out.append(f"<tr><th>{esc(labels[key])}</th>{''.join(cells)}</tr>")
  out.append("</tbody></table>")
  return "".join(out)


def settings_table(datasets: Sequence[Dataset]) -> str:
  keys = list(dict.fromkeys(k for d in datasets for k in d.metadata if k != "skipped_inputs"))
  first = ["mode", "post_trained", "pre_trained", "alpha", "beta", "temperature", "top_p", "top_k",
           "max_new_tokens", "seed"]
  keys = [k for k in first if k in keys] + [k for k in keys if k not in first]
  head = "".join(f"<th>{esc('AB'[i])}</th>" for i in range(len(datasets))) if len(datasets) > 1 else "<th></th>"
  out = [f'<table class="kv settings"><thead><tr><th></th>{head}</tr></thead><tbody>']
  for key in keys:
    values = [json.dumps(d.metadata.get(key)) if not isinstance(d.metadata.get(key), str)
              else d.metadata[key] for d in datasets]
    differ = len(datasets) > 1 and len(set(values)) > 1
    cells = "".join(f'<td data-setting="{esc(key)}" data-ds="{i}">{esc(v)}</td>' for i, v in enumerate(values))
    out.append(f'<tr class="{"differ" if differ else ""}"><th>{esc(key)}</th>{cells}</tr>')
  out.append("</tbody></table>")
  return "".join(out)


def skipped_html(datasets: Sequence[Dataset]) -> str:
  parts = []
  for i, d in enumerate(datasets):
    skipped = d.metadata.get("skipped_inputs")
    name = f"{'AB'[i]}: " if len(datasets) > 1 else ""
    if skipped is None:
      parts.append(f'<p class="note">{esc(name)}skipped inputs: not recorded in this dataset\'s metadata.</p>')
      continue
    if not skipped:
      parts.append(f'<p>{esc(name)}no input was skipped.</p>')
      continue
    items = "".join(f'<li><code>{esc(kind)}</code>: <b data-skipped="{esc(kind)}" data-ds="{i}">{esc(count)}</b></li>'
                    for kind, count in sorted(dict(skipped).items()))
    parts.append(f"<p>{esc(name)}skipped inputs, by kind:</p><ul>{items}</ul>")
  return "".join(parts)


def length_plot(datasets: Sequence[Dataset]) -> str:
  longest = max((max(d.stats.lengths) if d.stats.rows else 0) for d in datasets)
  edges = svg.integer_edges(longest)
  series = []
  for i, d in enumerate(datasets):
    counts, _ = np.histogram(np.frombuffer(d.stats.lengths, np.int64), bins=edges)
    series.append((_label(d, i) if len(datasets) > 1 else "rows", counts, COLORS[i]))
  return svg.histogram(series, edges, xlabel="response length (tokens)", unit=" tokens")


def finish_plot(datasets: Sequence[Dataset]) -> str:
  rows = []
  for i, d in enumerate(datasets):
    reasons = sorted(d.stats.finish.items(), key=lambda kv: (kv[0] not in REASON_COLORS, kv[0]))
    parts = [(r, c, REASON_COLORS.get(r, "#9aa3ad")) for r, c in reasons]
    rows.append((_label(d, i) if len(datasets) > 1 else "finish", parts))
  rows += [(f"{_label(d, i) if len(datasets) > 1 else ''} repetitive".strip(),
            [("repetitive", d.stats.repetitive, "#c0504d"), ("not", d.stats.rows - d.stats.repetitive, "#d5dbe1")])
           for i, d in enumerate(datasets)]
  return svg.stacked_bars(rows)


# --------------------------------------------------------------------------------------------- tokens

class Shading:
  """Bucket classes: contrast (diverging, s0..s8) or, without pre log-probs, post log-prob (q0..q4)."""

  def __init__(self, samples: Sequence[Row], by_contrast: bool):
    self.by_contrast = by_contrast
    values = [np.abs(r.contrast) if by_contrast else -r.post for r in samples
              if len(r.tokens) and (r.contrast is not None or not by_contrast)]
    values = np.concatenate(values) if values else np.zeros(0)
    values = values[np.isfinite(values)]
    scale = float(np.percentile(values, 95)) if len(values) else 1.0
    self.scale = float(f"{max(scale, 0.1):.2g}")

  def css_class(self, row: Row, i: int) -> str:
    if self.by_contrast:
      value = row.contrast[i]
      if not np.isfinite(value):
        return "s4"
      return f"s{BUCKETS + int(np.round(np.clip(value / self.scale, -1, 1) * BUCKETS))}"
    value = -row.post[i]
    if not np.isfinite(value):
      return "q0"
    return f"q{int(np.round(np.clip(value / self.scale, 0, 1) * BUCKETS))}"

  def legend(self) -> str:
    if self.by_contrast:
      cells = "".join(f'<span class="t s{b}">{_fmt_edge((b - BUCKETS) / BUCKETS * self.scale)}</span>'
                      for b in range(2 * BUCKETS + 1))
      return (f'<div class="legend">contrast log p_post − log p_pre: {cells}'
              '<span class="hint">blue: the pre-trained model already said it · orange: post-training added it</span></div>')
    cells = "".join(f'<span class="t q{b}">{_fmt_edge(-b / BUCKETS * self.scale)}</span>' for b in range(BUCKETS + 1))
    return (f'<div class="legend">log p_post: {cells}<span class="hint">no pre log-probs in this dataset '
            '(direct mode): shaded by the post-trained log-prob, darker = less likely</span></div>')


def _fmt_edge(x: float) -> str:
  return f"{x:+.2g}" if x else "0"


def tokens_html(row: Row, pieces: Pieces, shading: Shading) -> str:
  texts = pieces.of_response(row.tokens)
  out = []
  for i, (token, piece) in enumerate(zip(row.tokens, texts)):
    attrs = f'data-i="{int(token)}" data-a="{num(row.post[i])}"'
    if row.pre is not None:
      attrs += f' data-b="{num(row.pre[i])}"'
    if row.codit is not None:
      attrs += f' data-c="{num(row.codit[i])}"'
    out.append(f'<span class="t {shading.css_class(row, i)}" {attrs}>{piece_html(piece)}</span>')
  return "".join(out)


def response_card(row: Row | None, pieces: Pieces, shading: Shading, index: int, label: str = "") -> str:
  if row is None:
    return '<div class="card missing"><p class="note">this id is not in this dataset.</p></div>'
  s = row.contrast
  facts = [f"{len(row.tokens)} tokens", f"finish: {esc(row.finish_reason)}"]
  if row.repetitive:
    facts.append('<b class="rep">repetitive</b>')
  if s is not None and len(s):
    facts.append(f"mean contrast {np.mean(s):+.3f}")
  facts.append(f"mean log p_post {np.mean(row.post):.3f}" if len(row.post) else "")
  head = f'<span class="tag" style="background:{COLORS[index]}">{esc(label)}</span>' if label else ""
  return (f'<div class="card" data-row="{esc(row.id)}" data-ds="{index}">'
          f'<div class="meta">{head}{" · ".join(f for f in facts if f)}</div>'
          f'<div class="tokens">{tokens_html(row, pieces, shading)}</div></div>')


def samples_html(primary: Dataset, other: Dataset | None, pieces: Pieces, other_pieces: Pieces | None) -> str:
  shades = [Shading(primary.samples, primary.stats.has_pre)]
  if other is not None:
    shades.append(Shading(other.samples, other.stats.has_pre))
  out = ['<div class="legends">' + "".join(
      (f'<div><span class="tag" style="background:{COLORS[i]}">{"AB"[i]}</span>' if other else "<div>")
      + sh.legend() + "</div>" for i, sh in enumerate(shades)) + "</div>"]
  by_id = {r.id: r for r in other.samples} if other is not None else {}
  for row in primary.samples:
    out.append(f'<section class="sample"><h3><code>{esc(row.id)}</code></h3>'
               f'<details class="instr"><summary>instruction</summary><pre>{esc(row.instruction)}</pre></details>')
    if other is None:
      out.append(response_card(row, pieces, shades[0], 0))
    else:
      out.append('<div class="cols">' + response_card(row, pieces, shades[0], 0, _label(primary, 0))
                 + response_card(by_id.get(row.id), other_pieces, shades[1], 1, _label(other, 1)) + "</div>")
    out.append("</section>")
  if not primary.samples:
    out.append('<p class="note">no response to show (empty dataset, or none of the requested ids).</p>')
  return "".join(out)


def top_tokens_html(d: Dataset, pieces: Pieces, k: int, min_count: int) -> str:
  if not d.stats.has_pre:
    return ('<p class="note">No pre-trained log-probs in this dataset (direct mode), so there is no contrast '
            'to rank tokens by.</p>')
  largest, smallest = d.stats.top_tokens(k, min_count)

  def table(rows, kind, title, hint):
    peak = max([abs(m) for _, m, _ in rows] + [1e-9])
    body = "".join(
        f'<tr data-top="{kind}" data-token="{t}"><td class="tok"><code>{piece_html(pieces.of_id(t))}</code></td>'
        f'<td class="n">{t}</td><td class="n" data-mean="{m:.6f}">{m:+.3f}</td><td class="n">{c}</td>'
        f'<td class="barcell"><span class="bar {kind}" style="width:{100 * abs(m) / peak:.0f}%"></span></td></tr>'
        for t, m, c in rows)
    return (f'<div><h3>{title}</h3><p class="hint">{hint}</p><table class="top"><thead><tr><th>token</th>'
            f'<th>id</th><th>mean contrast</th><th>count</th><th></th></tr></thead><tbody>{body}</tbody></table></div>')

  if not largest:
    return f'<p class="note">No token id occurs {min_count}+ times: lower --min_count.</p>'
  return ('<div class="cols">'
          + table(largest, "hi", "What post-training added", "largest mean log p_post − log p_pre")
          + table(smallest, "lo", "What the pre-trained model already said", "smallest mean log p_post − log p_pre")
          + "</div>"
          + f'<p class="hint">Mean contrast per token id over all {d.stats.tokens_with_pre} emitted tokens of the '
          f'dataset, among ids emitted at least {min_count} times.</p>')


def contrast_plot(datasets: Sequence[Dataset]) -> str:
  series = [(_label(d, i) if len(datasets) > 1 else "tokens", d.stats.contrast_hist, COLORS[i])
            for i, d in enumerate(datasets) if d.stats.has_pre]
  if not series:
    return ""
  used = np.nonzero(sum(c for _, c, _ in series))[0]
  lo, hi = max(int(used.min()) - 1, 0), min(int(used.max()) + 2, len(CONTRAST_EDGES) - 1)
  return svg.histogram([(n, c[lo:hi], col) for n, c, col in series], CONTRAST_EDGES[lo:hi + 1],
                       xlabel="contrast of each emitted token, log p_post − log p_pre", ylabel="tokens")


# ----------------------------------------------------------------------------------------------- page

CSS = """
:root{--fg:#1f2328;--mute:#656d76;--line:#d8dee4;--bg:#fff;--soft:#f6f8fa}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:30px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:14px;margin:14px 0 6px}code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.sub{color:var(--mute);margin:0}.note{color:#9a6700;background:#fff8c5;padding:6px 10px;border-radius:6px}
.hint{color:var(--mute);font-size:12px;margin:2px 0 8px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.big{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:8px 14px;min-width:130px}
.big b{display:block;font-size:20px}.big span{color:var(--mute);font-size:12px}
.grid2{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:24px;align-items:start}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));gap:16px;align-items:start}
table{border-collapse:collapse}table.kv th,table.kv td{padding:3px 10px;border-bottom:1px solid var(--soft);text-align:left;vertical-align:top}
table.kv th{color:var(--mute);font-weight:500}table.kv thead th{color:var(--fg)}
table.settings td{font:12px ui-monospace,monospace;max-width:420px;overflow-wrap:anywhere}tr.differ td{background:#fff1e0}
table.top td,table.top th{padding:2px 8px;font-size:13px}table.top .n{text-align:right;font-variant-numeric:tabular-nums}
table.top .tok code{background:var(--soft);padding:1px 4px;border-radius:4px;white-space:pre}
.barcell{width:90px}.bar{display:block;height:8px;border-radius:4px}.bar.hi{background:#e07b39}.bar.lo{background:#3b78c2}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.plot{max-width:100%;height:auto;font-size:11px;fill:var(--mute)}.plot .axis{stroke:#8c959f}.plot .grid{stroke:#eaeef2}
.plot .label{fill:var(--fg)}.plot .onbar{fill:#fff;font-weight:600}
.sample{margin:12px 0 22px}.sample h3{margin-bottom:2px}.instr summary{color:var(--mute);cursor:pointer;font-size:12px}
.instr pre{white-space:pre-wrap;background:var(--soft);padding:6px 10px;border-radius:6px;margin:4px 0}
.card{border:1px solid var(--line);border-radius:8px;padding:8px 12px;background:#fff}.card.missing{background:var(--soft)}
.meta{color:var(--mute);font-size:12px;margin-bottom:6px}.tag{color:#fff;border-radius:4px;padding:0 6px;margin-right:6px;font-weight:600}
.rep{color:#c0504d}.tokens{white-space:pre-wrap;overflow-wrap:anywhere;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,monospace}
.t{border-radius:3px;padding:1px 0;cursor:default}.t:hover{outline:2px solid #1f2328}
.t i.e{color:#8c959f;font-style:normal}.t i.nl{color:#8c959f;font-style:normal}
.s0{background:#5b8fd6}.s1{background:#8fb3e6}.s2{background:#bcd2f1}.s3{background:#e1ebf9}.s4{background:transparent}
.s5{background:#fde6d3}.s6{background:#fac7a0}.s7{background:#f3a06a}.s8{background:#e07b39}
.q0{background:transparent}.q1{background:#ece6f5}.q2{background:#d5c8ea}.q3{background:#b7a2da}.q4{background:#9479c8}
.legend{font-size:12px;color:var(--mute);margin:4px 0}.legend .t{display:inline-block;min-width:40px;text-align:center;margin:0 1px;font:11px ui-monospace,monospace;color:var(--fg)}
.legend .hint{margin-left:10px}.legends>div{display:flex;align-items:center;gap:4px;flex-wrap:wrap}
#tip{position:fixed;z-index:9;pointer-events:none;background:#1f2328;color:#fff;font:12px/1.5 ui-monospace,monospace;padding:6px 9px;border-radius:6px;box-shadow:0 4px 14px rgba(0,0,0,.25);max-width:380px;white-space:pre}
#tip[hidden]{display:none}footer{color:var(--mute);font-size:12px;margin-top:40px}
"""

# Catches script errors into the page (data-script-errors on <html>) before anything else runs.
ERROR_HOOK = """
window.onerror=function(m,s,l,c){var d=document.documentElement;d.setAttribute('data-script-errors',String(1+parseInt(d.getAttribute('data-script-errors')||'0',10)));d.setAttribute('data-script-error-message',String(m)+' @'+l+':'+c);};
"""

SCRIPT = """
(function(){
  var tip=document.getElementById('tip');
  function f(v){return v==null?null:(+v).toFixed(4);}
  function show(t,x,y){
    var a=t.getAttribute('data-a'),b=t.getAttribute('data-b'),c=t.getAttribute('data-c');
    var lines=['token '+JSON.stringify(t.textContent.replace(/\\u21b5\\n/g,'\\n'))+'  id '+t.getAttribute('data-i'),
               'log p_post   '+f(a)];
    if(b!=null){lines.push('log p_pre    '+f(b));lines.push('contrast     '+((a-b)>=0?'+':'')+(a-b).toFixed(4));}
    else{lines.push('log p_pre    not recorded (direct mode)');}
    lines.push(c!=null?'CoDIT log-p  '+f(c):'CoDIT log-p  unavailable: not recorded in this dataset');
    tip.textContent=lines.join('\\n');tip.hidden=false;
    var w=tip.offsetWidth,h=tip.offsetHeight;
    tip.style.left=Math.min(x+14,window.innerWidth-w-8)+'px';
    tip.style.top=(y+18+h>window.innerHeight?y-h-10:y+18)+'px';
  }
  document.addEventListener('mouseover',function(e){
    var t=e.target.closest?e.target.closest('.tokens .t'):null;
    if(t){show(t,e.clientX,e.clientY);}else{tip.hidden=true;}
  });
  document.addEventListener('mousemove',function(e){if(!tip.hidden){
    var t=e.target.closest?e.target.closest('.tokens .t'):null;if(t){show(t,e.clientX,e.clientY);}}});
  var n=document.querySelectorAll('.tokens .t').length;
  document.documentElement.setAttribute('data-token-count',String(n));
  document.documentElement.setAttribute('data-report-ready','1');
})();
"""


def cards_html(d: Dataset) -> str:
  s = d.stats
  p = s.percentiles()
  stop = s.finish.get("stop", 0)
  cards = [("rows", s.rows), ("finished by an end token", f"{100 * stop / max(s.rows, 1):.1f}%"),
           ("repetitive", f"{100 * s.repetitive_fraction:.1f}%"), ("median length", f"{p.get('p50', 0)} tokens")]
  if s.has_pre:
    cards.append(("mean contrast / token", f"{s.sum_contrast / s.tokens_with_pre:+.3f}"))
  return '<div class="cards">' + "".join(f'<div class="big"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                                         for k, v in cards) + "</div>"


def render(primary: Dataset, other: Dataset | None, pieces: Pieces, other_pieces: Pieces | None = None, *,
           top_k: int = 25, min_count: int = 5, version: str = "") -> str:
  datasets = [primary] + ([other] if other is not None else [])
  other_pieces = other_pieces or pieces
  m = primary.metadata
  title = f"CoDIT report: {primary.directory}" + (f" vs {other.directory}" if other else "")
  notes = []
  for i, (d, pc) in enumerate(zip(datasets, [pieces, other_pieces])):
    if pc.note:
      notes.append(f'<p class="note">{"AB"[i] + ": " if other else ""}{esc(pc.note)}.</p>')
    if not d.has_codit:
      notes.append(f'<p class="hint">{"AB"[i] + ": " if other else ""}this dataset records no CoDIT log-probs '
                   '(codit_logprobs): the hover marks them unavailable. They cannot be recomputed from what is '
                   'stored: they need both full distributions at every step.</p>')
  subtitle = (f"post-trained <code>{esc(m.get('post_trained', '?'))}</code> · pre-trained "
              f"<code>{esc(m.get('pre_trained', '?'))}</code> · mode <b>{esc(primary.mode)}</b>")
  if "alpha" in m:
    subtitle += f" · alpha {esc(m.get('alpha'))} · beta {esc(m.get('beta'))} · temperature {esc(m.get('temperature'))}"
  dirs = "".join(f'<p class="sub"><span class="sw" style="background:{COLORS[i]}"></span>{esc(_label(d, i))}: '
                 f'<code>{esc(d.directory)}</code></p>' for i, d in enumerate(datasets)) if other else \
      f'<p class="sub"><code>{esc(primary.directory)}</code></p>'
  body = [
      f"<header><h1>{'Two datasets side by side' if other else 'What CoDIT wrote'}</h1>{dirs}"
      f'<p class="sub">{subtitle}</p></header>',
      cards_html(primary),
      "<h2>Summary</h2>",
      '<div class="grid2"><div>', summary_table(datasets), "</div><div>",
      "<h3>Response length</h3>", length_plot(datasets),
      "<h3>Finish reasons and repetitive responses</h3>", finish_plot(datasets), "</div></div>",
      "<h3>Skipped inputs</h3>", skipped_html(datasets),
      "<details><summary>Generation settings (dataset metadata)</summary>", settings_table(datasets), "</details>",
      f"<h2>What the contrast amplified{': the same ids in both datasets' if other else ''}</h2>",
      '<p class="hint">Each token is shaded by log p_post − log p_pre of the token actually emitted; hover a token '
      'for both log-probs and the contrastive (CoDIT) log-prob.</p>',
      *notes,
      samples_html(primary, other, pieces, other_pieces),
      "<h2>Tokens over the whole dataset</h2>",
      contrast_plot(datasets),
      top_tokens_html(primary, pieces, top_k, min_count),
      f'<footer>codit-report {esc(version)} · {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")} · '
      f'{" · ".join(f"{d.stats.rows} rows read in {d.seconds:.1f}s" for d in datasets)}</footer>',
  ]
  return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
          "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
          f"<title>{esc(title)}</title><script>{ERROR_HOOK}</script><style>{CSS}</style></head>"
          f"<body><main>{''.join(body)}</main><div id=\"tip\" hidden></div><script>{SCRIPT}</script></body></html>")
