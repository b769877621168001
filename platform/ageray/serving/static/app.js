// ageray web page: send a photo to POST <root>/v1/predict?distribution=true and draw the
// answer. Plain browser JavaScript, no libraries, nothing loaded from elsewhere.
"use strict";

(function () {
  const body = document.body;
  const ROOT = body.dataset.root || "";
  const GENDERS = JSON.parse(body.dataset.genders || "[]");
  const RACES = JSON.parse(body.dataset.races || "[]");
  const TOKEN_KEY = "ageray.token";
  const $ = (id) => document.getElementById(id);

  const tokenInput = $("token");
  try {
    tokenInput.value = window.localStorage.getItem(TOKEN_KEY) || "";
  } catch (e) { /* storage disabled: the field still works for this page */ }
  tokenInput.addEventListener("change", () => {
    try { window.localStorage.setItem(TOKEN_KEY, tokenInput.value.trim()); } catch (e) {}
    loadModel();
  });

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const token = tokenInput.value.trim();
    if (token) h["Authorization"] = "Bearer " + token;
    return h;
  }

  function status(text) { $("status").textContent = text || ""; }

  function showError(text) {
    const el = $("error");
    el.textContent = text;
    el.hidden = !text;
    if (text) status("");
  }

  // The service's own message when it sent one ({"error": {"code", "message"}}).
  async function errorText(resp) {
    let detail = resp.statusText || "request failed";
    try {
      const data = await resp.json();
      if (data && data.error && data.error.message) {
        detail = data.error.message + " (" + data.error.code + ")";
      }
    } catch (e) { /* not JSON: keep the status text */ }
    if (resp.status === 401) {
      $("auth").open = true;
      return "This service needs an access token: " + detail;
    }
    return "HTTP " + resp.status + ": " + detail;
  }

  function modelText(m) {
    if (!m) return "–";
    let s = (m.name || "model") + (m.version ? " v" + m.version : "");
    if (m.alias) s += " @" + m.alias;
    return s;
  }

  async function loadModel() {
    try {
      const resp = await fetch(ROOT + "/v1/model", { headers: headers() });
      if (resp.ok) {
        const info = await resp.json();
        $("model-version").textContent = modelText(info);
      } else if (resp.status === 401) {
        $("model-version").textContent = "(token needed)";
        $("auth").open = true;
      }
    } catch (e) { /* offline: shown when a photo is sent */ }
  }

  // ------------------------------------------------------------------ drawing
  let image = null; // the decoded photo (ImageBitmap or HTMLImageElement)

  function drawPhoto(face) {
    const canvas = $("photo");
    if (!image) return;
    const w = image.width, h = image.height;
    const scale = Math.min(1, 640 / Math.max(w, h));
    canvas.width = Math.round(w * scale);
    canvas.height = Math.round(h * scale);
    const ctx = canvas.getContext("2d");
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    if (face && face.box && face.box.length === 4) {
      const [x0, y0, x1, y1] = face.box.map((v) => v * scale);
      ctx.lineWidth = Math.max(2, canvas.width / 160);
      ctx.strokeStyle = face.found === false ? "#d97706" : "#16a34a";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
  }

  function drawChart(dist, answer) {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || 600, cssH = canvas.clientHeight || 180;
    canvas.width = Math.round(cssW * ratio);
    canvas.height = Math.round(cssH * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    if (!dist || !dist.length) {
      ctx.fillStyle = "#666";
      ctx.fillText("no distribution for this model", 10, 20);
      return;
    }
    const pad = { l: 8, r: 8, t: 10, b: 22 };
    const W = cssW - pad.l - pad.r, H = cssH - pad.t - pad.b;
    const n = dist.length, bw = W / n;
    const peak = Math.max(...dist) || 1;
    const iv = answer.interval;
    if (iv) { // the 90% interval, shaded
      ctx.fillStyle = "rgba(37, 99, 235, 0.12)";
      const x0 = pad.l + (iv.low + 0.5) * bw, x1 = pad.l + (iv.high + 0.5) * bw;
      ctx.fillRect(x0, pad.t, Math.max(1, x1 - x0), H);
    }
    for (let k = 0; k < n; k++) {
      const bh = (dist[k] / peak) * H;
      ctx.fillStyle = "#2563eb";
      ctx.fillRect(pad.l + k * bw, pad.t + H - bh, Math.max(1, bw - 0.5), bh);
    }
    const xa = pad.l + (answer.age + 0.5) * bw; // the answer (expected age)
    ctx.strokeStyle = "#dc2626";
    ctx.lineWidth = 2;
    ctx.beginPath(); ctx.moveTo(xa, pad.t); ctx.lineTo(xa, pad.t + H); ctx.stroke();
    ctx.fillStyle = "#444";
    ctx.font = "11px system-ui, sans-serif";
    for (let a = 0; a < n; a += 10) {
      ctx.textAlign = a === 0 ? "left" : a + 10 >= n ? "right" : "center";
      ctx.fillText(String(a), Math.min(cssW - 1, pad.l + (a + 0.5) * bw), cssH - 6);
    }
    ctx.textAlign = "left";
  }

  function classText(group, names) {
    if (!group) return null;
    const i = group.index;
    const name = group.label || names[i] || "class " + i;
    const p = group.probs && group.probs[i];
    return p === undefined ? name : name + " (" + Math.round(p * 100) + "%)";
  }

  function setFact(id, text) {
    const show = text !== null && text !== undefined;
    $(id).hidden = !show;
    const label = $(id + "-label");
    if (label) label.hidden = !show;
    if (show) $(id).textContent = text;
  }

  let lastAnswer = null;

  function show(answer) {
    lastAnswer = answer;
    $("result").hidden = false;
    $("age").textContent = answer.age.toFixed(1);
    const iv = answer.interval;
    $("interval").textContent = iv
      ? Math.round(iv.level * 100) + "% interval: " + iv.low.toFixed(0) + "–" + iv.high.toFixed(0) + " years"
      : "";
    const heads = answer.heads || {};
    const other = Object.keys(heads).filter((h) => h !== answer.head)
      .map((h) => h + " said " + heads[h].age.toFixed(1)).join(", ");
    $("head").textContent = answer.head + (other ? " (" + other + ")" : "");
    $("rule").textContent = answer.rule || "–";
    setFact("gender", classText(answer.gender, GENDERS));
    setFact("race", classText(answer.race, RACES));
    $("model").textContent = modelText(answer.model);
    $("model-version").textContent = modelText(answer.model);
    const t = answer.timing_ms;
    $("timing").textContent = t ? Math.round(t.total) + " ms on the server" : "–";
    drawPhoto(answer.face);
    drawChart(answer.distribution, answer);
  }

  // ------------------------------------------------------------------ sending
  async function decodeForPreview(file) {
    try {
      if (window.createImageBitmap) return await createImageBitmap(file);
    } catch (e) { /* not decodable here (e.g. HEIC): the server decides */ }
    return await new Promise((resolve) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => resolve(null);
      img.src = URL.createObjectURL(file);
    });
  }

  async function send(file) {
    if (!file) return;
    showError("");
    status("Estimating the age of " + (file.name || "the photo") + " …");
    image = await decodeForPreview(file);
    // multipart with the file's name, so an error message names the file the person chose
    const form = new FormData();
    form.append("file", file, file.name || "photo");
    let resp;
    try {
      resp = await fetch(ROOT + "/v1/predict?distribution=true", {
        method: "POST",
        headers: headers(),
        body: form,
      });
    } catch (e) {
      showError("The service did not answer: " + e.message);
      return;
    }
    if (!resp.ok) {
      $("result").hidden = true;
      showError(await errorText(resp));
      return;
    }
    const answer = await resp.json();
    status("");
    show(answer);
  }

  for (const id of ["file", "camera"]) {
    $(id).addEventListener("change", (ev) => {
      const f = ev.target.files && ev.target.files[0];
      send(f);
      ev.target.value = ""; // the same file again fires change again
    });
  }
  // A photo dropped anywhere on the page is sent (never opened by the browser instead).
  const drop = $("drop");
  ["dragenter", "dragover"].forEach((t) => document.addEventListener(t, (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => document.addEventListener(t, () => drop.classList.remove("over")));
  document.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const f = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    send(f);
  });
  window.addEventListener("resize", () => { // keep the chart sharp at the new width
    if (lastAnswer) drawChart(lastAnswer.distribution, lastAnswer);
  });
  loadModel();
})();
