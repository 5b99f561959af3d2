"use strict";
const $ = (id) => document.getElementById(id);
let job = null, lastSeed = null, lastBody = null;

function key() { return localStorage.getItem("craftserve-key") || ""; }
function auth() { return { "Authorization": "Bearer " + key() }; }
function showKey() { $("keystate").textContent = key() ? "key saved" : "no key: enter one first"; }

$("keyform").addEventListener("submit", (e) => {
  e.preventDefault(); localStorage.setItem("craftserve-key", $("key").value.trim()); $("key").value = ""; showKey();
fillControl();
  fillControl();
});

// The ControlNet pickers: served models and preprocessors, asked with the caller's key (the
// /controlnet routes want one); filled again when a key is saved.
async function fillControl() {
  if (!key()) return;
  const lists = [["cnmodel", "/controlnet/model_list", "model_list"], ["cnmodule", "/controlnet/module_list", "module_list"]];
  for (const [id, route, field] of lists) {
    try {
      const answer = await fetch(route, { headers: auth() });
      if (!answer.ok) continue;  // a wrong key, or a server without ControlNet
      const select = $(id), keep = select.value;
      for (const option of [...select.options].slice(1)) option.remove();
      for (const name of (await answer.json())[field] || []) if (name !== select.options[0].value) select.add(new Option(name, name));
      select.value = [...select.options].some((o) => o.value === keep) ? keep : select.options[0].value;
    } catch (_) { /* tolerate a missing route */ }
  }
}

async function fill(select, routes) {
  for (const route of routes) {
    try {
      const answer = await fetch(route);
      if (!answer.ok) continue;  // a discovery route this server lacks
      for (const name of await answer.json()) select.add(new Option(name, name));
    } catch (_) { /* tolerate a missing route */ }
  }
}
// The default model preselected: the first of the models file that can serve now
// (tiny-sdxl on a machine without sdxl-base's weights), as the API's default.
fill($("model"), ["/sd/models-sdxl", "/sd/models-sd"]).then(async () => {
  try {
    const answer = await fetch("/sd/models-status");
    if (!answer.ok) return;
    const chosen = (await answer.json()).find((m) => m.default);
    if (chosen && [...$("model").options].some((o) => o.value === chosen.name)) $("model").value = chosen.name;
  } catch (_) { /* the first option stays */ }
});
fill($("sampler"), ["/sd/samplers"]);
fill($("lora"), ["/sd/loras-sdxl", "/sd/loras-sd"]);
$("size").addEventListener("change", () => {
  if (!$("size").value) return;  // "custom": width and height stay as typed
  const [w, h] = $("size").value.split("x"); $("width").value = w; $("height").value = h;
});
// The preset follows width and height: the matching one, else "custom".
function syncSize() {
  const wanted = $("width").value + "x" + $("height").value;
  $("size").value = [...$("size").options].some((o) => o.value === wanted) ? wanted : "";
}
for (const id of ["width", "height"]) { $(id).addEventListener("input", syncSize); $(id).addEventListener("change", syncSize); }
syncSize();
$("reuse").addEventListener("click", () => { if (lastSeed !== null) $("seed").value = lastSeed; });

function clearErrors() { document.querySelectorAll(".err").forEach((el) => { el.textContent = ""; }); }
function showError(body) {
  const message = (body && (body.detail || (body.error && body.error.message))) || "request failed";
  let shown = false;
  for (const item of (body && body.errors) || []) {
    const field = item.loc && item.loc[item.loc.length - 1];
    const el = $("err-" + field);
    if (el) { el.textContent = message; shown = true; }
  }
  if (!shown && /controlnet\[/.test(message)) { $("err-controlnet").textContent = message; shown = true; }
  const named = /doesn't have (\w+)/.exec(message);
  if (!shown && named && $("err-" + named[1])) { $("err-" + named[1]).textContent = message; shown = true; }
  if (!shown) $("err-body").textContent = message;
}

function requestBody() {
  const body = {
    model: $("model").value, prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value || undefined, steps: Number($("steps").value), width: Number($("width").value),
    height: Number($("height").value), cfg_scale: Number($("cfg_scale").value), seed: Number($("seed").value),
    previews: $("previews").checked,
  };
  if ($("lora").value) body.loras = { [$("lora").value]: Number($("loraweight").value) };
  const unit = controlUnit();
  if (unit) body.controlnet = [unit];
  if (source) {
    body.init_image = source;
    body.strength = Number($("strength").value);
    if (maskPainted()) {
      body.mask = maskPng();
      body.mask_blur = Number($("mask_blur").value);
      body.inpaint_full_res = $("inpaint_full_res").checked;
    }
  }
  return body;
}

// -- the source picture and its mask --------------------------------------------------------
// The picture is sent as the data: URL it was read as. The mask is painted white on a
// transparent canvas of the picture's own size (shown half-opaque over it) and sent as a PNG,
// white (repaint) on black (keep).
let source = null;  // data: URL of the picture, or null
const canvas = $("mask"), pen = canvas.getContext("2d");

function fitSize(w, h) {  // the server's rule for img2img sizes: at most 1024 a side, at least 64, multiples of 8
  let scale = Math.min(1, 1024 / Math.max(w, h));
  scale = Math.max(scale, 64 / Math.min(w, h));
  const side = (v) => Math.min(1024, Math.max(64, Math.round(v * scale / 8) * 8));
  return [side(w), side(h)];
}

function setPicture(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("err-init_image").textContent = file ? `${file.name || "that"} is not a picture` : "";
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    const img = $("source");
    img.onload = () => {
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      clearMask();
      const [w, h] = fitSize(img.naturalWidth, img.naturalHeight);
      $("width").value = w; $("height").value = h; syncSize();
      $("canvaswrap").hidden = false; $("imagetools").hidden = false;
    };
    img.onerror = () => { $("err-init_image").textContent = "this browser cannot show that picture"; removePicture(); };
    source = reader.result; img.src = source; $("err-init_image").textContent = "";
  };
  reader.readAsDataURL(file);
}

function removePicture() {
  source = null; $("source").removeAttribute("src"); $("file").value = "";
  $("canvaswrap").hidden = true; $("imagetools").hidden = true;
}

function clearMask() { pen.clearRect(0, 0, canvas.width, canvas.height); }

function invertMask() {  // painted becomes clear and clear becomes painted
  const pixels = pen.getImageData(0, 0, canvas.width, canvas.height), d = pixels.data;
  for (let i = 0; i < d.length; i += 4) { d[i] = d[i + 1] = d[i + 2] = 255; d[i + 3] = 255 - d[i + 3]; }
  pen.putImageData(pixels, 0, 0);
}

function maskPainted() {
  if (!canvas.width) return false;
  const d = pen.getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 3; i < d.length; i += 4) if (d[i]) return true;
  return false;
}

function maskPng() {
  const out = document.createElement("canvas");
  out.width = canvas.width; out.height = canvas.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000"; ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(canvas, 0, 0);
  return out.toDataURL("image/png");
}

// Painting: pointer events (mouse, pen, touch), in the canvas's own pixels whatever its shown size.
let last = null;
function at(e) {
  const box = canvas.getBoundingClientRect();
  return [(e.clientX - box.left) * canvas.width / box.width, (e.clientY - box.top) * canvas.height / box.height];
}
function brushWidth() { return Number($("brush").value) * canvas.width / Math.max(1, canvas.getBoundingClientRect().width); }
function stroke(from, to) {
  pen.strokeStyle = pen.fillStyle = "#fff"; pen.lineWidth = brushWidth(); pen.lineCap = pen.lineJoin = "round";
  pen.beginPath(); pen.moveTo(...from); pen.lineTo(...to); pen.stroke();
}
canvas.addEventListener("pointerdown", (e) => {
  e.preventDefault(); canvas.setPointerCapture(e.pointerId); last = at(e); stroke(last, last);
});
canvas.addEventListener("pointermove", (e) => { if (last) { const p = at(e); stroke(last, p); last = p; } });
for (const name of ["pointerup", "pointercancel"]) canvas.addEventListener(name, () => { last = null; });

// -- the ControlNet unit -----------------------------------------------------------------------
// One unit of the job API's `controlnet` list when a model is picked: the control picture as
// the data: URL it was read as (none: the server uses the picture to start from).
let control = null;  // data: URL of the control picture, or null
function controlUnit() {
  if (!$("cnmodel").value) return null;
  const unit = { model: $("cnmodel").value, module: $("cnmodule").value, weight: Number($("cnweight").value),
    guidance_start: Number($("cnstart").value), guidance_end: Number($("cnend").value) };
  if (control) unit.image = control;
  return unit;
}
function setControl(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("err-controlnet").textContent = file ? `${file.name || "that"} is not a picture` : ""; return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    control = reader.result; $("controlpreview").src = control; $("controlpreview").hidden = false;
    $("err-controlnet").textContent = "";
  };
  reader.readAsDataURL(file);
}
$("controlfile").addEventListener("change", () => setControl($("controlfile").files[0]));
$("removecontrol").addEventListener("click", () => {
  control = null; $("controlfile").value = ""; $("controlpreview").removeAttribute("src"); $("controlpreview").hidden = true;
});

$("file").addEventListener("change", () => setPicture($("file").files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault(); $("drop").classList.remove("over"); setPicture(e.dataTransfer.files[0]);
});
$("drop").addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
document.addEventListener("paste", (e) => {
  const file = [...(e.clipboardData ? e.clipboardData.files : [])].find((f) => f.type.startsWith("image/"));
  if (file) { e.preventDefault(); setPicture(file); }  // text pastes into fields as usual
});
$("clearmask").addEventListener("click", clearMask);
$("invertmask").addEventListener("click", invertMask);
$("removeimage").addEventListener("click", removePicture);
$("strength").addEventListener("input", () => { $("strengthval").textContent = Number($("strength").value).toFixed(2); });
$("brush").addEventListener("input", () => { $("brushval").textContent = $("brush").value; });

async function events(url, onEvent) {
  const answer = await fetch(url, { headers: auth() });
  if (!answer.ok) { showError(await answer.json()); return; }
  const reader = answer.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r/g, "");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

$("gen").addEventListener("submit", async (e) => {
  e.preventDefault(); clearErrors();
  if (!key()) { $("err-body").textContent = "enter your API key first"; $("key").focus(); return; }
  const body = requestBody();
  const answer = await fetch("/jobs", { method: "POST", headers: { ...auth(), "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const made = await answer.json();
  if (answer.status !== 202) { showError(made); return; }
  job = made; lastBody = body;
  $("cancel").disabled = false; $("bar").value = 0; $("status").textContent = "queued";
  $("result").hidden = true; $("preview").hidden = true;
  await events(made.events_url, (name, data) => {
    if (name === "queued") $("status").textContent = "queued" + (data.position ? ", position " + data.position : "");
    else if (name === "started") $("status").textContent = "started";
    else if (name === "progress") {
      $("bar").value = data.step / data.steps;
      $("status").textContent = `step ${data.step}/${data.steps}` + (data.eta_s != null ? `, eta ${data.eta_s} s` : "");
    } else if (name === "preview") { $("preview").src = "data:image/png;base64," + data.png_base64; $("preview").hidden = false; }
    else if (name === "done") { done(made, data); }
    else if (name === "failed") { $("status").textContent = "failed"; showError({ detail: data.error.message }); }
    else if (name === "cancelled") { $("status").textContent = "cancelled"; }
  });
  $("cancel").disabled = true;
});

async function done(made, data) {
  $("bar").value = 1; $("status").textContent = "done"; lastSeed = data.seed;
  const answer = await fetch(made.image_url, { headers: auth() });
  const blob = await answer.blob(), url = URL.createObjectURL(blob);
  $("result").src = url; $("result").hidden = false; $("preview").hidden = true;
  $("download").href = url; $("download").download = made.id + ".png"; $("download").hidden = false;
  $("info").textContent = pngText(new Uint8Array(await blob.arrayBuffer())); $("info").hidden = false;
  // the Python snippet posts to /sd, which takes no picture: offered for plain text to image only
  $("curl").hidden = false; $("py").hidden = Boolean(lastBody && (lastBody.init_image || lastBody.controlnet));
  const thumb = new Image(); thumb.src = url; thumb.alt = "seed " + data.seed; $("history").prepend(thumb);
  while ($("history").children.length > 12) $("history").lastChild.remove();
}

function pngText(bytes) {  // the tEXt "parameters" chunk of a PNG
  const view = new DataView(bytes.buffer);
  for (let at = 8; at + 8 < bytes.length;) {
    const length = view.getUint32(at), type = String.fromCharCode(...bytes.slice(at + 4, at + 8));
    if (type === "tEXt") {
      const text = new TextDecoder("latin1").decode(bytes.slice(at + 8, at + 8 + length));
      if (text.startsWith("parameters\0")) return text.slice(11);
    }
    at += 12 + length;
  }
  return "";
}

$("cancel").addEventListener("click", async () => {
  if (!job) return;
  const answer = await fetch(job.status_url, { method: "DELETE", headers: auth() });
  const state = await answer.json();
  if (!answer.ok) showError(state); else $("status").textContent = state.status;
});
$("curl").addEventListener("click", () => navigator.clipboard.writeText(craftSnippets.curlCommand(location.origin, lastBody)));
$("py").addEventListener("click", () => navigator.clipboard.writeText(craftSnippets.pythonSnippet(location.origin, lastBody)));
showKey();
fillControl();
