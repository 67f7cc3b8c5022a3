// Progressive enhancement for the console (served as a file: the CSP allows no inline script).
// Overview: polls /console/api/overview and redraws the uPlot charts. Audit: a live tail that
// polls /console/api/audit with the page's filters. Pages work without it.
"use strict";
(function () {
  const PREFIX = "/console";
  const POLL_MS = 5000;

  function getJSON(path) {
    return fetch(PREFIX + path, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.json(); });
  }

  function text(tag, value) {
    const el = document.createElement(tag);
    el.textContent = value === null || value === undefined ? "" : String(value);
    return el;
  }

  // ---------------------------------------------------------------- overview charts
  const charts = {};
  function drawCharts(data) {
    if (typeof uPlot === "undefined") { return; }
    const servers = Object.keys(data.series).sort();
    document.querySelectorAll(".chart").forEach(function (box) {
      const metric = box.dataset.metric;
      const rows = [data.times];
      servers.forEach(function (s) { rows.push(data.series[s][metric]); });
      const key = box.id + ":" + servers.join(",");
      if (charts[box.id] && charts[box.id].key === key) {
        charts[box.id].plot.setData(rows);
        return;
      }
      if (charts[box.id]) { charts[box.id].plot.destroy(); }
      const palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"];
      const series = [{}].concat(servers.map(function (s, i) {
        return { label: s, stroke: palette[i % palette.length], width: 1.5 };
      }));
      const plot = new uPlot({ width: 420, height: 200, series: series, scales: { x: { time: true } } },
        rows, box);
      charts[box.id] = { key: key, plot: plot };
    });
  }

  function refreshOverview() {
    getJSON("/api/overview").then(function (data) {
      const ready = document.getElementById("envoy-ready");
      if (ready) {
        ready.textContent = data.envoy_ready ? "ready" : "not ready";
        ready.className = data.envoy_ready ? "ok" : "bad";
      }
      const body = document.querySelector("#components tbody");
      if (body && data.instances.length) {
        body.replaceChildren();
        data.instances.slice().sort(function (a, b) {
          return a.component.localeCompare(b.component) || a.address.localeCompare(b.address);
        }).forEach(function (i) {
          const tr = document.createElement("tr");
          tr.dataset.component = i.component;
          tr.append(text("td", i.component), text("td", i.address));
          const h = text("td", i.health);
          h.className = (i.health === "healthy" ? "ok" : "bad") + " health";
          tr.append(h);
          body.append(tr);
        });
      }
      const traffic = document.querySelector("#traffic tbody");
      if (traffic) {
        traffic.replaceChildren();
        Object.keys(data.current).sort().forEach(function (s) {
          const c = data.current[s];
          const tr = document.createElement("tr");
          tr.append(text("td", s), text("td", c.rps), text("td", c.error_pct),
            text("td", c.p50_ms === null ? "-" : c.p50_ms), text("td", c.p99_ms === null ? "-" : c.p99_ms));
          traffic.append(tr);
        });
      }
      const services = document.querySelector("#services tbody");
      if (services && data.services) {
        services.replaceChildren();
        data.services.forEach(function (s) {
          const tr = document.createElement("tr");
          tr.dataset.component = s.component;
          tr.append(text("td", s.component), text("td", s.url));
          const up = text("td", s.up ? "up" : "down: " + s.error);
          up.className = (s.up ? "ok" : "bad") + " scrape";
          const figures = Object.keys(s.rates).sort().map(function (k) {
            return k + " " + (s.rates[k] === null ? "-" : s.rates[k]);
          }).join(", ");
          const f = text("td", figures);
          f.className = "figures";
          tr.append(up, f, text("td", s.p50_ms === null ? "-" : s.p50_ms),
            text("td", s.p99_ms === null ? "-" : s.p99_ms));
          services.append(tr);
        });
      }
      drawCharts(data);
    }).catch(function () { /* the next poll tries again */ });
  }

  // ---------------------------------------------------------------- audit live tail
  let tailTimer = null;
  function refreshAudit() {
    const form = document.getElementById("audit-filters");
    const params = new URLSearchParams(new FormData(form));
    getJSON("/api/audit?" + params.toString()).then(function (data) {
      const body = document.querySelector("#audit tbody");
      body.replaceChildren();
      data.rows.forEach(function (r) {
        const tr = document.createElement("tr");
        tr.className = r.decision || "";
        [r.ts, r.sub === null ? "(sealed)" : r.sub, r.method, r.server, r.target, r.decision,
          r.reason, r.status, r.latency_ms, r.decision_id].forEach(function (v) { tr.append(text("td", v)); });
        body.append(tr);
      });
      const summary = document.getElementById("audit-summary");
      if (summary) { summary.textContent = data.rows.length + " row(s), " + data.scanned + " entries read (live)."; }
    }).catch(function () { /* the next poll tries again */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (document.getElementById("components")) {
      refreshOverview();
      setInterval(refreshOverview, POLL_MS);
    }
    const live = document.getElementById("live");
    if (live) {
      live.addEventListener("change", function () {
        if (live.checked) { refreshAudit(); tailTimer = setInterval(refreshAudit, POLL_MS); }
        else if (tailTimer !== null) { clearInterval(tailTimer); tailTimer = null; }
      });
    }
  });
})();
