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
  var FONT_PX = 15;      /* labels no smaller than the site's small print (0.9 rem) */
  var MAX_CELL = 30;     /* px; a cell is at least as tall as a label */
  var PICKED = "#D55E00";

  function rgb(hex) { return [1, 3, 5].map(function (i) { return parseInt(hex.slice(i, i + 2), 16); }); }
  var STOPS = CIVIDIS.map(rgb);
  K.cividis = function (x) {
    var f = Math.max(0, Math.min(1, x)) * (STOPS.length - 1);
    var i = Math.min(STOPS.length - 2, Math.floor(f)), u = f - i;
    return "rgb(" + STOPS[i].map(function (a, k) { return Math.round(a + u * (STOPS[i + 1][k] - a)); }).join(",") + ")";
  };

  function decode(base64) {
    var raw = atob(base64), bytes = new Uint8Array(raw.length);
    for (var i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return bytes;
  }
  /* A token as an axis label: the spaces around it dropped, whitespace made visible, long ones cut. */
  function label(token) {
    var s = token.trim();
    if (!s) return token.replace(/\n/g, "\u23CE").replace(/\t/g, "\u21E5").replace(/ /g, "\u2423") || "\u2205";
    return s.length > 12 ? s.slice(0, 11) + "\u2026" : s;
  }
  function quote(token) { return "\u201C" + token + "\u201D"; }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, String(attrs[k])); });
    return e;
  }
  function count(n) { var a = []; for (var i = 0; i < n; i++) a.push(String(i)); return a; }

  K.components.attention_viewer = function (root, data) {
    var H = data.heads;
    var state = { prompt: data.initial.prompt, layer: data.initial.layer, head: data.initial.head };
    var picked = null;  /* [t, s], the cell the reader clicked; null: the last query's strongest key */
    var bytes = [];     /* each prompt's maps, decoded when first shown */

    /* Query t's weight on key s in the head on show. */
    function weight(t, s) {
      var p = state.prompt, T = data.prompts[p].tokens.length;
      if (!bytes[p]) bytes[p] = decode(data.prompts[p].maps);
      return bytes[p][(state.layer * H + state.head) * T * (T + 1) / 2 + t * (t + 1) / 2 + s] / 255;
    }
    function strongest(t) {
      var best = 0;
      for (var s = 1; s <= t; s++) if (weight(t, s) > weight(t, best)) best = s;
      return best;
    }

    /* The controls: prompt, layer, head. */
    var bar = K.el("div", { class: "kqv-controls" });
    var names = data.prompts.map(function (p) { return p.name; });
    var controls = {
      prompt: K.control({ label: "prompt", kind: "choice", labels: names }, state.prompt,
                        function (i) { state.prompt = i; picked = null; draw(); }),
      layer: K.control({ label: "layer", kind: "slider", labels: count(data.layers) }, state.layer,
                       function (i) { state.layer = i; draw(); }),
      head: K.control({ label: "head", kind: "choice", labels: count(H) }, state.head,
                      function (i) { state.head = i; draw(); })
    };
    controls.prompt.classList.add("kqv-wide");
    Object.keys(controls).forEach(function (k) {
      controls[k].input.dataset.control = k;
      bar.appendChild(controls[k]);
    });
    function show(layer, head) {
      state.layer = layer; state.head = head;
      controls.layer.set(layer); controls.head.set(head);
      draw();
    }

    var badges = K.el("div", { class: "kqv-badges", "aria-live": "polite" });
    var onPrompt = K.el("p", { class: "kqv-note kqv-on-prompt" });
    var figure = K.el("div", { class: "kqv-figure kqv-map" });
    var readout = K.el("p", { class: "kqv-readout", "aria-live": "polite" });
    var gradient = "background: linear-gradient(to right, " + CIVIDIS.join(", ") + ")";
    var legend = K.el("div", { class: "kqv-legend" }, [
      K.el("span", { text: "0" }), K.el("span", { class: "kqv-gradient", style: gradient }), K.el("span", { text: "1" }),
      K.el("span", { class: "kqv-note", text: "Rows are queries, columns keys; each row sums to 1. Above the " +
                     "diagonal the causal mask hides every key. Click a cell to read its weight." })
    ]);

    /* The top heads of each kind, each a button that shows it. */
    var tops = K.el("div", { class: "kqv-tops" }, [
      K.el("p", { class: "kqv-panel-title", text: "The top heads of each kind, scored on " + data.scored_on + ":" })
    ]);
    data.kinds.forEach(function (kind) {
      var row = K.el("div", { class: "kqv-top-row" }, [K.el("span", { class: "kqv-top-kind", text: kind.label })]);
      kind.top.forEach(function (r) {
        var button = K.el("button", {
          type: "button", class: "kqv-head-button", "data-layer": String(r.layer), "data-head": String(r.head),
          text: "layer " + r.layer + " head " + r.head + ": " + r.score.toFixed(2)
        });
        button.addEventListener("click", function () { show(r.layer, r.head); });
        row.appendChild(button);
      });
      tops.appendChild(row);
    });
    [bar, badges, onPrompt, figure, readout, legend, tops].forEach(function (e) { root.appendChild(e); });

    /* Text widths, to give the labels just the room they need. */
    var measure = document.createElement("canvas").getContext("2d");
    function textWidth(text) {
      measure.font = FONT_PX + "px " + getComputedStyle(root).fontFamily;
      return measure.measureText(text).width;
    }

    /* The map: query labels on the left, key labels below (turned), one cell per visible key. */
    function drawMap(pick) {
      var tokens = data.prompts[state.prompt].tokens, T = tokens.length, labels = tokens.map(label);
      var x0 = Math.ceil(Math.max.apply(null, labels.map(textWidth))) + 8;   /* the labels' column */
      var room = (figure.clientWidth || 640) - x0 - 4;
      var cell = Math.max(FONT_PX + 2, Math.min(MAX_CELL, Math.floor(room / T)));
      var width = x0 + T * cell + 2, height = T * cell + x0 + 2;
      var map = svg("svg", {
        viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img",
        "aria-label": "Attention map of layer " + state.layer + ", head " + state.head + " over " + T + " tokens"
      });
      map.style.width = width + "px";
      map.style.fontSize = FONT_PX + "px";
      var cells = svg("g", { class: "kqv-cells" });
      for (var t = 0; t < T; t++) {
        var row = svg("text", { x: x0 - 6, y: (t + 0.5) * cell, "text-anchor": "end", "dominant-baseline": "central" });
        var col = svg("text", { transform: "translate(" + (x0 + (t + 0.5) * cell) + "," + (T * cell + 6) + ") rotate(-90)",
                                "text-anchor": "end", "dominant-baseline": "central" });
        row.textContent = col.textContent = labels[t];
        map.appendChild(row);
        map.appendChild(col);
        for (var s = 0; s <= t; s++) {
          var w = weight(t, s);
          var rect = svg("rect", { x: x0 + s * cell, y: t * cell, width: cell - 1, height: cell - 1, fill: K.cividis(w),
                                   "data-q": t, "data-k": s, "data-w": w });
          var tip = svg("title", {});
          tip.textContent = quote(tokens[t]) + " \u2192 " + quote(tokens[s]) + ": " + w.toFixed(2);
          rect.appendChild(tip);
          cells.appendChild(rect);
        }
      }
      map.appendChild(cells);
      var y = pick[0] * cell - 1;
      map.appendChild(svg("rect", { x: x0 - 1, y: y, width: (pick[0] + 1) * cell + 1, height: cell + 1,
                                    fill: "none", stroke: "currentColor", "stroke-width": 1.5 }));  /* the query's row */
      map.appendChild(svg("rect", { x: x0 + pick[1] * cell - 1, y: y, width: cell + 1, height: cell + 1,
                                    fill: "none", stroke: PICKED, "stroke-width": 2.5 }));         /* the cell read out */
      cells.addEventListener("click", function (event) {
        var r = event.target.closest("rect");
        if (!r) return;
        picked = [Number(r.getAttribute("data-q")), Number(r.getAttribute("data-k"))];
        draw();
      });
      figure.innerHTML = "";
      figure.appendChild(map);
    }

    /* The kinds this head is known for (a badge each), and its scores on the prompt shown. */
    function drawKinds(prompt) {
      var k = state.layer * H + state.head, marked = 0;
      badges.textContent = "";
      badges.appendChild(K.el("span", { class: "kqv-badges-title", text: "layer " + state.layer + ", head " + state.head + ":" }));
      data.kinds.forEach(function (kind) {
        var score = kind.scores[k];
        var rank = kind.top.findIndex(function (r) { return r.layer === state.layer && r.head === state.head; });
        if (score > data.threshold || rank >= 0) {
          marked += 1;
          badges.appendChild(K.el("span", { class: "kqv-badge", "data-kind": kind.key,
            text: kind.label + " " + score.toFixed(2) + (rank >= 0 ? " (#" + (rank + 1) + ")" : "") }));
        }
      });
      if (!marked) {
        badges.appendChild(K.el("span", { class: "kqv-note", text: "no kind above " + data.threshold + "; its scores on this prompt:" }));
      }
      onPrompt.textContent = "On this prompt: " + data.kinds.map(function (kind) {
        var s = prompt.scores[kind.key];
        return kind.label + " " + (s ? s[k].toFixed(2) : "\u2014");
      }).join(" \u00B7 ");
      tops.querySelectorAll("button").forEach(function (b) {
        var on = Number(b.dataset.layer) === state.layer && Number(b.dataset.head) === state.head;
        b.setAttribute("aria-pressed", String(on));
      });
    }

    function draw() {
      var prompt = data.prompts[state.prompt], last = prompt.tokens.length - 1;
      if (picked && picked[0] > last) picked = null;
      var pick = picked || [last, strongest(last)];
      drawKinds(prompt);
      drawMap(pick);
      var w = weight(pick[0], pick[1]), best = strongest(pick[0]);
      readout.textContent = "Query " + pick[0] + " " + quote(prompt.tokens[pick[0]]) + " \u2192 key " + pick[1] + " " +
        quote(prompt.tokens[pick[1]]) + ": weight " + w.toFixed(3) + ". Its strongest key: " +
        quote(prompt.tokens[best]) + " (" + weight(pick[0], best).toFixed(3) + ").";
      readout.dataset.q = String(pick[0]);
      readout.dataset.k = String(pick[1]);
      readout.dataset.w = String(w);
      root.dataset.prompt = String(state.prompt);
      root.dataset.layer = String(state.layer);
      root.dataset.head = String(state.head);
    }

    draw();
    K.onResize(root, draw);
  };
})();
