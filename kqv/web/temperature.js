/* The temperature explorer (kqv.explore.temperature): softmax(scores / tau), and the blended answer.
 *
 * The reader drags the temperature (a slider on a log scale) or types one. The weights are
 * computed here as torch.softmax computes them: subtract the largest scaled score, exponentiate,
 * divide by the sum (in float64). The blended answer is weights @ values, one number per column.
 */
(function () {
  "use strict";
  var K = (window.kqvExplore = window.kqvExplore || { components: {} });

  K.softmax = function (scores, tau) {
    var scaled = scores.map(function (s) { return s / tau; });
    var top = Math.max.apply(null, scaled);               /* only differences matter; no overflow */
    var e = scaled.map(function (s) { return Math.exp(s - top); });
    var sum = e.reduce(function (a, b) { return a + b; }, 0);
    return e.map(function (x) { return x / sum; });
  };

  /* Rows of "label | bar | value", the bars' lengths set later by set(i, fraction, text). */
  function barChart(cls, labels, highlight) {
    var box = K.el("div", { class: "kqv-bars " + cls, role: "list" });
    var rows = labels.map(function (label, i) {
      var fill = K.el("div", { class: "kqv-bar-fill" + (highlight.indexOf(i) >= 0 ? " kqv-highlight" : "") });
      var value = K.el("span", { class: "kqv-bar-value" });
      var row = K.el("div", { class: "kqv-bar-row", role: "listitem" }, [
        K.el("span", { class: "kqv-bar-label", text: label }),
        K.el("div", { class: "kqv-bar-track" }, [fill]),
        value
      ]);
      box.appendChild(row);
      return { row: row, fill: fill, value: value };
    });
    box.set = function (i, fraction, text) {
      rows[i].fill.style.width = (100 * Math.max(0, Math.min(1, fraction))).toFixed(2) + "%";
      rows[i].value.textContent = text;
    };
    box.rows = rows;
    return box;
  }

  K.components.temperature = function (root, data) {
    var scores = data.scores, n = scores.length, lo = data.range[0], hi = data.range[1];
    var bar = K.el("div", { class: "kqv-controls" });
    var sid = "kqv-c-" + Math.random().toString(36).slice(2), tid = sid + "-typed";
    var slider = K.el("input", {
      /* log10 of the temperature, on a grid of 0.01 inside the range: 10^-1 = 0.1 is a position */
      type: "range", id: sid, step: "0.01",
      min: String(Math.ceil(100 * Math.log10(lo)) / 100), max: String(Math.floor(100 * Math.log10(hi)) / 100),
      "aria-label": "temperature, on a log scale"
    });
    var typed = K.el("input", { type: "text", id: tid, class: "kqv-tau", inputmode: "decimal", size: "6", autocomplete: "off" });
    [[slider, "temperature \u03C4"], [typed, "\u03C4 ="]].forEach(function (c) {
      bar.appendChild(K.el("div", { class: "kqv-control" }, [K.el("label", { for: c[0].id, text: c[1] }), c[0]]));
    });
    var error = K.el("p", { class: "kqv-error", role: "alert" });

    var panels = K.el("div", { class: "kqv-panels" });
    var weights = barChart("kqv-weights", data.labels, data.highlight);
    var uniform = K.el("div", { class: "kqv-uniform", "aria-hidden": "true" });
    weights.rows.forEach(function (r) {
      r.fill.parentNode.appendChild(uniform.cloneNode());
      r.fill.parentNode.lastChild.style.left = (100 / n).toFixed(2) + "%";
    });
    panels.appendChild(K.el("div", { class: "kqv-panel" }, [
      K.el("p", { class: "kqv-panel-title", text: "relevance: softmax(scores / \u03C4)" }), weights,
      K.el("p", { class: "kqv-note", text: "The thin line marks 1/" + n + ", every book's share when \u03C4 is large." })
    ]));
    var answer = null;
    if (data.values) {
      answer = barChart("kqv-answer", data.value_labels, []);
      panels.appendChild(K.el("div", { class: "kqv-panel" }, [
        K.el("p", { class: "kqv-panel-title", text: "the blended answer: weights @ values" }), answer
      ]));
    }
    /* The ratio of the two best books' weights is e^(gap / tau): the chapter's ratio rule. */
    var order = scores.map(function (s, i) { return i; }).sort(function (a, b) { return scores[b] - scores[a]; });
    var ratio = K.el("p", { class: "kqv-note kqv-ratio" });
    [bar, error, panels, ratio].forEach(function (e) { root.appendChild(e); });

    function draw(tau) {
      var w = K.softmax(scores, tau);
      w.forEach(function (x, i) {
        weights.set(i, x, K.fixed(100 * x, 1) + "%");
        weights.rows[i].row.dataset.w = String(x);
      });
      if (answer) {
        var a0 = data.answer_range[0], a1 = data.answer_range[1];
        data.value_labels.forEach(function (_, j) {
          var a = 0;
          for (var i = 0; i < n; i++) a += w[i] * data.values[i][j];           /* (N,) @ (N, M) -> (M,) */
          answer.set(j, (a - a0) / (a1 - a0 || 1), K.fixed(a, 3));
          answer.rows[j].row.dataset.a = String(a);
        });
      }
      var b = order[0], c = order[1];
      ratio.textContent = data.labels[b] + " / " + data.labels[c] + ": e^((" + K.fixed(scores[b], 2) + " \u2212 " +
        K.fixed(scores[c], 2) + ") / \u03C4) = " + K.fixed(w[b] / w[c], 2) + "\u00D7 as relevant";
      root.dataset.tau = String(tau);
    }

    function fromText() {
      var text = typed.value.trim(), tau = /^(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$/i.test(text) ? Number(text) : NaN;
      if (!(tau > 0 && isFinite(tau))) {
        error.textContent = "the temperature must be a positive number, got \u201C" + typed.value + "\u201D";
        typed.setAttribute("aria-invalid", "true");
        root.dataset.error = error.textContent;
        return;
      }
      error.textContent = "";
      root.dataset.error = "";
      typed.setAttribute("aria-invalid", "false");
      slider.value = String(Math.log10(Math.min(hi, Math.max(lo, tau))));
      draw(tau);
    }
    slider.addEventListener("input", function () {
      var tau = Number(Math.pow(10, Number(slider.value)).toPrecision(3));
      typed.value = String(tau);
      fromText();
    });
    typed.addEventListener("input", fromText);

    typed.value = String(data.tau);
    fromText();
  };
})();
