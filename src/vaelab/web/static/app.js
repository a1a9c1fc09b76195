// vaelab serve: every number comes from the server (the library), none is computed here.
const $ = (id) => document.getElementById(id);
const api = async (url, options) => {
  const r = await fetch(url, options);
  const body = await r.json();
  if (!r.ok) throw new Error(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
  return body;
};
const escapeHtml = (t) => t.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const fmt = (v) => v.toFixed(4).replace(/^-(0\.0+)$/, "$1"); // a value that rounds to 0 shows no sign
const gauss = (t, m, s) => Math.exp(-0.5 * ((t - m) / s) ** 2) / (s * Math.sqrt(2 * Math.PI));

// -- views ----------------------------------------------------------------------------------------
function showView() {
  const name = (location.hash || "#kl").slice(1);
  document.querySelectorAll(".view").forEach((v) => v.classList.toggle("active", v.id === "view-" + name));
  document.querySelectorAll(".tab").forEach((a) => a.classList.toggle("active", a.dataset.view === name));
}
window.addEventListener("hashchange", showView);

// -- KL explorer ------------------------------------------------------------------------------------
function plot1d(mu, sigma) {
  const c = $("plot1d"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const x = (t) => ((t + 4) / 8) * W, ymax = Math.max(0.45, gauss(mu, mu, sigma) * 1.05);
  const y = (p) => H - 20 - (p / ymax) * (H - 30);
  g.strokeStyle = "#ccc"; g.beginPath(); g.moveTo(0, y(0)); g.lineTo(W, y(0)); g.stroke();
  for (const [m, s, color, label, row] of [[0, 1, "#7570b3", "prior N(0, 1)", 0], [mu, sigma, "#d95f02", "q = N(μ, σ²)", 1]]) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    for (let i = 0; i <= 400; i++) { const t = -4 + (8 * i) / 400; i ? g.lineTo(x(t), y(gauss(t, m, s))) : g.moveTo(x(t), y(gauss(t, m, s))); }
    g.stroke(); g.fillStyle = color; g.fillText(label, 10, 16 + 14 * row);
  }
  g.fillStyle = "#555"; for (let t = -4; t <= 4; t += 2) g.fillText(String(t), x(t) - 4, H - 5);
}
async function updateKL() {
  const mu = +$("mu").value, sigma = +$("sigma").value;
  $("mu-out").textContent = mu.toFixed(2); $("sigma-out").textContent = sigma.toFixed(2);
  plot1d(mu, sigma);
  const r = await api(`/api/kl?mu=${mu}&sigma=${sigma}`);
  if (+$("mu").value !== mu || +$("sigma").value !== sigma) return; // a newer request is on its way
  $("kl-value").textContent = fmt(r.kl); $("kl-mean").textContent = fmt(r.mean_term); $("kl-width").textContent = fmt(r.width_term);
}
function plot2d(m1, s1, m2, s2, rho) {
  const c = $("plot2d"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const x = (t) => ((t + 4) / 8) * W, y = (t) => H - ((t + 4) / 8) * H;
  g.strokeStyle = "#eee"; g.beginPath(); g.moveTo(x(0), 0); g.lineTo(x(0), H); g.moveTo(0, y(0)); g.lineTo(W, y(0)); g.stroke();
  for (const [a, sa, b, sb, r, color] of [[0, 1, 0, 1, 0, "#7570b3"], [m1, s1, m2, s2, rho, "#d95f02"]]) {
    // the covariance's axes: eigenvalues and the angle of the first eigenvector (drawing only)
    const c12 = r * sa * sb, tr = sa * sa + sb * sb, det = sa * sa * sb * sb - c12 * c12;
    const l1 = tr / 2 + Math.sqrt(tr * tr / 4 - det), l2 = tr / 2 - Math.sqrt(tr * tr / 4 - det);
    const angle = Math.abs(c12) < 1e-12 ? (sa >= sb ? 0 : Math.PI / 2) : Math.atan2(l1 - sa * sa, c12);
    for (const k of [1, 2]) {
      g.strokeStyle = color; g.setLineDash(k === 2 ? [3, 3] : []); g.beginPath();
      g.ellipse(x(a), y(b), (k * Math.sqrt(l1) * W) / 8, (k * Math.sqrt(Math.max(l2, 0)) * H) / 8, -angle, 0, 2 * Math.PI); g.stroke();
    }
  }
  g.setLineDash([]); g.fillStyle = "#555"; g.fillText("z₁", W - 14, y(0) - 4); g.fillText("z₂", x(0) + 4, 12);
}
async function updateKL2() {
  const [m1, s1, m2, s2, rho] = ["mu1", "s1", "mu2", "s2", "rho"].map((id) => +$(id).value);
  $("rho-out").textContent = rho.toFixed(2);
  plot2d(m1, s1, m2, s2, rho);
  const r = await api(`/api/kl2?mu1=${m1}&s1=${s1}&mu2=${m2}&s2=${s2}&rho=${rho}`);
  $("kl1").textContent = fmt(r.kl1); $("kl2").textContent = fmt(r.kl2); $("klrho").textContent = fmt(r.correlation);
  $("kl12").textContent = fmt(r.kl);
}

// -- the KL as an expectation: sampling ------------------------------------------------------------
let batches = 0;
function plotMC(r) {
  const c = $("plotmc"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const lo = Math.min(...r.newest, r.closed_form - 1), hi = Math.max(...r.newest, r.closed_form + 1);
  const n = r.count[r.count.length - 1];
  const x = (i) => 30 + ((W - 40) * i) / n, y = (v) => H - 20 - ((v - lo) / (hi - lo)) * (H - 30);
  g.fillStyle = "rgba(217, 95, 2, 0.25)";  // the newest batch's samples, at their place in the sequence
  r.newest.forEach((v, i) => g.fillRect(x(n - r.newest.length + i) - 1, y(v) - 1, 2, 2));
  g.fillStyle = "rgba(117, 112, 179, 0.25)"; g.beginPath();  // the band of +- 2 standard errors
  r.count.forEach((k, i) => (i ? g.lineTo(x(k), y(r.mean[i] + 2 * r.std_error[i])) : g.moveTo(x(k), y(r.mean[i] + 2 * r.std_error[i]))));
  for (let i = r.count.length - 1; i >= 0; i--) g.lineTo(x(r.count[i]), y(r.mean[i] - 2 * r.std_error[i]));
  g.closePath(); g.fill();
  g.strokeStyle = "#7570b3"; g.lineWidth = 2; g.beginPath();
  r.count.forEach((k, i) => (i ? g.lineTo(x(k), y(r.mean[i])) : g.moveTo(x(k), y(r.mean[i])))); g.stroke();
  g.strokeStyle = "#333"; g.lineWidth = 1; g.setLineDash([4, 4]); g.beginPath();
  g.moveTo(x(0), y(r.closed_form)); g.lineTo(W - 10, y(r.closed_form)); g.stroke(); g.setLineDash([]);
  g.fillStyle = "#555"; g.fillText(`${n} samples`, W - 80, H - 5); g.fillText(hi.toFixed(1), 2, 12); g.fillText(lo.toFixed(1), 2, H - 20);
}
async function drawSamples() {
  batches += 1;
  const r = await api(`/api/kl/samples?mu=${+$("mu").value}&sigma=${+$("sigma").value}&batch_size=200&batches=${batches}`);
  const last = r.mean.length - 1, mean = r.mean[last], band = 2 * r.std_error[last];
  $("mc-count").textContent = String(r.count[last]); $("mc-mean").textContent = fmt(mean);
  $("mc-band").textContent = fmt(band); $("mc-closed").textContent = fmt(r.closed_form);
  $("mc-verdict").textContent = Math.abs(mean - r.closed_form) <= band
    ? "the closed form lies inside the band" : "the closed form lies outside the band (it happens 1 time in 20)";
  plotMC(r);
}
function resetSamples() {
  batches = 0; ["mc-mean", "mc-band", "mc-closed", "mc-verdict"].forEach((id) => ($(id).textContent = ""));
  $("mc-count").textContent = "0"; const c = $("plotmc"); c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

// -- image inspector ----------------------------------------------------------------------------------
function bars(kl) {
  const c = $("bars"), g = c.getContext("2d"), W = c.width, H = c.height;
  g.clearRect(0, 0, W, H);
  const top = Math.max(...kl, 1e-9), w = W / kl.length;
  kl.forEach((v, j) => {
    g.fillStyle = "#d95f02"; g.fillRect(j * w + 1, H - 18 - (v / top) * (H - 30), w - 2, (v / top) * (H - 30));
    g.fillStyle = "#555"; if (kl.length <= 32) g.fillText("z" + j, j * w + 2, H - 4);
  });
  g.fillText(`max ${top.toFixed(2)} nats`, W - 90, 12);
}
function showInspection(r) {
  // r.kl: the KL of each dimension where the prior factorises (closed form); null where it does not,
  // and then r.kl_total is a Monte Carlo estimate with its standard error r.kl_std_error
  $("inspect-error").textContent = "";
  $("img").src = r.image; $("recon").src = r.reconstruction; $("kl-total").textContent = fmt(r.kl_total);
  $("kl-how").textContent = r.kl_how;
  const b = r.bits; // what vaelab compress paid for this image, where the run has its record
  $("bits").textContent = b
    ? `As bits (vaelab compress, bits-back): x ${b.pixels.toFixed(1)} + z net ${b.z_net.toFixed(1)} ` +
      `(pushed ${b.z_pushed.toFixed(1)}, got back ${b.z_back.toFixed(1)}) = ${b.net.toFixed(1)} bits; ` +
      `the KL term is ${b.kl.toFixed(1)} bits, −ELBO ${b.neg_elbo.toFixed(1)} bits.`
    : "";
  const c = $("bars"), g = c.getContext("2d");
  if (r.kl) bars(r.kl);
  else {
    g.clearRect(0, 0, c.width, c.height); g.fillStyle = "#555";
    g.fillText("no KL per dimension: this prior does not factorise over the dimensions of z", 10, c.height / 2);
  }
  const kl = (j) => (r.kl ? `<td>${r.kl[j].toFixed(3)}</td>` : "");
  if (r.mode) { // categorical variables: each one's most probable category, its probability, its KL
    $("dims").innerHTML = "<tr><th>variable</th><th>category</th><th>q(category|x)</th><th>KL (nats)</th></tr>" +
      r.mode.map((k, j) => `<tr><td>z${j}</td><td>${k}</td><td>${r.p_mode[j].toFixed(3)}</td>${kl(j)}</tr>`).join("");
    return;
  }
  $("dims").innerHTML = `<tr><th>dim</th><th>μ</th><th>σ</th>${r.kl ? "<th>KL (nats)</th>" : ""}</tr>` +
    r.mu.map((m, j) => `<tr><td>z${j}</td><td>${m.toFixed(3)}</td><td>${r.sigma[j].toFixed(3)}</td>${kl(j)}</tr>`).join("");
}
async function inspectIndex(i) {
  try { $("index").value = i; showInspection(await api(`/api/test/${i}`)); }
  catch (e) { $("inspect-error").textContent = e.message; }
}
async function inspectUpload() {
  const file = $("upload").files[0];
  if (!file) return;
  const form = new FormData(); form.append("file", file);
  if (labelled) form.append("label", $("upload-label").value);
  try { showInspection(await api("/api/inspect", { method: "POST", body: form })); }
  catch (e) { $("inspect-error").textContent = e.message; }
}

// -- latent explorer ------------------------------------------------------------------------------------
let pending = null;
let labelled = false; // a conditional model: the decoder and the encoder are given a label y
async function decodeSliders() {
  const sliders = [...document.querySelectorAll("#sliders input, #sliders select")];
  const z = new Array(sliders.length);
  sliders.forEach((s) => {
    if (s.tagName === "SELECT") { z[+s.dataset.dim] = s.value; return; } // a categorical variable's category
    z[+s.dataset.dim] = (+s.value).toFixed(3); s.nextElementSibling.textContent = (+s.value).toFixed(2);
  });
  const key = z.join(",");
  pending = key;
  const label = labelled ? `&label=${$("decode-label").value}` : "";
  const r = await api(`/api/decode?z=${key}${label}`);
  if (pending === key) $("decoded").src = r.image;
}

// -- start ------------------------------------------------------------------------------------------------
async function start() {
  showView();
  ["mu", "sigma"].forEach((id) => $(id).addEventListener("input", updateKL));
  ["mu1", "s1", "mu2", "s2", "rho"].forEach((id) => $(id).addEventListener("input", updateKL2));
  ["mu", "sigma"].forEach((id) => $(id).addEventListener("input", resetSamples));
  $("draw").addEventListener("click", drawSamples); $("reset").addEventListener("click", resetSamples);
  updateKL(); updateKL2();
  const m = await api("/api/model");
  const names = { mutual_information: "MI", total_correlation: "TC", dimension_wise_kl: "dimension-wise KL", marginal_kl: "marginal KL" };
  const layers = m.layers ? Object.entries(m.layers) : null;
  const top = layers ? ` of the top layer ${layers[0][0]}` : "";
  $("run").textContent = layers
    ? `${m.run}: ${m.data}, latent layers ${layers.map(([n, l]) => `${n} (${l.dims} dims, KL ${l.kl.toFixed(2)} nats)`).join(", ")}; ${m.test_count} test images; the sliders move ${layers[0][0]}`
    : `${m.run}: ${m.data}, ${m.latent_dim} ${m.codebook ? `positions, each one of ${m.categories} codes` : m.categories ? `categorical variables of ${m.categories} categories` : "latent dimensions"}, ${m.test_count} test images` +
      (m.classes ? `; conditional on ${m.classes} labels` : "");
  if (m.kl_parts) {
    const label = (k) => names[k] ?? `KL of ${k.replace("kl_", "")}`;
    const parts = Object.entries(m.kl_parts).map(([k, v]) => `${label(k)} ${v.toFixed(2)}`).join(" + ");
    $("kl-parts").textContent = `Over the test set, the average KL = ${parts} nats (the parts${top}: one z per image, ` +
      "the aggregate posterior of all of them; see vaelab evaluate).";
  } else {
    $("kl-parts").textContent = "This posterior is not Gaussian (a flow), so its aggregate over the test set has no " +
      "density to take the KL apart with.";
  }
  $("evaluation-title").textContent = m.measured_here
    ? `the run's evaluation (measured for this page on ${m.test_count} test images; vaelab evaluate adds log p(x))`
    : "the run's evaluation (its evaluation.json, as vaelab evaluate printed it)";
  $("evaluation").innerHTML = m.evaluation.map((r) => {
    const name = "&nbsp;".repeat(4 * r.depth) + escapeHtml(r.name);
    const value = r.value === null ? "" : Number.isInteger(r.value) ? String(r.value) : r.value.toFixed(3);
    return `<tr><td class="l">${name}</td><td>${value}</td><td>${escapeHtml(r.value === null ? r.note : r.unit)}</td>` +
      `<td class="l"><small>${r.value === null ? "" : escapeHtml(r.note)}</small></td></tr>`;
  }).join("");
  $("index").max = m.test_count - 1;
  if (m.classes) {
    labelled = true;
    const options = [...Array(m.classes).keys()].map((c) => `<option value="${c}">${c}</option>`).join("");
    for (const id of ["upload-label", "decode-label"]) $(id).innerHTML = options;
    document.querySelectorAll(".conditional").forEach((e) => { e.hidden = false; });
    $("decode-label").addEventListener("change", decodeSliders);
  }
  for (const [id, list] of [["highest", m.highest_kl], ["lowest", m.lowest_kl]]) {
    const se = (e) => (e.std_error === undefined ? "" : ` ± ${e.std_error.toFixed(2)}`);
    $(id).innerHTML = list.map((e) => `<li><a data-index="${e.index}">#${e.index}</a> ${e.kl.toFixed(2)}${se(e)} nats</li>`).join("");
  }
  document.querySelectorAll("ol a").forEach((a) => a.addEventListener("click", () => inspectIndex(+a.dataset.index)));
  $("show").addEventListener("click", () => inspectIndex(+$("index").value));
  $("upload").addEventListener("change", inspectUpload);
  if (m.categories) {
    $("latent-note").textContent = m.codebook
      ? `One code picker per position (of ${m.categories} codes, z their codebook vectors); the image is the decoder's mean.`
      : `One category picker per variable (of ${m.categories} categories, z one-hot), ` +
        "the variables with the most KL first; the image is the decoder's mean.";
    $("recon-at").textContent = m.codebook ? "the nearest codes" : "each variable's most probable category";
  }
  const kl = (j) => (m.kl_per_dim ? `(${m.kl_per_dim[j].toFixed(2)} nats)` : "");
  const picker = (j) => `<select data-dim="${j}">` + // a categorical variable: one of its categories
    [...Array(m.categories).keys()].map((k) => `<option value="${k}">${m.codebook ? "code" : "category"} ${k}</option>`).join("") + "</select>";
  $("sliders").innerHTML = m.dims_by_kl.map((j) => `<label><span>z${j} <small>${kl(j)}</small></span> ` +
    (m.categories ? picker(j) : `<input type="range" min="-3" max="3" step="0.05" value="0" data-dim="${j}"><output></output>`) +
    "</label>").join("");
  document.querySelectorAll("#sliders input, #sliders select").forEach((s) => s.addEventListener("input", decodeSliders));
  decodeSliders(); inspectIndex(0);
}
start();
