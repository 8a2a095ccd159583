// The chat page of the API server: streams answers from /v1/chat/completions (server-sent events over
// fetch), shows which servers the chain used (/api/route). Text goes into the page as text nodes only.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the conversation so far
let modelId = null;
let controller = null;  // AbortController of the answer being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  box.append(label, body);
  $("conversation").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function loadModel() {
  try {
    const answer = await fetch("/v1/models", { headers: headers() });
    const body = await answer.json();
    if (!answer.ok) throw new Error(body.error ? body.error.message : answer.statusText);
    modelId = body.data[0].id;
    $("model").textContent = modelId;
    showError("");
  } catch (e) {
    showError(`Cannot read the model: ${e.message}`);
  }
}

async function showRoute() {
  try {
    const body = await (await fetch("/api/route")).json();
    $("route").textContent = body.route.length
      ? "Chain: " + body.route.map((s) => `${s.peer_id.slice(-6)} [${s.start}:${s.end}]`).join(" → ")
      : "No chain used yet.";
  } catch (e) { /* the route is a hint; the answer matters */ }
}

// Reads server-sent events from a fetch response; calls onData(parsed JSON) for each `data:` line.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!modelId) await loadModel();
  if (!modelId) return;
  showError("");
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.classList.add("streaming");
  const out = box.querySelector(".text");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const request = {
    model: modelId,
    messages: history,
    stream: true,
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.statusText);
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) {
          answer += choice.delta.content;
          out.textContent = answer;
        }
        if (choice.finish_reason) box.dataset.finish = choice.finish_reason;
      }
    });
  } catch (e) {
    if (e.name === "AbortError") box.dataset.finish = "stopped";
    else showError(e.message);
  } finally {
    box.classList.remove("streaming");
    box.dataset.done = "true";
    history.push({ role: "assistant", content: answer });
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    showRoute();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || controller) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("conversation").replaceChildren();
});
$("api-key").addEventListener("input", () => { modelId = null; loadModel(); });
loadModel();
showRoute();
