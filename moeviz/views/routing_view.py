"""The routing view: every layer's routing of one text, shipped to the browser once, as one
self-contained HTML page with its own script. Layers switch in the browser (a slider and the
arrow keys), with no server round trip: the coloured tokens (Mixtral paper, Fig. 8), the expert
load of the layer and a window of the router-probability heatmap follow at once.

Hovering a token highlights its heatmap column and its first choice's load bar, and shows its
path across the layers (first choice per layer); a click pins its details (token text and id,
position, top-k ids and weights and the full router distribution, for every layer). A search
box marks the tokens that contain a string.

The data travels as JSON in a `<script type="application/json">` element, with `<`, `>` and
`&` written as JSON escapes, so no token text can close the element or become markup; the
script reads it with `JSON.parse` and writes token text with `textContent` only. Arrays are
little-endian typed arrays in base64 (exact, and a quarter of the size of decimal JSON).
"""

from __future__ import annotations

import base64
import json

import numpy as np

from moeviz.trace import RoutingTrace
from moeviz.views.charts import (
    _EMPTY_TOKEN,
    _score_name,
    _text_color,
    _visible_chars,
    character_runs,
    expert_colors,
)

_ROW_PX = 14  # an expert's row in the heatmap and the load bars
CONTINUED = "·"  # shown by the further byte pieces of a character drawn on its first piece
_JSON_ESCAPES = {ord("<"): "\\u003c", ord(">"): "\\u003e", ord("&"): "\\u0026",
                 0x2028: "\\u2028", 0x2029: "\\u2029"}


def typed_array(values: np.ndarray, dtype: str) -> dict:
    """{dtype, shape, data}: `values` as little-endian `dtype` bytes in base64."""
    array = np.ascontiguousarray(values, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"dtype": dtype, "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode("ascii")}


def read_typed_array(encoded: dict) -> np.ndarray:
    """The inverse of `typed_array`."""
    array = np.frombuffer(base64.b64decode(encoded["data"]), dtype=np.dtype(encoded["dtype"]).newbyteorder("<"))
    return array.reshape(encoded["shape"])


def routing_payload(trace: RoutingTrace, left_out=None) -> dict:
    """What the view needs, as JSON-able data. `left_out` bool[tokens] marks the tokens the
    statistics leave out (grey, not counted in the load bars).

    topk_ids: int32[layers, tokens, k]; topk_weights: float32[layers, tokens, k] or None;
    router_probs: float32[layers, tokens, experts] or None (ids-only traces, unknown scoring).
    """
    left_out = np.zeros(trace.num_tokens, dtype=bool) if left_out is None else np.asarray(left_out, dtype=bool)
    if left_out.shape != (trace.num_tokens,):
        raise ValueError(f"left_out has shape {left_out.shape}; expected one flag per token ({trace.num_tokens},)")
    colors = expert_colors(trace.num_experts)
    return {
        "tokens": list(trace.tokens),
        "labels": token_labels(trace),
        "token_ids": [int(i) for i in trace.token_ids],
        "left_out": left_out.tolist(),
        "generated_from": trace.generated_from,
        "layer_ids": list(trace.layer_ids),
        "layer_labels": [trace.layer_label(n) for n in trace.layer_ids],
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "colors": colors,
        "text_colors": [_text_color(c) for c in colors],
        "score_name": _score_name(trace),
        "topk_ids": typed_array(trace.topk_ids, "int32"),
        "topk_weights": typed_array(trace.topk_weights, "float32") if trace.has_weights else None,
        "router_probs": typed_array(trace.router_probs, "float32") if trace.has_scores else None,
    }


def token_labels(trace: RoutingTrace) -> list[str]:
    """What each token's span shows. Byte-level pieces that together form characters (Chinese,
    an emoji split over tokens: `charts.character_runs`) show those characters on the run's first
    piece and CONTINUED on the others, whose routing stays their own; a token on its own shows
    its text with whitespace made visible."""
    labels = ["".join(_visible_chars(token)) or _EMPTY_TOKEN for token in trace.tokens]
    for first, end, characters in character_runs(trace):
        if characters is not None:
            labels[first:end] = ["".join(_visible_chars(characters))] + [CONTINUED] * (end - first - 1)
    return labels


def payload_json(payload: dict) -> str:
    """`payload` as JSON that is inert inside a `<script>` element."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).translate(_JSON_ESCAPES)


def routing_view_height(trace: RoutingTrace) -> int:
    """Pixels the view needs: controls, tokens (scrolling beyond 300 px), heatmap and load bars
    (scrolling beyond 460 px), the overview strip, the path line and the pinned details
    (scrolling beyond 300 px)."""
    charts_height = min(_ROW_PX * trace.num_experts + 100, 520)
    return 40 + 330 + charts_height + 24 + 60 + min(30 * len(trace.layer_ids) + 30, 310)


def routing_view_html(trace: RoutingTrace, layer_id: int | None = None, left_out=None,
                      pinned: int | None = None) -> str:
    """The whole view as one HTML document (for `st.iframe`), starting at `layer_id` (the
    first MoE layer by default) with token `pinned` (a position) pinned, if given.

    In the app, the view writes its layer and pinned token into the page's URL
    (`?view_layer=3&token=17`, `URL_PARAMS`), so a link reopens it as it was."""
    start = trace.layer_index(layer_id) if layer_id is not None else 0
    if pinned is not None and not 0 <= pinned < trace.num_tokens:
        raise ValueError(f"cannot pin token {pinned}: the text has {trace.num_tokens} tokens")
    return (_PAGE.replace("@DATA@", payload_json(routing_payload(trace, left_out)))
            .replace("@START@", str(start)).replace("@PINNED@", str(-1 if pinned is None else pinned)))


URL_PARAMS = ("view_layer", "token")  # the view's layer (the model's number) and pinned position


_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8">
<style>
body{font-family:"Source Sans Pro",sans-serif;font-size:14px;margin:0;padding:4px;color:#31333f}
.bar{display:flex;gap:12px;align-items:center;flex-wrap:wrap;margin-bottom:6px}
#layer{width:260px}
#layer-name{font-weight:600;min-width:70px}
#tokens{max-height:300px;overflow:auto;line-height:1.9;white-space:pre-wrap;border:1px solid #e6e6e6;padding:6px;border-radius:4px}
.tok{padding:1px 1px;border-radius:3px;cursor:pointer}
.tok.gen{text-decoration:underline;font-style:italic}
.tok.hit{outline:2px solid #000;outline-offset:0}
.tok.hover{box-shadow:0 0 0 2px #ff2b2b}
.tok.pinned{box-shadow:0 0 0 3px #1c83e1}
.row{display:flex;gap:16px;margin-top:8px}
h4{margin:4px 0;font-size:14px}
.load{max-height:460px;overflow:auto;display:grid;grid-template-columns:auto 160px auto;gap:2px 6px;align-items:center;font-size:12px}
.load .track{position:relative;height:12px;background:#f0f2f6}
.load .fill{height:12px}
.load .uniform{position:absolute;top:-2px;bottom:-2px;border-left:1.5px dashed #555}
.load .on{font-weight:700;outline:2px solid #ff2b2b}
#path{font-size:12px;min-height:22px}
.chip{display:inline-block;padding:0 4px;margin:1px 3px 1px 0;border-radius:3px}
#details{max-height:300px;overflow:auto;font-size:12px;border-top:1px solid #e6e6e6;margin-top:8px;padding-top:4px}
.dist{display:inline-flex;align-items:flex-end;height:24px;gap:1px;vertical-align:middle;margin-left:6px}
.dist span{width:5px;display:inline-block}
.note{color:#808495;font-size:12px}
</style></head>
<body data-layer="@START@" data-pinned="@PINNED@">
<script type="application/json" id="moeviz-routing-data">@DATA@</script>
<div class="bar">
  <label>Layer <input type="range" id="layer" min="0" step="1" aria-label="Layer"></label>
  <span id="layer-name"></span><span class="note">← → step layers</span>
  <input type="search" id="search" placeholder="Search tokens" aria-label="Search tokens">
  <span id="matches" class="note"></span>
</div>
<div id="tokens"></div>
<div class="row">
  <div><h4 id="heat-title"></h4><canvas id="heat"></canvas><br>
    <canvas id="overview" aria-label="The whole text: drag to move the heatmap window"></canvas><br>
    <input type="range" id="window" min="0" step="1" aria-label="Heatmap window" style="width:100%">
    <div class="note"><span id="window-name"></span>
      <button id="zoom-out" aria-label="Zoom out" title="More tokens, narrower">−</button>
      <button id="zoom-in" aria-label="Zoom in" title="Fewer tokens, wider">+</button></div></div>
  <div><h4 id="load-title"></h4><div class="load" id="load"></div></div>
</div>
<div id="path" class="note">Hover a token for its path across layers (and its column and first choice in the
  charts below); click to pin its details.</div>
<div id="details"></div>
<script>
"use strict";
const D = JSON.parse(document.getElementById("moeviz-routing-data").textContent);
function typed(a) {
  if (!a) return null;
  const bytes = Uint8Array.from(atob(a.data), c => c.charCodeAt(0));
  const array = a.dtype === "int32" ? new Int32Array(bytes.buffer) : new Float32Array(bytes.buffer);
  return {array, shape: a.shape};
}
const IDS = typed(D.topk_ids), W = typed(D.topk_weights), P = typed(D.router_probs);
const T = D.tokens.length, L = D.layer_ids.length, K = D.top_k, E = D.num_experts;
// The heatmap window: as many columns of `cell` px as fit beside the load bars (12 px: each
// token pickable); zoom changes the width, the overview strip below moves the window.
const CELLS = [3, 4, 6, 8, 12, 16, 24], ROW = Math.max(2, Math.min(14, Math.floor(448 / E)));
const WIDTH = Math.max(16 * 12, document.documentElement.clientWidth - 60 - 330);
let cell = 12, windowSize = windowFor(cell);
function windowFor(c) { return Math.min(T, Math.max(16, Math.floor(WIDTH / c))); }
const first = (l, t) => IDS.array[(l * T + t) * K];
const pick = (l, t, r) => IDS.array[(l * T + t) * K + r];
const weight = (l, t, r) => W ? W.array[(l * T + t) * K + r] : null;
const prob = (l, t, e) => P.array[(l * T + t) * E + e];
const $ = id => document.getElementById(id);
let layer = +document.body.dataset.layer, hovered = -1, pinned = +document.body.dataset.pinned, windowStart = 0;

// The app's URL remembers the view (layer, pinned token), so a link reopens it; the view is a
// same-origin frame of the app's page. Saved on its own, it has no such page: nothing to write.
function remember() {
  try {
    const url = new URL(window.parent.location.href);
    url.searchParams.set("view_layer", D.layer_ids[layer]);
    if (pinned >= 0) url.searchParams.set("token", pinned); else url.searchParams.delete("token");
    if (url.href !== window.parent.location.href) window.parent.history.replaceState(window.parent.history.state, "", url);
  } catch (error) { /* not inside the app */ }
}

const spans = D.labels.map((label, t) => {
  const span = document.createElement("span");
  span.className = "tok" + (D.generated_from >= 0 && t >= D.generated_from ? " gen" : "");
  span.dataset.pos = t;
  span.textContent = label;
  if (D.left_out[t]) { span.style.backgroundColor = "#e8e8e8"; span.style.color = "#666666"; }
  return span;
});
const box = $("tokens"), fragment = document.createDocumentFragment();
D.tokens.forEach((token, t) => {
  fragment.appendChild(spans[t]);
  if (token.includes("\\n")) fragment.appendChild(document.createElement("br"));
});
box.appendChild(fragment);

const loadRows = [];
for (let e = 0; e < E; e++) {
  const name = document.createElement("span"), track = document.createElement("div"), share = document.createElement("span");
  name.textContent = "expert " + e;
  track.className = "track";
  const fill = document.createElement("div"), uniform = document.createElement("div");
  fill.className = "fill"; fill.style.backgroundColor = D.colors[e];
  uniform.className = "uniform"; uniform.style.left = (100 / E) + "%";
  track.append(fill, uniform);
  $("load").append(name, track, share);
  loadRows.push({name, fill, share});
}

function showLayer(l, started) {
  layer = Math.max(0, Math.min(L - 1, l));
  $("layer").value = layer;
  $("layer-name").textContent = D.layer_labels[layer];
  const counts = new Array(E).fill(0);
  let counted = 0;
  for (let t = 0; t < T; t++) {
    if (D.left_out[t]) continue;
    const e = first(layer, t);
    spans[t].style.backgroundColor = D.colors[e];
    spans[t].style.color = D.text_colors[e];
    counts[e]++; counted++;
  }
  $("load-title").textContent = "Expert load by first choice · " + D.layer_labels[layer];
  const top = Math.max(...counts, 1) / Math.max(counted, 1);
  const scale = Math.max(top, 1 / E) * 1.1;
  counts.forEach((c, e) => {
    const share = counted ? c / counted : 0;
    loadRows[e].fill.style.width = (100 * share / scale) + "%";
    loadRows[e].share.textContent = (100 * share).toFixed(1) + "%";
  });
  document.querySelectorAll(".uniform").forEach(u => u.style.left = (100 / E / scale) + "%");
  drawHeatmap(); showPath(); showDetails();
  document.body.dataset.layer = layer;
  if (started !== undefined) remember();
  if (started !== undefined) requestAnimationFrame(() => setTimeout(() => {
    document.body.dataset.shown = layer;
    document.body.dataset.switchMs = (performance.now() - started).toFixed(1);
    document.body.dataset.switches = (+document.body.dataset.switches || 0) + 1;
  }, 0));
  else document.body.dataset.shown = layer;
}

function drawHeatmap() {
  const canvas = $("heat"), title = $("heat-title");
  title.textContent = (P ? "Router scores (" + D.score_name + ")" : "First choices") + " · " +
    D.layer_labels[layer] + " · tokens " + windowStart + "–" + (windowStart + windowSize - 1);
  canvas.width = windowSize * cell + 60; canvas.height = E * ROW + 4;
  const g = canvas.getContext("2d");
  g.font = "11px sans-serif"; g.textBaseline = "middle";
  for (let e = 0; e < E; e++) { g.fillStyle = "#31333f"; g.fillText("e" + e, 2, e * ROW + ROW / 2); }
  for (let c = 0; c < windowSize; c++) {
    const t = windowStart + c;
    for (let e = 0; e < E; e++) {
      const v = P ? prob(layer, t, e) : (first(layer, t) === e ? 1 : 0);
      g.fillStyle = "rgba(31,119,180," + v.toFixed(3) + ")";
      g.fillRect(60 + c * cell, e * ROW, cell - 1, ROW - 1);
    }
    g.strokeStyle = "#000";
    g.strokeRect(60 + c * cell + 0.5, first(layer, t) * ROW + 0.5, cell - 2, ROW - 2);
  }
  if (hovered >= windowStart && hovered < windowStart + windowSize) {
    g.strokeStyle = "#ff2b2b"; g.lineWidth = 2;
    g.strokeRect(60 + (hovered - windowStart) * cell, 1, cell - 1, E * ROW);
    g.strokeRect(60, first(layer, hovered) * ROW, windowSize * cell, ROW - 1);
    g.lineWidth = 1;
  }
  $("window").max = Math.max(0, T - windowSize);
  $("window").value = windowStart;
  $("window-name").textContent = "Heatmap window over the whole text (" + T + " tokens): drag it or the strip above, " +
    "or hover a token; zoom";
  document.body.dataset.window = windowStart + "-" + (windowStart + windowSize - 1);
  drawOverview();
}

function drawOverview() {
  const canvas = $("overview"), width = windowSize * cell, per = width / T;
  canvas.width = width + 60; canvas.height = 18;
  const g = canvas.getContext("2d");
  g.font = "11px sans-serif"; g.textBaseline = "middle"; g.fillStyle = "#31333f";
  g.fillText("all " + T, 2, 9);
  for (let t = 0; t < T; t++) { g.fillStyle = D.colors[first(layer, t)]; g.fillRect(60 + t * per, 3, Math.max(per, 1), 12); }
  g.strokeStyle = "#000"; g.lineWidth = 2;
  g.strokeRect(60 + windowStart * per, 1, Math.max(windowSize * per, 2), 16);
}

function centreWindowAt(t) {
  windowStart = Math.max(0, Math.min(T - windowSize, Math.round(t - windowSize / 2)));
  drawHeatmap();
}

function zoom(step) {
  const centre = windowStart + windowSize / 2;
  cell = CELLS[Math.max(0, Math.min(CELLS.length - 1, CELLS.indexOf(cell) + step))];
  windowSize = windowFor(cell);
  centreWindowAt(centre);
}

function chip(e, text) {
  const c = document.createElement("span");
  c.className = "chip"; c.style.backgroundColor = D.colors[e]; c.style.color = D.text_colors[e];
  c.textContent = text;
  return c;
}

function showPath() {
  const path = $("path");
  loadRows.forEach(row => row.name.classList.remove("on"));
  if (hovered < 0) return;
  loadRows[first(layer, hovered)].name.classList.add("on");
  path.replaceChildren(document.createTextNode("Token " + hovered + " “" + D.labels[hovered] + "” · first choice per layer: "));
  for (let l = 0; l < L; l++) path.appendChild(chip(first(l, hovered), D.layer_labels[l] + ": e" + first(l, hovered)));
}

function showDetails() {
  const details = $("details");
  if (pinned < 0) { details.replaceChildren(); return; }
  const head = document.createElement("div");
  head.className = "pinned-head";
  head.textContent = "Pinned: position " + pinned + " · token id " + D.token_ids[pinned] + " · text " +
    JSON.stringify(D.tokens[pinned]) + " (click it again to unpin)";
  details.replaceChildren(head);
  for (let l = 0; l < L; l++) {
    const line = document.createElement("div");
    line.className = "layer-detail";
    if (l === layer) line.style.fontWeight = "700";
    line.append(D.layer_labels[l] + ": ");
    for (let r = 0; r < K; r++) {
      const w = weight(l, pinned, r);
      line.appendChild(chip(pick(l, pinned, r), "e" + pick(l, pinned, r) + (w === null ? "" : " " + w.toFixed(3))));
    }
    if (P) {
      const dist = document.createElement("span");
      dist.className = "dist"; dist.title = D.score_name + " of each expert";
      for (let e = 0; e < E; e++) {
        const bar = document.createElement("span"), p = prob(l, pinned, e);
        bar.style.height = Math.max(1, 24 * p) + "px"; bar.style.backgroundColor = D.colors[e];
        bar.title = "expert " + e + ": " + p.toFixed(3);
        dist.appendChild(bar);
      }
      line.appendChild(dist);
    }
    details.appendChild(line);
  }
}

// Linked charts: the page's Plotly charts of one layer (the Analyse page's "probabilities" heatmap
// and "expert_load" bars, their layer in layout.meta) get a marker at the hovered token's column
// and at its first choice's bar. They live in the app's page, which this same-origin frame reaches;
// the marker is an overlay placed with the chart's own axis scale, so no chart is redrawn.
const LINKED = {probabilities: (gd, t) => t, expert_load: (gd, t) => {
  const index = D.layer_ids.indexOf(gd.layout.meta && gd.layout.meta.layer);
  return index < 0 ? null : first(index, t);
}};
function linkCharts(t) {
  let doc;
  try { doc = window.parent.document; } catch (error) { return; }
  for (const [key, valueOf] of Object.entries(LINKED)) {
    const gd = doc.querySelector(".st-key-" + key + " .js-plotly-plot");
    if (!gd || !gd._fullLayout || !gd._fullLayout.xaxis) continue;
    let mark = gd.querySelector(":scope > .moeviz-link");
    const value = t < 0 ? null : valueOf(gd, t);
    if (value === null) { if (mark) mark.remove(); continue; }
    if (!mark) {
      mark = doc.createElement("div");
      mark.className = "moeviz-link";
      mark.style.cssText = "position:absolute;pointer-events:none;width:0;border-left:2px solid #ff2b2b;z-index:10";
      if (getComputedStyle(gd).position === "static") gd.style.position = "relative";
      gd.appendChild(mark);
    }
    const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
    mark.style.left = (xa._offset + xa.l2p(value) - 1) + "px";
    mark.style.top = ya._offset + "px";
    mark.style.height = ya._length + "px";
    mark.dataset.token = t;
    mark.dataset.x = value;
  }
}

function hover(t) {
  if (hovered >= 0) spans[hovered].classList.remove("hover");
  hovered = t;
  if (t >= 0) {
    spans[t].classList.add("hover");
    if (t < windowStart || t >= windowStart + windowSize) windowStart = Math.max(0, Math.min(T - windowSize, t - (windowSize >> 1)));
  }
  drawHeatmap(); showPath(); linkCharts(t);
}

box.addEventListener("mouseover", event => { if (event.target.dataset.pos) hover(+event.target.dataset.pos); });
box.addEventListener("click", event => {
  if (!event.target.dataset.pos) return;
  const t = +event.target.dataset.pos;
  if (pinned >= 0) spans[pinned].classList.remove("pinned");
  pinned = pinned === t ? -1 : t;
  if (pinned >= 0) spans[pinned].classList.add("pinned");
  hover(t); showDetails(); remember();
});
$("heat").addEventListener("mousemove", event => {
  const c = Math.floor((event.offsetX - 60) / cell);
  if (c >= 0 && c < windowSize) hover(windowStart + c);
});
$("window").addEventListener("input", event => { windowStart = +event.target.value; drawHeatmap(); });
let brushing = false;
const brush = event => centreWindowAt((event.offsetX - 60) / (windowSize * cell) * T);
$("overview").addEventListener("mousedown", event => { brushing = true; brush(event); });
$("overview").addEventListener("mousemove", event => { if (brushing) brush(event); });
document.addEventListener("mouseup", () => { brushing = false; });
$("zoom-in").addEventListener("click", () => zoom(1));
$("zoom-out").addEventListener("click", () => zoom(-1));
$("layer").max = L - 1;
$("layer").addEventListener("input", event => showLayer(+event.target.value, event.timeStamp));
document.addEventListener("keydown", event => {
  if (event.target.id === "search" || event.target.id === "layer" || event.target.id === "window") return;
  if (event.key === "ArrowRight" || event.key === "ArrowLeft") {
    event.preventDefault();
    showLayer(layer + (event.key === "ArrowRight" ? 1 : -1), event.timeStamp);
  }
});
$("search").addEventListener("input", event => {
  const query = event.target.value.toLowerCase();
  let found = 0, firstHit = -1;
  D.tokens.forEach((token, t) => {
    const hit = query !== "" && token.toLowerCase().includes(query);
    spans[t].classList.toggle("hit", hit);
    if (hit) { found++; if (firstHit < 0) firstHit = t; }
  });
  $("matches").textContent = query ? found + (found === 1 ? " token matches" : " tokens match") : "";
  if (firstHit >= 0) spans[firstHit].scrollIntoView({block: "nearest"});
});
if (pinned >= 0) { spans[pinned].classList.add("pinned"); hover(pinned); spans[pinned].scrollIntoView({block: "nearest"}); }
showLayer(layer);
</script></body></html>
"""
