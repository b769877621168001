// ageray web page: send a photo to POST <root>/v1/predict?distribution=true&faces=all and
// draw the answer: a box with its age on every face, the list of faces, one face's details. Plain browser JavaScript, no libraries, nothing loaded from elsewhere.
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

  // ------------------------------------------------------------------ the photo and its faces
  let photoUrl = null; // object URL of the photo on show (revoked when the next one comes)

  function showPhoto(file) {
    if (photoUrl) URL.revokeObjectURL(photoUrl);
    photoUrl = URL.createObjectURL(file);
    const img = $("photo");
    img.hidden = false;
    img.onerror = () => { img.hidden = true; }; // not decodable here (e.g. HEIC): boxes only
    img.src = photoUrl;
  }

  // The answer's faces. `faces=all` (the default) answers {"faces": [...], "reason", "image"};
  // a `faces=largest` answer is one flat face (its box under "face").
  function facesOf(answer) {
    if (Array.isArray(answer.faces)) return answer.faces;
    const face = answer.face || {};
    return [Object.assign({}, answer, { index: 0, box: face.box, guess: face.found === false })];
  }

  function imageSize(answer) {
    const img = $("photo");
    if (answer.image && answer.image.width && answer.image.height) {
      return [answer.image.width, answer.image.height];
    }
    return [img.naturalWidth || 1, img.naturalHeight || 1];
  }

  // Boxes are positioned in percent of the original image, so they follow the displayed
  // size of the <img> (any window width, a rotated phone) without redrawing.
  function drawBoxes(answer, faces) {
    const layer = $("boxes");
    layer.textContent = "";
    const [W, H] = imageSize(answer);
    faces.forEach((face, n) => {
      if (!face.box || face.box.length !== 4) return;
      const [x0, y0, x1, y1] = face.box;
      const box = document.createElement("div");
      box.className = "box" + (face.guess ? " guess" : "");
      box.dataset.face = String(n);
      box.style.left = (100 * x0 / W) + "%";
      box.style.top = (100 * y0 / H) + "%";
      box.style.width = (100 * (x1 - x0) / W) + "%";
      box.style.height = (100 * (y1 - y0) / H) + "%";
      const tag = document.createElement("span");
      tag.className = "tag" + (y0 / H < 0.08 ? " inside" : "") + ((x0 + x1) / 2 / W > 0.7 ? " right" : "");
      tag.textContent = ageText(face.age);
      box.appendChild(tag);
      box.addEventListener("click", () => pick(n));
      layer.appendChild(box);
    });
  }

  function ageText(age) { return typeof age === "number" ? age.toFixed(1) : "?"; }

  function ivText(iv) {
    return iv ? Math.round(iv.level * 100) + "% interval: " + iv.low.toFixed(0) + "–" + iv.high.toFixed(0) + " years" : "";
  }

  function headText(face) {
    const heads = face.heads || {};
    const other = Object.keys(heads).filter((h) => h !== face.head)
      .map((h) => h + " said " + heads[h].age.toFixed(1)).join(", ");
    return (face.head || "–") + (other ? " (" + other + ")" : "");
  }

  function listFaces(faces) {
    const list = $("faces");
    list.textContent = "";
    $("faces-title").textContent = faces.length === 1 ? "1 face" : faces.length + " faces";
    faces.forEach((face, n) => {
      const li = document.createElement("li");
      li.className = "face";
      li.dataset.face = String(n);
      li.tabIndex = 0;
      const parts = [ageText(face.age) + " years"];
      const iv = ivText(face.interval);
      if (iv) parts.push(iv);
      parts.push("head: " + headText(face));
      if (typeof face.score === "number") parts.push("score " + face.score.toFixed(3));
      const g = classText(face.gender, GENDERS), r = classText(face.race, RACES);
      if (g) parts.push(g);
      if (r) parts.push(r);
      li.textContent = parts.join(" · ");
      li.addEventListener("click", () => pick(n));
      li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") pick(n); });
      list.appendChild(li);
    });
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

  let lastFaces = [], picked = 0;

  // One face's details (the largest first): the big age, its facts and its distribution.
  function pick(n) {
    const face = lastFaces[n];
    if (!face) return;
    picked = n;
    document.querySelectorAll("[data-face]").forEach((el) => {
      el.classList.toggle("picked", el.dataset.face === String(n));
    });
    $("face-title").textContent = lastFaces.length > 1 ? "Face " + (n + 1) + " of " + lastFaces.length : "";
    $("age").textContent = ageText(face.age);
    $("interval").textContent = ivText(face.interval);
    $("head").textContent = headText(face);
    $("rule").textContent = face.rule || "–";
    setFact("score", typeof face.score === "number" ? face.score.toFixed(3) : null);
    setFact("gender", classText(face.gender, GENDERS));
    setFact("race", classText(face.race, RACES));
    drawChart(face.distribution, face);
  }

  function show(answer, name) {
    lastFaces = facesOf(answer);
    $("result").hidden = false;
    $("model").textContent = modelText(answer.model);
    $("model-version").textContent = modelText(answer.model);
    const t = answer.timing_ms;
    $("timing").textContent = t ? Math.round(t.total) + " ms on the server" : "–";
    drawBoxes(answer, lastFaces);
    listFaces(lastFaces);
    const none = lastFaces.length === 0;
    const noface = $("noface");
    noface.hidden = !none;
    noface.textContent = none
      ? "No face found in " + (name || "the photo") + ": " + (answer.reason || "the detector found none") +
        ". Try a photo where the faces are larger, frontal and well lit."
      : "";
    $("picked").hidden = none;
    $("chart-figure").hidden = none;
    $("faces-title").parentElement.hidden = none;
    if (!none) pick(0);
  }

  // ------------------------------------------------------------------ sending
  async function send(file) {
    if (!file) return;
    showError("");
    status("Estimating the ages in " + (file.name || "the photo") + " …");
    // multipart with the file's name, so an error message names the file the person chose
    const form = new FormData();
    form.append("file", file, file.name || "photo");
    let resp;
    try {
      resp = await fetch(ROOT + "/v1/predict?distribution=true&faces=all", {
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
    showPhoto(file);
    show(answer, file.name);
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
    if (lastFaces[picked]) drawChart(lastFaces[picked].distribution, lastFaces[picked]);
  });
  loadModel();
})();
