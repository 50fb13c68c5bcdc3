// LayerLink dashboard: polls GET /api/state once a second and renders it. Names and other
// strings come from the network (mDNS, node info), so they are set as text, never as HTML.
"use strict";

const POLL_MS = 1000;
const HISTORY = 60;
const COLORS = ["#4dabf7", "#69db7c", "#ffa94d", "#da77f2", "#ffd43b", "#38d9a9", "#ff8787", "#a9e34b"];
const tpsHistory = [];
const nodeColor = new Map();

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function colorOf(name) {
  if (!nodeColor.has(name)) nodeColor.set(name, COLORS[nodeColor.size % COLORS.length]);
  return nodeColor.get(name);
}

function setText(id, value) { document.getElementById(id).textContent = value; }

function renderLive(live) {
  setText("tps", live.tokens_per_s.toFixed(1));
  setText("in-flight", live.in_flight);
  setText("queued", live.queued);
  setText("requests-total", live.requests_total);
  setText("tokens-total", live.completion_tokens_total);
  tpsHistory.push(live.tokens_per_s);
  if (tpsHistory.length > HISTORY) tpsHistory.shift();
  const c = document.getElementById("tps-chart");
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  // The newest point at the right edge; one point per poll, the last minute.
  const top = Math.max(1, ...tpsHistory);
  const step = c.width / (HISTORY - 1);
  const xy = tpsHistory.map((v, i) => [
    c.width - (tpsHistory.length - 1 - i) * step,
    c.height - 2 - (v / top) * (c.height - 14),
  ]);
  g.fillStyle = "rgba(77, 171, 247, 0.15)";
  g.beginPath();
  g.moveTo(xy[0][0], c.height);
  for (const [x, y] of xy) g.lineTo(x, y);
  g.lineTo(c.width, c.height);
  g.fill();
  g.strokeStyle = "#4dabf7";
  g.lineWidth = 2;
  g.beginPath();
  xy.forEach(([x, y], i) => (i === 0 ? g.moveTo(x, y) : g.lineTo(x, y)));
  g.stroke();
  g.fillStyle = "#8a96a3";
  g.font = "10px system-ui, sans-serif";
  g.fillText(`max ${top.toFixed(0)} tok/s, last ${HISTORY} s`, 2, 10);
}

function renderPlan(plan) {
  const bar = document.getElementById("plan-bar");
  bar.replaceChildren();
  if (!plan) {
    setText("plan-id", "no plan loaded");
    setText("plan-explanation", "");
    setText("tps-predicted", "");
    return;
  }
  setText("plan-id", `${plan.plan_id} · ${plan.num_layers} layers · ${plan.stages.length} stage(s)`);
  setText("plan-explanation", plan.explanation || "");
  const p = plan.predicted;
  setText("tps-predicted", p
    ? `predicted ${p.decode_tps.toFixed(1)} per stream, ${p.throughput_tps.toFixed(1)} in all`
    : "");
  for (const s of plan.stages) {
    const [a, b] = s.layers;
    const seg = el("div", {
      class: "plan-seg",
      "data-node": s.node,
      title: `stage ${s.index}: ${s.node} (${s.address}) layers [${a}, ${b})`,
      style: `flex: ${b - a} 1 0; background: ${colorOf(s.node)}`,
    }, `${s.node} [${a}, ${b})`);
    bar.append(seg);
  }
}

function renderReplicas(replicas, serving) {
  // Serving with replicas: one row per pipeline, with the router's view of it.
  const section = document.getElementById("replicas-section");
  section.hidden = !replicas;
  if (!replicas) return;
  setText("serving", serving
    ? `${serving.shape} · predicted ${serving.aggregate_tps.toFixed(1)} tok/s in all, ` +
      `${serving.per_request_tps.toFixed(1)} per request at ${serving.concurrency} in flight`
    : "");
  const body = document.getElementById("replicas");
  body.replaceChildren();
  for (const r of replicas) {
    const stages = r.stages.map((s) => `${s.node} [${s.layers[0]}, ${s.layers[1]})`).join(" + ");
    const state = r.fatal ? "dropped" : r.healthy ? "serving" : "recovering";
    body.append(el("tr", { class: r.healthy ? "" : "bad" },
      el("td", {}, r.replica),
      el("td", {}, stages),
      el("td", { title: r.fatal || "" }, state),
      el("td", {}, r.in_flight),
      el("td", {}, r.routed),
      el("td", {}, r.predicted_decode_tps == null ? "–" : r.predicted_decode_tps.toFixed(1)),
      el("td", {}, r.speed_correction.toFixed(2))));
  }
}

function renderNodes(nodes, plan) {
  const box = document.getElementById("nodes");
  box.replaceChildren();
  for (const n of nodes) {
    const card = el("div", {
      class: "node" + (n.reachable ? "" : " down"),
      "data-node": n.name,
      style: `border-left-color: ${colorOf(n.name)}`,
    });
    card.append(el("div", { class: "name" }, n.name));
    const meta = n.reachable
      ? `${n.address} · ${n.backend} · ${n.hostname} · rpc ${n.rpc_ms.toFixed(1)} ms`
      : `${n.address} · unreachable: ${n.error}`;
    card.append(el("div", { class: "meta" }, meta));
    for (const d of n.devices) {
      const used = d.mem_used_bytes, total = d.mem_total_bytes || 1;
      card.append(el("div", { class: "row" },
        el("span", {}, `${d.kind}:${d.index} ${d.name}${d.runs_stages ? " · stages" : ""}`),
        el("span", { title: d.mem_source ? `memory from ${d.mem_source}` : "" },
          `${bytes(used)} used · ${bytes(d.mem_free_bytes)} free`)));
      const bar = el("div", { class: "mem" }, el("div", { style: `width: ${(100 * used / total).toFixed(1)}%` }));
      card.append(bar);
    }
    card.append(el("div", { class: "row" }, el("span", {}, "MLX memory"), el("span", {}, bytes(n.mlx_active_bytes))));
    const mine = plan ? n.stages.filter((s) => s.plan_id === plan.plan_id) : [];
    for (const s of mine) {
      card.append(el("div", { class: "row" },
        el("span", {}, `layers [${s.layers[0]}, ${s.layers[1]})`),
        el("span", { class: "active" }, `${s.active_requests} active request(s)`)));
      if (s.decode_ms !== null && s.decode_ms !== undefined) {
        card.append(el("div", { class: "row" }, el("span", {}, "compute per token"),
          el("span", { class: "decode-ms" }, `${s.decode_ms.toFixed(1)} ms`)));
      }
    }
    box.append(card);
  }
}

function renderLinks(links) {
  const section = document.getElementById("links-section");
  if (!links || links.length === 0) { section.hidden = true; return; }
  section.hidden = false;
  const names = [...new Set(links.flatMap((l) => [l.src, l.dst]))].sort();
  const byPair = new Map(links.map((l) => [`${l.src}\u0000${l.dst}`, l]));
  // The probe marks its slowest links; without marks, the lowest bandwidth is the slowest.
  const minBw = Math.min(...links.map((l) => l.bandwidth_gbs));
  const marked = links.some((l) => l.slowest);
  const isSlowest = (l) => (marked ? l.slowest : l.bandwidth_gbs === minBw);
  const table = document.getElementById("links");
  table.replaceChildren();
  table.append(el("tr", {}, el("th", {}, "from \\ to"), ...names.map((n) => el("th", {}, n))));
  for (const src of names) {
    const row = el("tr", {}, el("th", {}, src));
    for (const dst of names) {
      const l = byPair.get(`${src}\u0000${dst}`);
      if (src === dst) row.append(el("td", { class: "self" }, "—"));
      else if (!l) row.append(el("td", {}, "?"));
      else row.append(el("td", { class: isSlowest(l) ? "slowest" : "" },
        `${l.latency_us.toFixed(0)} µs · ${l.bandwidth_gbs.toFixed(2)} GB/s${l.same_host ? " (same host)" : ""}`));
    }
    table.append(row);
  }
}

// Weight shipping: a bar per stage of the latest shipment (live while it runs).
function renderShipping(shipping) {
  const section = document.getElementById("weights-section");
  if (!shipping || shipping.stages.length === 0) { section.hidden = true; return; }
  section.hidden = false;
  setText("weights-status", shipping.error ? `failed: ${shipping.error}`
    : shipping.active ? "shipping…" : `plan ${shipping.plan_id}: shipped`);
  const box = document.getElementById("weights");
  box.replaceChildren();
  for (const s of shipping.stages) {
    const share = s.total_bytes ? Math.min(1, s.sent_bytes / s.total_bytes) : 1;
    let what;
    if (!s.done) what = `${bytes(s.sent_bytes)} of ${bytes(s.total_bytes)}`;
    else if (s.source === "own copy") what = "its own copy of the model: nothing sent";
    else if (!s.sent_bytes) what = "all in its cache: nothing sent";
    else what = `${bytes(s.sent_bytes)} in ${s.seconds.toFixed(1)} s (${s.gbs.toFixed(2)} GB/s)`;
    box.append(el("div", {}, s.label),
      el("div", { class: s.done ? "bar" : "bar active" },
        el("div", { style: `width:${(share * 100).toFixed(1)}%` })),
      el("div", { class: "what" }, what));
  }
}

function renderRecent(recent) {
  const body = document.getElementById("recent");
  body.replaceChildren();
  for (const r of recent) {
    body.append(el("tr", {},
      el("td", {}, new Date(r.finished_at * 1000).toLocaleTimeString()),
      el("td", {}, r.endpoint),
      el("td", {}, r.prompt_tokens),
      el("td", {}, r.completion_tokens),
      el("td", {}, r.queue_ms.toFixed(1)),
      el("td", {}, r.ttft_ms === null ? "–" : r.ttft_ms.toFixed(1)),
      el("td", {}, r.tokens_per_s.toFixed(1)),
      el("td", {}, r.finish_reason)));
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const res = await fetch("/api/state", { cache: "no-store" });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const state = await res.json();
    setText("model", state.model);
    renderLive(state.live);
    renderPlan(state.plan);
    renderReplicas(state.replicas, state.serving);
    setText("alerts", (state.alerts || []).join(" · "));
    renderShipping(state.shipping);
    renderNodes(state.nodes, state.plan);
    renderLinks(state.links);
    setText("probe-time", state.probe && state.probe.measured_at
      ? `at ${new Date(state.probe.measured_at * 1000).toLocaleTimeString()}` : "");
    renderRecent(state.recent);
    status.className = "status";
    status.textContent = `updated ${new Date(state.time * 1000).toLocaleTimeString()}`;
  } catch (err) {
    status.className = "status bad";
    status.textContent = `coordinator unreachable (${err.message})`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
