// The page at `/`: pick or drop an image, choose scale, steps and seed, run POST /v1/super-resolve, compare
// input and output, download; the model card from GET /v1/model. Plain JavaScript, nothing loaded from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("hndsr-key") || "", urls: [] };

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function showError(payload, status) {
  const box = $("error");
  box.textContent = payload && payload.detail
    ? `${payload.detail}\n(${payload.error}, HTTP ${status})`
    : `The server answered HTTP ${status}.`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function clearResult() {
  // A new run or an error: the previous result goes, so nothing on the page belongs to another request.
  $("result").hidden = true;
  for (const id of ["after", "before", "output-view", "input-view"]) $(id).removeAttribute("src");
  $("download").removeAttribute("href");
  state.urls.forEach((url) => URL.revokeObjectURL(url));
  state.urls = [];
}

function isTiff(file) {
  return /^image\/tiff$/.test(file.type) || /\.tiff?$/i.test(file.name);
}

async function errorBody(response) {
  try { return await response.json(); } catch { return null; }
}

function fact(list, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

async function loadCard() {
  const response = await fetch("/v1/model", { headers: authHeaders() });
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("card-status").textContent = "This server needs an API key: enter it in the form below.";
    return;
  }
  if (!response.ok) {
    $("card-status").textContent = `The model card is not available (HTTP ${response.status}).`;
    return;
  }
  const info = await response.json();
  const list = $("card-facts");
  list.replaceChildren();
  fact(list, "version", `${info.version}${info.alias ? ` (${info.alias})` : ""}`);
  fact(list, "scale range", `x${info.scale_range[0]} to x${info.scale_range[1]}, any real number`);
  fact(list, "default DDIM steps", String(info.default_steps));
  fact(list, "bands", (info.data && info.data.bands || []).join(", "));
  fact(list, "device", `${info.device}, ${info.inference ? info.inference.precision : "float32"}`);
  if (info.dataset_hash) fact(list, "dataset", info.dataset_hash.slice(0, 12));
  const reference = info.reference;
  if (reference && reference.consistency_psnr_db && reference.consistency_psnr_db.p50 !== null) {
    const c = reference.consistency_psnr_db;
    fact(list, "consistency on validation", `${c.p50.toFixed(1)} dB median (5th percentile ${c.p05.toFixed(1)} dB)`);
  }
  if (reference && reference.input) {
    fact(list, "training range", reference.input.bands.map((b) => `${b.name} ${b.range[0].toFixed(2)}\u2013${b.range[1].toFixed(2)}`).join(", "));
  }
  list.hidden = false;
  $("card-status").textContent = "";
  const body = $("card-metrics").querySelector("tbody");
  body.replaceChildren();
  const scales = Object.keys(info.metrics || {}).sort((a, b) => Number(a) - Number(b));
  for (const scale of scales) {
    const m = info.metrics[scale];
    const row = document.createElement("tr");
    const gain = m.bicubic_psnr !== undefined ? `${(m.psnr - m.bicubic_psnr >= 0 ? "+" : "")}${(m.psnr - m.bicubic_psnr).toFixed(2)} dB` : "-";
    for (const text of [`x${scale}`, m.psnr.toFixed(2), gain, m.ssim !== undefined ? m.ssim.toFixed(4) : "-"]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  $("card-metrics").hidden = scales.length === 0;
  if (scales.length === 0) $("card-status").textContent = "No test metrics recorded for this model (a local folder).";
  for (const input of [$("scale"), $("scale-number")]) {
    input.min = info.scale_range[0];
    input.max = info.scale_range[1];
  }
  setScale(Math.min(4, info.scale_range[1]));
  $("steps").placeholder = `default ${info.default_steps}`;
}

// The answer's label-free figures (hndsr.monitoring): its consistency with its own input and whether the input
// looks like the training data.
function quality(headers) {
  const consistency = headers.get("X-Consistency-PSNR-dB");
  if (consistency === null) return "";
  const parts = [`Consistency with the input: ${Number(consistency).toFixed(1)} dB`];
  const shift = headers.get("X-Consistency-Shift-Px");
  if (shift !== null) parts[0] += `, shift ${Number(shift).toFixed(2)} px`;
  const inRange = headers.get("X-Input-In-Range");
  if (inRange !== null) {
    const share = Number(inRange);
    parts.push(share >= 0.95 ? `input in the training range (${(100 * share).toFixed(1)} % of pixels)`
      : `input outside the training range: only ${(100 * share).toFixed(1)} % of pixels inside, expect a worse result`);
  }
  const psi = headers.get("X-Input-PSI");
  if (psi !== null) parts.push(`PSI of this input against the training split ${Number(psi).toFixed(2)}`);
  const nodata = Number(headers.get("X-Input-Nodata") || 0);
  if (nodata > 0) parts.push(`${(100 * nodata).toFixed(1)} % nodata`);
  return parts.join("; ") + ".";
}

function setScale(value) {
  $("scale").value = value;
  $("scale-number").value = value;
  $("scale-out").textContent = `x${Number(value).toFixed(2)}`;
}

function clampScale(text) {
  const low = Number($("scale-number").min), high = Number($("scale-number").max), value = Number(text);
  return Number.isFinite(value) && text !== "" ? Math.min(high, Math.max(low, value)) : Number($("scale").value);
}

function displayable(file) {
  return /^image\/(png|jpeg)$/.test(file.type) || /\.(png|jpe?g)$/i.test(file.name);
}

function keep(url) {
  state.urls.push(url);
  return url;
}

async function run(event) {
  event.preventDefault();
  clearError();
  const file = $("file").files[0];
  if (!file) {
    clearResult();
    showError({ error: "missing_file", detail: "choose an image first" }, 0);
    $("file").focus();
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  setScale(clampScale($("scale-number").value));
  form.append("scale", $("scale-number").value);
  if ($("steps").value !== "") form.append("steps", $("steps").value);
  form.append("seed", $("seed").value || "0");
  const format = $("format").value;
  form.append("format", format !== "auto" ? format : isTiff(file) ? "tiff" : "png");
  $("run").disabled = true;
  $("status").textContent = "Running\u2026";
  const started = performance.now();
  try {
    const response = await fetch("/v1/super-resolve", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      clearResult();
      showError(await errorBody(response), response.status);
      if (response.status === 401) $("key-row").hidden = false;
      $("status").textContent = "";
      return;
    }
    const blob = await response.blob();
    clearResult();
    const output = keep(URL.createObjectURL(blob));
    const [width, height] = (response.headers.get("X-Output-Size") || "0x0").split("x").map(Number);
    const png = blob.type === "image/png";
    const input = displayable(file) ? keep(URL.createObjectURL(file)) : "";
    // Browsers cannot show a TIFF: no image boxes then (never a broken image), only the facts and the download.
    if (png) for (const id of ["after", "output-view"]) $(id).src = output;
    if (png && input) for (const id of ["before", "input-view"]) $(id).src = input;
    for (const id of ["after", "before"]) {
      $(id).width = width;
      $(id).height = height;
    }
    $("compare").hidden = !(png && input);
    $("slider-row").hidden = !(png && input);
    $("side-by-side").hidden = !png;
    $("input-view").closest("figure").hidden = !input;
    $("result-quality").textContent = quality(response.headers);
    $("result-facts").textContent =
      `${width}\u00d7${height} px at x${response.headers.get("X-Scale")}, ${response.headers.get("X-Steps")} DDIM steps, ` +
      `seed ${response.headers.get("X-Seed")}, model version ${response.headers.get("X-Model-Version")} ` +
      `(${response.headers.get("X-Model-Alias") || "local"}); ${response.headers.get("X-Inference-Time-Ms")} ms inference, ` +
      `${Math.round(performance.now() - started)} ms in all` + (png ? "" : ". A GeoTIFF: download it to view it in GIS software.");
    const stem = file.name.replace(/\.[^.]+$/, "");
    $("download").href = output;
    $("download").download = `${stem}_x${response.headers.get("X-Scale")}.${png ? "png" : "tif"}`;
    $("result").hidden = false;
    $("status").textContent = "Done.";
    slide();
  } catch (error) {
    clearResult();
    showError({ error: "network", detail: `the request failed: ${error}` }, 0);
    $("status").textContent = "";
  } finally {
    $("run").disabled = false;
  }
}

function slide() {
  const share = Number($("slider").value);
  $("before-clip").style.clipPath = `inset(0 ${100 - share}% 0 0)`;
  $("divider").style.left = `${share}%`;
}

function setUp() {
  $("scale").addEventListener("input", () => setScale($("scale").value));
  $("scale-number").addEventListener("change", () => {
    if ($("scale-number").value !== "") setScale(clampScale($("scale-number").value));
  });
  $("slider").addEventListener("input", slide);
  $("form").addEventListener("submit", run);
  $("key").value = state.key;
  $("key").addEventListener("change", () => {
    state.key = $("key").value.trim();
    sessionStorage.setItem("hndsr-key", state.key);
    loadCard();
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) $("file").files = event.dataTransfer.files;
  });
  setScale($("scale").value);
  loadCard();
}

setUp();
