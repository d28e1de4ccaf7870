"""The web page at `/`: a prompt box and the main settings, a live progress bar, the video when
done, and the recent videos as a gallery. One static page over the JSON API (no build step);
with a bearer token set, the page asks for it and sends it with every call (videos are fetched
as blobs, since a <video src> cannot carry an Authorization header)."""

from __future__ import annotations

import html

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>t2v</title>
<style>
body{font-family:sans-serif;margin:1.5em;max-width:960px;background:#fafafa}
textarea{width:100%;height:4em}label{margin-right:1em;font-size:14px}
input[type=number]{width:5em}progress{width:100%;height:1.2em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:180px;background:#fff;padding:5px;border:1px solid #ddd;cursor:pointer}
figure img{width:100%;image-rendering:pixelated}figcaption{font-size:12px}
video{width:384px;image-rendering:pixelated;background:#000}#error{color:#b00}
</style></head><body>
<h1>t2v</h1><p>Model: <code>__MODEL__</code> &middot; <a href="/docs">API</a></p>
<form id="form">
<p id="tokenrow" __TOKEN_HIDDEN__><label>API token <input id="token" type="password"></label></p>
<textarea id="prompt" placeholder="a red circle moving left" required></textarea>
<p><label>negative <input id="negative_prompt"></label>
<label>seed <input id="seed" type="number" min="0"></label>
<label>steps <input id="steps" type="number" min="1"></label>
<label>cfg <input id="cfg" type="number" step="0.5" min="0"></label>
<label>frames <input id="frames" type="number" min="1"></label>
<label>height <input id="height" type="number" min="8"></label>
<label>width <input id="width" type="number" min="8"></label>
<button id="go">Render</button></p></form>
<p id="status">Ready.</p><progress id="bar" max="1" value="0"></progress>
<p id="error"></p><video id="video" controls loop autoplay muted playsinline></video>
<h2>Recent</h2><div id="gallery" class="grid"></div>
<script>
const $ = id => document.getElementById(id);
const headers = () => {
  const t = $("token").value; return t ? {"Authorization": "Bearer " + t} : {};
};
async function blobUrl(url) {
  const r = await fetch(url, {headers: headers()});
  if (!r.ok) throw new Error(url + ": " + r.status);
  return URL.createObjectURL(await r.blob());
}
async function show(v) {
  $("status").textContent = v.status + " - step " + v.progress.step + "/" + v.progress.steps;
  $("bar").value = v.progress.fraction;
  if (v.status === "done") { $("video").src = await blobUrl(v.urls.video); gallery(); }
  if (v.status === "failed") $("error").textContent = v.error;
  return v.status === "done" || v.status === "failed";
}
async function poll(url) {
  for (;;) {
    const r = await fetch(url, {headers: headers()});
    if (!r.ok) { $("error").textContent = "status " + r.status; return; }
    if (await show(await r.json())) return;
    await new Promise(ok => setTimeout(ok, 300));
  }
}
$("form").addEventListener("submit", async e => {
  e.preventDefault(); $("error").textContent = "";
  const body = {prompt: $("prompt").value};
  for (const k of ["negative_prompt"]) if ($(k).value) body[k] = $(k).value;
  for (const k of ["seed", "steps", "frames", "height", "width"])
    if ($(k).value) body[k] = parseInt($(k).value, 10);
  if ($("cfg").value) body.cfg = parseFloat($("cfg").value);
  const r = await fetch("/v1/videos", {method: "POST", body: JSON.stringify(body),
    headers: {...headers(), "Content-Type": "application/json"}});
  const v = await r.json();
  if (r.status === 422) { $("error").textContent = v.detail.map(d => d.msg).join("; "); return; }
  if (!r.ok) { $("error").textContent = r.status + ": " + (v.detail || ""); return; }
  await show(v); await poll(v.urls.self);
});
async function gallery() {
  const r = await fetch("/v1/videos", {headers: headers()});
  if (!r.ok) return;
  const g = $("gallery"); g.replaceChildren();
  for (const v of (await r.json()).videos.filter(v => v.status === "done")) {
    const f = document.createElement("figure"), img = document.createElement("img"),
          c = document.createElement("figcaption");
    c.textContent = v.settings.prompt + " (seed " + v.settings.seed + ")";
    blobUrl(v.urls.poster).then(u => img.src = u).catch(() => {});
    f.onclick = async () => { $("video").src = await blobUrl(v.urls.video); };
    f.append(img, c); g.append(f);
  }
}
$("token").addEventListener("change", gallery);
gallery();
</script></body></html>
"""


def page_html(model: str, token_required: bool) -> str:
    return (_PAGE.replace("__MODEL__", html.escape(model))
            .replace("__TOKEN_HIDDEN__", "" if token_required else "hidden"))
