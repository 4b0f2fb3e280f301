// The chat page of `mlxlocal serve`: plain JavaScript over the server's own OpenAI-style API
// (GET v1/models, POST v1/chat/completions with stream: true). No libraries, no network beyond
// the server that served this page.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), newChat: $("new-chat"), status: $("status"), system: $("system"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), apiKey: $("api-key"),
  messages: $("messages"), error: $("error"), composer: $("composer"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"),
};

let history = []; // {role, content} of the conversation so far (without the system prompt)
let running = null; // the AbortController of the answer being streamed, if any

// --- settings, kept in this browser (the API key only for this tab) ------------------------------

const SAVED = { system: ui.system, temperature: ui.temperature, maxTokens: ui.maxTokens };

function restoreSettings() {
  try {
    for (const [name, el] of Object.entries(SAVED)) {
      const value = localStorage.getItem(`mlxlocal.${name}`);
      if (value !== null) el.value = value;
    }
    ui.apiKey.value = sessionStorage.getItem("mlxlocal.apiKey") || "";
  } catch (_) { /* storage disabled: defaults it is */ }
}

function saveSettings() {
  try {
    for (const [name, el] of Object.entries(SAVED)) localStorage.setItem(`mlxlocal.${name}`, el.value);
    sessionStorage.setItem("mlxlocal.apiKey", ui.apiKey.value);
    if (ui.model.value) localStorage.setItem("mlxlocal.model", ui.model.value);
  } catch (_) { /* storage disabled */ }
}

// --- talking to the server -------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = ui.apiKey.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

// A failed response as one readable line, from the OpenAI error object when there is one.
async function describeFailure(response) {
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  if (response.status === 401 && !ui.apiKey.value.trim()) {
    message += " (enter the server's API key in the settings)";
  }
  return `Error ${response.status}: ${message}`;
}

function unreachable() {
  return `Cannot reach the server at ${location.origin}: is \`mlxlocal serve\` still running?`;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("v1/models", { headers: headers() });
  } catch (_) {
    showError(unreachable());
    return;
  }
  if (!response.ok) {
    showError(await describeFailure(response));
    return;
  }
  const { data } = await response.json();
  const current = ui.model.value || safeGet("mlxlocal.model");
  ui.model.replaceChildren(...data.map((m, i) => {
    const option = new Option(i === 0 ? `${m.id} (base)` : `${m.id} (adapter)`, m.id);
    return option;
  }));
  if (data.some((m) => m.id === current)) ui.model.value = current;
  clearError();
  setStatus(`${data.length} model${data.length === 1 ? "" : "s"}`);
}

function safeGet(key) {
  try { return localStorage.getItem(key); } catch (_) { return null; }
}

// The payloads of a server-sent event stream: each event's `data:` lines joined, as they arrive.
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    // A lone trailing "\r" may be the first half of "\r\n": keep it for the next chunk.
    const end = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, end).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(end);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield data.join("\n");
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      } // comments (": ping") and other fields are not ours
    }
  }
  if (data.length) yield data.join("\n");
}

function requestBody() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model: ui.model.value, messages, stream: true, stream_options: { include_usage: true },
  };
  const temperature = ui.temperature.value.trim();
  const maxTokens = ui.maxTokens.value.trim();
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  return body;
}

// --- the conversation ------------------------------------------------------------------------------

function addMessage(role, text) {
  ui.messages.querySelector(".empty")?.remove();
  const el = document.createElement("article");
  el.className = `msg ${role}`;
  const who = document.createElement("h2");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  el.append(who, content);
  ui.messages.append(el);
  scrollDown(true);
  return el;
}

function scrollDown(force) {
  const m = ui.messages;
  if (force || m.scrollHeight - m.scrollTop - m.clientHeight < 80) m.scrollTop = m.scrollHeight;
}

async function send(text) {
  clearError();
  if (!ui.model.value) {
    await loadModels();
    if (!ui.model.value) return;
  }
  saveSettings();
  history.push({ role: "user", content: text });
  const userEl = addMessage("user", text);
  const answerEl = addMessage("assistant", "");
  const content = answerEl.querySelector(".content");
  answerEl.dataset.state = "streaming";
  const controller = new AbortController();
  running = controller;
  setBusy(true);
  let answer = "";
  let finish = null;
  let usage = null;
  try {
    let response;
    try {
      response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error(unreachable());
    }
    if (!response.ok) throw new Error(await describeFailure(response));
    for await (const payload of sseData(response.body)) {
      if (payload === "[DONE]") break;
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(`Error: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue; // the usage chunk
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        answer += piece;
        content.textContent = answer;
        scrollDown(false);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    answerEl.dataset.state = "done";
    if (finish) answerEl.dataset.finish = finish;
    if (finish === "length") note(answerEl, "reached the max tokens");
  } catch (e) {
    if (e.name === "AbortError") {
      answerEl.dataset.state = "stopped";
      note(answerEl, "stopped");
    } else if (!answer) {
      // Nothing came back: take the message back into the box so it can be sent again.
      history.pop();
      userEl.remove();
      answerEl.remove();
      if (!ui.prompt.value) ui.prompt.value = text;
      showError(e.message);
      return;
    } else {
      answerEl.dataset.state = "error";
      showError(e.message);
    }
  } finally {
    if (running === controller) {
      running = null;
      setBusy(false);
      if (usage) setStatus(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} generated tokens`);
    }
  }
  if (answer) history.push({ role: "assistant", content: answer });
}

function note(el, text) {
  const n = document.createElement("p");
  n.className = "note";
  n.textContent = text;
  el.append(n);
}

function stop() {
  if (running) running.abort(); // closing the stream makes the server drop the sequence
}

function newChat() {
  stop();
  history = [];
  const empty = document.createElement("p");
  empty.className = "empty";
  empty.textContent = "New chat. Type a message and press Enter.";
  ui.messages.replaceChildren(empty);
  clearError();
  ui.prompt.focus();
}

// --- small UI helpers ------------------------------------------------------------------------------

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
  setStatus(busy ? "answering…" : "");
}

function setStatus(text) { ui.status.textContent = text; }

function showError(text) {
  ui.error.textContent = text;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || running) return;
  ui.prompt.value = "";
  send(text);
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.apiKey.addEventListener("change", () => { saveSettings(); loadModels(); });
ui.model.addEventListener("change", saveSettings);
for (const el of Object.values(SAVED)) el.addEventListener("change", saveSettings);

restoreSettings();
setBusy(false);
loadModels();
