// The swarm health page: draws the view served at api/v1/state, then fetches it again every refresh period.
// Every value from the swarm enters the document as a text node or an attribute value, never as markup.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const STATUS_ORDER = ["online", "unreachable", "joining", "offline"];

  // ---- small DOM helpers ----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    appendAll(node, children);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
  }

  function appendAll(node, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    }
  }

  function tooltip(text) {
    return svg("title", {}, text);
  }

  // ---- number and time formats ----

  function num(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (digits === undefined) digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
    return Number(value).toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }

  function count(value) {
    return value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US");
  }

  function ms(seconds) {
    return seconds === null || seconds === undefined ? "–" : num(seconds * 1000, seconds < 0.01 ? 1 : 0) + " ms";
  }

  function clock(unixSeconds) {
    const d = new Date(unixSeconds * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function rangesText(ranges) {
    return ranges.map(([a, b]) => (b - a === 1 ? String(a) : `${a}:${b}`)).join(", ");
  }

  function shorten(text, length) {
    return text.length > length ? text.slice(0, length - 1) + "…" : text;
  }

  function serverLabel(server) {
    return server.public_name ? `${shorten(server.public_name, 40)} (${server.short_id})` : server.short_id;
  }

  // ---- the page ----

  function render(state) {
    renderSummary(state);
    renderErrors(state.errors || []);
    const index = document.getElementById("model-index");
    const main = document.getElementById("models");
    index.replaceChildren(...state.models.map((m) =>
      el("a", { href: `#model-${encodeURIComponent(m.dht_prefix)}` }, m.dht_prefix, " ",
        el("span", { class: `badge ${m.healthy ? "healthy" : "broken"}` }, m.healthy ? "healthy" : "broken"))));
    if (!state.models.length) {
      main.replaceChildren(el("p", { class: "empty" },
        state.ready ? "No models found in the swarm." : "Reading the swarm for the first time…"));
      return;
    }
    main.replaceChildren(...state.models.map((m) => renderModel(m, state.history)));
  }

  function renderSummary(state) {
    const summary = document.getElementById("summary");
    if (!state.ready) {
      summary.replaceChildren("Reading the swarm…");
      return;
    }
    const s = state.summary;
    const by = s.servers_by_status;
    const parts = [
      [el("b", {}, count(s.models)), " models"],
      [el("b", {}, count(s.healthy_models)), " healthy"],
      [el("b", {}, count(by.online)), " servers online"],
    ];
    if (by.unreachable) parts.push([el("b", {}, count(by.unreachable)), " unreachable"]);
    if (by.joining) parts.push([el("b", {}, count(by.joining)), " joining"]);
    parts.push([`updated ${clock(state.generated_at)} (read in ${num(state.read_seconds, 1)} s), every ${num(state.refresh_period, 0)} s`]);
    const nodes = [];
    parts.forEach((p, i) => { if (i) nodes.push(" · "); nodes.push(...p); });
    summary.replaceChildren(...nodes);
  }

  function renderErrors(errors) {
    document.getElementById("errors").replaceChildren(...errors.map((e) => el("p", {}, e)));
  }

  function renderModel(model, history) {
    const facts = [
      el("b", {}, count(model.num_blocks)), " blocks · ",
      el("b", {}, count(model.online_servers)), " online servers · bottleneck ",
      el("b", { class: "bottleneck" }, num(model.bottleneck_throughput)), " tokens/s",
    ];
    if (model.uncovered_blocks.length) {
      facts.push(" · ", el("span", { class: "bad uncovered-text" },
        `uncovered blocks: ${rangesText(model.uncovered_ranges)}`));
    }
    const named = model.name && model.name !== model.dht_prefix;
    return el("section", {
      class: "model", id: `model-${encodeURIComponent(model.dht_prefix)}`,
      "data-prefix": model.dht_prefix, "data-healthy": model.healthy,
    },
      el("h2", {}, el("span", { class: "model-name" }, model.dht_prefix),
        named ? el("span", { class: "prefix" }, model.name) : null,
        el("span", { class: `badge verdict ${model.healthy ? "healthy" : "broken"}` }, model.healthy ? "HEALTHY" : "BROKEN")),
      el("p", { class: "facts" }, facts),
      el("h3", {}, "Block coverage"),
      el("div", { class: "scroll" }, coverageMap(model)),
      el("div", { class: "legend" },
        el("span", { class: "online" }, "online"), el("span", { class: "joining" }, "joining"),
        el("span", { class: "unreachable" }, "unreachable"), el("span", { class: "offline" }, "offline"),
        el("span", { class: "thin" }, "one server"), el("span", { class: "uncovered" }, "no server"),
        el("span", { class: "throughput" }, "tokens/s per block")),
      el("h3", {}, "Servers"),
      el("div", { class: "scroll" }, serversTable(model)),
      el("h3", {}, "Bottleneck throughput and online servers over time"),
      el("div", { class: "scroll" }, historyChart(model.dht_prefix, history)));
  }

  // ---- coverage map: blocks along x; a row of per-block counts, a row of throughput bars, then spans ----

  function packLanes(servers) {
    // each server on the first lane where it overlaps nothing; online spans first, so they sit on top
    const sorted = [...servers].sort((a, b) =>
      STATUS_ORDER.indexOf(a.status) - STATUS_ORDER.indexOf(b.status) || a.start_block - b.start_block);
    const laneEnds = [];
    return sorted.map((server) => {
      let lane = laneEnds.findIndex((end) => end <= server.start_block);
      if (lane < 0) { lane = laneEnds.length; laneEnds.push(0); }
      laneEnds[lane] = server.end_block;
      return [server, lane];
    });
  }

  function coverageMap(model) {
    const n = model.num_blocks;
    const cell = Math.max(8, Math.min(44, Math.floor(1000 / Math.max(n, 1))));
    const left = 92, top = 18, rowH = 22, barH = 34, laneH = 22;
    // a record may claim a span beyond the model's blocks: draw only the part inside them
    const clipped = model.servers.map((s) => ({ ...s, start_block: Math.min(s.start_block, n),
      end_block: Math.min(s.end_block, n), span_text: `${s.start_block}:${s.end_block}` }));
    const placed = packLanes(clipped.filter((s) => s.end_block > s.start_block));
    const lanes = placed.reduce((m, [, lane]) => Math.max(m, lane + 1), 0);
    const spansTop = top + rowH + barH + 10;
    const height = spansTop + Math.max(lanes, 1) * laneH + 6;
    const width = left + n * cell + 8;
    const x = (block) => left + block * cell;
    const maxTp = Math.max(...model.blocks.map((b) => b.throughput), 1e-9);
    const labelEvery = cell >= 22 ? 1 : Math.ceil(22 / cell) <= 5 ? 5 : 10;

    const root = svg("svg", { class: "coverage", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": `block coverage of ${model.dht_prefix}` });
    root.appendChild(svg("text", { x: 0, y: top + rowH - 7, class: "row-label" }, "servers"));
    root.appendChild(svg("text", { x: 0, y: top + rowH + barH - 4, class: "row-label" }, "tokens/s"));
    root.appendChild(svg("text", { x: 0, y: spansTop + 15, class: "row-label" }, "spans"));

    for (const range of model.uncovered_ranges) {
      const [a, b] = range;
      root.appendChild(svg("rect", { class: "gap", x: x(a), y: top, width: (b - a) * cell, height: height - top,
        "data-start": a, "data-end": b }, tooltip(`no server for blocks ${rangesText([range])}`)));
    }
    for (const block of model.blocks) {
      const i = block.index;
      if (i % labelEvery === 0 || i === n - 1) {
        root.appendChild(svg("text", { x: x(i) + cell / 2, y: top - 5, class: "axis-label", "text-anchor": "middle" }, i));
      }
      const level = block.servers === 0 ? "uncovered" : block.servers === 1 ? "thin" : "covered";
      const text = `block ${i}: ${block.servers} online servers, ${num(block.throughput)} tokens/s` +
        (block.joining ? `, ${block.joining} joining` : "");
      root.appendChild(svg("rect", { class: `block-cell ${level}`, x: x(i), y: top, width: cell, height: rowH - 2,
        "data-block": i, "data-servers": block.servers, "data-throughput": block.throughput }, tooltip(text)));
      if (cell >= 14) {
        root.appendChild(svg("text", { class: "cell-count", x: x(i) + cell / 2, y: top + rowH - 7 }, block.servers));
      }
      const h = block.throughput > 0 ? Math.max(2, (barH - 6) * block.throughput / maxTp) : 0;
      root.appendChild(svg("rect", { class: "tp-bar", x: x(i) + 2, y: top + rowH + barH - 2 - h,
        width: Math.max(cell - 4, 1), height: h }, tooltip(text)));
    }
    root.appendChild(svg("text", { x: left - 4, y: top + rowH + 10, class: "axis-label", "text-anchor": "end" },
      num(maxTp > 1e-9 ? maxTp : 0)));
    for (const range of model.uncovered_ranges) {
      const [a, b] = range;
      root.appendChild(svg("text", { class: "gap-label", x: x(a) + (b - a) * cell / 2, y: spansTop + 15 }, "gap"));
    }
    for (const [server, lane] of placed) {
      const y = spansTop + lane * laneH;
      const w = (server.end_block - server.start_block) * cell;
      const label = serverLabel(server);
      const fits = Math.floor((w - 8) / 6.5);
      const g = svg("g", { class: `span status-${server.status}`, "data-peer-id": server.peer_id,
        "data-span": server.span_text, "data-status": server.status },
        svg("rect", { x: x(server.start_block), y, width: w, height: laneH - 3 }),
        tooltip(`${label}: blocks ${server.span_text}, ${server.status}, ` +
          `${num(server.throughput)} tokens/s`));
      if (fits >= 3) {
        g.appendChild(svg("text", { x: x(server.start_block) + 4, y: y + laneH - 8 },
          shorten(label, fits)));
      }
      root.appendChild(g);
    }
    return root;
  }

  // ---- servers table ----

  function serversTable(model) {
    if (!model.servers.length) return el("p", { class: "empty" }, "No server has announced blocks of this model.");
    const columns = [
      ["Server", ""], ["Span", ""], ["State", ""], ["rpc_info", "num"], ["Throughput", "num"],
      ["Inference steps/s", "num"], ["Forward tokens/s", "num"], ["Free cache", "num"], ["Sessions", "num"],
      ["Load", "num"], ["Version", ""], ["Dtype", ""], ["Quant", ""], ["Adapters", ""], ["Pings to next", ""],
    ];
    const head = el("tr", {}, columns.map(([name, cls]) => el("th", { class: cls || null }, name)));
    const rows = model.servers.map((s) => {
      const state = s.status === "unreachable" ? "unreachable" : s.status;
      const pings = Object.entries(s.next_pings).sort((a, b) => a[1] - b[1])
        .map(([peer, rtt]) => `${peer.slice(-6)} ${ms(rtt)}`).join(", ");
      const reach = s.reachable === null ? "–" : s.reachable ? ms(s.rpc_rtt) : "no answer";
      return el("tr", { "data-peer-id": s.peer_id, "data-status": s.status },
        el("td", {}, el("span", { class: "peer", title: s.peer_id }, s.short_id),
          s.public_name ? el("span", { class: "name public-name", title: s.public_name }, shorten(s.public_name, 40)) : null,
          s.using_relay ? el("span", { class: "relayed", title: "behind NAT: clients reach it through a relay" }, "relayed") : null),
        el("td", { class: "span-text" }, `${s.start_block}:${s.end_block}`),
        el("td", {}, el("span", { class: `status ${state}`, title: s.error || null }, state)),
        el("td", { class: "num", title: s.error || null }, reach),
        el("td", { class: "num throughput" }, num(s.throughput)),
        el("td", { class: "num" }, num(s.inference_rps)),
        el("td", { class: "num" }, num(s.forward_rps)),
        el("td", { class: "num" }, count(s.cache_tokens_left)),
        el("td", { class: "num" }, count(s.open_sessions)),
        el("td", { class: "num" }, `${num(s.load * 100, 0)}%`),
        el("td", {}, s.version || "–"),
        el("td", {}, s.torch_dtype),
        el("td", {}, s.quant_type),
        el("td", {}, s.adapters.length ? s.adapters.join(", ") : "–"),
        el("td", { class: "pings" }, pings || "–"));
    });
    return el("table", { class: "servers" }, el("thead", {}, head), el("tbody", {}, rows));
  }

  // ---- history chart: bottleneck throughput (left axis) and online servers (right axis) ----

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 4, 8, 10]) if (value <= step * magnitude) return step * magnitude;  // quarters stay round
    return 10 * magnitude;
  }

  function historyChart(prefix, history) {
    const columns = history && history.models[prefix];
    const times = history ? history.time : [];
    const width = 760, height = 200, left = 56, right = 44, top = 22, bottom = 26;
    const root = svg("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": `history of ${prefix}` });
    if (!columns || times.length === 0) {
      root.appendChild(svg("text", { x: left, y: height / 2, class: "axis-label" }, "Collecting history…"));
      return root;
    }
    const tp = columns.bottleneck_throughput, sv = columns.online_servers;
    const t0 = times[0], t1 = Math.max(times[times.length - 1], t0 + 1);
    const tpMax = niceMax(Math.max(0, ...tp.filter((v) => v !== null)));
    const svMax = 4 * Math.max(1, Math.ceil(Math.max(0, ...sv.filter((v) => v !== null)) / 4));  // integer ticks
    const px = (t) => left + (width - left - right) * (t - t0) / (t1 - t0);
    const pyTp = (v) => top + (height - top - bottom) * (1 - v / tpMax);
    const pySv = (v) => top + (height - top - bottom) * (1 - v / svMax);

    for (let k = 0; k <= 4; k++) {
      const y = top + (height - top - bottom) * k / 4;
      root.appendChild(svg("line", { class: "grid", x1: left, x2: width - right, y1: y, y2: y }));
      root.appendChild(svg("text", { class: "axis-label", x: left - 6, y: y + 4, "text-anchor": "end" },
        num(tpMax * (1 - k / 4))));
      root.appendChild(svg("text", { class: "axis-label", x: width - right + 6, y: y + 4 }, count(svMax * (1 - k / 4))));
    }
    for (let k = 0; k <= 4; k++) {
      const t = t0 + (t1 - t0) * k / 4;
      root.appendChild(svg("text", { class: "axis-label", x: px(t), y: height - 8,
        "text-anchor": k === 0 ? "start" : k === 4 ? "end" : "middle" }, clock(t)));
    }
    root.appendChild(svg("text", { class: "axis-label", x: 2, y: top - 12 }, "tokens/s"));
    root.appendChild(svg("text", { class: "axis-label", x: width - 2, y: top - 12, "text-anchor": "end" }, "servers"));

    function line(values, py, cls, stepped) {
      // a null (the model was missing from a read) breaks the line
      const segments = [];
      let current = [];
      values.forEach((v, i) => {
        if (v === null) { if (current.length) segments.push(current); current = []; return; }
        if (stepped && current.length) current.push(`${px(times[i]).toFixed(1)},${current[current.length - 1].split(",")[1]}`);
        current.push(`${px(times[i]).toFixed(1)},${py(v).toFixed(1)}`);
      });
      if (current.length) segments.push(current);
      for (const points of segments) {
        if (points.length === 1) {
          const [cx, cy] = points[0].split(",");
          root.appendChild(svg("circle", { class: cls.replace("line", "dot"), cx, cy, r: 3 }));
        } else {
          root.appendChild(svg("polyline", { class: cls, points: points.join(" ") }));
        }
      }
    }
    line(tp, pyTp, "line-throughput", false);
    line(sv, pySv, "line-servers", true);
    const last = tp.length - 1;
    const wrap = el("div", {}, root, el("div", { class: "legend" },
      el("span", { class: "line-tp" }, `bottleneck throughput (now ${num(tp[last])} tokens/s)`),
      el("span", { class: "line-sv" }, `online servers (now ${count(sv[last])})`)));
    return wrap;
  }

  // ---- refresh ----

  let refreshPeriod = 10;

  function schedule() {
    setTimeout(refresh, Math.max(1, refreshPeriod) * 1000);
  }

  async function refresh() {
    try {
      const response = await fetch("api/v1/state", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      refreshPeriod = state.refresh_period || refreshPeriod;
      render(state);
    } catch (e) {
      renderErrors([`The dashboard did not answer: ${e.message}. Showing the last view.`]);
    }
    schedule();
  }

  const initial = JSON.parse(document.getElementById("initial-state").textContent);
  refreshPeriod = initial.refresh_period || refreshPeriod;
  render(initial);
  schedule();
})();
