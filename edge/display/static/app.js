// cytoedge bench display. Plain browser JavaScript, no build step, no outside resources.
// Every piece of message data goes into the page through textContent / element properties, never
// through an HTML parser, so a label or warning from the wire cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);

let snapshot = null; // last state from the server
let receivedAt = 0; // performance.now() when it arrived
let connected = false;
let held = false;
let previewKey = "";
let newSlideArmed = 0; // timer id while "New slide" waits for its second press
const cards = new Map(); // "run/frame/cell" -> <li> of the review queue (kept, so a card under a finger stays put)
const cardKey = (item) => `${item.run}/${item.frame_id}/${item.cell_id}`;

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("aria-") || name === "role") node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function fmt(value, digits = 1) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function show(message, isError = false) {
  const box = $("message");
  box.textContent = message;
  box.classList.toggle("error", isError);
  box.hidden = false;
  clearTimeout(show.timer);
  show.timer = setTimeout(() => { box.hidden = true; }, isError ? 8000 : 3000);
}

// -- server connection ------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/events"); // reconnects by itself (the server sends retry: 1000)
  source.addEventListener("state", (event) => {
    snapshot = JSON.parse(event.data);
    receivedAt = performance.now();
    setConnected(true);
    render(snapshot);
  });
  source.addEventListener("open", () => setConnected(true));
  source.addEventListener("error", () => setConnected(false));
}

function setConnected(value) {
  connected = value;
  const pill = $("connection");
  pill.dataset.state = value ? "connected" : "lost";
  pill.textContent = value ? "live" : "display server unreachable — reconnecting";
}

// Runs between snapshots too, so the banner keeps counting when nothing arrives at all.
function updateBanner() {
  const banner = $("stale-banner");
  if (!snapshot) return;
  const sinceSnapshot = (performance.now() - receivedAt) / 1000;
  const age = snapshot.last_message_age_s;
  let text = "";
  if (!connected || sinceSnapshot > 3) {
    text = `No connection to the display server for ${Math.round(sinceSnapshot)} s — reconnecting…`;
  } else if (age === null) {
    text = "No data from the publisher yet — is cytoedge running and publishing?";
  } else if (age + sinceSnapshot > snapshot.stale_after_s) {
    text = `No data for ${Math.round(age + sinceSnapshot)} s — the publisher may have stopped`;
  }
  banner.textContent = text;
  banner.hidden = !text;
  // Health figures are the last ones received: say so while they may be out of date.
  $("health-title").textContent = text ? "Health (last known)" : "Health";
  document.querySelector(".health").classList.toggle("stale", Boolean(text));
}

// -- rendering --------------------------------------------------------------------------------
function render(s) {
  $("slide-id").textContent = s.slide.id;
  $("session-file").textContent = s.slide.session_file;
  renderPreview(s.preview);
  renderDifferential(s);
  renderQueue(s);
  renderHealth(s.health);
  updateBanner();
}

function renderPreview(preview) {
  const img = $("preview");
  $("preview-empty").hidden = Boolean(preview);
  if (!preview) return;
  const key = `${preview.run}/${preview.seq}`;
  if (key !== previewKey) {
    previewKey = key;
    img.src = `/preview.jpg?run=${encodeURIComponent(preview.run)}&seq=${Number(preview.seq)}`;
    img.width = Number(preview.width);
    img.height = Number(preview.height);
    $("preview-caption").textContent = `frame ${preview.frame_id}`;
  }
}

function renderDifferential(s) {
  $("white-total").textContent = String(s.white_total);
  $("target").textContent = String(s.target);
  const progress = $("white-progress");
  progress.max = s.target;
  progress.value = Math.min(s.white_total, s.target);
  $("target-reached").hidden = s.white_total < s.target;
  $("platelets").textContent = String(s.platelets);
  $("red-cells").textContent = String(s.red_cells);
  $("frames").textContent = String(s.slide.frames);
  $("reviewed").textContent = String(s.slide.decisions);
  $("corrected").textContent = String(s.slide.corrections);
  const rows = s.differential.map((row) => {
    const bar = el("span", { className: "share" });
    bar.style.width = `${Math.max(0, Math.min(100, Number(row.percent)))}%`;
    return el("tr", { dataset: { class: row.class } }, [
      el("th", { scope: "row", text: row.class }),
      el("td", { className: "num count", text: String(row.count) }),
      el("td", { className: "num percent", text: fmt(row.percent) }),
      el("td", { className: "bar-col" }, [bar]),
    ]);
  });
  $("diff-body").replaceChildren(...rows);
}

function renderHealth(h) {
  $("h-state").textContent = h.state ?? "–";
  $("h-source-state").textContent = h.source_state ?? "–";
  $("h-source-state").dataset.state = h.source_state ?? "";
  $("h-fps").textContent = fmt(h.fps);
  $("h-latency").textContent = `${fmt(h.latency_p50_ms)} / ${fmt(h.latency_p99_ms)} ms`;
  $("h-dropped").textContent = h.dropped ?? "–";
  const reasons = Object.entries(h.rejected_by_reason ?? {}).map(([kind, n]) => `${kind} ${n}`);
  $("h-rejected").textContent = reasons.length ? reasons.join(", ") : String(h.rejected ?? "–");
  $("h-missed").textContent = String(h.missed);
  $("h-malformed").textContent = String(h.malformed);
  $("h-domain-alarm").textContent = h.domain_alarm ? "ON: all to review"
    : (h.domain_checked === false ? "checking first cells: all to review" : "off");
  $("h-domain-alarm").classList.toggle("alarm", Boolean(h.domain_alarm));
  $("h-model").textContent = h.model ?? "–";
  $("h-run").textContent = h.run ?? "–";
  const items = h.warnings.map((w) => el("li", { text: w }));
  if (h.final) items.unshift(el("li", { text: "the publisher has exited (final status)" }));
  $("warnings").replaceChildren(...items);
}

// -- review queue -----------------------------------------------------------------------------
function renderQueue(s) {
  $("queue-pending").textContent = `(${s.queue_pending} waiting)`;
  const list = $("queue");
  const wanted = s.queue;
  $("queue-empty").hidden = wanted.length > 0 || list.children.length > 0;
  if (held) {
    // Frozen: no cards added, moved or removed; only decisions on the cards shown are updated.
    for (const item of wanted) if (cards.has(cardKey(item))) updateCard(cards.get(cardKey(item)), item, s.classes);
    return;
  }
  const keep = new Set(wanted.map(cardKey));
  for (const [key, card] of cards) {
    if (!keep.has(key)) { card.remove(); cards.delete(key); }
  }
  let previous = null;
  for (const item of wanted) {
    let card = cards.get(cardKey(item));
    if (!card) { card = makeCard(item); cards.set(cardKey(item), card); }
    updateCard(card, item, s.classes);
    const expected = previous ? previous.nextSibling : list.firstChild;
    if (card !== expected) list.insertBefore(card, expected);
    previous = card;
  }
}

function makeCard(item) {
  const cell = { run: item.run, frame_id: item.frame_id, cell_id: item.cell_id };
  const card = el("li", { className: "card", tabIndex: 0, dataset: { key: cardKey(item), label: item.label } });
  const img = el("img", { alt: `cell ${item.cell_id} of frame ${item.frame_id}`, width: 96, height: 96 });
  // The cell in the query keeps a browser cache from mixing up crops across server restarts.
  img.src = `/thumb/${Number(item.serial)}.jpg?cell=${encodeURIComponent(cardKey(item))}`;
  const top = el("ol", { className: "top" }, item.top.map(([name, p]) => el("li", { text: `${name} ${fmt(100 * p, 0)}%` })));
  const meta = el("p", { className: "muted small", text: `frame ${item.frame_id} · cell ${item.cell_id} · unc ${fmt(item.uncertainty, 2)} · anom ${fmt(item.anomaly, 2)}` });
  const accept = el("button", { type: "button", className: "button accept", text: `Accept ${item.label}` });
  accept.addEventListener("click", () => decide(card, cell, "accept", item.label));
  const buttons = [accept];
  for (const [name] of item.top.slice(1)) {
    const other = el("button", { type: "button", className: "button other", text: `→ ${name}`, dataset: { label: name } });
    other.addEventListener("click", () => decide(card, cell, "correct", name));
    buttons.push(other);
  }
  const select = el("select", { className: "pick", "aria-label": "pick another class" });
  select.addEventListener("change", () => {
    if (select.value) decide(card, cell, "correct", select.value);
    select.value = "";
  });
  buttons.push(select);
  const status = el("p", { className: "decision" });
  card.append(img, el("div", { className: "card-body" }, [top, meta, el("div", { className: "actions" }, buttons), status]));
  card.addEventListener("keydown", (event) => onCardKey(event, card, cell, item));
  return card;
}

function updateCard(card, item, classes) {
  const select = card.querySelector("select.pick");
  if (select.options.length !== classes.length + 1) {
    select.replaceChildren(
      el("option", { value: "", text: "other class…" }),
      ...classes.map((name, i) => el("option", { value: name, text: `${i + 1} ${name}` })),
    );
  }
  const decided = item.decision;
  card.classList.toggle("decided", Boolean(decided));
  card.querySelector(".decision").textContent = decided
    ? (decided === item.label ? `✓ accepted ${decided}` : `✎ corrected to ${decided}`)
    : "";
}

async function decide(card, cell, action, label) {
  try {
    const response = await fetch("/api/decision", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ ...cell, action, label }),
    });
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
    card.classList.add("decided");
    card.querySelector(".decision").textContent = action === "accept" ? `✓ accepted ${label}` : `✎ corrected to ${label}`;
    show(`${action === "accept" ? "accepted" : "corrected to"} ${label} (frame ${cell.frame_id}, cell ${cell.cell_id})`);
  } catch (error) {
    show(`decision not saved: ${error.message}`, true);
  }
}

function onCardKey(event, card, cell, item) {
  if (event.target !== card) return; // keys inside the select/buttons keep their usual meaning
  const classes = snapshot ? snapshot.classes : [];
  if (event.key === "a" || event.key === "Enter") {
    decide(card, cell, "accept", item.label);
  } else if (/^[1-9]$/.test(event.key) && Number(event.key) <= classes.length) {
    const name = classes[Number(event.key) - 1];
    decide(card, cell, name === item.label ? "accept" : "correct", name);
  } else if (["ArrowDown", "ArrowRight", "j"].includes(event.key)) {
    card.nextElementSibling?.focus();
  } else if (["ArrowUp", "ArrowLeft", "k"].includes(event.key)) {
    card.previousElementSibling?.focus();
  } else {
    return;
  }
  event.preventDefault();
}

function setHeld(value) {
  held = value;
  const button = $("hold");
  button.setAttribute("aria-pressed", String(held));
  button.textContent = held ? "Release queue" : "Hold queue";
  if (!held && snapshot) renderQueue(snapshot);
}

// -- slide controls ---------------------------------------------------------------------------
async function newSlide() {
  const button = $("new-slide");
  if (!newSlideArmed) {
    // Two presses, no modal dialog: quick on a tablet, hard to do by accident.
    button.textContent = "Confirm new slide";
    button.classList.add("armed");
    $("new-slide-hint").hidden = false;
    newSlideArmed = setTimeout(disarm, 4000);
    return;
  }
  disarm();
  try {
    const response = await fetch("/api/new-slide", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    const reply = await response.json();
    if (!response.ok) throw new Error(reply.error || `HTTP ${response.status}`);
    for (const card of cards.values()) card.remove();
    cards.clear();
    show(`new slide ${reply.slide}`);
  } catch (error) {
    show(`new slide failed: ${error.message}`, true);
  }
}

function disarm() {
  clearTimeout(newSlideArmed);
  newSlideArmed = 0;
  const button = $("new-slide");
  button.textContent = "New slide";
  button.classList.remove("armed");
  $("new-slide-hint").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("new-slide").addEventListener("click", newSlide);
  $("hold").addEventListener("click", () => setHeld(!held));
  document.addEventListener("keydown", (event) => {
    const typing = event.target instanceof HTMLSelectElement || event.target instanceof HTMLInputElement;
    if (!typing && (event.key === "h" || event.key === "H") && !event.ctrlKey && !event.metaKey) setHeld(!held);
  });
  $("preview").addEventListener("error", () => { previewKey = ""; }); // retry with the next snapshot
  setInterval(updateBanner, 500);
  connect();
});
