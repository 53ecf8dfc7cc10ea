// momentum-service training dashboard: plain ES module, no dependencies.
//
// Every second it reads the model list (GET /v1/models, every page) and, per model, the training
// metrics pushed since the last poll (GET /v1/models/{model}/metrics?since=<next>), keeps them
// (at most MAX_POINTS per model, as the server does) and draws them as inline SVG. The page
// itself holds no data: when the API answers 401 it asks for an API key, keeps it in
// sessionStorage and sends it as "Authorization: Bearer <key>" on every call.
//
// What it shows is readable from the DOM (data-testid and data-* attributes): model-row-<name>,
// steps-<name> (the list's `steps`), rate-<name> (steps per second), workers-<name>, lr-<name>
// (data-last: the last point's lr), last-<metric>-<name> (data-value: the last value, exact),
// and in the chart one <path data-model=<name> data-points=<count>> per shown curve.
//
// The URL's fragment keeps the view: #metric=loss&models=a,b&log=1 (models: the ones shown; a
// model named there is read even if the list does not have it, so a 403 names it).

const KEY_STORAGE = "momentum-service.api-key";
const POLL_MS = 1000;
const RATE_WINDOW_S = 5; // steps per second: over the points of the last few seconds
const MAX_POINTS = 10000; // per model, like the server's series
const PAGE = 10000; // points per metrics request (the API's maximum)
const MODELS_PAGE = 1000; // models per list request (the API's maximum)
const CONCURRENT = 6; // metrics requests in flight
const PALETTE = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);

const view = parseFragment();
const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  models: new Map(), // name -> model (see newModel)
  listed: [], // the list's names, in its order
  metric: view.metric || "loss",
  metricNames: new Set(["loss", view.metric || "loss"]),
  logY: view.log,
  onlyShown: view.models !== null, // the fragment named the models to show: the others start hidden
  pinned: new Set(view.models || []),
  colours: new Map(),
  needKey: false,
  clockOffset: null, // server time minus this browser's, in seconds (from the Date header)
  timer: null,
  polling: false,
  dirty: true,
};

function parseFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  const models = params.get("models");
  return {
    metric: params.get("metric"),
    models: models === null ? null : models.split(",").filter((n) => n),
    log: params.get("log") === "1",
  };
}

function writeFragment() {
  const params = new URLSearchParams();
  params.set("metric", state.metric);
  const names = [...state.models.keys()];
  const shown = names.filter((n) => state.models.get(n).shown);
  if (shown.length !== names.length || state.onlyShown) params.set("models", shown.join(","));
  if (state.logY) params.set("log", "1");
  history.replaceState(null, "", "#" + params.toString().replaceAll("%2C", ","));
}

function newModel(name) {
  if (!state.colours.has(name)) state.colours.set(name, PALETTE[state.colours.size % PALETTE.length]);
  return {
    name,
    summary: null, // {name, rule, mode, params, steps} from the list
    points: [], // {id, time, step, lr, worker, staleness, metrics}, oldest first
    since: 0,
    workers: new Map(), // worker id (or "anonymous") -> latest staleness
    shown: !state.onlyShown || state.pinned.has(name),
    forbidden: null, // the 403's detail
    missing: false,
    error: null,
    row: null,
  };
}

// --- the API ----------------------------------------------------------------------------------

async function api(path) {
  const headers = { Accept: "application/json" };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(new URL(path, document.baseURI), { headers, cache: "no-store" });
  noteClock(response);
  if (response.ok) return { ok: true, status: response.status, body: await response.json() };
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // not problem+json (a proxy's page): the status says enough
  }
  return { ok: false, status: response.status, problem };
}

function noteClock(response) {
  // The Date header has a resolution of one second and is at most the server's time: the largest
  // (Date - now) seen, plus half a second, estimates the offset to within about half a second.
  const date = Date.parse(response.headers.get("date") || "");
  if (Number.isNaN(date)) return;
  const offset = (date - Date.now()) / 1000;
  state.clockOffset = state.clockOffset === null ? offset : Math.max(state.clockOffset, offset);
}

function serverNow() {
  return Date.now() / 1000 + (state.clockOffset === null ? 0 : state.clockOffset + 0.5);
}

class NeedKey extends Error {}

function refusedKey(problem) {
  if (state.needKey) throw new NeedKey(); // another request of this poll was refused first
  state.needKey = true;
  const hadKey = Boolean(state.key);
  if (hadKey) sessionStorage.removeItem(KEY_STORAGE);
  state.key = null;
  showKeyForm(
    hadKey
      ? `The server refused this API key${problem.detail ? ": " + problem.detail : ""}. Enter another.`
      : "This server needs an API key to read its models.",
  );
  throw new NeedKey();
}

async function listModels() {
  const models = [];
  let after = null;
  do {
    const query = new URLSearchParams({ limit: String(MODELS_PAGE) });
    if (after !== null) query.set("after", after);
    const r = await api(`v1/models?${query}`);
    if (r.status === 401) refusedKey(r.problem);
    if (!r.ok) throw new Error(describe(r, "the model list"));
    models.push(...r.body.models);
    after = r.body.next;
  } while (after !== null && after !== undefined);
  return models;
}

async function pollMetrics(model) {
  for (let round = 0; round < 10; round++) {
    const path = `v1/models/${encodeURIComponent(model.name)}/metrics?since=${model.since}&limit=${PAGE}`;
    const r = await api(path);
    if (r.status === 401) refusedKey(r.problem);
    if (r.status === 403) {
      model.forbidden = r.problem.detail || `this API key may not read model "${model.name}"`;
      state.dirty = true;
      return;
    }
    if (r.status === 404) {
      if (state.pinned.has(model.name)) model.missing = true;
      else state.models.delete(model.name); // deleted since the list was read
      state.dirty = true;
      return;
    }
    if (!r.ok) {
      model.error = describe(r, "its metrics");
      state.dirty = true;
      return;
    }
    model.forbidden = model.error = null;
    model.missing = false;
    append(model, r.body.points);
    model.since = r.body.next;
    if (r.body.points.length < PAGE) return;
  }
}

function describe(r, what) {
  const p = r.problem || {};
  return `${what}: ${r.status} ${p.title || ""}${p.detail ? " (" + p.detail + ")" : ""}`.trim();
}

function append(model, points) {
  if (!points.length) return;
  for (const p of points) {
    model.points.push(p);
    model.workers.set(p.worker === null || p.worker === undefined ? "anonymous" : String(p.worker), p.staleness);
    for (const name of Object.keys(p.metrics || {})) state.metricNames.add(name);
  }
  if (model.points.length > MAX_POINTS) model.points.splice(0, model.points.length - MAX_POINTS);
  state.dirty = true;
}

function resetSeries(model) {
  // The model was replaced (its steps went back): read its series again from the start.
  Object.assign(model, { points: [], since: 0, workers: new Map() });
  state.dirty = true;
}

async function eachConcurrently(items, limit, fn) {
  const queue = [...items];
  const runners = Array.from({ length: Math.min(limit, queue.length) }, async () => {
    while (queue.length) await fn(queue.shift());
  });
  await Promise.all(runners);
}

// --- polling ----------------------------------------------------------------------------------

async function poll() {
  clearTimeout(state.timer);
  if (state.polling || state.needKey) return;
  state.polling = true;
  try {
    const listed = await listModels();
    const names = new Set(listed.map((m) => m.name));
    for (const name of [...state.models.keys()]) {
      if (!names.has(name) && !state.pinned.has(name)) state.models.delete(name);
    }
    for (const summary of listed) {
      let model = state.models.get(summary.name);
      if (!model) state.models.set(summary.name, (model = newModel(summary.name)));
      const last = model.points[model.points.length - 1];
      if (last && summary.steps < last.step) resetSeries(model);
      if (JSON.stringify(model.summary) !== JSON.stringify(summary)) state.dirty = true;
      model.summary = summary;
    }
    for (const name of state.pinned) {
      if (!state.models.has(name)) state.models.set(name, newModel(name));
    }
    state.listed = listed.map((m) => m.name);
    await eachConcurrently([...state.models.values()], CONCURRENT, pollMetrics);
    setStatus("ok", `updated ${new Date().toLocaleTimeString()} · ${state.listed.length} models`);
  } catch (error) {
    if (!(error instanceof NeedKey)) setStatus("error", `cannot read the API (${error.message}); retrying`);
  } finally {
    state.polling = false;
  }
  if (!state.needKey) {
    render();
    state.timer = setTimeout(poll, POLL_MS);
  }
}

function setStatus(kind, text) {
  const status = $("status");
  status.dataset.state = kind;
  status.textContent = text;
}

// --- the API key ------------------------------------------------------------------------------

function showKeyForm(message) {
  $("key-message").textContent = message;
  $("key-form").hidden = false;
  $("main").hidden = true;
  $("alert").hidden = true;
  $("forget-key").hidden = true;
  setStatus("key", "waiting for an API key");
  $("key-input").focus();
}

function useKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORAGE, key);
  state.key = key;
  state.needKey = false;
  state.models.clear(); // another key may read other models
  $("key-input").value = "";
  $("key-form").hidden = true;
  $("main").hidden = false;
  $("forget-key").hidden = false;
  setStatus("ok", "connecting…");
  poll();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  location.reload();
}

// --- numbers ----------------------------------------------------------------------------------

function fmt(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  const a = Math.abs(value);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return value.toExponential(3);
  return String(Number(value.toPrecision(4)));
}

function stepsPerSecond(model) {
  const points = model.points;
  if (points.length < 2) return 0;
  const start = serverNow() - RATE_WINDOW_S;
  let i = points.length - 1;
  if (points[i].time < start) return 0; // nothing in the last few seconds
  while (i > 0 && points[i - 1].time >= start) i--;
  const first = points[i];
  const last = points[points.length - 1];
  const dt = last.time - first.time;
  return dt > 0 ? (last.step - first.step) / dt : 0;
}

function lastValue(model, metric) {
  for (let i = model.points.length - 1; i >= 0; i--) {
    const v = model.points[i].metrics?.[metric];
    if (v !== undefined) return v;
  }
  return null;
}

function series(model, metric) {
  const xs = [];
  const ys = [];
  for (const p of model.points) {
    const v = p.metrics?.[metric];
    if (v !== undefined) {
      xs.push(p.step);
      ys.push(v);
    }
  }
  return { xs, ys };
}

function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) || 10 * mag;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// --- drawing ----------------------------------------------------------------------------------

function el(tag, attrs = {}, text) {
  const node = tag === "svg" || SVG_TAGS.has(tag) ? document.createElementNS(SVG, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}
const SVG_TAGS = new Set(["path", "line", "text", "g", "rect", "circle", "title"]);

function render() {
  const metrics = [...state.metricNames].sort();
  const select = $("metric");
  if ([...select.options].map((o) => o.value).join("\n") !== metrics.join("\n")) {
    select.replaceChildren(...metrics.map((m) => el("option", { value: m }, m)));
  }
  select.value = state.metric;
  $("log-y").checked = state.logY;
  $("forget-key").hidden = !state.key;
  $("last-head").textContent = `last ${state.metric}`;
  renderRows();
  renderAlert();
  if (state.dirty) renderChart();
  state.dirty = false;
}

function renderAlert() {
  const forbidden = [...state.models.values()].filter((m) => m.forbidden).map((m) => m.name);
  const missing = [...state.models.values()].filter((m) => m.missing).map((m) => m.name);
  const lines = [];
  if (forbidden.length) lines.push(`This API key may not read model ${forbidden.map((n) => `"${n}"`).join(", ")}.`);
  if (missing.length) lines.push(`No model ${missing.map((n) => `"${n}"`).join(", ")} on this server.`);
  $("alert").textContent = lines.join(" ");
  $("alert").hidden = lines.length === 0;
}

function renderRows() {
  const body = $("model-rows");
  const names = [...state.listed, ...[...state.pinned].filter((n) => !state.listed.includes(n))];
  const rows = [];
  for (const name of names) {
    const model = state.models.get(name);
    if (!model) continue;
    if (!model.row) model.row = buildRow(model);
    updateRow(model);
    rows.push(model.row.tr);
  }
  const current = [...body.children];
  if (current.length !== rows.length || current.some((tr, i) => tr !== rows[i])) body.replaceChildren(...rows);
  $("empty").hidden = rows.length > 0;
  const all = $("toggle-all");
  const shown = rows.length && names.every((n) => !state.models.has(n) || state.models.get(n).shown);
  all.checked = Boolean(shown);
}

function buildRow(model) {
  const n = model.name;
  const tr = el("tr", { "data-testid": `model-row-${n}`, "data-model": n });
  const toggle = el("input", { type: "checkbox", "data-testid": `toggle-${n}`, title: `show ${n} in the chart` });
  toggle.addEventListener("change", () => {
    model.shown = toggle.checked;
    state.dirty = true;
    writeFragment();
    render();
  });
  const swatch = el("span", { class: "swatch" });
  swatch.style.background = state.colours.get(n);
  const nameCell = el("td", { class: "name" });
  const label = el("label");
  label.append(swatch, el("span", {}, n));
  const note = el("div", { class: "note", "data-testid": `note-${n}` });
  nameCell.append(label, note);
  const cells = {
    toggle,
    note,
    rule: el("td", { "data-testid": `rule-${n}` }),
    mode: el("td", { "data-testid": `mode-${n}` }),
    params: el("td", { class: "num", "data-testid": `params-${n}` }),
    steps: el("td", { class: "num", "data-testid": `steps-${n}` }),
    rate: el("td", { class: "num", "data-testid": `rate-${n}` }),
    workers: el("td", { class: "workers", "data-testid": `workers-${n}` }),
    lr: el("td", { class: "spark" }),
    last: el("td", { class: "num" }),
  };
  const first = el("td");
  first.append(toggle);
  tr.append(first, nameCell, cells.rule, cells.mode, cells.params, cells.steps, cells.rate, cells.workers, cells.lr);
  tr.append(cells.last);
  return { tr, ...cells };
}

function updateRow(model) {
  const row = model.row;
  const n = model.name;
  const s = model.summary;
  row.toggle.checked = model.shown;
  setText(row.rule, s ? s.rule : "—");
  setText(row.mode, s ? s.mode : "—");
  setText(row.params, s ? String(s.params) : "—");
  setText(row.steps, s ? String(s.steps) : "—");
  row.steps.dataset.value = s ? String(s.steps) : "";
  const rate = stepsPerSecond(model);
  setText(row.rate, rate.toFixed(1));
  row.rate.dataset.value = String(rate);

  if (model.forbidden) {
    row.note.setAttribute("data-testid", `forbidden-${n}`);
    setText(row.note, `this API key may not read model "${n}"`);
    row.note.title = model.forbidden;
  } else if (model.missing || model.error) {
    row.note.setAttribute("data-testid", `note-${n}`);
    setText(row.note, model.missing ? "no such model" : model.error);
  } else {
    row.note.setAttribute("data-testid", `note-${n}`);
    setText(row.note, "");
  }

  const workers = [...model.workers.entries()].sort(([a], [b]) => workerOrder(a) - workerOrder(b));
  const named = workers.filter(([w]) => w !== "anonymous").length;
  const key = JSON.stringify(workers);
  if (row.workers.dataset.key !== key) {
    row.workers.dataset.key = key;
    row.workers.dataset.count = String(named);
    row.workers.replaceChildren(
      ...workers.map(([w, staleness]) =>
        el(
          "span",
          { class: "worker", "data-worker": w, "data-staleness": staleness === null ? "" : String(staleness) },
          `${w === "anonymous" ? "no id" : "#" + w}: ${staleness === null ? "—" : staleness}`,
        ),
      ),
    );
    if (!workers.length) row.workers.textContent = "—";
  }

  const lastPoint = model.points[model.points.length - 1];
  const lrKey = `${model.points.length}:${lastPoint ? lastPoint.id : ""}`;
  if (row.lr.dataset.key !== lrKey) {
    row.lr.dataset.key = lrKey;
    const lr = lastPoint && Number.isFinite(lastPoint.lr) ? lastPoint.lr : null;
    const label = el("span", { class: "lr-last", "data-testid": `lr-last-${n}` }, fmt(lr));
    label.dataset.value = lr === null ? "" : String(lr);
    row.lr.replaceChildren(sparkline(model), label);
  }

  const value = lastValue(model, state.metric);
  row.last.setAttribute("data-testid", `last-${state.metric}-${n}`);
  row.last.dataset.value = value === null ? "" : String(value);
  setText(row.last, fmt(value));
}

function workerOrder(w) {
  return w === "anonymous" ? Number.MAX_SAFE_INTEGER : Number(w);
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function sparkline(model) {
  const w = 120;
  const h = 26;
  const n = model.name;
  const svg = el("svg", { class: "lr", viewBox: `0 0 ${w} ${h}`, width: w, height: h, "data-testid": `lr-${n}` });
  const points = model.points.filter((p) => Number.isFinite(p.lr));
  const last = points[points.length - 1];
  svg.dataset.last = last ? String(last.lr) : "";
  svg.dataset.points = String(points.length);
  if (!points.length) return svg;
  const x0 = points[0].step;
  const x1 = last.step;
  let y0 = Math.min(...points.map((p) => p.lr));
  let y1 = Math.max(...points.map((p) => p.lr));
  if (y1 === y0) [y0, y1] = [y0 - 1, y1 + 1];
  const sx = (x) => (x1 > x0 ? ((x - x0) / (x1 - x0)) * (w - 4) + 2 : w / 2);
  const sy = (y) => h - 3 - ((y - y0) / (y1 - y0)) * (h - 6);
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p.step).toFixed(1)} ${sy(p.lr).toFixed(1)}`).join("");
  svg.append(el("title", {}, `lr: last ${fmt(last.lr)} (step ${last.step})`));
  svg.append(el("path", { d: points.length > 1 ? d : d + "l0 0", stroke: state.colours.get(n), "data-model": n }));
  return svg;
}

function renderChart() {
  const svg = $("chart");
  const width = Math.max(320, Math.round(svg.getBoundingClientRect().width || 960));
  const height = 360;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.removeAttribute("preserveAspectRatio");
  const m = { left: 64, right: 16, top: 14, bottom: 38 };
  const metric = state.metric;
  const curves = [];
  for (const name of [...state.listed, ...state.pinned]) {
    const model = state.models.get(name);
    if (!model || !model.shown || curves.some((c) => c.name === name)) continue;
    const { xs, ys } = series(model, metric);
    if (xs.length) curves.push({ name, xs, ys, colour: state.colours.get(name) });
  }
  const nodes = [];
  const legend = [];
  const usable = (y) => Number.isFinite(y) && (!state.logY || y > 0);
  let xLo = Infinity;
  let xHi = -Infinity;
  let yLo = Infinity;
  let yHi = -Infinity;
  for (const c of curves) {
    for (let i = 0; i < c.xs.length; i++) {
      if (!usable(c.ys[i])) continue;
      xLo = Math.min(xLo, c.xs[i]);
      xHi = Math.max(xHi, c.xs[i]);
      yLo = Math.min(yLo, c.ys[i]);
      yHi = Math.max(yHi, c.ys[i]);
    }
  }
  const plotW = width - m.left - m.right;
  const plotH = height - m.top - m.bottom;
  if (!curves.length || xLo === Infinity) {
    nodes.push(
      el("text", { x: width / 2, y: height / 2, class: "placeholder" }, `no points carry "${metric}" yet`),
    );
  } else {
    if (xHi === xLo) [xLo, xHi] = [xLo - 1, xHi + 1];
    const ty = state.logY ? Math.log10 : (y) => y;
    let lo = ty(yLo);
    let hi = ty(yHi);
    if (hi === lo) [lo, hi] = [lo - (Math.abs(lo) || 1) * 0.05, hi + (Math.abs(hi) || 1) * 0.05];
    const pad = (hi - lo) * 0.04;
    lo -= pad;
    hi += pad;
    const sx = (x) => m.left + ((x - xLo) / (xHi - xLo)) * plotW;
    const sy = (y) => m.top + (1 - (ty(y) - lo) / (hi - lo)) * plotH;
    for (const t of niceTicks(xLo, xHi, Math.max(2, Math.floor(plotW / 90)))) {
      nodes.push(el("line", { x1: sx(t), x2: sx(t), y1: m.top, y2: m.top + plotH, class: "grid" }));
      nodes.push(el("text", { x: sx(t), y: m.top + plotH + 16, class: "tick x" }, fmt(t)));
    }
    const yTicks = state.logY ? logTicks(lo, hi) : niceTicks(lo, hi, 6);
    for (const t of yTicks) {
      const y = sy(t);
      if (y < m.top - 0.5 || y > m.top + plotH + 0.5) continue;
      nodes.push(el("line", { x1: m.left, x2: m.left + plotW, y1: y, y2: y, class: "grid" }));
      nodes.push(el("text", { x: m.left - 6, y: y + 4, class: "tick y" }, fmt(t)));
    }
    for (const c of curves) {
      let d = "";
      let pen = "M";
      for (let i = 0; i < c.xs.length; i++) {
        if (!usable(c.ys[i])) {
          pen = "M";
          continue;
        }
        d += `${pen}${sx(c.xs[i]).toFixed(1)} ${sy(c.ys[i]).toFixed(1)}`;
        pen = "L";
      }
      if (c.xs.length === 1) d += "l0 0";
      const path = el("path", {
        d,
        class: "curve",
        stroke: c.colour,
        "data-model": c.name,
        "data-points": c.xs.length,
        "data-testid": `curve-${c.name}`,
      });
      path.append(el("title", {}, `${c.name}: ${metric} ${fmt(c.ys[c.ys.length - 1])} at step ${c.xs[c.xs.length - 1]}`));
      nodes.push(path);
    }
  }
  nodes.push(el("rect", { x: m.left, y: m.top, width: plotW, height: plotH, class: "frame" }));
  nodes.push(el("text", { x: m.left + plotW / 2, y: height - 4, class: "axis-label" }, "step"));
  nodes.push(
    el("text", { x: 14, y: m.top + plotH / 2, class: "axis-label", transform: `rotate(-90 14 ${m.top + plotH / 2})` },
      state.logY ? `${metric} (log scale)` : metric),
  );
  svg.replaceChildren(...nodes);
  for (const c of curves) {
    const item = el("span", { class: "legend-item", "data-testid": `legend-${c.name}`, "data-model": c.name });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = c.colour;
    item.append(swatch, c.name);
    legend.push(item);
  }
  $("legend").replaceChildren(...legend);
}

function logTicks(lo, hi) {
  // lo and hi are log10 of the range: powers of ten, with 2 and 5 between them on short ranges.
  const ticks = [];
  const factors = hi - lo < 2 ? [1, 2, 5] : [1];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e++) {
    for (const f of factors) {
      const t = f * 10 ** e;
      if (Math.log10(t) >= lo && Math.log10(t) <= hi) ticks.push(Number(t.toPrecision(6)));
    }
  }
  return ticks;
}

// --- start ------------------------------------------------------------------------------------

$("key-form").addEventListener("submit", useKey);
$("forget-key").addEventListener("click", forgetKey);
$("metric").addEventListener("change", (event) => {
  state.metric = event.target.value;
  state.dirty = true;
  writeFragment();
  render();
});
$("log-y").addEventListener("change", (event) => {
  state.logY = event.target.checked;
  state.dirty = true;
  writeFragment();
  render();
});
$("toggle-all").addEventListener("change", (event) => {
  for (const model of state.models.values()) model.shown = event.target.checked;
  state.dirty = true;
  writeFragment();
  render();
});
window.addEventListener("resize", () => {
  state.dirty = true;
  renderChart();
});
window.addEventListener("hashchange", () => {
  const next = parseFragment();
  state.metric = next.metric || "loss";
  state.metricNames.add(state.metric);
  state.logY = next.log;
  state.onlyShown = next.models !== null;
  state.pinned = new Set(next.models || []);
  for (const model of state.models.values()) model.shown = !state.onlyShown || state.pinned.has(model.name);
  state.dirty = true;
  poll();
});
$("forget-key").hidden = !state.key;
poll();
