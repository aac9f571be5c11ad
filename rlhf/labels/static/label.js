// The labelling page. Model text is only ever set with textContent: it is untrusted input to this browser.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const MAX_SKIPPED = 50;  // the server takes at most 100 ids in `exclude`
const MAX_MS = 86400000;  // the store refuses longer decisions
const KEYS = {"1": "left", "2": "right", "3": "tie", "0": "both_bad"};
const state = {item: null, flip: false, shownAt: 0, skipped: [], busy: false};
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const headers = {"Authorization": "Bearer " + token};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || response.status + " " + response.statusText);
  return data;
}

function say(text) {
  $("message").textContent = text;
}

function showProgress(progress) {
  if (progress) $("progress").textContent = `judged ${progress.judged} · ${progress.remaining} to go`;
}

function show(item) {
  state.item = item;
  const prompt = $("prompt");
  prompt.replaceChildren();
  $("left").textContent = "";
  $("right").textContent = "";
  $("comment").value = "";
  document.body.classList.toggle("done", !item);
  if (!item) return;
  for (const message of item.prompt) {
    const block = document.createElement("div");
    block.className = "message";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = message.role;
    const content = document.createElement("div");
    content.textContent = message.content;
    block.append(role, content);
    prompt.append(block);
  }
  // a fresh side for every item, so that neither position nor habit favours the stored A
  state.flip = Math.random() < 0.5;
  $("left").textContent = state.flip ? item.response_b : item.response_a;
  $("right").textContent = state.flip ? item.response_a : item.response_b;
  state.shownAt = performance.now();
}

function stored(side) {
  if (side === "left") return state.flip ? "B" : "A";
  if (side === "right") return state.flip ? "A" : "B";
  return side;
}

async function busy(work) {
  if (state.busy) return;
  state.busy = true;
  try {
    await work();
  } catch (error) {
    say(error.message);
  } finally {
    state.busy = false;
  }
}

async function fetchNext() {
  let data = await api("GET", "/api/next?exclude=" + state.skipped.join(","));
  if (!data.item && state.skipped.length) {  // only skipped items are left: offer them again
    state.skipped = [];
    data = await api("GET", "/api/next");
  }
  show(data.item);
  showProgress(data.progress);
  if (!data.item) say("Nothing left to judge. Thank you!");
}

function judge(side) {
  return busy(async () => {
    if (!state.item) return;
    const ms = Math.min(MAX_MS, Math.max(0, Math.round(performance.now() - state.shownAt)));
    const comment = $("comment").value.trim() || null;
    await api("POST", "/api/judgements", {item_id: state.item.id, choice: stored(side), comment, ms});
    say("");
    await fetchNext();
  });
}

function skip() {
  return busy(async () => {
    if (!state.item) return;
    state.skipped = [...state.skipped, state.item.id].slice(-MAX_SKIPPED);
    say("");
    await fetchNext();
  });
}

function undo() {
  return busy(async () => {
    const data = await api("POST", "/api/undo");
    state.skipped = state.skipped.filter((id) => id !== data.item.id);
    show(data.item);
    showProgress(data.progress);
    say("Your last judgement was taken back: judge this pair again.");
  });
}

for (const button of document.querySelectorAll("[data-choice]")) {
  button.addEventListener("click", () => judge(button.dataset.choice));
}
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
document.addEventListener("keydown", (event) => {
  if (event.target.closest("textarea, input") || event.ctrlKey || event.metaKey || event.altKey) return;
  const side = KEYS[event.key];
  if (side) judge(side);
  else if (event.key === "s") skip();
  else if (event.key === "u") undo();
  else return;
  event.preventDefault();
});

const statsLink = $("stats-link");
if (statsLink) statsLink.href = "/stats?token=" + encodeURIComponent(token);
const first = JSON.parse($("first").textContent);
show(first.item);
showProgress(first.progress);
if (!first.item) say("Nothing left to judge. Thank you!");
