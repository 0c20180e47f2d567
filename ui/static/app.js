// The review page: uploads go to the app's API (which asks the Triton server), results are drawn here.
"use strict";

const $ = (id) => document.getElementById(id);
const results = []; // {row: the API's result, file: the File it came from}
let evidence = null; // the open evidence: {data, image}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function fixed(value, digits) {
  return value === null || value === undefined ? "" : Number(value).toFixed(digits);
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

async function errorOf(response) {
  try {
    return (await response.json()).error || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadInfo() {
  const response = await fetch("api/info");
  if (!response.ok) {
    $("server").textContent = await errorOf(response);
    $("server").className = "error";
    return;
  }
  const info = await response.json();
  const down = Object.entries(info.models).filter(([, ready]) => !ready).map(([m]) => m);
  $("server").textContent = `Triton server ${info.url}` + (down.length ? ` — not ready: ${down.join(", ")}` : " — ready");
  $("server").className = down.length ? "error" : "muted";
  $("limits").textContent =
    `Up to ${info.max_files} files and ${info.max_request_mb} MB at once, ${info.max_file_mb} MB a file. ` +
    `Videos (${info.video_suffixes.join(" ")}) are scored at ${info.fps} frames a second; ` +
    (info.threshold === null
      ? "P(generated) above the server's threshold (each row shows it) is flagged."
      : `P(generated) above ${info.threshold} is flagged.`);
}

async function scoreFiles(files) {
  if (!files.length) return;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.webkitRelativePath || file.name);
  setStatus(`Scoring ${files.length} file${files.length > 1 ? "s" : ""}…`);
  let response;
  try {
    response = await fetch("api/score", { method: "POST", body: form });
  } catch (e) {
    setStatus(`The upload failed: ${e}`, true);
    return;
  }
  if (!response.ok) {
    setStatus(await errorOf(response), true);
    return;
  }
  const rows = (await response.json()).results;
  rows.forEach((row, i) => addResult(row, files[i]));
  const failed = rows.filter((r) => r.error).length;
  setStatus(`Scored ${rows.length - failed} of ${rows.length}` + (failed ? `; ${failed} failed (see below)` : "."));
}

function addResult(row, file) {
  results.push({ row, file });
  $("results-section").hidden = false;
  const tr = document.createElement("tr");
  tr.className = row.error ? "failed" : row.verdict || "";
  tr.dataset.source = row.source;
  const cells = ["thumb", "source", "p", "logit", "verdict", "details"].map((name) => {
    const td = document.createElement("td");
    td.className = name;
    tr.appendChild(td);
    return td;
  });
  const [thumb, source, p, logit, verdict, details] = cells;
  source.textContent = row.source;
  verdict.textContent = row.verdict || "";
  if (row.kind === "image") {
    if (!row.error) {
      const img = document.createElement("img");
      img.src = URL.createObjectURL(file);
      thumb.appendChild(img);
      const button = document.createElement("button");
      button.type = "button";
      button.className = "evidence-button";
      button.textContent = "Evidence";
      button.addEventListener("click", () => openEvidence(file, row.source));
      details.appendChild(button);
    }
    p.textContent = fixed(row.probability, 4);
    logit.textContent = fixed(row.logit, 4);
    if (!row.error) details.appendChild(provenance(row));
  } else {
    thumb.textContent = "▶";
    p.textContent = fixed(row.p_topk, 4);
    p.title = "mean P(generated) of the top tenth of the frames";
    if (!row.error) details.appendChild(timeline(row));
  }
  if (row.error) {
    const message = document.createElement("span");
    message.className = "error";
    message.textContent = row.error;
    details.appendChild(message);
  }
  $("results").querySelector("tbody").appendChild(tr);
}

// What produced a score: the export (its manifest id, shortened) and the threshold of the verdict.
function provenance(row) {
  const span = document.createElement("span");
  span.className = "provenance";
  const model = row.manifest_id ? `export ${row.manifest_id.slice(0, 12)}` : "export not named by the server";
  span.textContent = `${model} · threshold ${fixed(row.threshold, 3)}`;
  span.title = row.manifest_id ? `manifest id ${row.manifest_id}` : "";
  return span;
}

function timeline(video) {
  const width = 420, height = 90, pad = 24;
  const frames = video.frames.filter((f) => f.p_generated !== null);
  const end = Math.max(...video.frames.map((f) => f.time_s), ...video.fake_periods.map((s) => s[1]), 1e-6);
  const x = (t) => pad + (t / end) * (width - 2 * pad);
  const y = (p) => height - pad - p * (height - 2 * pad);
  const root = document.createElement("div");
  root.className = "timeline";
  const chart = svg("svg", { width, height, role: "img", "aria-label": "P(generated) over time" }, root);
  for (const [start, stop] of video.fake_periods) {
    svg("rect", { class: "span", x: x(start), y: pad / 2, width: Math.max(x(stop) - x(start), 2), height: height - pad * 1.5 }, chart);
  }
  svg("line", { class: "threshold", x1: pad, x2: width - pad, y1: y(0.5), y2: y(0.5) }, chart);
  svg("polyline", { class: "curve", points: frames.map((f) => `${x(f.time_s)},${y(f.p_generated)}`).join(" ") }, chart);
  svg("text", { x: pad, y: height - 4 }, chart).textContent = "0 s";
  svg("text", { x: width - pad, y: height - 4, "text-anchor": "end" }, chart).textContent = `${end.toFixed(1)} s`;
  const spans = document.createElement("p");
  spans.className = "spans";
  spans.textContent = video.fake_periods.length
    ? "Flagged: " + video.fake_periods.map(([a, b, peak]) => `${a.toFixed(1)}–${b.toFixed(1)} s (peak ${peak.toFixed(2)})`).join(", ")
    : `No flagged span in ${video.frames.length} frames.`;
  root.appendChild(spans);
  return root;
}

async function openEvidence(file, name) {
  setStatus(`Asking for the evidence of ${name}…`);
  const form = new FormData();
  form.append("file", file, name);
  const response = await fetch("api/evidence", { method: "POST", body: form });
  if (!response.ok) {
    setStatus(await errorOf(response), true);
    return;
  }
  const data = await response.json();
  const image = new Image();
  image.onload = () => {
    evidence = { data, image };
    $("evidence").hidden = false;
    $("evidence-name").textContent = name;
    $("evidence-summary").textContent =
      `P(generated) ${data.probability.toFixed(4)} (logit ${data.logit.toFixed(4)}, ${data.verdict}). ` +
      `${data.codes_used} distinct codes in ${data.tokens} tokens; ` +
      `${(100 * data.fake_leaning_share).toFixed(1)} % of the tokens use a code more frequent among fake than real training tokens. ` +
      `Scored by ${provenance(data).textContent}.`;
    drawMap();
    drawHistogram(data);
    setStatus("");
    $("evidence").scrollIntoView();
  };
  image.src = URL.createObjectURL(file);
}

function drawMap() {
  const canvas = $("evidence-map");
  const ctx = canvas.getContext("2d");
  const { data, image } = evidence;
  // The model's view: shorter side resized, centre square cropped (d3qe.preprocess).
  const side = Math.min(image.naturalWidth, image.naturalHeight);
  const sx = (image.naturalWidth - side) / 2, sy = (image.naturalHeight - side) / 2;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(image, sx, sy, side, side, 0, 0, canvas.width, canvas.height);
  const overlay = document.querySelector("input[name=overlay]:checked").value;
  if (overlay === "none") {
    $("evidence-scale").textContent = "";
    return;
  }
  const grid = data[overlay];
  const values = grid.flat();
  const low = Math.min(...values), high = Math.max(...values);
  const cell = canvas.width / grid.length;
  grid.forEach((line, i) =>
    line.forEach((v, j) => {
      const t = high > low ? (v - low) / (high - low) : 0;
      ctx.fillStyle = `hsla(${240 - 240 * t}, 90%, 50%, 0.5)`;
      ctx.fillRect(j * cell, i * cell, cell, cell);
    }),
  );
  $("evidence-scale").textContent = `blue ${low.toPrecision(3)} → red ${high.toPrecision(3)}`;
}

function drawHistogram(data) {
  const chart = $("evidence-histogram");
  chart.replaceChildren();
  const codes = data.codebook_usage.slice(0, 24);
  const width = +chart.getAttribute("width"), height = +chart.getAttribute("height");
  const left = 44, band = (width - left - 8) / codes.length, half = (height - 70) / 2;
  const maxTokens = Math.max(...codes.map((c) => c.tokens));
  const maxFreq = Math.max(...codes.map((c) => Math.max(c.real_freq, c.fake_freq)), 1e-12);
  svg("text", { x: 4, y: 14 }, chart).textContent = "tokens in this image";
  svg("text", { x: 4, y: half + 34 }, chart).textContent = "per 10 000 training tokens: real / fake";
  codes.forEach((c, k) => {
    const x = left + k * band;
    const h = (c.tokens / maxTokens) * (half - 34);
    const top = 30 + half - 34 - h;
    svg("rect", { class: "usage", x: x + 2, y: top, width: band - 4, height: h }, chart);
    const base = 2 * half + 24;
    for (const [i, kind] of ["real", "fake"].entries()) {
      const fh = (c[`${kind}_freq`] / maxFreq) * (half - 30);
      const bar = svg("rect", { class: kind, x: x + 2 + i * (band - 4) / 2, y: base - fh, width: (band - 4) / 2, height: fh }, chart);
      svg("title", {}, bar).textContent = `code ${c.code}: ${(1e4 * c[`${kind}_freq`]).toFixed(2)} per 10 000 ${kind} tokens`;
    }
    svg("text", { class: "code", x: x + band / 2, y: base + 12, transform: `rotate(60 ${x + band / 2} ${base + 12})` }, chart)
      .textContent = c.code;
    svg("text", { class: "count", x: x + band / 2, y: top - 3, "text-anchor": "middle" }, chart).textContent = c.tokens;
  });
}

function download(name, type, text) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  link.click();
}

function csvField(value) {
  const text = value === null || value === undefined ? "" : String(value);
  return /[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text;
}

function toCsv() {
  const columns = [
    ...["source", "kind", "logit", "probability", "p_topk", "verdict", "fake_periods", "error"],
    ...["manifest_id", "threshold"],
  ];
  const lines = results.map(({ row }) =>
    columns.map((c) => csvField(c === "fake_periods" && row[c] ? JSON.stringify(row[c]) : row[c])).join(","),
  );
  return [columns.join(","), ...lines].join("\n") + "\n";
}

$("pick-files").addEventListener("change", (e) => scoreFiles([...e.target.files]));
$("pick-folder").addEventListener("change", (e) => scoreFiles([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  scoreFiles([...e.dataTransfer.files]);
});
document.querySelectorAll("input[name=overlay]").forEach((r) => r.addEventListener("change", drawMap));
$("evidence-close").addEventListener("click", () => ($("evidence").hidden = true));
$("download-csv").addEventListener("click", () => download("d3qe-results.csv", "text/csv", toCsv()));
$("download-json").addEventListener("click", () =>
  download("d3qe-results.json", "application/json", JSON.stringify(results.map((r) => r.row), null, 2)),
);
$("clear").addEventListener("click", () => {
  results.length = 0;
  $("results").querySelector("tbody").replaceChildren();
  $("results-section").hidden = true;
  $("evidence").hidden = true;
  setStatus("");
});
loadInfo();
