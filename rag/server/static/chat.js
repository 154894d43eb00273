// kvrag chat page: one conversation streamed from /v1/chat/completions, citations shown in
// their documents, document upload and list. Plain browser JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "kvrag-api-key";
const POLL_MS = 1000;
const state = { messages: [], busy: false, docs: new Map() };

$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORE, $("api-key").value.trim());
  state.docs.clear();
  refreshDocuments();
  showModel();
});

function authHeaders(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

class ApiError extends Error {}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: authHeaders(options.headers) });
  if (!r.ok) {
    let message = `HTTP ${r.status}`;
    try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
    if (r.status === 401) message += " (enter the API key at the top)";
    throw new ApiError(message);
  }
  return r;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Server-sent events from a fetch body: yields each `data:` payload, parsed.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function tierSummary(tiers) {
  const parts = Object.entries(tiers || {}).map(([tier, c]) => `${tier} ${c.hits || 0}/${(c.hits || 0) + (c.misses || 0)}`);
  return parts.length ? parts.join(", ") : "none";
}

function renderAnswerInfo(div, info, usage) {
  const cites = document.createElement("div");
  cites.className = "citations";
  info.citations.forEach((c, i) => {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "citation";
    b.textContent = `[${i + 1}] ${c.doc_id}`;
    b.title = `characters ${c.start}-${c.end}, score ${c.score}`;
    b.dataset.doc = c.doc_id;
    b.dataset.start = c.start;
    b.dataset.end = c.end;
    b.addEventListener("click", () => showSpan(b, c));
    cites.appendChild(b);
  });
  div.appendChild(cites);
  const cache = info.cache || {};
  const conv = info.conversation || {};
  const stats = document.createElement("div");
  stats.className = "stats";
  const cached = usage && usage.prompt_tokens_details ? usage.prompt_tokens_details.cached_tokens : "?";
  stats.textContent =
    `TTFT ${Math.round(info.timings_ms.ttft)} ms · mode ${info.mode}` +
    ` · reused ${cache.reused_tokens} / recomputed ${cache.recomputed_tokens} tokens` +
    ` · prompt ${usage ? usage.prompt_tokens : "?"} (cached ${cached})` +
    ` · chunk K/V hits ${cache.kv_hits}, misses ${cache.kv_misses}` +
    ` · tier hits ${tierSummary(cache.tiers)}` +
    ` · earlier turns used ${conv.turns_used ?? 0}`;
  div.appendChild(stats);
}

async function ask(question) {
  showError("");
  state.busy = true;
  $("send").disabled = true;
  const sent = [...state.messages, { role: "user", content: question }];
  const userDiv = bubble("user", question);
  const div = bubble("assistant", "");
  div.classList.add("streaming");
  const textEl = div.querySelector(".text");
  let text = "";
  let deltas = 0;
  let info = null;
  let usage = null;
  try {
    const body = {
      model: "kvrag",
      messages: sent,
      stream: true,
      stream_options: { include_usage: true },
      kvrag: { k: Number($("k").value), mode: $("mode").value },
    };
    const r = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    for await (const event of events(r)) {
      if (event.error) throw new ApiError(event.error.message);
      const choice = event.choices && event.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        text += choice.delta.content;
        textEl.textContent = text;
        div.dataset.deltas = ++deltas;
        div.scrollIntoView({ block: "end" });
      }
      if (event.kvrag) info = event.kvrag;
      if (event.usage) usage = event.usage;
    }
    if (!info) throw new ApiError("the answer ended early");
    state.messages = [...sent, { role: "assistant", content: text }];
    div.classList.remove("streaming");
    div.dataset.done = "1";
    renderAnswerInfo(div, info, usage);
  } catch (e) {
    // Nothing lost: the question goes back into the box, the conversation is unchanged.
    userDiv.remove();
    div.remove();
    $("question").value = question;
    showError(e.message);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

async function documentText(docId) {
  if (!state.docs.has(docId)) {
    const path = docId.split("/").map(encodeURIComponent).join("/");
    const r = await api(`/v1/documents/${path}/text`);
    state.docs.set(docId, (await r.json()).text);
  }
  return state.docs.get(docId);
}

async function showSpan(button, citation) {
  try {
    const text = await documentText(citation.doc_id);
    const pre = $("doc-text");
    pre.replaceChildren(
      document.createTextNode(text.slice(0, citation.start)),
      Object.assign(document.createElement("mark"), { textContent: text.slice(citation.start, citation.end) }),
      document.createTextNode(text.slice(citation.end)),
    );
    $("viewer-title").textContent = `${citation.doc_id}, characters ${citation.start}-${citation.end}`;
    $("viewer").hidden = false;
    document.querySelectorAll(".citation.active").forEach((b) => b.classList.remove("active"));
    button.classList.add("active");
    pre.querySelector("mark").scrollIntoView({ block: "center" });
  } catch (e) {
    showError(e.message);
  }
}

async function showDocument(docId) {
  const text = await documentText(docId);
  $("doc-text").textContent = text;
  $("viewer-title").textContent = docId;
  $("viewer").hidden = false;
}

async function refreshDocuments() {
  const list = $("doc-list");
  try {
    const docs = (await (await api("/v1/documents")).json()).data;
    list.replaceChildren(...docs.map((d) => {
      const li = document.createElement("li");
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = d.id;
      b.addEventListener("click", () => showDocument(d.id).catch((e) => showError(e.message)));
      li.append(b, ` (${d.chunks} chunks)`);
      return li;
    }));
  } catch (e) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: e.message }));
  }
}

// An upload is done at once (200/201), or accepted as a job (202) to poll until done or failed.
async function upload(file) {
  const status = $("upload-status");
  status.textContent = `uploading ${file.name}...`;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await api("/v1/documents", { method: "POST", body: form });
    let body = await r.json();
    if (r.status === 202) {
      const where = r.headers.get("Location") || `/v1/documents/jobs/${body.id}`;
      while (body.status !== "done" && body.status !== "failed") {
        status.textContent = `ingesting ${file.name}: ${body.status}`;
        await new Promise((ok) => setTimeout(ok, POLL_MS));
        body = await (await api(where)).json();
      }
      if (body.status === "failed") throw new ApiError(`ingestion failed: ${(body.error && body.error.message) || body.error || "unknown error"}`);
    }
    status.textContent = `${file.name}: ${body.status || "done"}`;
    state.docs.clear();
    await refreshDocuments();
  } catch (e) {
    status.textContent = "";
    showError(e.message);
  }
}

async function showModel() {
  try {
    const models = (await (await api("/v1/models")).json()).data;
    $("model").textContent = models.map((m) => m.id).join(", ");
  } catch (e) {
    $("model").textContent = "";
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q || state.busy) return;
  $("question").value = "";
  ask(q);
});
$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});
$("upload").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const file = $("file").files[0];
  if (file) upload(file);
});
$("new-chat").addEventListener("click", () => {
  state.messages = [];
  $("messages").replaceChildren();
  showError("");
});

showModel();
refreshDocuments();
