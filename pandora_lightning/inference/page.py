"""The `play` page: one HTML file with its script, talking to the JSON API in play.py."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pandora-lightning play</title>
<style>
 body { font: 15px system-ui, sans-serif; margin: 20px; color: #222; max-width: 1100px; }
 h1 { font-size: 20px; margin: 0 0 4px; } .muted { color: #777; }
 img.px { image-rendering: pixelated; } .thumb { width: 48px; height: 48px; margin: 2px; border: 2px solid transparent; cursor: pointer; }
 .thumb.sel { border-color: #2563eb; } #player { width: 256px; height: 256px; border: 1px solid #ccc; background: #eee; }
 #error { color: #b91c1c; min-height: 1.2em; } #note { color: #0f766e; min-height: 1.2em; }
 .row { display: flex; align-items: center; gap: 6px; margin: 3px 0; } .row img { width: 40px; height: 40px; }
 .row .label { width: 220px; } button { padding: 4px 10px; } #action { width: 280px; padding: 5px; }
 .cols { display: flex; gap: 28px; align-items: flex-start; } .branch { cursor: pointer; } .branch.cur { font-weight: bold; }
</style></head><body>
<h1>pandora-lightning play</h1><div class="muted" id="model"></div>
<div class="cols">
 <div>
  <h3>1. Start image</h3>
  <div id="starts"></div>
  <div>or upload: <input type="file" id="upload" accept="image/*"></div>
  <div style="margin-top:6px">seed <input id="seed" type="number" value="0" style="width:60px"> <button id="new">start session</button></div>
  <h3>2. Act</h3>
  <img id="player" class="px" alt="">
  <div class="row"><input id="action" placeholder="type an action, e.g. move left" maxlength="300">
   <button id="go">go</button></div>
  <div id="examples" class="muted"></div>
  <div id="error"></div><div id="note"></div>
  <a id="download" href="#" download>download the episode (mp4)</a>
 </div>
 <div>
  <h3>Episode <span id="sid" class="muted"></span></h3>
  <div id="episode"></div>
  <h3>Branches</h3><div id="branches"></div>
 </div>
</div>
<script>
let info = null, current = null, pick = 0, upload = null, timer = null;
const $ = (id) => document.getElementById(id);
async function api(method, path, body) {
  const r = await fetch(path, {method, headers: {"Content-Type": "application/json"}, body: body ? JSON.stringify(body) : undefined});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}
function show(err) { $("error").textContent = err ? "error: " + err.message : ""; }
function animate(frames) {
  clearInterval(timer); let i = 0; $("player").src = frames[0];
  timer = setInterval(() => { i = (i + 1) % frames.length; $("player").src = frames[i]; }, 125);
}
function render(s) {
  current = s; $("sid").textContent = "(session " + s.id + (s.parent !== null ? ", forked from " + s.parent + " after round " + s.at_round : "") + (s.closed ? ", closed" : "") + ")";
  $("note").textContent = s.note || ""; $("download").href = "/api/sessions/" + s.id + "/video.mp4";
  const ep = $("episode"); ep.innerHTML = "";
  const add = (label, frames, k) => {
    const row = document.createElement("div"); row.className = "row"; row.dataset.round = k;
    const span = document.createElement("span"); span.className = "label"; span.textContent = label; row.appendChild(span);
    frames.forEach((f) => { const im = document.createElement("img"); im.className = "px"; im.src = f; row.appendChild(im); });
    const b = document.createElement("button"); b.textContent = "fork here"; b.className = "fork"; b.dataset.round = k;
    b.onclick = async () => { try { show(); render(await api("POST", "/api/sessions/" + current.id + "/fork", {round: k})); } catch (e) { show(e); } };
    row.appendChild(b); ep.appendChild(row);
  };
  add("start", [s.start], 0);
  s.rounds.forEach((r, i) => add("round " + (i + 1) + ": " + r.action, r.frames, i + 1));
  animate(s.rounds.length ? s.rounds[s.rounds.length - 1].frames : [s.start]);
  const br = $("branches"); br.innerHTML = "";
  s.branches.forEach((b) => {
    const d = document.createElement("div"); d.className = "branch" + (b.id === s.id ? " cur" : "");
    d.textContent = "session " + b.id + ": " + b.rounds + " rounds" + (b.parent !== null ? " (fork of " + b.parent + " after round " + b.at_round + ")" : "");
    br.appendChild(d);
  });
}
async function init() {
  info = await api("GET", "/api/info");
  $("model").textContent = info.checkpoint + " | " + info.height + "x" + info.width + " frames, " + info.new_frames + " new per round, history: " +
    (info.history_rounds === 1 ? "none" : info.history_rounds === 0 ? "all rounds" : info.history_rounds + " rounds");
  info.starts.forEach((src, i) => {
    const im = document.createElement("img"); im.src = src; im.className = "thumb px" + (i === 0 ? " sel" : ""); im.dataset.index = i;
    im.onclick = () => { pick = i; upload = null; document.querySelectorAll(".thumb").forEach((t) => t.classList.toggle("sel", t === im)); };
    $("starts").appendChild(im);
  });
  if (info.examples.length) $("examples").textContent = "try: " + info.examples.join(" | ");
}
$("upload").onchange = () => {
  const f = $("upload").files[0]; if (!f) return;
  const reader = new FileReader(); reader.onload = () => { upload = reader.result; document.querySelectorAll(".thumb").forEach((t) => t.classList.remove("sel")); };
  reader.readAsDataURL(f);
};
$("new").onclick = async () => {
  try { show(); render(await api("POST", "/api/sessions", upload ? {image: upload, seed: +$("seed").value} : {start: pick, seed: +$("seed").value})); } catch (e) { show(e); }
};
async function go() {
  if (!current) { show(new Error("start a session first")); return; }
  if ($("go").disabled) return;  // one round at a time
  $("go").disabled = true;
  try { show(); render(await api("POST", "/api/sessions/" + current.id + "/step", {action: $("action").value})); $("action").value = ""; }
  catch (e) { show(e); } finally { $("go").disabled = false; }
}
$("go").onclick = go;
$("action").addEventListener("keydown", (e) => { if (e.key === "Enter") go(); });
init().catch(show);
</script></body></html>
"""
