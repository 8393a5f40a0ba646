// The chat page: talks to this server's public /v1 API only, exactly as any OpenAI client would.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // the conversation, as OpenAI messages; sent in full every turn
let controller = null;       // the AbortController of the stream in flight (the Stop button)

$("api-key").value = localStorage.getItem("nanogpt-api-key") || "";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// An HTTP error's message: the server always answers with OpenAI's {"error": {"message": ...}}.
async function httpError(response) {
  let message = response.statusText;
  try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
  return `${response.status}: ${message}`;
}

function networkError(err) {
  return `The server is unreachable (${err.message}). Is it running?`;
}

// The picker keeps its width and says why it is empty; a list it had stays until a new one comes.
function emptyPicker(why) {
  const select = $("model");
  if (!select.value) select.replaceChildren(new Option(why, ""));
}

// The model list. A base model (kind "pretrain": it continues text, it was never tuned to answer)
// says so; the first choice is the one the user had, else the model of the last stage of tuning there
// is (preference-tuned, then instruction-tuned), else the first.
async function loadModels() {
  const select = $("model");
  const chosen = select.value;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) {
      emptyPicker("(no list: see above)");
      return showError(await httpError(response));
    }
    const models = (await response.json()).data;
    if (!models.length) {
      select.replaceChildren(new Option("(no models)", ""));
      return showError("No models: the server's models directory (NANOGPT_MODELS_DIR, default checkpoints/) " +
        "has no run directory with a checkpoint; the server's log names the folder it read. After make demo, " +
        "serve its runs with: NANOGPT_MODELS_DIR=checkpoints/demo gunicorn -c gunicorn_config.py web.app:app");
    }
    showError("");
    select.replaceChildren(...models.map((m) =>
      new Option(m.kind === "pretrain" ? `${m.id} (base model: continues text)` : m.id, m.id)));
    const tuned = models.find((m) => m.kind === "dpo") || models.find((m) => m.kind === "sft");
    select.value = models.some((m) => m.id === chosen) ? chosen : (tuned || models[0]).id;
  } catch (err) {
    emptyPicker("(no list: see above)");
    showError(networkError(err));
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;  // never innerHTML: model text is not markup
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setStreaming(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

// Reads server-sent events: blank-line separated, "data:" lines, ":" comments (keepalives) skipped.
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // stream: true because a UTF-8 character may span two reads; \r\n is legal SSE too
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
      if (data.length) yield data.join("\n");
    }
  }
}

// A number field's value, or undefined when empty so that JSON.stringify leaves it out
// and the server's default applies (Number("") would send 0).
function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

async function send(text) {
  showError("");
  const system = $("system").value.trim();
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const body = {
    model: $("model").value,
    messages: (system ? [{ role: "system", content: system }] : []).concat(history),
    temperature: numberField("temperature"),
    top_p: numberField("top-p"),
    max_tokens: numberField("max-tokens"),
    stream: true,
  };
  controller = new AbortController();
  setStreaming(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      showError(await httpError(response));
      history.pop();  // the turn never happened: put it back so the user can send it again
      bubble.previousSibling.remove();
      bubble.remove();
      if (!$("prompt").value) $("prompt").value = text;
      return;
    }
    let finished = false;
    for await (const data of sseData(response)) {
      if (data === "[DONE]") { finished = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);  // a failure after the headers were sent
      const delta = chunk.choices.length ? chunk.choices[0].delta.content : "";
      if (delta) bubble.textContent += delta;
    }
    if (!finished) throw new Error("the stream ended before [DONE] (server restarted?)");
  } catch (err) {
    if (err.name === "AbortError") bubble.classList.add("stopped");
    else {
      bubble.classList.add("failed");
      showError(err instanceof TypeError ? networkError(err) : `Generation failed: ${err.message}`);
    }
  } finally {
    bubble.classList.remove("streaming");
    if (bubble.isConnected) history.push({ role: "assistant", content: bubble.textContent });  // stopped ones too
    controller = null;
    setStreaming(false);
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  // an error already on screen (a wrong key, say) is the reason there is no model: it stays
  if (!$("model").value) return $("error").hidden && showError("Pick a model first (↻ reloads the list).");
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  showError("");
});
$("refresh").addEventListener("click", loadModels);
$("api-key").addEventListener("change", () => {
  localStorage.setItem("nanogpt-api-key", $("api-key").value.trim());
  loadModels();
});
loadModels();
