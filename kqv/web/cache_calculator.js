/* The KV-cache calculator (kqv.explore.cache_calculator): kqv.configs' arithmetic, in the page.
 *
 * Per token and layer a cache keeps K and V for every KV head, 2 * H_kv * D numbers (MHA, GQA and
 * MQA alike), or, for MLA, the latent and the RoPE key that all heads share, d_c + d_r numbers
 * (DeepSeek-V2, arXiv 2405.04434, Table 1). Times the layers: per token; times the bytes of one
 * number, the tokens and the sequences: the whole cache. Counts are BigInts, exact as in Python.
 */
(function () {
  "use strict";
  var K = (window.kqvExplore = window.kqvExplore || { components: {} });

  /* Each input: what it is called, which layout shows it ("kv", "mla" or both), the least and the
   * largest value it takes, and whether it takes decimals. */
  var FIELDS = [
    { key: "layers", label: "layers", min: 1, max: 1e4 },
    { key: "heads", label: "query heads H", min: 1, max: 1e5, layout: "kv" },
    { key: "kv_heads", label: "KV heads H_kv", min: 1, max: 1e5, layout: "kv" },
    { key: "head_dim", label: "head width D", min: 1, max: 1e5, layout: "kv" },
    { key: "d_c", label: "latent width d_c", min: 1, max: 1e6, layout: "mla" },
    { key: "d_r", label: "RoPE width d_r", min: 0, max: 1e6, layout: "mla" },
    { key: "context", label: "context (tokens)", min: 1, max: 1e12 },
    { key: "batch", label: "batch (sequences)", min: 1, max: 1e9 },
    { key: "budget", label: "memory budget (GiB)", min: 0, max: 1e9, decimal: true }
  ];
  /* One colour per design, as in every figure of the book (kqv.plots.DESIGNS). */
  var COLOURS = { MHA: "#0072B2", GQA: "#009E73", MQA: "#D55E00", MLA: "#CC79A7" };
  var GIB = 1073741824;
  /* The numbers the page shows, also as data-* attributes of the explorer (read by the tests). */
  var NUMBERS = ["elementsPerLayer", "elementsPerToken", "bytesPerToken", "cacheBytes", "sequences", "maxContext"];

  function quote(text) { return "\u201C" + text + "\u201D"; }
  /* "1 byte", "2 bytes": n is a Number or a BigInt. */
  function plural(n, word) { return K.count(n) + " " + word + (String(n) === "1" ? "" : "s"); }
  /* A control of the top bar: its label, then its input. */
  function labelled(input, text, wide) {
    return K.el("div", { class: wide ? "kqv-control kqv-wide" : "kqv-control" }, [K.el("label", { for: input.id, text: text }), input]);
  }

  /* What the reader typed -> {value} (a BigInt, or a Number for decimals) or {error} naming it. */
  function parse(spec, text) {
    var clean = text.replace(/[,_\s]/g, "");
    var range = K.count(spec.min) + " to " + K.count(spec.max);
    if (spec.decimal) {
      var x = /^(\d+\.?\d*|\.\d+)$/.test(clean) ? Number(clean) : NaN;
      if (!(x > 0 && x <= spec.max)) {
        return { error: spec.label + " must be a positive number up to " + K.count(spec.max) + ", got " + quote(text) };
      }
      return { value: x };
    }
    if (!/^\d+$/.test(clean)) {
      return { error: spec.label + " must be a whole number from " + range + ", got " + quote(text) };
    }
    var n = BigInt(clean);
    if (n < BigInt(spec.min) || n > BigInt(spec.max)) {
      return { error: spec.label + " must be from " + range + ", got " + K.count(n) };
    }
    return { value: n };
  }

  function family(layout, heads, kvHeads) {  /* kqv.configs.ModelConfig.attention */
    if (layout === "mla") return "MLA";
    if (kvHeads === heads) return "MHA";
    return kvHeads === BigInt(1) ? "MQA" : "GQA";
  }

  function describe(name, v) {
    if (name === "MLA") return "MLA: one latent and one RoPE key per token, shared by every head";
    if (name === "MHA") return "MHA: every query head has its own K and V";
    if (name === "MQA") return "MQA: all " + K.count(v.heads) + " query heads share one KV head";
    return "GQA: " + K.count(v.heads / v.kv_heads) + " query heads share each KV head";
  }

  /* The same sentence as kqv.explore._counted. */
  function counted(layout, v, perLayer) {
    if (layout === "mla") {
      return "per token and layer: latent " + K.count(v.d_c) + " + RoPE key " + K.count(v.d_r) + " = " +
        K.count(perLayer) + " numbers (MLA caches no per-head keys or values)";
    }
    return "per token and layer: K and V of " + plural(v.kv_heads, "KV head") + " of width " + K.count(v.head_dim) +
      ": 2 \u00D7 " + K.count(v.kv_heads) + " \u00D7 " + K.count(v.head_dim) + " = " + K.count(perLayer) + " numbers";
  }

  K.components.cache_calculator = function (root, data) {
    var presets = data.presets, dtypes = data.dtypes;
    var bar = K.el("div", { class: "kqv-controls" });
    var id = function () { return "kqv-c-" + Math.random().toString(36).slice(2); };

    /* The model: a preset from kqv.configs, grouped by design, or the reader's own. */
    var presetSelect = K.el("select", { id: id(), class: "kqv-preset" });
    presetSelect.appendChild(K.el("option", { value: "", text: "your own numbers" }));
    ["MHA", "GQA", "MQA", "MLA"].forEach(function (design) {
      var group = K.el("optgroup", { label: design });
      presets.forEach(function (p, i) {
        if (p.attention === design) group.appendChild(K.el("option", { value: String(i), text: p.name }));
      });
      if (group.children.length) presetSelect.appendChild(group);
    });
    bar.appendChild(labelled(presetSelect, "model", true));

    var layoutSelect = K.el("select", { id: id(), class: "kqv-layout" });
    layoutSelect.appendChild(K.el("option", { value: "kv", text: "K and V per KV head (MHA, GQA, MQA)" }));
    layoutSelect.appendChild(K.el("option", { value: "mla", text: "latent + RoPE key (MLA)" }));
    bar.appendChild(labelled(layoutSelect, "cache"));

    var dtypeSelect = K.el("select", { id: id(), class: "kqv-dtype" });
    dtypes.forEach(function (d) {
      dtypeSelect.appendChild(K.el("option", { value: d.name, text: d.label + " (" + plural(d.bytes, "byte") + ")" }));
    });
    bar.appendChild(labelled(dtypeSelect, "cache dtype"));

    var grid = K.el("div", { class: "kqv-fields" });
    var inputs = {}, boxes = {};
    FIELDS.forEach(function (spec) {
      var fid = id();
      inputs[spec.key] = K.el("input", {
        type: "text", id: fid, inputmode: spec.decimal ? "decimal" : "numeric", autocomplete: "off",
        spellcheck: "false", "data-field": spec.key, size: "9"
      });
      var name = K.el("label", { for: fid, text: spec.label });
      boxes[spec.key] = K.el("div", { class: "kqv-field" }, [name, inputs[spec.key]]);
      grid.appendChild(boxes[spec.key]);
    });

    var error = K.el("p", { class: "kqv-error", role: "alert" });
    var results = K.el("dl", { class: "kqv-results", "aria-live": "polite" });
    var out = {};
    [["design", "design"], ["counted", "counted"], ["per-token", "per token"], ["cache", "the cache"],
     ["budget", "in the budget"]].forEach(function (row) {
      out[row[0]] = K.el("dd", { class: "kqv-out-" + row[0] });
      results.appendChild(K.el("dt", { text: row[1] }));
      results.appendChild(out[row[0]]);
    });
    var meter = K.el("div", { class: "kqv-meter", "aria-hidden": "true" }, [K.el("div", { class: "kqv-meter-fill" })]);
    out.budget.appendChild(meter);
    var budgetText = K.el("span");
    out.budget.insertBefore(budgetText, meter);
    var note = K.el("p", { class: "kqv-note kqv-preset-note" });

    [bar, grid, error, results, note].forEach(function (e) { root.appendChild(e); });

    function layout() { return layoutSelect.value; }
    function showLayout() {
      FIELDS.forEach(function (spec) {
        boxes[spec.key].hidden = !!spec.layout && spec.layout !== layout();
      });
    }
    function fill(p) {
      inputs.layers.value = String(p.layers);
      inputs.heads.value = String(p.heads);
      inputs.kv_heads.value = String(p.kv_heads);
      inputs.head_dim.value = String(p.head_dim);
      if (p.d_c !== null) { inputs.d_c.value = String(p.d_c); inputs.d_r.value = String(p.d_r); }
      layoutSelect.value = p.d_c !== null ? "mla" : "kv";
      showLayout();
    }
    /* The preset still describes what the fields say (else the select says "your own numbers"). */
    function matches(p) {
      if ((p.d_c !== null) !== (layout() === "mla") || inputs.layers.value.trim() !== String(p.layers)) return false;
      if (p.d_c !== null) return inputs.d_c.value.trim() === String(p.d_c) && inputs.d_r.value.trim() === String(p.d_r);
      return inputs.heads.value.trim() === String(p.heads) && inputs.kv_heads.value.trim() === String(p.kv_heads) &&
        inputs.head_dim.value.trim() === String(p.head_dim);
    }

    function clear(message) {
      error.textContent = message;
      root.dataset.error = message;
      results.classList.add("kqv-stale");
      NUMBERS.forEach(function (k) { delete root.dataset[k]; });
    }

    function compute() {
      var v = {}, errors = [];
      FIELDS.forEach(function (spec) {
        if (spec.layout && spec.layout !== layout()) return;
        var r = parse(spec, inputs[spec.key].value);
        inputs[spec.key].setAttribute("aria-invalid", r.error ? "true" : "false");
        if (r.error) errors.push(r.error); else v[spec.key] = r.value;
      });
      if (layout() === "kv" && v.heads !== undefined && v.kv_heads !== undefined && v.heads % v.kv_heads !== BigInt(0)) {
        errors.push("query heads H (" + K.count(v.heads) + ") must be divisible by KV heads H_kv (" +
                    K.count(v.kv_heads) + ")");
        inputs.kv_heads.setAttribute("aria-invalid", "true");
      }
      if (errors.length) { clear(errors.join("; ")); return; }
      error.textContent = "";
      root.dataset.error = "";
      results.classList.remove("kqv-stale");

      var dtype = dtypes.filter(function (d) { return d.name === dtypeSelect.value; })[0];
      /* per token and layer: d_c + d_r, or 2 H_kv D (kqv.configs.kv_elements_per_token(per_layer=True)) */
      var perLayer = layout() === "mla" ? v.d_c + v.d_r : BigInt(2) * v.kv_heads * v.head_dim;
      var perToken = perLayer * v.layers;                               /* kqv.configs.kv_elements_per_token */
      var bytesPerToken = perToken * BigInt(dtype.bytes);              /* kv_bytes_per_token */
      var perSequence = bytesPerToken * v.context;
      var cache = perSequence * v.batch;                               /* kv_cache_bytes */
      var budget = BigInt(Math.floor(v.budget * GIB));                 /* int(budget_gib * 2**30) */
      var sequences = budget / perSequence, maxContext = budget / bytesPerToken;  /* BigInt: floor */

      var design = family(layout(), v.heads, v.kv_heads);
      out.design.textContent = "";
      out.design.appendChild(K.el("span", { class: "kqv-chip", style: "background:" + COLOURS[design] }));
      out.design.appendChild(document.createTextNode(describe(design, v)));
      out.counted.textContent = counted(layout(), v, perLayer);
      out["per-token"].textContent = K.count(bytesPerToken) + " bytes (" + K.bytes(bytesPerToken) + "): " +
        K.count(perToken) + " numbers over " + plural(v.layers, "layer") + ", " + plural(dtype.bytes, "byte") + " each";
      out.cache.textContent = K.count(cache) + " bytes (" + K.bytes(cache) + ") for " + K.count(v.batch) +
        (v.batch === BigInt(1) ? " sequence" : " sequences") + " of " + K.count(v.context) + " tokens";
      var share = Number(cache) / Number(budget);
      budgetText.textContent = K.count(sequences) + (sequences === BigInt(1) ? " sequence" : " sequences") + " of " +
        K.count(v.context) + " tokens fit in " + inputs.budget.value.trim() + " GiB; one sequence fits up to " +
        K.count(maxContext) + " tokens. This batch " + (share <= 1 ? "uses " + K.fixed(100 * share, 1) + "% of it." :
        "needs " + K.fixed(share, 1) + " \u00D7 the budget: it does not fit.");
      meter.firstChild.style.width = Math.min(100, 100 * share).toFixed(2) + "%";
      meter.classList.toggle("kqv-over", share > 1);

      var p = presetSelect.value === "" ? null : presets[Number(presetSelect.value)];
      var notes = [];
      if (p && p.d_c === null && p.heads * p.head_dim !== p.hidden) {
        notes.push("Its head width D = " + K.count(p.head_dim) + " is not hidden / heads = " + K.count(p.hidden) + " / " +
          K.count(p.heads) + ": the cache counts D.");
      }
      if (dtype.bytes === 1) notes.push("One byte per number; the scales a quantized cache also keeps are not counted.");
      if (p && p.source) notes.push("Source: " + p.source + ".");
      note.textContent = notes.join(" ");

      var d = root.dataset;
      d.elementsPerLayer = String(perLayer);
      d.elementsPerToken = String(perToken);
      d.bytesPerToken = String(bytesPerToken);
      d.cacheBytes = String(cache);
      d.sequences = String(sequences);
      d.maxContext = String(maxContext);
      d.design = design;
    }

    presetSelect.addEventListener("change", function () {
      if (presetSelect.value !== "") fill(presets[Number(presetSelect.value)]);
      compute();
    });
    layoutSelect.addEventListener("change", function () {
      showLayout();
      if (presetSelect.value !== "" && !matches(presets[Number(presetSelect.value)])) presetSelect.value = "";
      compute();
    });
    dtypeSelect.addEventListener("change", compute);
    FIELDS.forEach(function (spec) {
      inputs[spec.key].addEventListener("input", function () {
        if (presetSelect.value !== "" && !matches(presets[Number(presetSelect.value)])) presetSelect.value = "";
        compute();
      });
    });

    /* Start from the preset Python chose; MLA widths default to the first MLA preset's. */
    var mla = presets.filter(function (p) { return p.d_c !== null; })[0] || { d_c: 512, d_r: 64 };
    inputs.d_c.value = String(mla.d_c);
    inputs.d_r.value = String(mla.d_r);
    var start = 0;
    presets.forEach(function (p, i) { if (p.name === data.initial.preset) start = i; });
    presetSelect.value = String(start);
    fill(presets[start]);
    inputs.context.value = String(data.initial.context);
    inputs.batch.value = String(data.initial.batch);
    inputs.budget.value = String(data.initial.budget);
    dtypeSelect.value = data.initial.dtype;
    compute();
  };
})();
