// The narrative-cache console: figures from the gateway's JSON routes, refreshed every
// few seconds, and a playground that streams a narrative as it is written.
//
// Everything shown comes from the gateway this page was served by; nothing is stored
// but the client key, in this tab's sessionStorage. Text from the gateway (system
// names, errors, narratives) is only ever set as textContent.
"use strict";

(() => {
  const REFRESH_MS = 3000;
  const KEY_STORAGE = "narrative-cache.client-key";

  const $ = (id) => document.getElementById(id);
  const figure = (name) => document.querySelector(`[data-figure="${name}"]`);

  // ---- Talking to the gateway -------------------------------------------------------

  function clientKey() {
    return sessionStorage.getItem(KEY_STORAGE);
  }

  function withAuth(headers = {}) {
    const key = clientKey();
    return key ? { ...headers, authorization: `Bearer ${key}` } : headers;
  }

  class Unauthorized extends Error {}
  // Any other answer than 200: the gateway's word, not a bug of the page.
  class Refused extends Error {}

  // The gateway's routes, relative to this page: a proxy may mount the gateway under
  // a path prefix.
  const route = (path) => new URL(path, document.baseURI).toString();

  async function getJson(path, signal) {
    const response = await fetch(route(path), {
      headers: withAuth({ accept: "application/json" }),
      signal,
    });
    if (response.status === 401) throw new Unauthorized(path);
    if (!response.ok) throw new Refused(`${path} answered ${response.status}`);
    return response.json();
  }

  // ---- Formatting -------------------------------------------------------------------

  const count = (n) => (n == null ? "—" : Number(n).toLocaleString("en-US"));
  const percent = (r) => (r == null ? "—" : `${(r * 100).toFixed(1)}%`);
  const dollars = (d) => (d == null ? "—" : `$${d.toFixed(d < 1 ? 6 : 2)}`);
  const millis = (ms) => (ms == null ? "—" : `${Math.round(ms).toLocaleString("en-US")} ms`);
  const took = (ms) =>
    ms < 0.1 ? "<100 µs" : ms < 1 ? `${(ms * 1000).toFixed(0)} µs` : `${ms.toFixed(1)} ms`;
  const clock = (iso) => new Date(iso).toLocaleTimeString("en-GB", { hour12: false });

  function set(name, text) {
    const element = figure(name);
    if (element) element.textContent = text;
  }

  function rows(tbody, items) {
    tbody.replaceChildren(
      ...items.map((cells) => {
        const tr = document.createElement("tr");
        cells.forEach(([text, className]) => {
          const td = document.createElement("td");
          td.textContent = text;
          if (className) td.className = className;
          tr.append(td);
        });
        return tr;
      }),
    );
  }

  // ---- Mode and backends (/readyz needs no key) ---------------------------------------

  async function showReadiness(signal) {
    const ready = await getJson("readyz", signal);
    $("mode").textContent = `${ready.mode} mode · ${ready.generator.kind} ${ready.generator.model}`;
    $("mode").dataset.mode = ready.mode;
    const items = Object.entries(ready.backends).map(([name, backend]) => {
      const li = document.createElement("li");
      li.className = `backend state-${backend.state}`;
      li.dataset.backend = name;
      const extra = ["signals", "l1"]
        .filter((part) => backend[part])
        .map((part) => ` · ${part} ${backend[part]}`)
        .join("");
      li.textContent = `${name}: ${backend.kind} ${backend.state}${extra}`;
      return li;
    });
    $("backends").replaceChildren(...items);
    return ready;
  }

  // ---- Figures ----------------------------------------------------------------------

  let previousCounts = null;
  let chart = null;

  function showStats(stats) {
    set("hitRate", percent(stats.hitRate));
    set("hits", count(stats.hits));
    set("misses", count(stats.misses));
    set("fallbacks", count(stats.fallbacks));
    set("inFlight", count(stats.inFlight));
    set("keys", count(stats.keys));
    set("memoryUsed", stats.memoryUsed);
    set("store", stats.store);
    $("counts-scope").textContent = stats.counts === "global" ? "whole fleet" : "this instance";

    // Over the last interval: the difference of two refreshes' counts, when both
    // count the same thing (a fleet's counts and an instance's do not mix, and a
    // restarted gateway counts from zero).
    const now = { hits: stats.hits, misses: stats.misses, scope: stats.counts };
    if (previousCounts && previousCounts.scope === now.scope) {
      const hits = now.hits - previousCounts.hits;
      const misses = now.misses - previousCounts.misses;
      if (hits < 0 || misses < 0) set("hitRateNow", "—");
      else set("hitRateNow", hits + misses > 0 ? percent(hits / (hits + misses)) : "no requests");
    } else {
      set("hitRateNow", "—");
    }
    previousCounts = now;

    rows(
      $("entries-by-version"),
      Object.entries(stats.entriesByVersion).map(([version, n]) => [
        [version],
        [count(n), "num"],
      ]),
    );
    rows(
      $("recent"),
      stats.recent.map((answer) => [
        [clock(answer.at)],
        [answer.source, `source source-${answer.source}`],
        [took(answer.latencyMs), "num"],
      ]),
    );
  }

  function showAnalytics(summary) {
    set("totalRequests", count(summary.totalRequests));
    set("uniqueUsers", count(summary.uniqueUsers));
    set("generations", count(summary.generations));
    set("failedGenerations", count(summary.failedGenerations));
    set("avgGenerationTime", millis(summary.avgGenerationTime));
    set("estimatedCost", dollars(summary.estimatedCost));
    set("costSaved", dollars(summary.costSaved));
    set("tokensIn", count(summary.tokensIn));
    set("tokensOut", count(summary.tokensOut));
    set("tokensSaved", count(summary.tokensSaved));
    rows(
      $("top-systems"),
      summary.topSystems.map((top) => [[top.system], [count(top.count), "num"]]),
    );
    showChart(summary.hitRateByHour);
  }

  function chartWidth() {
    return Math.max(240, $("chart").clientWidth);
  }

  // The last day, by the hour; the analytics range (30 days) holds more.
  const CHART_HOURS = 24;
  let chartRange = [0, 1];

  function showChart(buckets) {
    const hour = 3600;
    const end = Math.ceil(Date.now() / 1000 / hour) * hour;
    chartRange = [end - CHART_HOURS * hour, end];
    const byHour = new Map(
      buckets.map((b) => [Date.parse(b.start) / 1000, b]).filter(([at]) => at >= chartRange[0]),
    );
    $("chart-empty").hidden = byHour.size > 0;
    $("chart").dataset.points = String(byHour.size);
    // Every hour of the range, so that the line breaks where no request came.
    const hours = [];
    for (let at = chartRange[0]; at < chartRange[1]; at += hour) hours.push(at);
    const data = [
      hours,
      hours.map((at) => (byHour.has(at) ? byHour.get(at).hitRate * 100 : null)),
      hours.map((at) => (byHour.has(at) ? byHour.get(at).requests : null)),
    ];
    if (chart) {
      if (chart.width !== chartWidth()) chart.setSize({ width: chartWidth(), height: 220 });
      chart.setData(data);
      return;
    }
    if (typeof uPlot === "undefined") return;
    chart = new uPlot(
      {
        width: chartWidth(),
        height: 220,
        scales: { x: { time: true, range: () => chartRange }, pct: { range: [0, 100] }, n: { range: (_u, _min, max) => [0, Math.max(1, max)] } },
        series: [
          {},
          { label: "Hit rate", scale: "pct", stroke: "#2f7d5b", width: 2, points: { show: true }, value: (_u, v) => (v == null ? "—" : `${v.toFixed(1)}%`) },
          {
            label: "Requests",
            scale: "n",
            stroke: "#6b6fd4",
            fill: "rgba(107, 111, 212, 0.25)",
            paths: uPlot.paths.bars({ size: [0.6, 24] }),
            points: { show: false },
          },
        ],
        axes: [
          {},
          { scale: "pct", values: (_u, ticks) => ticks.map((t) => `${t}%`) },
          // Requests are whole numbers: no tick at 0.2 of one.
          { scale: "n", side: 1, grid: { show: false }, incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 1e5, 1e6] },
        ],
      },
      data,
      $("chart"),
    );
    window.addEventListener("resize", () => chart.setSize({ width: chartWidth(), height: 220 }));
  }

  // One refresh loop at a time: starting it again (a new key) or stopping it (a key
  // refused) bumps the epoch, aborts what is in flight, and a refresh of an older
  // epoch neither draws nor re-arms.
  let epoch = 0;
  let inFlight = null;
  let refreshTimer = null;

  function stopFigures() {
    epoch += 1;
    clearTimeout(refreshTimer);
    if (inFlight) inFlight.abort();
    inFlight = null;
  }

  async function refresh(mine) {
    const controller = new AbortController();
    inFlight = controller;
    let retry = REFRESH_MS;
    try {
      const [stats, summary] = await Promise.all([
        getJson("narrative/stats", controller.signal),
        getJson("narrative/analytics", controller.signal),
      ]);
      if (mine !== epoch) return;
      // Shown before they are drawn, so that the chart takes its panel's width.
      $("figures").hidden = false;
      showStats(stats);
      showAnalytics(summary);
      const at = new Date();
      $("updated-at").dateTime = at.toISOString();
      $("updated-at").textContent = at.toLocaleTimeString("en-GB", { hour12: false });
      $("figures").dataset.refreshes = String(Number($("figures").dataset.refreshes || 0) + 1);
      await showReadiness(controller.signal);
    } catch (error) {
      if (mine !== epoch || error.name === "AbortError") return;
      if (error instanceof Unauthorized) {
        askForKey("That key was refused.");
        return;
      }
      // A network failure (TypeError) or an answer like 429 or 503 is the gateway's
      // state, shown; anything else is a fault of this page, logged.
      if (!(error instanceof TypeError || error instanceof Refused)) console.error(error);
      const what = error instanceof Refused ? error.message : `unreachable: ${error.message}`;
      $("mode").textContent = `${what}; retrying`;
      retry = REFRESH_MS * 2;
    } finally {
      if (inFlight === controller) inFlight = null;
    }
    if (mine !== epoch) return;
    // A hidden tab asks nothing; it refreshes when shown again.
    if (document.visibilityState === "hidden") return;
    refreshTimer = setTimeout(() => refresh(mine), retry);
  }

  function startFigures() {
    stopFigures();
    $("refresh-seconds").textContent = String(REFRESH_MS / 1000);
    $("interval-label").textContent = `${REFRESH_MS / 1000} s`;
    previousCounts = null;
    refresh(epoch);
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && $("auth").hidden && !inFlight) {
      clearTimeout(refreshTimer);
      refresh(epoch);
    }
  });

  // ---- The client key ---------------------------------------------------------------

  // What an HTTP header may carry: a pasted key with a zero-width space or a smart
  // quote would make every request throw.
  const KEY_SHAPE = /^[\x21-\x7e]+$/;

  function askForKey(message) {
    stopFigures();
    sessionStorage.removeItem(KEY_STORAGE);
    $("figures").hidden = true;
    $("auth").hidden = false;
    $("auth-error").textContent = message || "";
    $("auth-key").focus();
  }

  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("auth-key").value.trim();
    if (!key) return;
    if (!KEY_SHAPE.test(key)) {
      $("auth-error").textContent = "A key is printable ASCII without spaces; check what was pasted.";
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("auth-key").value = "";
    $("auth").hidden = true;
    $("auth-error").textContent = "";
    startFigures();
  });

  // ---- Playground: the profile form -------------------------------------------------

  const DEFAULT_SHARES = [
    ["Pleiades", "62.4"],
    ["Sirius", "25.1"],
    ["Arcturus", "12.5"],
  ];
  let nextShareId = 0;

  function addShare(name = "", share = "") {
    const id = nextShareId++;
    const li = document.createElement("li");
    li.className = "share";

    const nameLabel = document.createElement("label");
    nameLabel.htmlFor = `share-name-${id}`;
    nameLabel.textContent = "System";
    const nameInput = document.createElement("input");
    nameInput.id = `share-name-${id}`;
    nameInput.className = "share-name";
    nameInput.value = name;

    const shareLabel = document.createElement("label");
    shareLabel.htmlFor = `share-value-${id}`;
    shareLabel.textContent = "Share %";
    const shareInput = document.createElement("input");
    shareInput.id = `share-value-${id}`;
    shareInput.className = "share-value";
    shareInput.inputMode = "decimal";
    shareInput.value = share;

    const error = document.createElement("p");
    error.id = `share-error-${id}`;
    error.className = "field-error";
    error.setAttribute("role", "alert");
    shareInput.setAttribute("aria-describedby", error.id);

    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary remove";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove system ${id + 1}`);
    remove.addEventListener("click", () => li.remove());

    li.append(nameLabel, nameInput, shareLabel, shareInput, remove, error);
    $("shares").append(li);
    return li;
  }

  class Duplicate extends Error {}

  // The form as a `POST /narrative` body. A system listed twice cannot be sent (a
  // JSON object keeps one of the two), so it is refused here, at the second row.
  function profileBody() {
    const percentages = new Map();
    for (const li of $("shares").children) {
      const name = li.querySelector(".share-name").value.trim();
      const raw = li.querySelector(".share-value").value.trim();
      if (!name && !raw) continue;
      if (percentages.has(name)) {
        li.querySelector(".field-error").textContent = `${name}: is listed twice`;
        li.querySelector(".share-name").setAttribute("aria-invalid", "true");
        li.querySelector(".share-name").focus();
        throw new Duplicate(name);
      }
      // A share that is not a number is sent as typed, for the gateway to name it.
      const number = Number(raw);
      percentages.set(name, raw !== "" && Number.isFinite(number) ? number : raw);
    }
    const body = {
      classification: $("classification").value,
      percentages: Object.fromEntries(percentages),
      hdData: {
        type: $("hd-type").value,
        authority: $("hd-authority").value,
        profile: $("hd-profile").value.trim(),
      },
    };
    if (body.classification === "primary") {
      body.primary = $("primary").value.trim();
    } else {
      body.hybrid = $("hybrid").value.split(",").map((s) => s.trim()).filter(Boolean);
    }
    const userId = $("user-id").value.trim();
    if (userId) body.userId = userId;
    return body;
  }

  $("classification").addEventListener("change", () => {
    const hybrid = $("classification").value === "hybrid";
    $("primary-row").hidden = hybrid;
    $("hybrid-row").hidden = !hybrid;
  });
  $("add-share").addEventListener("click", () => addShare().querySelector("input").focus());

  // ---- Playground: errors next to their input -----------------------------------------

  function clearErrors() {
    document.querySelectorAll("#profile-form .field-error").forEach((p) => (p.textContent = ""));
    document
      .querySelectorAll("#profile-form [aria-invalid]")
      .forEach((input) => input.removeAttribute("aria-invalid"));
  }

  // Where the gateway's `field` belongs: `percentages.<Name>` at that system's share,
  // `hybrid[1]` at the hybrid list, `hdData.type` at the type; the body otherwise.
  function errorSlot(field) {
    const share = /^percentages\.(.+)$/.exec(field || "");
    if (share) {
      // The gateway names the system as it was sent: the same spelling first, then
      // any spelling that differs only in case.
      const rows = [...$("shares").children];
      const named = (same) => rows.find((li) => same(li.querySelector(".share-name").value.trim()));
      const li =
        named((name) => name === share[1]) ||
        named((name) => name.toLowerCase() === share[1].toLowerCase());
      if (li) return { error: li.querySelector(".field-error"), input: li.querySelector(".share-value") };
    }
    const base = (field || "body").replace(/\[\d+\]$/, "").replace(/^percentages\..*$/, "percentages");
    const error = document.querySelector(`#profile-form [data-field="${CSS.escape(base)}"]`);
    if (!error) return { error: $("error-body"), input: null };
    const input = document.querySelector(`[aria-describedby="${error.id}"]`);
    return { error, input };
  }

  function showError(payload, status) {
    const { field, message, code } = (payload && payload.error) || {};
    const { error, input } = errorSlot(field);
    error.textContent = field ? `${field}: ${message}` : `${code || status}: ${message || "failed"}`;
    if (input) {
      input.setAttribute("aria-invalid", "true");
      input.focus();
    }
    answerState("error", `${status} ${code || ""}`.trim());
  }

  // ---- Playground: the answer ----------------------------------------------------------

  function answerState(state, note) {
    $("answer").dataset.state = state;
    $("answer-state").textContent = note || "";
    // Screen readers hear the state, not every piece of a streaming text.
    $("narrative").setAttribute("aria-busy", String(state === "streaming"));
  }

  function resetAnswer() {
    for (const id of ["answer-source", "answer-x-cache", "answer-cache-status", "answer-key"]) {
      $(id).textContent = "—";
    }
    $("narrative").textContent = "";
    $("canonical").hidden = true;
    $("canonical").textContent = "";
  }

  // A refused request: the key asked for again on a 401, the error placed otherwise.
  function refused(payload, status) {
    if (status === 401) askForKey("The gateway asks for a client key.");
    showError(payload, status);
  }

  async function explain(body) {
    const response = await fetch(route("narrative/key"), {
      method: "POST",
      headers: withAuth({ "content-type": "application/json" }),
      body: JSON.stringify(body),
    });
    const payload = await response.json().catch(() => null);
    if (!response.ok) return refused(payload, response.status);
    $("answer-key").textContent = payload.cacheKey;
    $("canonical").textContent = JSON.stringify(payload.canonical, null, 2);
    $("canonical").hidden = false;
    answerState("done", "the canonical form the key is the digest of");
  }

  // Server-Sent Events from a fetch body: `event:` and `data:` lines, a blank line
  // ends an event, lines starting with `:` are comments (the keepalive).
  async function* events(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
          let name = "message";
          const data = [];
          for (const line of block.split(/\r?\n/)) {
            if (line.startsWith(":")) continue;
            const colon = line.indexOf(":");
            const field = colon < 0 ? line : line.slice(0, colon);
            const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
            if (field === "event") name = text;
            else if (field === "data") data.push(text);
          }
          if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
        }
      }
    } finally {
      // Left early too (an error in `done`): the connection is not kept reading.
      reader.cancel().catch(() => {});
    }
  }

  async function generate(body, noCache) {
    const headers = withAuth({ "content-type": "application/json", accept: "text/event-stream" });
    if (noCache) headers["cache-control"] = "no-cache";
    const response = await fetch(route("narrative"), {
      method: "POST",
      headers,
      body: JSON.stringify(body),
    });
    $("answer-x-cache").textContent = response.headers.get("x-cache") || "—";
    $("answer-cache-status").textContent = response.headers.get("cache-status") || "—";
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
      const payload = await response.json().catch(() => null);
      return refused(payload, response.status);
    }
    answerState("streaming", "streaming…");
    const narrative = $("narrative");
    for await (const event of events(response)) {
      if (event.name === "meta") {
        $("answer-key").textContent = event.data.cacheKey;
        $("answer-source").textContent = event.data.source;
      } else if (event.name === "delta") {
        narrative.append(event.data.text);
      } else if (event.name === "reset") {
        narrative.textContent = "";
        answerState("streaming", `restarted (${event.data.reason})…`);
      } else if (event.name === "done") {
        if (event.data.error) return showError(event.data, response.status);
        narrative.textContent = event.data.narrative;
        $("answer-source").textContent = event.data.source;
        answerState("done", `${event.data.model} · generated at ${event.data.generatedAt}`);
      }
    }
    if ($("answer").dataset.state === "streaming") answerState("error", "the stream ended early");
  }

  $("profile-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const action = (event.submitter && event.submitter.value) || "generate";
    clearErrors();
    resetAnswer();
    answerState("sending", "sending…");
    const buttons = document.querySelectorAll("#profile-form button[type=submit]");
    buttons.forEach((button) => (button.disabled = true));
    try {
      const body = profileBody();
      if (action === "explain") await explain(body);
      else await generate(body, action === "no-cache");
    } catch (error) {
      if (!(error instanceof Duplicate || error instanceof TypeError)) console.error(error);
      answerState("error", error instanceof Duplicate ? "a system is listed twice" : error.message);
    } finally {
      buttons.forEach((button) => (button.disabled = false));
      // After an error the focus stays on the input it names.
      if (event.submitter && $("answer").dataset.state !== "error") event.submitter.focus();
    }
  });

  // ---- Start ------------------------------------------------------------------------

  DEFAULT_SHARES.forEach(([name, share]) => addShare(name, share));

  // Until the gateway answers `/readyz` (it may be restarting), try again, slower
  // each time; then ask for a key first if client routes need one.
  async function boot(delay) {
    try {
      const ready = await showReadiness();
      if (ready.access === "key" && !clientKey()) askForKey();
      else startFigures();
    } catch (error) {
      if (!(error instanceof TypeError || error instanceof Refused)) console.error(error);
      $("mode").textContent = `unreachable: ${error.message}; retrying`;
      setTimeout(() => boot(Math.min(delay * 2, 30000)), delay);
    }
  }
  boot(1000);
})();
