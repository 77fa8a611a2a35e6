/* Numbers as a reader reads them, for kqv's in-page explorers (the same strings as kqv.explore's
 * format_count and format_bytes): thousands separators, binary units named (1 KiB = 1,024 bytes).
 * toFixed rounds the number's exact value and a tie up; kqv.explore._fixed does the same in Python.
 */
(function () {
  "use strict";
  var K = (window.kqvExplore = window.kqvExplore || { components: {} });
  var UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

  function commas(text) {
    var parts = text.split(".");
    parts[0] = parts[0].replace(/\B(?=(\d{3})+(?!\d))/g, ",");
    return parts.join(".");
  }
  /* x with `digits` decimals and thousands separators: K.fixed(1234.5, 2) is "1,234.50". */
  K.fixed = function (x, digits) { return commas(x.toFixed(digits)); };
  /* A whole number (a Number or a BigInt) with thousands separators. */
  K.count = function (n) { return commas(String(n)); };
  /* A size: "512 bytes", "128 KiB", "1.50 MiB", "12.5 GiB" (three significant digits from 1 KiB on). */
  K.bytes = function (n) {
    var big = BigInt(n);
    if (big < BigInt(1024)) return K.count(big) + (big === BigInt(1) ? " byte" : " bytes");
    var value = Number(big) / 1024, k = 0;  /* dividing by 1024 is exact, as in Python */
    while (value >= 1024 && k < UNITS.length - 1) { value /= 1024; k += 1; }
    var digits = value < 9.995 ? 2 : value < 99.95 ? 1 : 0;  /* what rounds to 10.0 gets one decimal */
    return K.fixed(value, digits) + " " + UNITS[k];
  };
})();
