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
  // The "try your own text" box (only on servers started with --model): per-token activations.
  var live = document.getElementById("live");
  if (live) {
    var textBox = document.getElementById("live-text"), btn = document.getElementById("live-run"),
        out = document.getElementById("live-out");
    var colour = function (v, scale) {            // the same colouring as the exemplars (render.act_style)
      if (!isFinite(v) || !(scale > 0)) return "";
      var a = Math.min(1, Math.abs(v) / scale);
      if (a < 0.02) return "";
      return "rgba(" + (v > 0 ? "255,122,0" : "40,110,255") + "," + (0.08 + 0.77 * a).toFixed(2) + ")";
    };
    var show = function (d) {
      out.textContent = "";
      out.className = "out";
      var scale = 0, best = 0;
      d.acts.forEach(function (a, i) { if (Math.abs(a) > scale) { scale = Math.abs(a); best = i; } });
      var box = document.createElement("span");
      box.className = "toks";
      d.display.forEach(function (t, i) {
        var s = document.createElement("span");
        s.className = "t";
        s.textContent = t;
        s.title = Number(d.acts[i]).toPrecision(4);
        s.setAttribute("data-act", String(d.acts[i]));
        var bg = colour(d.acts[i], scale);
        if (bg) s.style.backgroundColor = bg;
        box.appendChild(s);
      });
      out.appendChild(box);
      var note = document.createElement("p");
      note.className = "muted small";
      note.textContent = d.acts.length + " tokens at site " + d.site + "; largest |activation| " +
        (d.acts.length ? Number(d.acts[best]).toPrecision(4) + " on " + JSON.stringify(d.display[best]) : "—") +
        (d.truncated ? " (text cut to the first " + d.acts.length + " tokens)" : "");
      out.appendChild(note);
    };
    var run = function () {
      if (btn.disabled) return;
      btn.disabled = true;
      out.className = "out muted";
      out.textContent = "running…";
      fetch(live.getAttribute("data-url"), {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify({text: textBox.value})})
        .then(function (r) { return r.json().then(function (d) { return {ok: r.ok, d: d}; }); })
        .then(function (res) {
          if (res.ok) { show(res.d); } else { out.className = "out err"; out.textContent = res.d.error || "error"; }
        })
        .catch(function (e) { out.className = "out err"; out.textContent = "request failed: " + e; })
        .then(function () { btn.disabled = false; });
    };
    btn.addEventListener("click", run);
    textBox.addEventListener("keydown", function (ev) { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) run(); });
  }
})();
