"use strict";
const $ = (id) => document.getElementById(id);
let job = null, lastSeed = null, lastBody = null;

function key() { return localStorage.getItem("craftserve-key") || ""; }
function auth() { return { "Authorization": "Bearer " + key() }; }
function showKey() { $("keystate").textContent = key() ? "key saved" : "no key: enter one first"; }

$("keyform").addEventListener("submit", (e) => {
  e.preventDefault(); localStorage.setItem("craftserve-key", $("key").value.trim()); $("key").value = ""; showKey();
});

async function fill(select, routes) {
  for (const route of routes) {
    try {
      const answer = await fetch(route);
      if (!answer.ok) continue;  // a discovery route this server lacks
      for (const name of await answer.json()) select.add(new Option(name, name));
    } catch (_) { /* tolerate a missing route */ }
  }
}
fill($("model"), ["/sd/models-sdxl", "/sd/models-sd"]);
fill($("sampler"), ["/sd/samplers"]);
fill($("lora"), ["/sd/loras-sdxl", "/sd/loras-sd"]);
$("size").addEventListener("change", () => { const [w, h] = $("size").value.split("x"); $("width").value = w; $("height").value = h; });
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
  return body;
}

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
  $("curl").hidden = false; $("py").hidden = false;
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
