/* The attention viewer (kqv.explore.attention_viewer): a real model's heads, any prompt, layer, head.
 *
 * Python computed every head's causal map on every prompt (kqv.heads.attention_maps) and stored
 * the lower triangles, one byte per weight (round(255 w)), base64: entry (l, h, t, s) with s <= t
 * is byte (l * H + h) * T(T+1)/2 + t(t+1)/2 + s. Heads carry the kinds of kqv.heads: a badge
 * where a head's score is above the threshold, and the top heads of each kind, a click away.
 */
(function () {
  "use strict";
  var K = (window.kqvExplore = window.kqvExplore || { components: {} });
  var SVG = "http://www.w3.org/2000/svg";
  /* matplotlib's cividis at 0, 0.1, ..., 1: the colour map of every matrix in the book. */
  var CIVIDIS = ["#00224e", "#083370", "#35456c", "#4f576c", "#666970", "#7d7c78", "#948e77", "#aea371",
                 "#c8b866", "#e5cf52", "#fee838"];
  var FONT_PX = 15;  /* no smaller than the site's small print (0.9 rem) */

  function rgb(hex) { return [1, 3, 5].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); }); }
  var STOPS = CIVIDIS.map(rgb);
  K.cividis = function (x) {
    var f = Math.max(0, Math.min(1, x)) * (STOPS.length - 1), i = Math.min(STOPS.length - 2, Math.floor(f)), u = f - i;
    var c = STOPS[i].map(function (a, k) { return Math.round(a + u * (STOPS[i + 1][k] - a)); });
    return "rgb(" + c.join(",") + ")";
  };

  function decode(base64) {
    var raw = atob(base64), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }
  /* A token as an axis label: spaces around it dropped, whitespace made visible, long ones cut. */
  function label(token) {
    var s = token.trim();
    if (!s) return token.replace(/\n/g, "\u23CE").replace(/\t/g, "\u21E5").replace(/ /g, "\u2423") || "\u2205";
    return s.length > 12 ? s.slice(0, 11) + "\u2026" : s;
  }
  function quote(token) { return "\u201C" + token + "\u201D"; }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }

  K.components.attention_viewer = function (root, data) {
    var L = data.layers, H = data.heads, state = { prompt: data.initial.prompt, layer: data.initial.layer, head: data.initial.head };
    var bytes = data.prompts.map(function () { return null; });
    var selected = null;  /* [t, s]: the cell the reader picked; null: the last query's strongest key */

    var bar = K.el("div", { class: "kqv-controls" });
    var range = function (n) { var a = []; for (var i = 0; i < n; i++) a.push(String(i)); return a; };
    var controls = {
      prompt: K.control({ label: "prompt", kind: "choice", labels: data.prompts.map(function (p) { return p.name; }) },
                        state.prompt, function (i) { state.prompt = i; selected = null; draw(); }),
      layer: K.control({ label: "layer", kind: "slider", labels: range(L) }, state.layer, function (i) { state.layer = i; draw(); }),
      head: K.control({ label: "head", kind: "choice", labels: range(H) }, state.head, function (i) { state.head = i; draw(); })
    };
    controls.prompt.classList.add("kqv-wide");
    Object.keys(controls).forEach(function (k) { controls[k].input.dataset.control = k; bar.appendChild(controls[k]); });

    var badges = K.el("div", { class: "kqv-badges", "aria-live": "polite" });
    var onPrompt = K.el("p", { class: "kqv-note kqv-on-prompt" });
    var figure = K.el("div", { class: "kqv-figure kqv-map" });
    var readout = K.el("p", { class: "kqv-readout", "aria-live": "polite" });
    var legend = K.el("div", { class: "kqv-legend" }, [
      K.el("span", { text: "0" }),
      K.el("span", { class: "kqv-gradient", style: "background: linear-gradient(to right, " + CIVIDIS.join(", ") + ")" }),
      K.el("span", { text: "1" }),
      K.el("span", { class: "kqv-note", text: "Rows are queries, columns keys; each row sums to 1. Above the diagonal the causal mask hides every key. Click a cell to read its weight." })
    ]);
    var tops = K.el("div", { class: "kqv-tops" });
    tops.appendChild(K.el("p", { class: "kqv-panel-title", text: "The top heads of each kind, scored on " + data.scored_on + ":" }));
    data.kinds.forEach(function (kind) {
      var row = K.el("div", { class: "kqv-top-row" }, [K.el("span", { class: "kqv-top-kind", text: kind.label })]);
      kind.top.forEach(function (r) {
        var b = K.el("button", { type: "button", class: "kqv-head-button", "data-layer": String(r.layer), "data-head": String(r.head),
                                 text: "layer " + r.layer + " head " + r.head + ": " + r.score.toFixed(2) });
        b.addEventListener("click", function () {
          state.layer = r.layer; state.head = r.head;
          controls.layer.set(r.layer); controls.head.set(r.head);
          draw();
        });
        row.appendChild(b);
      });
      tops.appendChild(row);
    });
    [bar, badges, onPrompt, figure, readout, legend, tops].forEach(function (e) { root.appendChild(e); });

    /* Weight of query t on key s, head (l, h), prompt p: the stored byte / 255. */
    function weight(p, l, h, t, s) {
      if (!bytes[p]) bytes[p] = decode(data.prompts[p].maps);
      var T = data.prompts[p].tokens.length, tri = T * (T + 1) / 2;
      return bytes[p][(l * H + h) * tri + t * (t + 1) / 2 + s] / 255;
    }
    function rowOf(t) {
      var w = [];
      for (var s = 0; s <= t; s++) w.push(weight(state.prompt, state.layer, state.head, t, s));
      return w;
    }

    var measure = document.createElement("canvas").getContext("2d");
    function textWidth(text) {
      measure.font = FONT_PX + "px " + getComputedStyle(root).fontFamily;
      return measure.measureText(text).width;
    }

    function drawMap() {
      var tokens = data.prompts[state.prompt].tokens, T = tokens.length, labels = tokens.map(label);
      var labelWidth = Math.ceil(Math.max.apply(null, labels.map(textWidth))) + 8;
      var room = (figure.clientWidth || 640) - labelWidth - 4;
      var cell = Math.max(FONT_PX + 2, Math.min(30, Math.floor(room / T)));  /* a row label needs the cell's height */
      var width = labelWidth + T * cell + 2, height = T * cell + labelWidth + 2;
      var map = svg("svg", { viewBox: "0 0 " + width + " " + height, width: String(width), height: String(height), role: "img",
        "aria-label": "Attention map of layer " + state.layer + ", head " + state.head + " over " + T + " tokens" });
      map.style.width = width + "px";
      map.style.fontSize = FONT_PX + "px";
      var x0 = labelWidth, cells = svg("g", { class: "kqv-cells" });
      for (var t = 0; t < T; t++) {
        var row = svg("text", { x: String(x0 - 6), y: String((t + 0.5) * cell), "text-anchor": "end", "dominant-baseline": "central" });
        row.textContent = labels[t];
        map.appendChild(row);
        var col = svg("text", { transform: "translate(" + (x0 + (t + 0.5) * cell) + "," + (T * cell + 6) + ") rotate(-90)",
                                "text-anchor": "end", "dominant-baseline": "central" });
        col.textContent = labels[t];
        map.appendChild(col);
        for (var s = 0; s <= t; s++) {
          var w = weight(state.prompt, state.layer, state.head, t, s);
          var rect = svg("rect", { x: String(x0 + s * cell), y: String(t * cell), width: String(cell - 1), height: String(cell - 1),
                                   fill: K.cividis(w), "data-q": String(t), "data-k": String(s), "data-w": String(w) });
          var tip = svg("title", {});
          tip.textContent = quote(tokens[t]) + " \u2192 " + quote(tokens[s]) + ": " + w.toFixed(2);
          rect.appendChild(tip);
          cells.appendChild(rect);
        }
      }
      map.appendChild(cells);
      var pick = selected || strongest(T - 1);
      map.appendChild(svg("rect", { class: "kqv-row-mark", x: String(x0 - 1), y: String(pick[0] * cell - 1), width: String((pick[0] + 1) * cell + 1),
                                    height: String(cell + 1), fill: "none", stroke: "currentColor", "stroke-width": "1.5" }));
      map.appendChild(svg("rect", { class: "kqv-cell-mark", x: String(x0 + pick[1] * cell - 1), y: String(pick[0] * cell - 1),
                                    width: String(cell + 1), height: String(cell + 1), fill: "none", stroke: "#D55E00", "stroke-width": "2.5" }));
      cells.addEventListener("click", function (event) {
        var r = event.target.closest("rect");
        if (!r) return;
        selected = [Number(r.getAttribute("data-q")), Number(r.getAttribute("data-k"))];
        draw();
      });
      figure.innerHTML = "";
      figure.appendChild(map);
      return pick;
    }

    function strongest(t) {
      var w = rowOf(t), best = 0;
      for (var s = 1; s < w.length; s++) if (w[s] > w[best]) best = s;
      return [t, best];
    }

    function draw() {
      var p = data.prompts[state.prompt], k = state.layer * H + state.head;
      if (selected && selected[0] >= p.tokens.length) selected = null;
      badges.textContent = "";
      badges.appendChild(K.el("span", { class: "kqv-badges-title", text: "layer " + state.layer + ", head " + state.head + ":" }));
      var marked = 0;
      data.kinds.forEach(function (kind) {
        var score = kind.scores[k];
        var rank = kind.top.findIndex(function (r) { return r.layer === state.layer && r.head === state.head; });
        if (score > data.threshold || rank >= 0) {
          marked += 1;
          badges.appendChild(K.el("span", { class: "kqv-badge", "data-kind": kind.key,
            text: kind.label + " " + score.toFixed(2) + (rank >= 0 ? " (#" + (rank + 1) + ")" : "") }));
        }
      });
      if (!marked) badges.appendChild(K.el("span", { class: "kqv-note", text: "no kind above " + data.threshold + "; see the scores on this prompt below" }));
      onPrompt.textContent = "On this prompt: " + data.kinds.map(function (kind) {
        var s = p.scores[kind.key];
        return kind.label + " " + (s ? s[k].toFixed(2) : "\u2014");
      }).join(" \u00B7 ");

      var pick = drawMap(), w = weight(state.prompt, state.layer, state.head, pick[0], pick[1]);
      var best = strongest(pick[0]);
      readout.textContent = "Query " + pick[0] + " " + quote(p.tokens[pick[0]]) + " \u2192 key " + pick[1] + " " + quote(p.tokens[pick[1]]) +
        ": weight " + w.toFixed(3) + ". Its strongest key: " + quote(p.tokens[best[1]]) + " (" +
        weight(state.prompt, state.layer, state.head, best[0], best[1]).toFixed(3) + ").";
      readout.dataset.q = String(pick[0]);
      readout.dataset.k = String(pick[1]);
      readout.dataset.w = String(w);
      tops.querySelectorAll("button").forEach(function (b) {
        b.setAttribute("aria-pressed", String(Number(b.dataset.layer) === state.layer && Number(b.dataset.head) === state.head));
      });
      root.dataset.prompt = String(state.prompt);
      root.dataset.layer = String(state.layer);
      root.dataset.head = String(state.head);
    }

    draw();
    K.onResize(root, draw);
  };
})();
