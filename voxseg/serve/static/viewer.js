// The voxseg viewer: uploads a case to the server (or opens a finished job) and shows the image with the
// label map overlaid on three planes, through NiiVue. Query parameters: ?job=ID opens that job; &opacity=X.
"use strict";

const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
                 [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]];
const params = new URLSearchParams(window.location.search);
const $ = (id) => document.getElementById(id);
let model = null;
const viewer = new niivue.Niivue({ backColor: [0, 0, 0, 1], show3Dcrosshair: false });

function say(text) { $("status").textContent = text; }

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const answer = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(body.detail || `HTTP ${answer.status}`);
  return body;
}

function labelEntries() {
  // [value, name] of every foreground label of the model (region models: in their output order)
  const entries = Object.entries(model.labels).filter(([name]) => name !== "background");
  return entries.map(([name, value], index) => [Number.isInteger(value) ? value : index + 1, name]);
}

function labelColormap() {
  const entries = labelEntries();
  const top = Math.max(1, ...entries.map(([value]) => value));
  const map = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: ["background"] };
  for (let value = 1; value <= top; value++) {
    const colour = PALETTE[(value - 1) % PALETTE.length];
    const named = entries.find(([v]) => v === value);
    map.R.push(colour[0]); map.G.push(colour[1]); map.B.push(colour[2]); map.A.push(255); map.I.push(value);
    map.labels.push(named ? named[1] : String(value));
  }
  return map;
}

function drawLegend() {
  $("legend").innerHTML = "";
  for (const [value, name] of labelEntries()) {
    const colour = PALETTE[(value - 1) % PALETTE.length];
    const item = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colour.join(",")})`;
    item.append(swatch, `${value} ${name}`);
    $("legend").append(item);
  }
}

async function show(imageUrl, imageName, job) {
  const resultName = `${job.name}_seg${job.result_ending}`;
  await viewer.loadVolumes([
    { url: imageUrl, name: imageName, headers: headers() },
    { url: `/v1/jobs/${job.id}/result`, name: resultName, headers: headers(),
      opacity: Number($("opacity").value) },
  ]);
  viewer.volumes[1].setColormapLabel(labelColormap());
  viewer.setSliceType(viewer.sliceTypeMultiplanar);
  viewer.setOpacity(1, Number($("opacity").value));
  document.body.dataset.shown = job.id;
  say(`job ${job.id.slice(0, 8)}: ${job.name}, done in ${(job.finished - job.created).toFixed(2)} s`);
}

async function waitFor(jobId) {
  for (;;) {
    const job = await api(`/v1/jobs/${jobId}`);
    if (job.state === "done") return job;
    if (job.state === "failed" || job.state === "cancelled") throw new Error(`${job.state}: ${job.error || ""}`);
    say(`job ${jobId.slice(0, 8)}: ${job.state} (${job.stage})`);
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

async function segmentUpload() {
  const files = Array.from($("files").files);
  if (!files.length) { say("choose the channel files of one case first"); return; }
  const form = new FormData();
  files.forEach((file) => form.append("files", file, file.name));
  say("uploading ...");
  const job = await waitFor((await api("/v1/jobs", { method: "POST", body: form })).id);
  const first = files.find((file) => !file.name.toLowerCase().endsWith(".zip"));
  const imageUrl = first ? URL.createObjectURL(first) : `/v1/jobs/${job.id}/input/0`;
  await show(imageUrl, first ? first.name : `${job.name}_0000${job.result_ending}`, job);
  await listJobs();
}

async function openJob(jobId) {
  const job = await waitFor(jobId);
  await show(`/v1/jobs/${job.id}/input/0`, `${job.name}_0000${job.result_ending}`, job);
}

async function listJobs() {
  const { jobs } = await api("/v1/jobs");
  const select = $("jobs");
  select.length = 1;
  for (const job of jobs.filter((j) => j.state === "done").reverse()) {
    select.add(new Option(`${job.name} (${job.id.slice(0, 8)})`, job.id));
  }
}

function guarded(action) {
  return (...args) => action(...args).catch((error) => say(`error: ${error.message}`));
}

async function start() {
  if (params.has("opacity")) $("opacity").value = params.get("opacity");
  await viewer.attachToCanvas($("view"));
  model = await api("/readyz");
  drawLegend();
  $("segment").onclick = guarded(segmentUpload);
  $("jobs").onchange = guarded(async () => { if ($("jobs").value) await openJob($("jobs").value); });
  $("opacity").oninput = () => { if (viewer.volumes.length > 1) viewer.setOpacity(1, Number($("opacity").value)); };
  if (params.has("job")) await openJob(params.get("job"));
  await listJobs().catch(() => say("enter the server's token to list its jobs"));
}

guarded(start)();
