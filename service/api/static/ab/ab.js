// The encoder A/B dashboard. Plain JavaScript on the public API: no build step, nothing loaded from elsewhere.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { runId: null, view: "compare", poll: null, pair: null, runs: [] };
const voter = localStorage.getItem("t2i-voter") || (() => {
  const id = "v-" + Math.random().toString(36).slice(2, 12);
  localStorage.setItem("t2i-voter", id);
  return id;
})();

// With API keys configured, every call (images included) carries `Authorization: Bearer KEY`; the key is asked for
// once and kept for this browser tab only.
const auth = () => {
  const key = sessionStorage.getItem("t2i-key");
  return key ? { Authorization: `Bearer ${key}` } : {};
};

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...(options.headers || {}), ...auth() } });
  if (response.status === 401) {
    const key = prompt("This service needs an API key:");
    if (key) { sessionStorage.setItem("t2i-key", key.trim()); return api(path, options); }
  }
  if (response.status === 204) return null;
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

// An <img> whose bytes need the key: fetched with it, shown from a blob URL. Without a key: the URL itself.
function setImage(img, url) {
  if (!sessionStorage.getItem("t2i-key")) { img.src = url; return; }
  fetch(url, { headers: auth() }).then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); });
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const ms = (s) => (s === null || s === undefined ? "–" : (s * 1000).toFixed(s < 0.1 ? 1 : 0) + " ms");
const bytes = (b) => {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + units[i];
};
const count = (n) => (n === null || n === undefined ? "–" : n >= 1e9 ? (n / 1e9).toFixed(2) + " B"
  : n >= 1e6 ? (n / 1e6).toFixed(1) + " M" : n >= 1e3 ? (n / 1e3).toFixed(0) + " K" : String(n));
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
};

// -- the form ----------------------------------------------------------------------------------------------------
async function loadForm() {
  const [sets, encoders, pipelines] = await Promise.all([
    api("/v1/compare/prompt-sets"), api("/v1/encoders"), api("/v1/pipelines")]);
  for (const set of sets) {
    $("#prompt-set").append(el("option", { value: set.name, title: set.description },
      `${set.name} (${set.prompts.length})`));
  }
  $("#prompt-set").value = sets.some((s) => s.name === "miniature-semantics") ? "miniature-semantics" : "semantics";
  for (const p of pipelines) $("#pipeline").append(el("option", { value: p.name }, `${p.name} (${p.kind})`));
  const teacher = encoders.find((e) => e.kind === "teacher");
  for (const e of encoders) {
    const checked = e.kind === "teacher" || e.name === "t5-base";
    const box = el("input", { type: "checkbox", name: "encoder", value: e.name });
    box.checked = checked;
    // A route (`kind: route`) is a column like an encoder: each prompt runs on the encoder the route picks for it.
    const title = e.route ? [...e.route.rules, `default -> ${e.route.default}`,
      `fallback: ${e.route.fallback.join(", ")}`].join("\n") : "";
    $("#encoders").append(el("label", { title }, box, ` ${e.name} `, el("small", { class: "muted" }, `${e.kind}`)));
    if (e.kind !== "route") $("#reference").append(el("option", { value: e.name }, e.name));
  }
  if (teacher) $("#reference").value = teacher.name;
}

async function startRun(event) {
  event.preventDefault();
  $("#form-error").textContent = "";
  const body = {
    encoders: [...document.querySelectorAll("#encoders input:checked")].map((b) => b.value),
    reference: $("#reference").value || null,
    pipeline: $("#pipeline").value,
    seeds: $("#seeds").value.split(",").map((s) => s.trim()).filter(Boolean).map(Number),
  };
  if ($("#prompt-set").value) body.prompt_set = $("#prompt-set").value;
  else body.prompts = $("#prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  for (const key of ["width", "height", "steps"]) if ($("#" + key).value) body[key] = Number($("#" + key).value);
  $("#start").disabled = true;
  try {
    const run = await api("/v1/compare", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    await loadRuns();
    showRun(run.id);
  } catch (error) {
    $("#form-error").textContent = error.message;
  } finally {
    $("#start").disabled = false;
  }
}

// -- runs ----------------------------------------------------------------------------------------------------------
async function loadRuns() {
  state.runs = await api("/v1/compare");
  const list = $("#runs");
  list.replaceChildren();
  if (!state.runs.length) list.append(el("li", { class: "muted" }, "none yet"));
  for (const run of state.runs) {
    const when = new Date(run.created_at * 1000).toLocaleString();
    const item = el("li", { "data-run": run.id, onclick: () => showRun(run.id) },
      run.title || `${run.encoders.join(" vs ")}`,
      el("small", {}, `${run.prompts} prompts · ${run.jobs_done}/${run.jobs_total} · ${run.status} · ${when}`));
    if (run.id === state.runId) item.classList.add("active");
    list.append(item);
  }
}

function showRun(runId) {
  state.runId = runId;
  for (const li of document.querySelectorAll("#runs li")) li.classList.toggle("active", li.dataset.run === runId);
  if (state.view === "vote") { nextPair(); return; }
  $("#run-form").hidden = true;
  $("#run").hidden = false;
  refreshRun();
}

async function refreshRun() {
  clearTimeout(state.poll);
  const runId = state.runId;
  const run = await api(`/v1/compare/${runId}`);
  if (runId !== state.runId) return;
  renderRun(run);
  if (run.status !== "done") state.poll = setTimeout(refreshRun, 1000);
  else loadRuns();
}

function renderRun(run) {
  $("#run-title").textContent = run.title || `${run.encoders.join(" vs ")} · ${run.prompt_set || "custom prompts"}`;
  $("#run-status").textContent = `${run.status} · ${run.jobs_done}/${run.jobs_total} jobs` +
    (run.jobs_failed ? ` · ${run.jobs_failed} failed` : "");
  $("#run-status").className = "badge " + run.status;
  $("#run-progress").max = run.jobs_total;
  $("#run-progress").value = run.jobs_done;
  $("#export-csv").href = `/v1/compare/${run.id}.csv`;
  $("#export-json").href = `/v1/compare/${run.id}.json`;
  for (const link of ["#export-csv", "#export-json"]) $(link).onclick = download;
  $("#reference-note").textContent = `(PSNR, SSIM and embedding cosine against ${run.reference})`;

  const summary = $("#summary tbody");
  summary.replaceChildren();
  for (const s of run.summary) {
    summary.append(el("tr", { "data-encoder": s.encoder },
      el("td", {}, s.encoder + (s.is_reference ? " (reference)" : "") +
        (s.quantization ? ` · ${s.quantization}` : "") +
        (s.routed ? ` · route: ${Object.entries(s.routed).map(([n, k]) => `${n} ${k}`).join(", ")}` : "")), el("td", {}, count(s.params)), el("td", {}, bytes(s.bytes)),
      el("td", {}, s.is_reference ? "ref" : fmt(s.psnr, 2)), el("td", {}, s.is_reference ? "ref" : fmt(s.ssim)),
      el("td", {}, s.is_reference ? "ref" : fmt(s.embedding_cosine)),
      el("td", {}, s.accuracy === null ? "–" : (s.accuracy * 100).toFixed(0) + "%"),
      el("td", {}, `${ms(s.encode_p50_s)} / ${ms(s.encode_p95_s)}`),
      el("td", {}, `${ms(s.job_p50_s)} / ${ms(s.job_p95_s)}`), el("td", {}, bytes(s.peak_memory_bytes)),
      el("td", {}, `${s.succeeded} / ${s.jobs}`)));
  }

  drawFrontier(run);

  const head = el("tr", {}, el("th", {}, "prompt · seed"));
  for (const e of run.encoders) head.append(el("th", {}, e + (e === run.reference ? " (ref)" : "")));
  $("#grid thead").replaceChildren(head);
  const body = $("#grid tbody");
  body.replaceChildren();
  for (const cell of run.cells) {
    const row = el("tr", {}, el("td", { class: "prompt" }, cell.prompt, el("br"),
      el("small", { class: "muted" }, `seed ${cell.seed}`)));
    for (const e of run.encoders) {
      const r = cell.results[e];
      const td = el("td", {});
      if (r.image) {
        const img = el("img", { class: "cell-image", alt: `${e}: ${cell.prompt}`,
          onclick: () => enlarge(img.src, `${e} · ${cell.prompt} · seed ${cell.seed}`) });
        setImage(img, r.image);
        td.append(img);
      } else {
        td.append(el("div", { class: r.error ? "error" : "muted" }, r.error || r.status));
      }
      const lines = el("div", { class: "metrics" });
      if (e !== run.reference && r.psnr !== null) lines.append(`PSNR ${fmt(r.psnr, 1)} · SSIM ${fmt(r.ssim, 2)}`, el("br"));
      if (e !== run.reference && r.embedding_cosine !== null) lines.append(`cos ${fmt(r.embedding_cosine, 3)}`, el("br"));
      if (r.evaluator) {
        const ok = Object.values(r.evaluator).every(Boolean);
        lines.append(el("span", { class: ok ? "ok" : "no" }, ok ? "✓ evaluator" : "✗ " +
          Object.entries(r.evaluator).filter(([, v]) => !v).map(([k]) => k).join(", ")), el("br"));
      }
      if (r.ran_on) lines.append(el("span", { class: "routed" }, `→ ${r.ran_on}`), el("br"));
      if (r.total_s !== null) lines.append(`${ms(r.encode_s)} enc · ${ms(r.total_s)} job`);
      td.append(lines);
      row.append(td);
    }
    body.append(row);
  }

  const votes = $("#votes tbody");
  votes.replaceChildren();
  if (!run.votes.length) votes.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no votes yet")));
  for (const v of run.votes) {
    votes.append(el("tr", {}, el("td", {}, v.a), el("td", {}, v.b), el("td", {}, String(v.votes)),
      el("td", {}, String(v.a_wins)), el("td", {}, String(v.b_wins)), el("td", {}, String(v.ties)),
      el("td", {}, `${(v.a_win_rate * 100).toFixed(0)}% (${(v.ci_low * 100).toFixed(0)}–${(v.ci_high * 100).toFixed(0)}%)`)));
  }
}

// Exports go through fetch too, so that they carry the key.
// Each encoder's score against the bytes of its weights (log scale), quantized encoders as squares, the others as
// circles, and the frontier: the encoders that no smaller encoder beats. The score is the evaluator's accuracy where
// the prompts have one (miniature-world sets), else SSIM against the reference (the reference itself scores 1).
function drawFrontier(run) {
  const svg = $("#frontier");
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const byAccuracy = run.summary.some((s) => s.accuracy !== null);
  const score = (s) => (byAccuracy ? s.accuracy : s.is_reference ? 1 : s.ssim);
  const points = run.summary.filter((s) => s.bytes && score(s) !== null && score(s) !== undefined);
  svg.replaceChildren();
  $("#frontier-caption").textContent = points.length
    ? `${byAccuracy ? "Evaluator accuracy" : `SSIM against ${run.reference}`} against the encoder's bytes in memory ` +
      "(log scale); squares are quantized encoders; the line is the frontier (nothing smaller scores higher)."
    : "The chart appears once encoders have finished jobs and their workers report their sizes.";
  if (!points.length) return;
  const [w, h, left, right, top, bottom] = [640, 300, 56, 90, 16, 40];
  const logs = points.map((p) => Math.log10(p.bytes));
  let [lo, hi] = [Math.min(...logs), Math.max(...logs)];
  if (hi - lo < 0.2) { lo -= 0.1; hi += 0.1; }
  lo -= 0.05 * (hi - lo);
  hi += 0.05 * (hi - lo);
  // The score axis ends at 1 and starts at a tenth below the lowest score (0 at the lowest), so close scores show apart.
  const floor = Math.max(0, Math.floor((Math.min(...points.map(score)) - 0.05) * 10) / 10);
  const x = (b) => left + ((Math.log10(b) - lo) / (hi - lo)) * (w - left - right);
  const y = (v) => top + (1 - (v - floor) / (1 - floor)) * (h - top - bottom);
  svg.append(node("line", { x1: left, y1: y(floor), x2: w - right, y2: y(floor), class: "axis" }),
    node("line", { x1: left, y1: y(floor), x2: left, y2: y(1), class: "axis" }),
    node("text", { x: left - 8, y: y(1) + 4, "text-anchor": "end" }, "1"),
    node("text", { x: left - 8, y: y(floor) + 4, "text-anchor": "end" }, String(floor)),
    node("text", { x: (left + w - right) / 2, y: h - 6, "text-anchor": "middle" }, "bytes in memory (log)"));
  for (let i = 0; i <= 3; i++) {
    const b = 10 ** (lo + ((hi - lo) * i) / 3);
    svg.append(node("text", { x: x(b), y: y(floor) + 16, "text-anchor": "middle" }, bytes(b)));
  }
  const sorted = [...points].sort((a, b) => a.bytes - b.bytes);
  const frontier = [];
  for (const p of sorted) if (!frontier.length || score(p) > score(frontier[frontier.length - 1])) frontier.push(p);
  const line = frontier.map((p) => `${x(p.bytes)},${y(score(p))}`).join(" ");
  svg.append(node("polyline", { class: "frontier", points: line }));
  for (const p of points) {
    const [cx, cy] = [x(p.bytes), y(score(p))];
    const attrs = { "data-encoder": p.encoder, "data-bytes": p.bytes, "data-score": score(p),
                    class: "point" + (frontier.includes(p) ? " on-frontier" : "") };
    const mark = p.quantization ? node("rect", { ...attrs, x: cx - 5, y: cy - 5, width: 10, height: 10 })
      : node("circle", { ...attrs, cx, cy, r: 5 });
    mark.append(node("title", {}, `${p.encoder}: ${(score(p) * (byAccuracy ? 100 : 1)).toFixed(byAccuracy ? 0 : 3)}` +
      `${byAccuracy ? "%" : ""}, ${bytes(p.bytes)}`));
    svg.append(mark, node("text", { x: cx + 8, y: cy - 8, class: "label" }, p.encoder));
  }
}

function download(event) {
  if (!sessionStorage.getItem("t2i-key")) return;
  event.preventDefault();
  const url = event.currentTarget.href;
  fetch(url, { headers: auth() }).then((r) => r.blob()).then((blob) => {
    const a = el("a", { href: URL.createObjectURL(blob), download: url.split("/").pop() });
    a.click();
  });
}

function enlarge(src, caption) {
  $("#lightbox img").src = src;
  $("#lightbox p").textContent = caption;
  $("#lightbox").hidden = false;
}

// -- blind votes ---------------------------------------------------------------------------------------------------
async function nextPair() {
  state.pair = null;
  $("#vote-done").hidden = true;
  if (!state.runId) { $("#pair").hidden = true; return; }
  $("#vote-run").textContent = `Run ${state.runId} · you are ${voter}`;
  const pair = await api(`/v1/compare/${state.runId}/pair?voter=${encodeURIComponent(voter)}`);
  if (!pair) { $("#pair").hidden = true; $("#vote-done").hidden = false; return; }
  state.pair = pair;
  $("#pair-prompt").textContent = `“${pair.prompt}” · seed ${pair.seed}`;
  setImage($("#pair-left"), pair.left);
  setImage($("#pair-right"), pair.right);
  $("#pair-remaining").textContent = `${pair.remaining} pair(s) left for you`;
  $("#pair").hidden = false;
}

async function vote(choice) {
  if (!state.pair) return;
  const token = state.pair.token;
  state.pair = null;
  await api(`/v1/compare/${state.runId}/votes`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token, choice, voter }) });
  await nextPair();
}

function switchView(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  $("#view-compare").hidden = view !== "compare";
  $("#view-vote").hidden = view !== "vote";
  if (view === "vote") nextPair(); else if (state.runId) refreshRun();
}

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") $("#lightbox").hidden = true;
  if (state.view !== "vote" || event.target.matches("input, textarea, select")) return;
  const choice = { ArrowLeft: "left", ArrowRight: "right", ArrowDown: "tie", t: "tie", T: "tie" }[event.key];
  if (choice) { event.preventDefault(); vote(choice); }
});
$("#lightbox").addEventListener("click", () => { $("#lightbox").hidden = true; });
$("#run-form").addEventListener("submit", startRun);
$("#new-run").addEventListener("click", () => {
  clearTimeout(state.poll);
  state.runId = null;
  switchView("compare");
  $("#run-form").hidden = false;
  $("#run").hidden = true;
});
$("#vote-left").addEventListener("click", () => vote("left"));
$("#vote-right").addEventListener("click", () => vote("right"));
$("#vote-tie").addEventListener("click", () => vote("tie"));
for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => switchView(tab.dataset.view));

loadForm().catch((error) => { $("#form-error").textContent = error.message; });
loadRuns().catch(() => {});
