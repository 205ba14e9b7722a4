// The gossip dashboard's page: polls /api/state and redraws, without reloading.
// Everything a peer controls (ids, addresses, messages) reaches the page through
// textContent and setAttribute only, never as markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const KEEP = 600; // history points kept per node and for the cluster, as on the server
  const nodes = new Map(); // node_id -> {info, hist: [[round, t, step, loss, accuracy], ...]}
  let series = []; // cluster points: {round, t, spread, exchanges_per_s, bytes_per_s, ...}
  let lastRound = 0;
  let intervalMs = 1000;

  function h(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function s(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }

  function clear(e) {
    while (e.firstChild) e.removeChild(e.firstChild);
  }

  function clock(t) {
    const d = new Date(t * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return p(d.getHours()) + ":" + p(d.getMinutes()) + ":" + p(d.getSeconds());
  }

  function num(v, digits) {
    if (v === null || v === undefined) return "–";
    return Number(v).toFixed(digits);
  }

  function bytes(v) {
    if (v === null || v === undefined) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let i = 0;
    while (Math.abs(v) >= 1000 && i < units.length - 1) {
      v /= 1000;
      i++;
    }
    return v.toFixed(v < 10 && i > 0 ? 2 : 0) + " " + units[i];
  }

  function short(id) {
    return id.length > 12 ? id.slice(0, 11) + "…" : id;
  }

  // One colour per node for its curves, fixed by its place in the (rank, id) order.
  function nodeColour(i) {
    return "hsl(" + ((i * 137.508) % 360).toFixed(1) + ", 65%, 42%)";
  }

  // --- merging what the server sent ---------------------------------------------------------

  function merge(st) {
    if (st.round < lastRound) {
      nodes.clear(); // the dashboard restarted: start over
      series = [];
    }
    for (const n of st.nodes) {
      let entry = nodes.get(n.node_id);
      if (!entry) {
        entry = { info: n, hist: [] };
        nodes.set(n.node_id, entry);
      }
      entry.info = n;
      for (const p of n.history) entry.hist.push(p);
      if (entry.hist.length > KEEP) entry.hist.splice(0, entry.hist.length - KEEP);
    }
    for (const p of st.series) series.push(p);
    if (series.length > KEEP) series.splice(0, series.length - KEEP);
    lastRound = st.round;
    if (typeof st.interval === "number" && st.interval > 0) intervalMs = Math.max(250, st.interval * 1000);
  }

  // --- the graph -----------------------------------------------------------------------------

  function fillFor(info, colourBy, maxStep) {
    if (colourBy === "accuracy") {
      const a = info.eval_accuracy;
      if (a === null || a === undefined) return "hsl(210, 15%, 85%)";
      const clamped = Math.min(1, Math.max(0, a));
      return "hsl(" + (120 * clamped).toFixed(0) + ", 65%, 46%)";
    }
    const frac = maxStep > 0 ? (info.step || 0) / maxStep : 0;
    return "hsl(210, 70%, " + (85 - 45 * frac).toFixed(0) + "%)";
  }

  function drawGraph(st) {
    const svg = document.getElementById("graph");
    clear(svg);
    const at = new Map(st.nodes.map((n) => [n.node_id, n]));
    const edges = s("g", { class: "edges" });
    for (const e of st.edges) {
      const a = at.get(e.a);
      const b = at.get(e.b);
      if (!a || !b) continue;
      const cls = e.lit ? "lit" : e.current ? "" : "stale";
      const line = s("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: cls });
      line.dataset.a = e.a;
      line.dataset.b = e.b;
      edges.appendChild(line);
    }
    svg.appendChild(edges);
    const maxStep = Math.max(0, ...st.nodes.map((n) => n.step || 0));
    const r = Math.max(0.025, Math.min(0.08, 0.9 / Math.max(1, st.nodes.length)));
    for (const n of st.nodes) {
      const g = s("g", { class: n.reachable ? "node" : "node unreachable" });
      g.dataset.nodeId = n.node_id;
      g.appendChild(s("title", {}, n.node_id + " at " + n.address + " (" + n.state + ")"));
      g.appendChild(s("circle", { cx: n.x, cy: n.y, r: r, fill: fillFor(n, st.color_by, maxStep) }));
      // Labels outside the circle, anchored away from it on the left and right.
      const out = 1 + r + 0.08;
      const anchor = n.x < -0.3 ? "end" : n.x > 0.3 ? "start" : "middle";
      const lx = n.x * out;
      const ly = n.y * out + (anchor === "middle" ? (n.y < 0 ? -0.08 : 0.03) : -0.01);
      g.appendChild(s("text", { x: lx, y: ly, "text-anchor": anchor }, short(n.node_id)));
      const value =
        st.color_by === "accuracy" && n.eval_accuracy !== null && n.eval_accuracy !== undefined
          ? (100 * n.eval_accuracy).toFixed(1) + " %"
          : "step " + (n.step === undefined ? "–" : n.step);
      g.appendChild(s("text", { x: lx, y: ly + 0.08, "text-anchor": anchor, class: "value" }, value));
      svg.appendChild(g);
    }
    const legend = document.getElementById("color-legend");
    clear(legend);
    if (st.color_by === "accuracy") {
      legend.appendChild(document.createTextNode("colour: accuracy 0"));
      legend.appendChild(h("span", { class: "gradient accuracy" }));
      legend.appendChild(document.createTextNode("100 %"));
    } else {
      legend.appendChild(document.createTextNode("colour: step 0"));
      legend.appendChild(h("span", { class: "gradient step" }));
      legend.appendChild(document.createTextNode("furthest node"));
    }
  }

  // --- charts --------------------------------------------------------------------------------

  // lines: [{id, colour, grey, pts: [[t, v], ...]}]; draws each as a polyline in the svg's viewBox.
  function drawChart(svg, lines, opts) {
    clear(svg);
    const box = svg.viewBox.baseVal;
    const W = box.width;
    const H = box.height;
    const left = 44;
    const pad = 8;
    const tr = opts.log ? (v) => (v > 0 ? Math.log10(v) : null) : (v) => v;
    let t0 = Infinity;
    let t1 = -Infinity;
    let lo = Infinity;
    let hi = -Infinity;
    for (const l of lines) {
      for (const [t, v] of l.pts) {
        const y = v === null || v === undefined ? null : tr(v);
        if (y === null || !isFinite(y)) continue;
        t0 = Math.min(t0, t);
        t1 = Math.max(t1, t);
        lo = Math.min(lo, y);
        hi = Math.max(hi, y);
      }
    }
    svg.appendChild(s("line", { x1: left, y1: H - pad, x2: W, y2: H - pad, class: "axis" }));
    svg.appendChild(s("line", { x1: left, y1: pad, x2: left, y2: H - pad, class: "axis" }));
    if (!isFinite(t0)) {
      svg.appendChild(s("text", { x: left + 8, y: H / 2 }, opts.empty || "no data yet"));
      return;
    }
    if (hi - lo < 1e-12) {
      hi += 0.5 * (Math.abs(hi) || 1);
      lo -= 0.5 * (Math.abs(lo) || 1);
    }
    const span = Math.max(t1 - t0, 1e-9);
    const X = (t) => left + ((t - t0) / span) * (W - left - pad);
    const Y = (y) => pad + (1 - (y - lo) / (hi - lo)) * (H - 2 * pad);
    const label = (y) => opts.format(opts.log ? Math.pow(10, y) : y);
    svg.appendChild(s("text", { x: 2, y: pad + 8 }, label(hi)));
    svg.appendChild(s("text", { x: 2, y: H - pad }, label(lo)));
    svg.appendChild(s("text", { x: W - 70, y: H - pad - 3 }, "last " + Math.round(span) + " s"));
    for (const l of lines) {
      const pts = [];
      for (const [t, v] of l.pts) {
        const y = v === null || v === undefined ? null : tr(v);
        if (y === null || !isFinite(y)) continue;
        pts.push(X(t).toFixed(1) + "," + Y(y).toFixed(1));
      }
      if (!pts.length) continue;
      const pl = s("polyline", { points: pts.join(" "), stroke: l.colour });
      if (l.grey) pl.classList.add("unreachable");
      if (l.id !== undefined) pl.dataset.nodeId = l.id;
      pl.appendChild(s("title", {}, l.id === undefined ? "" : l.id));
      svg.appendChild(pl);
    }
  }

  function nodeLines(order, field) {
    return order.map((entry, i) => ({
      id: entry.info.node_id,
      colour: nodeColour(i),
      grey: !entry.info.reachable,
      pts: entry.hist.map((p) => [p[1], p[field]]),
    }));
  }

  // --- tables and lists ----------------------------------------------------------------------

  function drawTable(order) {
    const body = document.querySelector("#nodes tbody");
    clear(body);
    order.forEach((entry, i) => {
      const n = entry.info;
      const tr = h("tr", { class: n.reachable ? "" : "unreachable" });
      tr.dataset.nodeId = n.node_id;
      const cell = (field, text) => {
        const td = h("td", {}, text);
        td.dataset.field = field;
        tr.appendChild(td);
        return td;
      };
      const first = cell("node_id", "");
      const dot = h("span", { class: "dot" });
      dot.style.background = nodeColour(i);
      first.appendChild(dot);
      first.appendChild(document.createTextNode(n.node_id));
      cell("address", n.address);
      cell("state", n.state + (n.reachable ? "" : ", not answering"));
      cell("step", n.step === undefined ? "–" : n.step);
      cell("epoch", num(n.epoch, 2));
      cell("loss", num(n.train_loss === null || n.train_loss === undefined ? n.eval_loss : n.train_loss, 4));
      cell(
        "accuracy",
        n.eval_accuracy === null || n.eval_accuracy === undefined ? "–" : (100 * n.eval_accuracy).toFixed(2) + " %",
      );
      cell(
        "exchanges",
        n.exchanges_ok === undefined ? "–" : n.exchanges_ok + " / " + n.exchanges_served + " / " + n.exchanges_failed,
      );
      cell("bytes_out", n.bytes_out === undefined ? "–" : bytes(n.bytes_out));
      cell("rtt", n.rtt_ms === undefined ? "–" : num(n.rtt_ms, 1) + " ms");
      cell("shards", n.store ? n.store.shards_held : "–");
      cell("under_replicated", n.store ? n.store.under_replicated : "–");
      const why = n.error || (n.resting ? "resting" : n.training ? "training" : n.phase || "");
      const note = cell("note", why.length > 60 ? why.slice(0, 59) + "…" : why);
      note.classList.add("note");
      note.title = why;
      body.appendChild(tr);
    });
  }

  const EVENT_CLASS = {
    suspect: "suspect",
    "declared dead": "dead",
    "stopped answering the dashboard": "silent",
    rejoined: "back",
    "answers again": "back",
    "no longer suspect": "back",
  };

  function drawEvents(events) {
    const list = document.getElementById("events");
    clear(list);
    if (!events.length) list.appendChild(h("li", {}, "no membership changes since the dashboard started"));
    for (const e of events.slice().reverse()) {
      const li = h("li", { class: EVENT_CLASS[e.what] || "" }, clock(e.t) + "  node " + e.node_id + " " + e.what);
      li.dataset.nodeId = e.node_id;
      li.dataset.what = e.what;
      list.appendChild(li);
    }
  }

  function drawStore(store) {
    const dl = document.getElementById("store");
    clear(dl);
    const row = (k, v) => {
      dl.appendChild(h("dt", {}, k));
      dl.appendChild(h("dd", {}, v));
    };
    if (!store) {
      row("store", "no node reports a shard store");
      return;
    }
    const latest = store.versions.slice(0, 5).map((v) => "v" + v);
    row("versions known", store.version_count + (latest.length ? " (" + latest.join(", ") + ")" : ""));
    row("under-replicated shards", store.under_replicated);
    row("shards held, all nodes", store.shards_held + " (" + bytes(store.bytes_held) + ")");
    row("nodes with a store", store.nodes);
  }

  // --- one refresh ---------------------------------------------------------------------------

  function render(st) {
    const order = st.nodes.map((n) => nodes.get(n.node_id));
    const answering = st.nodes.filter((n) => n.reachable).length;
    const last = series.length ? series[series.length - 1] : null;
    document.getElementById("summary").textContent =
      "through " +
      st.seed +
      " · " +
      answering +
      " of " +
      st.nodes.length +
      " nodes answering · round " +
      st.round +
      (last ? " · poll " + (1000 * last.round_seconds).toFixed(0) + " ms" : "") +
      (st.time ? " · " + clock(st.time) : "");
    document.body.dataset.round = st.round;
    drawGraph(st);
    drawChart(document.getElementById("chart-loss"), nodeLines(order, 3), {
      format: (v) => v.toPrecision(3),
      empty: "no loss reported yet",
    });
    drawChart(document.getElementById("chart-accuracy"), nodeLines(order, 4), {
      format: (v) => (100 * v).toFixed(1) + "%",
      empty: "no evaluation reported yet",
    });
    drawChart(document.getElementById("chart-step"), nodeLines(order, 2), { format: (v) => v.toFixed(0) });
    document.getElementById("exchanges-rate").textContent = last ? num(last.exchanges_per_s, 1) : "–";
    document.getElementById("bytes-rate").textContent = last ? bytes(last.bytes_per_s) : "–";
    drawChart(
      document.getElementById("chart-throughput"),
      [{ colour: "hsl(28, 90%, 48%)", pts: series.map((p) => [p.t, p.exchanges_per_s]) }],
      { format: (v) => v.toFixed(1) + "/s" },
    );
    document.getElementById("spread").textContent = last && last.spread !== null ? last.spread.toExponential(3) : "–";
    drawChart(
      document.getElementById("chart-spread"),
      [{ colour: "hsl(265, 60%, 50%)", pts: series.map((p) => [p.t, p.spread]) }],
      { format: (v) => v.toExponential(1), log: true, empty: "needs two nodes that report a sample" },
    );
    document.getElementById("spread-method").textContent = "Estimate (log scale): " + st.spread_method + ".";
    drawStore(st.store);
    drawEvents(st.events);
    drawTable(order);
  }

  function setLink(ok, why) {
    const pill = document.getElementById("link");
    pill.className = ok ? "pill ok" : "pill down";
    pill.textContent = ok ? "live" : "dashboard not answering";
    pill.title = ok ? "" : String(why);
  }

  async function poll() {
    try {
      const res = await fetch("api/state?since=" + lastRound, { cache: "no-store" });
      if (!res.ok) throw new Error("HTTP " + res.status);
      const st = await res.json();
      merge(st);
      render(st);
      setLink(true);
    } catch (err) {
      setLink(false, err);
    }
    setTimeout(poll, intervalMs);
  }

  poll();
})();
