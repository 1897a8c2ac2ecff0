// The console's one script, written here (no framework, nothing fetched from elsewhere).
// Pages work for reading without it; it adds live updates, the start form's helpers and the
// preview. Every value goes into the page with textContent, never as HTML.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]').content;
const dash = "\u2013";
const count = (n) => (n === null || n === undefined ? dash : n.toLocaleString("en-US"));
const pad = (n) => String(n).padStart(2, "0");

function duration(seconds) {
  if (seconds === null || seconds === undefined) return dash;
  const s = Math.floor(seconds);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + pad(s % 60) + "s";
  return Math.floor(s / 3600) + "h " + pad(Math.floor((s % 3600) / 60)) + "m";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (r.status === 401) { window.location.assign("/console/sign-in?next=" + encodeURIComponent(location.pathname)); return null; }
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

const ENDED = new Set(["completed", "failed", "cancelled"]);
const statusText = (b) => b.status + (b.suspended ? " (suspended)" : "");
const chunksText = (b) => (b.num_chunks === null ? dash : b.chunks_done + " / " + b.num_chunks);
const rowsText = (b) => count(b.rows_delivered) + " / " + count(b.rows_staged);

// --- the list: live while anything runs ---------------------------------------------------
function listPage() {
  const table = document.getElementById("jobs");
  const select = document.getElementById("status");
  const live = document.getElementById("live");
  let status = table.dataset.status || "";
  let timer = null;

  function row(b) {
    const name = el("td", {}, el("a", { href: "/console/backfills/" + encodeURIComponent(b.job_id) }, b.job_name), el("div", { class: "sub" }, b.table));
    const st = el("td", {}, el("span", { class: "status s-" + b.status }, statusText(b)));
    if (b.error_message) st.append(el("div", { class: "sub err" }, b.error_message));
    return el("tr", { "data-job-id": b.job_id }, name, st, el("td", {}, chunksText(b)), el("td", {}, rowsText(b)),
      el("td", {}, count(b.rows_per_second)), el("td", {}, duration(b.elapsed_seconds)), el("td", {}, duration(b.seconds_left)),
      el("td", {}, el("time", { datetime: b.time_created }, b.time_created)));
  }

  async function refresh() {
    clearTimeout(timer);
    let jobs;
    try {
      jobs = await getJSON("/console/api/backfills" + (status ? "?status=" + encodeURIComponent(status) : ""));
    } catch (e) {
      live.textContent = "Not updating: " + e.message;
      timer = setTimeout(refresh, 5000);
      return;
    }
    if (jobs === null) return;
    const body = el("tbody");
    for (const b of jobs) body.append(row(b));
    if (!jobs.length) body.append(el("tr", { class: "empty" }, el("td", { colspan: "8" }, "No backfills" + (status ? " with status " + status : "") + " yet.")));
    table.tBodies[0].replaceWith(body);
    const running = jobs.some((b) => !ENDED.has(b.status));
    live.textContent = (running ? "Live" : "Up to date") + ", " + new Date().toLocaleTimeString();
    timer = setTimeout(refresh, running ? 2000 : 10000);
  }

  select.addEventListener("change", () => {
    status = select.value;
    const url = new URL(location.href);
    if (status) url.searchParams.set("status", status); else url.searchParams.delete("status");
    history.replaceState(null, "", url);
    refresh();
  });
  refresh();
}

// --- one backfill: its progress, live --------------------------------------------------------
function detailPage() {
  const box = document.getElementById("progress");
  const id = box.dataset.jobId;
  const set = (k, v) => { document.getElementById(k).textContent = v; };
  let last = document.getElementById("d-status").textContent;
  async function refresh() {
    let b;
    try { b = await getJSON("/console/api/backfills/" + encodeURIComponent(id)); } catch (e) { setTimeout(refresh, 5000); return; }
    if (b === null) return;
    const st = document.getElementById("d-status");
    st.textContent = statusText(b);
    st.className = "status s-" + b.status;
    set("d-chunks", chunksText(b)); set("d-rows", rowsText(b)); set("d-rate", count(b.rows_per_second));
    set("d-elapsed", duration(b.elapsed_seconds)); set("d-left", duration(b.seconds_left));
    set("d-error", b.error_message || dash); set("d-completed", b.time_completed || dash);
    // A new state brings new Events, conditions and actions: the server renders those.
    if (statusText(b) !== last && ENDED.has(b.status)) { location.reload(); return; }
    last = statusText(b);
    if (!ENDED.has(b.status)) setTimeout(refresh, 2000);
  }
  if (!ENDED.has(last.split(" ")[0])) setTimeout(refresh, 2000);
  document.getElementById("copy-yaml").addEventListener("click", async () => {
    const text = document.getElementById("manifest").textContent;
    try { await navigator.clipboard.writeText(text); set("copied", "Copied."); }
    catch (e) { set("copied", "Select the text and copy it (the browser refused)."); }
  });
  for (const b of document.querySelectorAll("button[data-confirm]")) {
    if (!b.dataset.confirm) continue;
    b.addEventListener("click", (ev) => { if (!window.confirm(b.dataset.confirm)) ev.preventDefault(); });
  }
}

// --- starting one --------------------------------------------------------------------------
function newPage() {
  const form = document.getElementById("new-backfill");
  for (const fs of form.querySelectorAll("fieldset.dest")) {
    const type = fs.querySelector(".dest-type");
    const show = () => {
      for (const f of fs.querySelectorAll(".dest-field")) f.hidden = !type.value || !f.dataset.for.split(" ").includes(type.value);
    };
    type.addEventListener("change", show);
    show();
  }
  document.getElementById("filter_file").addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    if (file) document.getElementById("filter_values").value = (await file.text()).trim();
  });

  function showErrors(errors) {
    for (const p of form.querySelectorAll("p.error[id^='err-']")) { p.hidden = true; p.textContent = ""; }
    for (const [field, messages] of Object.entries(errors)) {
      const p = document.getElementById("err-" + field) || document.getElementById("err-form");
      p.textContent = messages.join("; ");
      p.hidden = false;
    }
  }

  async function preview(button) {
    const body = new URLSearchParams(new FormData(form));
    body.delete("csrf");
    button.disabled = true;
    const old = button.textContent;
    button.textContent = "Asking Snowflake\u2026";
    try {
      const r = await fetch("/console/api/preview", {
        method: "POST", credentials: "same-origin", body,
        headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
      });
      const answer = await r.json();
      if (!r.ok) { showErrors(answer.errors || { form: [answer.detail || "HTTP " + r.status] }); return null; }
      showErrors({});
      return answer;
    } catch (e) {
      showErrors({ form: ["The preview failed: " + e.message] });
      return null;
    } finally {
      button.disabled = false;
      button.textContent = old;
    }
  }

  const columns = document.getElementById("columns");
  document.getElementById("load-columns").addEventListener("click", async (ev) => {
    const answer = await preview(ev.target);
    if (!answer) return;
    const picker = document.getElementById("column-picker");
    const chosen = new Set(columns.value.split(/[\s,]+/).filter(Boolean).map((c) => c.toLowerCase()));
    picker.replaceChildren(el("p", { class: "help" }, "Untick the columns to leave out:"));
    const sync = () => {
      const boxes = [...picker.querySelectorAll("input[type=checkbox]")];
      const on = boxes.filter((b) => b.checked).map((b) => b.value);
      columns.value = on.length === boxes.length ? "" : on.join(", ");
    };
    answer.columns.forEach((c, i) => {
      const box = el("input", { type: "checkbox", id: "col-" + i, value: c.name });
      box.checked = !chosen.size || chosen.has(c.name.toLowerCase());
      box.addEventListener("change", sync);
      picker.append(el("label", { for: "col-" + i, class: "col" }, box, " " + c.name + " ", el("span", { class: "type" }, c.type)));
    });
    picker.hidden = false;
  });

  document.getElementById("preview-button").addEventListener("click", async (ev) => {
    const out = document.getElementById("preview-out");
    out.replaceChildren();
    const answer = await preview(ev.target);
    if (!answer) return;
    const mib = (answer.estimated_bytes / 1048576).toFixed(1);
    out.append(el("dl", { class: "facts", id: "preview-facts" },
      el("dt", {}, "Rows"), el("dd", { id: "p-rows" }, count(answer.num_rows)),
      el("dt", {}, "Staged size (estimate)"), el("dd", {}, mib + " MiB in " + count(answer.estimated_chunks) + " chunk" + (answer.estimated_chunks === 1 ? "" : "s")),
      el("dt", {}, "Duration (estimate)"), el("dd", { id: "p-duration" }, duration(answer.estimated_seconds)),
      el("dt", {}, "Estimated from"), el("dd", {}, answer.estimate_basis),
      el("dt", {}, "Preview took"), el("dd", {}, answer.preview_seconds.toFixed(1) + " s")));
    const transformed = document.getElementById("transform_script").value.trim() !== "";
    if (answer.sample.length) {
      out.append(el("h3", {}, "First rows, as delivered" + (transformed ? " (after the transform)" : "") + (answer.sample_truncated ? " (cut to fit)" : "")));
      for (const row of answer.sample) out.append(el("pre", { class: "sample" }, typeof row === "string" ? row : JSON.stringify(row)));
    } else if (transformed && answer.num_rows) {
      out.append(el("p", { class: "help", id: "p-none" }, "The transform dropped every one of the first rows it was tried on."));
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "list") listPage();
  else if (page === "detail") detailPage();
  else if (page === "new") newPage();
});
