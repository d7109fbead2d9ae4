// The pages' only script (served from here; the CSP allows no other): the submit form shows the
// chosen method's options, and a job page follows the job live through its event stream. Everything it
// writes into the page goes in as text, never as markup.
"use strict";
(function () {
  var W = 600, H = 200, PAD = 24; // as api/web/view.py's chart box
  var TERMINAL = ["succeeded", "failed", "cancelled"];

  function methodOptions() {
    var pick = document.getElementById("f-method-name");
    if (!pick) return;
    function show() {
      document.querySelectorAll(".method-options").forEach(function (fs) {
        var on = fs.getAttribute("data-method") === pick.value;
        fs.hidden = !on;
        fs.disabled = !on;
      });
    }
    pick.addEventListener("change", show);
    show();
  }

  // view.chart_points: values scaled into the box, one x step per epoch, nulls skipped
  function points(values, lo, hi) {
    var span = (hi - lo) || 1, step = (W - 2 * PAD) / Math.max(values.length - 1, 1), out = [];
    values.forEach(function (v, i) {
      if (typeof v !== "number") return;
      out.push((PAD + i * step).toFixed(1) + "," + (H - PAD - (v - lo) / span * (H - 2 * PAD)).toFixed(1));
    });
    return (out.length === 1 ? out.concat(out) : out).join(" ");
  }

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el) el.textContent = text;
  }

  function live() {
    var box = document.getElementById("live");
    if (!box || box.getAttribute("data-ended") === "true" || !window.EventSource) return;
    var chart = document.getElementById("chart");
    var data = JSON.parse(chart.getAttribute("data-points") || "[]");
    var rows = document.getElementById("events");

    function redraw() {
      var loss = data.map(function (d) { return d[1]; });
      var top = Math.max.apply(null, loss.filter(function (v) { return typeof v === "number"; }).concat([-Infinity]));
      document.getElementById("chart-top1").setAttribute("points", points(data.map(function (d) { return d[0]; }), 0, 100));
      document.getElementById("chart-loss").setAttribute("points", points(loss, 0, isFinite(top) ? top : 1));
    }
    function addRow(seq, kind, json) {
      var tr = document.createElement("tr");
      [seq, kind, json].forEach(function (text, i) {
        var td = document.createElement("td");
        td.textContent = text;
        if (i) td.className = i === 2 ? "l mono" : "l";
        tr.appendChild(td);
      });
      rows.insertBefore(tr, rows.firstChild);
    }
    function setProgress(p) {
      document.getElementById("progress").value = p;
      setText("progress-text", Math.round(100 * p) + "%");
    }

    var es = new EventSource(box.getAttribute("data-events"));
    var handlers = {
      status: function (d) {
        var el = document.getElementById("status");
        el.textContent = d.status;
        el.className = "status " + d.status;
        if (TERMINAL.indexOf(d.status) >= 0) {
          es.close();
          if (d.status === "succeeded") setProgress(1);
          setTimeout(function () { window.location.reload(); }, 800); // the report and artifacts
        }
      },
      phase: function (d) { setText("phase", d.name); },
      progress: function (d) { setProgress(d.progress); },
      epoch: function (d) {
        setText("epoch-line", d.text || "");
        data.push([typeof d.top1 === "number" ? d.top1 : null, typeof d.train_loss === "number" ? d.train_loss : null]);
        redraw();
      },
      pruned: function () {},
      message: function () {},
      artifact: function () {}
    };
    Object.keys(handlers).forEach(function (kind) {
      es.addEventListener(kind, function (ev) {
        addRow(ev.lastEventId, kind, ev.data);
        handlers[kind](JSON.parse(ev.data));
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    methodOptions();
    live();
  });
})();
