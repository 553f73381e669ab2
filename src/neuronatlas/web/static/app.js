// NeuronAtlas viewer: small progressive enhancements, the pages work without it.
(function () {
  "use strict";
  document.addEventListener("keydown", function (ev) {
    var tag = (ev.target && ev.target.tagName) || "";
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "/") {                       // focus the search box
      var q = document.getElementById("q");
      if (q) { ev.preventDefault(); q.focus(); q.select(); }
    } else if (ev.key === "[" || ev.key === "]") {   // previous / next neuron or page
      var sel = ev.key === "[" ? ".neighbours a.prev, .pager a[rel=prev]" : ".neighbours a.next, .pager a[rel=next]";
      var a = document.querySelector(sel);
      if (a) { window.location.href = a.getAttribute("href"); }
    }
  });
  // Clicking a coloured token shows its text and activation in a small status box.
  document.addEventListener("click", function (ev) {
    var t = ev.target;
    if (!t || !t.classList || !t.classList.contains("t") || !t.title) return;
    var old = document.querySelector(".toks .t.picked");
    if (old) old.classList.remove("picked");
    t.classList.add("picked");
    var box = document.getElementById("picked");
    if (!box) {
      box = document.createElement("div");
      box.id = "picked";
      box.setAttribute("role", "status");
      document.body.appendChild(box);
    }
    box.textContent = JSON.stringify(t.textContent) + " activation " + t.title;
  });
})();
