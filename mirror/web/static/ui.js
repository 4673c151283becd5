// registry-mirror operator page: chart window switch, evict confirmation, optional auto-refresh.
// No framework, no external request: everything it needs is already in the page.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var buttons = document.querySelectorAll(".switch button[data-window]");
    buttons.forEach(function (button) {
      button.addEventListener("click", function () {
        buttons.forEach(function (b) { b.classList.toggle("on", b === button); });
        document.querySelectorAll(".charts[data-window]").forEach(function (c) {
          c.hidden = c.getAttribute("data-window") !== button.getAttribute("data-window");
        });
      });
    });
    document.querySelectorAll("button[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function (event) {
        if (!window.confirm(button.getAttribute("data-confirm"))) { event.preventDefault(); }
      });
    });
    var auto = document.getElementById("auto-refresh");
    if (auto) {
      var key = "registry-mirror-auto-refresh";
      auto.checked = window.localStorage && localStorage.getItem(key) === "1";
      auto.addEventListener("change", function () {
        if (window.localStorage) { localStorage.setItem(key, auto.checked ? "1" : "0"); }
        if (auto.checked) { window.location.reload(); }
      });
      if (auto.checked) { window.setTimeout(function () { window.location.reload(); }, 10000); }
    }
  });
})();
