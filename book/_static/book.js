/* The book's own script, on every page (html_js_files in _config.yml).
 *
 * Figures come in two renditions (tools/book_pages.py): one drawn for the desktop column and one
 * re-laid out for a phone. Show the phone's when the desktop one would have to shrink (and its text
 * with it); without this script the desktop one shows and scrolls sideways in its own box. */
(function () {
  "use strict";
  function fit() {
    document.querySelectorAll(".kqv-svg").forEach(function (box) {
      var width = parseFloat(box.dataset.kqvWidth) || 0;
      var narrow = box.querySelector(".kqv-narrow");
      box.classList.toggle("kqv-use-narrow", !!narrow && box.clientWidth + 1 < width);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", fit);
  else fit();
  window.addEventListener("resize", fit);
})();

/* A solution's title links to its exercise; a click on that link must follow it, not reach the
 * toggle script (sphinx-togglebutton looks for its button in the link and throws). */
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll(".solution .admonition-title a").forEach(function (link) {
    link.addEventListener("click", function (event) { event.stopPropagation(); });
  });
});
