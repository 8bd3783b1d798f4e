// The dashboard's script (served from /ui/static; the CSP allows no inline script): the login
// form, the live view fed by /ui/events, the Load/Unload buttons and the backend log tails.
// Everything the server sends is put in the page as text (textContent), never as markup, except
// /ui/recent, which is HTML the server rendered and escaped.
"use strict";

(function () {
  // ----- formats (as proxy/dashboard/views.py formats the first render) -----------------------
  function formatBytes(size) {
    if (size === null || size === undefined) return "-";
    let value = Number(size);
    const units = ["B", "KiB", "MiB", "GiB"];
    for (let i = 0; i < units.length; i++) {
      if (Math.abs(value) < 1024 || i === units.length - 1) {
        return i === 0 ? value.toFixed(0) + " B" : value.toFixed(1) + " " + units[i];
      }
      value /= 1024;
    }
    return "-";
  }

  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 1) return (seconds * 1000).toFixed(0) + " ms";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const whole = Math.floor(seconds);
    const pad = (n) => String(n).padStart(2, "0");
    if (whole < 3600) return Math.floor(whole / 60) + "m " + pad(whole % 60) + "s";
    return Math.floor(whole / 3600) + "h " + pad(Math.floor((whole % 3600) / 60)) + "m";
  }

  function idleText(model) {
    if (model.state !== "ready") return "-";
    if (model.leases) return "in use";
    if (!model.expires_at) return model.keep_alive_s === null ? "never" : "-";
    const remaining = (Date.parse(model.expires_at) - Date.now()) / 1000;
    return "unloads in " + formatSeconds(Math.max(0, remaining));
  }

  function footprintText(model) {
    const footprint = model.footprint || {};
    const parts = ["vram", "ram"].filter((kind) => footprint[kind]).map((kind) => kind + " " + formatBytes(footprint[kind]));
    if (!parts.length) return "unknown";
    const where = footprint.gpus && footprint.gpus.length ? " on " + footprint.gpus.map((i) => "gpu" + i).join("+") : "";
    return parts.join(", ") + where + " (" + (footprint.source || "unknown") + ")";
  }

  function pairsText(mapping) {
    const entries = Object.entries(mapping || {});
    return entries.length ? entries.map(([name, size]) => name + " " + formatBytes(size)).join(", ") : "-";
  }

  // ----- small helpers -----------------------------------------------------------------------
  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function say(text, isError) {
    const box = document.getElementById("message");
    if (!box) return;
    box.textContent = text;
    box.hidden = !text;
    box.classList.toggle("error", Boolean(isError));
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error) return typeof body.error === "string" ? body.error : body.error.message;
    } catch (ignored) { /* not JSON */ }
    return response.status + " " + response.statusText;
  }

  function cell(tag, text, className) {
    const element = document.createElement(tag);
    element.textContent = text;
    if (className) element.className = className;
    return element;
  }

  // ----- login -------------------------------------------------------------------------------
  function setUpLogin(form) {
    const failure = document.getElementById("login-error");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const key = form.elements.key.value.trim();
      failure.hidden = true;
      // The key goes in a header, the way API clients send it, and the request has no body.
      const response = await fetch("/ui/login", {
        method: "POST", credentials: "same-origin", headers: { "Authorization": "Bearer " + key },
      });
      if (response.ok) {
        window.location.assign("/ui");
        return;
      }
      failure.textContent = await errorMessage(response);
      failure.hidden = false;
    });
  }

  // ----- the live view -----------------------------------------------------------------------
  function fillRow(row, model) {
    const set = (field, text) => {
      const element = row.querySelector('[data-field="' + field + '"]');
      if (element && element.textContent !== String(text)) element.textContent = String(text);
    };
    row.dataset.model = model.name;
    set("name", model.name);
    set("state", model.state);
    row.querySelector('[data-field="state"]').className = "state state-" + model.state;
    set("footprint", footprintText(model));
    set("held", pairsText(model.memory));
    set("leases", model.leases);
    set("queued", model.queued);
    set("idle", idleText(model));
    set("progress", model.progress || "");
    set("served", model.requests_served);
    set("error", model.last_error || "");
    row.querySelectorAll("button[data-action]").forEach((button) => { button.dataset.model = model.name; });
  }

  function renderModels(models) {
    const body = document.querySelector("#models tbody");
    const template = document.getElementById("model-row");
    const seen = new Set();
    models.forEach((model, index) => {
      seen.add(model.name);
      let row = Array.from(body.rows).find((candidate) => candidate.dataset.model === model.name);
      if (!row) {
        row = template.content.firstElementChild.cloneNode(true);
      }
      fillRow(row, model);
      if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
    });
    Array.from(body.rows).forEach((row) => { if (!seen.has(row.dataset.model)) row.remove(); });
  }

  function renderMemory(devices) {
    const body = document.querySelector("#memory tbody");
    const rows = devices.map((device) => {
      const row = document.createElement("tr");
      row.dataset.device = device.device;
      row.append(cell("td", device.device, "name"), cell("td", formatBytes(device.budget)),
        cell("td", pairsText(device.used)), cell("td", formatBytes(device.available)),
        cell("td", device.nvml ? formatBytes(device.nvml.used) + " / " + formatBytes(device.nvml.total) : "-"));
      const bar = document.createElement("td");
      if (device.budget) {
        const meter = document.createElement("meter");
        meter.min = 0;
        meter.max = device.budget;
        meter.value = device.budget - (device.available || 0);
        bar.append(meter);
      }
      row.append(bar);
      return row;
    });
    if (!rows.length) {
      const row = document.createElement("tr");
      const empty = cell("td", "Memory is not counted (no proxy.gpus, no footprints).", "empty");
      empty.colSpan = 6;
      row.append(empty);
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  let recentBusy = false;
  let recentAgain = false;
  async function refreshRecent() {
    if (recentBusy) { recentAgain = true; return; }
    recentBusy = true;
    try {
      const response = await fetch("/ui/recent", { credentials: "same-origin" });
      if (response.status === 401) { window.location.assign("/ui/login"); return; }
      if (response.ok) document.getElementById("recent").innerHTML = await response.text();
    } finally {
      recentBusy = false;
      if (recentAgain) { recentAgain = false; setTimeout(refreshRecent, 1000); }
    }
  }

  const logFetched = {};
  async function refreshLogs(force) {
    const open = document.querySelectorAll("details.log[open]");
    for (const details of open) {
      const name = details.dataset.log;
      if (!force && Date.now() - (logFetched[name] || 0) < 3000) continue;
      logFetched[name] = Date.now();
      const response = await fetch("/ui/logs/" + encodeURIComponent(name), { credentials: "same-origin" });
      if (!response.ok) continue;
      const body = await response.json();
      details.querySelector("pre").textContent = body.lines.join("\n");
      const count = details.querySelector("summary .hint");
      if (count) count.textContent = body.lines.length + (body.lines.length === 1 ? " line" : " lines");
    }
  }

  function connection(state, text) {
    const badge = document.getElementById("connection");
    badge.className = "connection " + state;
    badge.textContent = text;
  }

  function listen() {
    const source = new EventSource("/ui/events");
    source.addEventListener("open", () => connection("live", "live"));
    source.addEventListener("status", (event) => {
      const status = JSON.parse(event.data);
      renderModels(status.models);
      renderMemory(status.memory);
      document.getElementById("uptime").textContent = formatSeconds(status.uptime_s);
      document.body.dataset.updated = String(Date.now());
      refreshLogs(false);
    });
    source.addEventListener("recent", refreshRecent);
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (503: too many live views, 401: the session ended): EventSource gives up, so retry
        // here; /ui/recent says whether the session still holds.
        connection("down", "reconnecting…");
        setTimeout(() => { refreshRecent(); listen(); }, 5000);
      } else {
        connection("connecting", "reconnecting…");
      }
    });
  }

  async function act(button) {
    const action = button.dataset.action;
    const model = button.dataset.model;
    button.disabled = true;
    try {
      const response = await fetch("/ui/" + action + "?model=" + encodeURIComponent(model), {
        method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() },
      });
      if (response.ok) {
        const body = await response.json();
        say(body.started ? action + " of " + model + " started" : body.note, false);
      } else {
        say(action + " of " + model + " refused: " + await errorMessage(response), true);
      }
    } finally {
      button.disabled = false;
    }
  }

  async function logOut() {
    const response = await fetch("/ui/logout", {
      method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrfToken() },
    });
    if (response.ok) window.location.assign("/ui/login");
    else say("log out refused: " + await errorMessage(response), true);
  }

  function setUpDashboard() {
    document.addEventListener("click", (event) => {
      const button = event.target.closest("button[data-action]");
      if (button) act(button);
    });
    document.querySelectorAll("details.log").forEach((details) => {
      details.addEventListener("toggle", () => { if (details.open) refreshLogs(true); });
    });
    const logout = document.getElementById("logout");
    if (logout) logout.addEventListener("click", logOut);
    listen();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const form = document.getElementById("login-form");
    if (form) setUpLogin(form);
    if (document.getElementById("models")) setUpDashboard();
  });
})();
