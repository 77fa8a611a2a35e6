/* kqv's in-page explorers: the same component on the book's site, in Colab, JupyterLab and VS Code.
 *
 * Each explorer is one HTML output made by kqv.explore: a root element with a JSON data block and a
 * call to kqvExplore.mount(root). Everything it needs is inline: no kernel, no network, no CDN.
 * Components register themselves in kqvExplore.components; "frames" is the generic one: controls over
 * a grid of pictures drawn in advance by Python (kqv.explore.frames).
 */
(function () {
  "use strict";
  var K = (window.kqvExplore = window.kqvExplore || { components: {} });
  if (K.core) return;
  K.core = true;

  /* On the book's site (pydata theme: <html data-theme=...>) figures follow the page's light or dark
   * mode: pure black ink becomes the text colour and white paper becomes transparent. Elsewhere
   * (notebooks) pictures keep their white paper, readable in any front end. tools/book_site.py applies
   * the same two rules to the site's static figures. */
  K.onSite = function () {
    return document.documentElement.hasAttribute("data-theme");
  };
  K.adaptSvg = function (svg) {
    if (!K.onSite()) return svg;
    return svg
      .replace(/(<g id="(?:figure|axes)_\d+">\s*<g id="patch_\d+">\s*<path [^>]*?style=")fill: ?#ffffff/g, "$1fill: none")
      .replace(/#000000/g, "currentColor");  /* uncoloured text inherits fill: currentColor (CSS) */
  };
  K.el = function (tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "html") e.innerHTML = attrs[k];
      else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { e.appendChild(c); });
    return e;
  };
  /* Each picture comes drawn for a desktop column (wide) and, where it has one, for a phone (narrow):
   * the narrow one is shown when the wide one would have to shrink, which would shrink its text. */
  K.useNarrow = function (box, wideWidth, narrow) {
    return !!narrow && box.clientWidth > 0 && box.clientWidth < wideWidth;
  };
  K.sizeSvg = function (svg, alt) {
    if (!svg) return;
    svg.setAttribute("role", "img");
    if (alt) svg.setAttribute("aria-label", alt);
    var w = parseFloat(svg.getAttribute("width")), h = parseFloat(svg.getAttribute("height"));
    if (w && h) {  /* matplotlib sizes in pt: 1pt = 4/3 CSS px; never upscale, keep the text legible */
      svg.style.width = (w * 4 / 3).toFixed(1) + "px";
      svg.style.maxWidth = "none";
      svg.removeAttribute("width");
      svg.removeAttribute("height");
      if (!svg.getAttribute("viewBox")) svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    }
  };
  K.onResize = function (root, redraw) {
    var last = root.clientWidth;
    window.addEventListener("resize", function () {
      if (Math.abs(root.clientWidth - last) > 8) { last = root.clientWidth; redraw(); }
    });
  };
  K.mount = function (root) {
    if (!root || root.dataset.kqvMounted) return;
    var data = JSON.parse(root.querySelector("script.kqv-data").textContent);
    var component = K.components[root.dataset.kqv];
    if (!component) throw new Error("kqv explorer: unknown component " + root.dataset.kqv);
    root.dataset.kqvMounted = "1";
    root.classList.add("kqv-live");
    component(root, data);
  };

  /* A control: a slider over a list of options (with its value shown), a drop-down, or a checkbox.
   * onChange(index) is called with the chosen option's index. */
  K.control = function (spec, index, onChange) {
    var id = "kqv-c-" + Math.random().toString(36).slice(2);
    var wrap = K.el("div", { class: "kqv-control" });
    var label = K.el("label", { for: id, text: spec.label });
    wrap.appendChild(label);
    var input, shown;
    if (spec.kind === "toggle") {
      input = K.el("input", { type: "checkbox", id: id });
      input.checked = index === 1;
      input.addEventListener("change", function () { onChange(input.checked ? 1 : 0); });
      wrap.insertBefore(input, label);
    } else if (spec.kind === "choice") {
      input = K.el("select", { id: id });
      spec.labels.forEach(function (text, i) {
        var o = K.el("option", { value: String(i), text: text });
        if (i === index) o.selected = true;
        input.appendChild(o);
      });
      input.addEventListener("change", function () { onChange(Number(input.value)); });
      wrap.appendChild(input);
    } else {
      input = K.el("input", { type: "range", id: id, min: "0", max: String(spec.labels.length - 1), step: "1" });
      input.value = String(index);
      shown = K.el("output", { for: id, text: spec.labels[index] });
      input.addEventListener("input", function () {
        shown.textContent = spec.labels[Number(input.value)];
        onChange(Number(input.value));
      });
      wrap.appendChild(input);
      wrap.appendChild(shown);
    }
    wrap.input = input;
    wrap.set = function (i) {
      if (spec.kind === "toggle") input.checked = i === 1;
      else input.value = String(i);
      if (shown) shown.textContent = spec.labels[i];
    };
    return wrap;
  };

  /* Pictures drawn in advance, one per combination of the controls' options (row-major). */
  K.components.frames = function (root, data) {
    var state = data.initial.slice();
    var figure = root.querySelector(".kqv-figure");
    var bar = K.el("div", { class: "kqv-controls" });
    var controls = data.controls.map(function (spec, c) {
      var ctl = K.control(spec, state[c], function (i) { state[c] = i; draw(); });
      bar.appendChild(ctl);
      return ctl;
    });
    if (data.play !== null && data.play !== undefined) {
      var c = data.play, timer = null;
      var button = K.el("button", { type: "button", class: "kqv-play", text: "\u25B6 play" });
      button.addEventListener("click", function () {
        if (timer) { clearInterval(timer); timer = null; button.textContent = "\u25B6 play"; return; }
        button.textContent = "\u23F8 pause";
        if (state[c] === data.controls[c].labels.length - 1) { state[c] = 0; controls[c].set(0); draw(); }
        timer = setInterval(function () {
          if (state[c] >= data.controls[c].labels.length - 1) { clearInterval(timer); timer = null; button.textContent = "\u25B6 play"; return; }
          state[c] += 1; controls[c].set(state[c]); draw();
        }, data.interval || 900);
      });
      bar.insertBefore(button, bar.firstChild);
    }
    root.insertBefore(bar, figure);
    function index() {
      var k = 0;
      for (var i = 0; i < state.length; i++) k = k * data.controls[i].labels.length + state[i];
      return k;
    }
    function draw() {
      var k = index();
      var alt = Array.isArray(data.alt) ? data.alt[k] : data.alt;
      var small = K.useNarrow(figure, data.width, data.narrow);
      figure.innerHTML = K.adaptSvg((small ? data.narrow : data.frames)[k]);
      K.sizeSvg(figure.querySelector("svg"), alt);
      root.dataset.frame = String(k);
      root.dataset.rendition = small ? "narrow" : "wide";
    }
    draw();
    K.onResize(root, draw);
  };
})();
