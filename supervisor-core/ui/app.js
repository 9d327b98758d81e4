// The built-in UI of the agent server: sessions, chat with streamed answers, tool calls and
// their results, the session's workspace files, and the live workers. Plain DOM code, no build
// step of its own. The agent's answers are Markdown, rendered by `marked` and sanitized by
// `DOMPurify` (vendor.js, inlined before this script; see scripts/build-ui-vendor.sh); every
// other text from the agent or the server is only ever set with textContent.
//
// Streams use the server's SSE framing (supervisor-core/src/api/sse.rs): a query stream sends each
// event as a `data:` block followed by an `id: <seq>` block; the follow stream
// (/sessions/events/stream) sends `id:` and `data:` in one block. An open session is always
// followed live, so events from other clients appear, a run survives a broken query stream,
// and the end of that stream is how the UI learns, at once, that the server went away.
// Every event is applied once, by its seq, whichever stream brings it first.
'use strict';

(() => {
  const API = (typeof window.AGENT_BASE_URL === 'string' ? window.AGENT_BASE_URL : '') + '/api/v1';
  const CONFIG = (window.AGENT_WEB_UI_CONFIG && typeof window.AGENT_WEB_UI_CONFIG === 'object')
    ? window.AGENT_WEB_UI_CONFIG : {};
  const REPLAY = window.AGENT_REPLAY_MODE === true;

  const $ = (id) => document.getElementById(id);

  /** Builds an element: `attrs` may hold className, text, title, dataset, on* handlers. */
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null) continue;
      if (key === 'className') node.className = value;
      else if (key === 'text') node.textContent = value;
      else if (key === 'dataset') Object.assign(node.dataset, value);
      else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === 'string' ? document.createTextNode(child) : child);
    }
    return node;
  }

  function toast(message, isError = false) {
    const box = $('toast');
    box.textContent = message;
    box.className = isError ? 'toast error' : 'toast';
    box.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(() => { box.hidden = true; }, 4000);
  }

  // ----------------------------------------------------------------------------------------
  // HTTP
  // ----------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body, fallback) {
      super((body && (typeof body.error === 'string' ? body.error : body.message)) || fallback);
      this.status = status;
      this.body = body;
    }
  }

  async function api(path, { method = 'GET', body, params } = {}) {
    const query = params ? '?' + new URLSearchParams(params).toString() : '';
    const response = await fetch(API + path + query, {
      method,
      headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (!response.ok) throw new ApiError(response.status, data, `${method} ${path}: ${response.status}`);
    return data;
  }

  /**
   * Reads an SSE response, calling `onEvent(event, seq)` for each event: `seq` is the event's
   * own `id:` (in its block, or in the `id:`-only block that follows it on a query stream), or
   * null for a server-made pseudo-event. `onEvent` returning false stops reading.
   */
  async function readSse(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    let pending = null;  // a data block waiting for the id block that may follow it
    const separator = /\r\n\r\n|\n\n|\r\r/;
    const deliver = (event, seq) => onEvent(event, Number.isFinite(seq) ? seq : null) !== false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let match;
      while ((match = separator.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const data = [];
        let id = null;
        for (const line of block.split(/\r\n|\n|\r/)) {
          if (line.startsWith('data:')) data.push(line.slice(5).replace(/^ /, ''));
          else if (line.startsWith('id:')) id = Number(line.slice(3).trim());
        }
        let event = null;
        if (data.length) {
          try { event = JSON.parse(data.join('\n')); } catch { continue; }
        }
        if (event === null) {
          // An id-only block names the data block before it.
          if (pending !== null && Number.isFinite(id)) {
            const held = pending;
            pending = null;
            if (!deliver(held, id)) { await reader.cancel(); return; }
          }
          continue;
        }
        if (pending !== null) {
          const held = pending;
          pending = null;
          if (!deliver(held, null)) { await reader.cancel(); return; }
        }
        if (Number.isFinite(id)) {
          if (!deliver(event, id)) { await reader.cancel(); return; }
        } else {
          pending = event;
        }
      }
    }
    if (pending !== null) deliver(pending, null);
  }

  // ----------------------------------------------------------------------------------------
  // Rendering one conversation from its events (events.md §7)
  // ----------------------------------------------------------------------------------------

  function contentText(content) {
    if (typeof content === 'string') return content;
    if (Array.isArray(content)) {
      return content.filter((p) => p && p.type === 'text').map((p) => p.text).join('\n');
    }
    return content == null ? '' : JSON.stringify(content, null, 2);
  }

  // ----------------------------------------------------------------------------------------
  // Markdown: marked renders, DOMPurify sanitizes (no scripts, no event handlers, no
  // javascript: URLs), and links open in a new tab without access to this one.
  // ----------------------------------------------------------------------------------------

  const markdown = (() => {
    const marked = window.marked;
    const purify = window.DOMPurify;
    if (!marked || typeof marked.parse !== 'function' || !purify || typeof purify.sanitize !== 'function') {
      return null;
    }
    purify.addHook('afterSanitizeAttributes', (node) => {
      if (node.tagName === 'A' && node.hasAttribute('href')) {
        node.setAttribute('target', '_blank');
        node.setAttribute('rel', 'noopener noreferrer');
      }
    });
    return (text) => purify.sanitize(marked.parse(text, { gfm: true, breaks: true, async: false }), {
      USE_PROFILE: { html: true },
      FORBID_TAGS: ['style', 'form', 'input', 'button', 'textarea', 'select'],
    });
  })();

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return;
    }
    // Plain http on another host has no clipboard API: the old way still works.
    const area = el('textarea', { 'aria-hidden': 'true' });
    area.value = text;
    area.style.position = 'fixed';
    area.style.opacity = '0';
    document.body.append(area);
    area.select();
    const copied = document.execCommand('copy');
    area.remove();
    if (!copied) throw new Error('copy refused');
  }

  /** A copy button for each code block, and a scroll box around each table. */
  function enhance(target) {
    for (const pre of target.querySelectorAll('pre')) {
      const code = pre.querySelector('code') || pre;
      const button = el('button', { type: 'button', className: 'copy', text: 'Copy', title: 'Copy the code' });
      button.addEventListener('click', async () => {
        try {
          await copyText(code.textContent);
          button.textContent = 'Copied';
        } catch {
          button.textContent = 'Copy failed';
        }
        setTimeout(() => { button.textContent = 'Copy'; }, 1500);
      });
      const box = el('div', { className: 'code-block' });
      pre.replaceWith(box);
      box.append(button, pre);
    }
    for (const table of target.querySelectorAll('table')) {
      const box = el('div', { className: 'table-scroll' });
      table.replaceWith(box);
      box.append(table);
    }
  }

  /** An answer's text as Markdown (plain text if the renderer is missing). */
  function renderMarkdown(target, text) {
    if (!markdown) {
      target.textContent = String(text);
      return;
    }
    target.innerHTML = markdown(String(text));
    enhance(target);
  }

  function formatJson(value) {
    if (typeof value === 'string') {
      try { return JSON.stringify(JSON.parse(value), null, 2); } catch { return value; }
    }
    return JSON.stringify(value, null, 2);
  }

  function briefArguments(args) {
    let value = args;
    if (typeof value === 'string') {
      try { value = JSON.parse(value); } catch { return value.slice(0, 80); }
    }
    if (value && typeof value === 'object') {
      // Paths and commands say most about a call; they go first.
      const rank = (key) => (/^(path|file|command|source|pattern|query)$/i.test(key) ? 0 : 1);
      return Object.entries(value)
        .filter(([, v]) => typeof v !== 'object')
        .sort(([a], [b]) => rank(a) - rank(b))
        .slice(0, 2)
        .map(([k, v]) => `${k}: ${String(v).slice(0, 40)}`)
        .join('  ');
    }
    return '';
  }

  class Conversation {
    constructor(container, { onRunning, onFilesChanged } = {}) {
      this.root = container;
      this.root.replaceChildren();
      this.messages = new Map();
      this.tools = new Map();
      this.lastAssistant = null;
      this.appliedSeq = 0;
      this.onRunning = onRunning || (() => {});
      this.onFilesChanged = onFilesChanged || (() => {});
    }

    nearBottom() {
      return this.root.scrollHeight - this.root.scrollTop - this.root.clientHeight < 80;
    }

    add(node) {
      const stick = this.nearBottom();
      this.root.append(node);
      if (stick) this.root.scrollTop = this.root.scrollHeight;
      return node;
    }

    keepScrolled(stick) {
      if (stick) this.root.scrollTop = this.root.scrollHeight;
    }

    /** Applies one event; events already applied (by seq) are skipped. */
    apply(event, seq) {
      if (seq !== null && seq !== undefined) {
        if (seq <= this.appliedSeq) return;
        this.appliedSeq = seq;
      }
      const stick = this.nearBottom();
      switch (event.type) {
        case 'user_message': this.user(event); break;
        case 'assistant_streaming_message': this.delta(event); break;
        case 'assistant_message': this.assistant(event); break;
        case 'assistant_streaming_thinking_message':
        case 'assistant_thinking_message': this.thinking(event); break;
        case 'assistant_streaming_tool_call': this.streamingTool(event); break;
        case 'tool_call': this.toolCall(event); break;
        case 'tool_result': this.toolResult(event); break;
        case 'system': this.system(event); break;
        case 'environment_input': this.environment(event); break;
        case 'agent_run_start': this.onRunning(true, 'executing'); break;
        case 'agent_run_end': this.runEnd(event); break;
        default: break;
      }
      this.keepScrolled(stick);
    }

    /** Records that everything up to `seq` has been applied (the query stream's id blocks). */
    markSeq(seq) {
      this.appliedSeq = Math.max(this.appliedSeq, seq);
    }

    user(event) {
      const bubble = el('div', { className: 'bubble' });
      const content = event.content;
      if (Array.isArray(content)) {
        for (const part of content) {
          if (part && part.type === 'text') bubble.append(document.createTextNode(part.text));
          else if (part && part.type === 'image_url' && part.image_url) {
            bubble.append(el('img', { src: part.image_url.url, alt: 'image' }));
          }
        }
      } else {
        bubble.textContent = contentText(content);
      }
      this.add(el('div', { className: 'msg user', dataset: { id: event.id || '' } }, bubble));
      this.lastAssistant = null;
    }

    message(messageId) {
      const key = messageId || (this.lastAssistant && this.lastAssistant.key) || `m${this.messages.size}`;
      let message = this.messages.get(key);
      if (!message) {
        const bubble = el('div', { className: 'bubble markdown' });
        const node = el('div', { className: 'msg assistant' });
        const meta = el('div', { className: 'meta' });
        node.append(bubble, meta);
        message = { key, node, bubble, meta, text: '', thinking: null, thinkingText: '' };
        this.messages.set(key, message);
        this.add(node);
      }
      this.lastAssistant = message;
      return message;
    }

    delta(event) {
      const message = this.message(event.messageId);
      message.text += event.content || '';
      message.node.classList.toggle('streaming', !event.isComplete);
      this.scheduleRender(message);
    }

    /**
     * Renders a streaming message at most once a frame: a fast answer brings hundreds of
     * deltas a second, and rendering the whole text again for each would be quadratic.
     */
    scheduleRender(message) {
      if (message.renderQueued) return;
      message.renderQueued = true;
      const render = () => {
        message.renderQueued = false;
        const stick = this.nearBottom();
        renderMarkdown(message.bubble, message.text);
        this.keepScrolled(stick);
      };
      if (document.hidden) setTimeout(render, 100);
      else requestAnimationFrame(render);
    }

    assistant(event) {
      const message = this.message(event.messageId || event.id);
      if (typeof event.content === 'string' && (event.content || !message.text)) {
        message.text = event.content;
        renderMarkdown(message.bubble, message.text);
      }
      message.node.classList.remove('streaming');
      for (const call of event.toolCalls || []) {
        const fn = call.function || {};
        this.toolCard(call.id, fn.name, fn.arguments, message);
      }
      const timings = [];
      if (event.finishReason === 'stop' && Number.isFinite(event.ttftMs)) timings.push(`TTFT ${event.ttftMs} ms`);
      if (event.finishReason === 'stop' && Number.isFinite(event.ttltMs)) timings.push(`total ${event.ttltMs} ms`);
      if (event.finishReason === 'abort') timings.push('aborted');
      if (event.finishReason === 'error') timings.push('error');
      message.meta.textContent = timings.join(' · ');
    }

    thinking(event) {
      const message = this.message(event.messageId);
      if (!message.thinking) {
        const body = el('div');
        const summary = el('summary', { text: 'Thinking…' });
        message.thinking = { node: el('details', { className: 'thinking' }, summary, body), body, summary };
        message.node.insertBefore(message.thinking.node, message.bubble);
      }
      if (event.type === 'assistant_thinking_message') {
        message.thinkingText = event.content || '';
        const took = Number.isFinite(event.thinkingDurationMs) ? ` (${(event.thinkingDurationMs / 1000).toFixed(1)} s)` : '';
        message.thinking.summary.textContent = `Thought${took}`;
      } else {
        message.thinkingText += event.content || '';
      }
      message.thinking.body.textContent = message.thinkingText.replace(/^\n+/, '');
    }

    toolCard(id, name, args, message) {
      let card = this.tools.get(id);
      if (!card) {
        const nameNode = el('span', { className: 'tool-name', text: name || 'tool' });
        const brief = el('span', { className: 'tool-brief' });
        const badge = el('span', { className: 'badge', text: 'running' });
        const argsPre = el('pre');
        const resultLabel = el('div', { className: 'label', text: 'Result' });
        const resultBox = el('div');
        resultLabel.hidden = true;
        const node = el('details', { className: 'tool', open: '' },
          el('summary', {}, nameNode, brief, badge),
          el('div', { className: 'tool-body' }, el('div', { className: 'label', text: 'Arguments' }), argsPre, resultLabel, resultBox));
        card = { node, nameNode, brief, badge, argsPre, resultLabel, resultBox, args: '', name };
        this.tools.set(id, card);
        const parent = message ? message.node : null;
        if (parent) {
          const stick = this.nearBottom();
          parent.append(node);
          this.keepScrolled(stick);
        } else {
          this.add(node);
        }
      }
      if (name) { card.name = name; card.nameNode.textContent = name; }
      if (args !== undefined && args !== null && args !== '') {
        card.args = typeof args === 'string' ? args : JSON.stringify(args);
        card.argsPre.textContent = formatJson(args);
        card.brief.textContent = briefArguments(args);
      }
      return card;
    }

    streamingTool(event) {
      const message = this.message(event.messageId);
      const card = this.toolCard(event.toolCallId, event.toolName, undefined, message);
      card.args += event.arguments || '';
      card.argsPre.textContent = card.args;
      if (event.isComplete) {
        card.argsPre.textContent = formatJson(card.args);
        card.brief.textContent = briefArguments(card.args);
      }
    }

    toolCall(event) {
      this.toolCard(event.toolCallId, event.name, event.arguments, this.lastAssistant);
    }

    toolResult(event) {
      const card = this.toolCard(event.toolCallId, event.name, undefined, this.lastAssistant);
      card.resultLabel.hidden = false;
      card.resultBox.replaceChildren();
      const content = event.content;
      if (Array.isArray(content)) {
        for (const part of content) {
          if (part && part.type === 'image_url' && part.image_url) card.resultBox.append(el('img', { src: part.image_url.url, alt: 'tool image' }));
          else if (part && part.type === 'text') card.resultBox.append(el('pre', { text: part.text }));
          else card.resultBox.append(el('pre', { text: formatJson(part) }));
        }
      } else {
        card.resultBox.append(el('pre', { text: typeof content === 'string' ? content : formatJson(content) }));
      }
      const failed = Boolean(event.error);
      card.node.classList.toggle('failed', failed);
      card.node.classList.toggle('done', !failed);
      const took = Number.isFinite(event.elapsedMs) ? ` · ${event.elapsedMs} ms` : '';
      card.badge.textContent = (failed ? `error: ${event.error}` : 'done') + took;
      if (/write|edit|create|move|delete/.test(card.name || '')) this.onFilesChanged();
    }

    system(event) {
      const node = el('div', { className: `system ${event.level || 'info'}` }, el('span', { text: event.message || '' }));
      if (event.details) {
        node.append(el('details', {}, el('summary', { text: 'Details' }), el('pre', { text: formatJson(event.details) })));
      }
      this.add(node);
    }

    environment(event) {
      const text = contentText(event.content);
      this.add(el('details', { className: 'env' },
        el('summary', { text: event.description || 'Context added' }),
        el('pre', { text: text.slice(0, 4000) })));
    }

    runEnd(event) {
      for (const message of this.messages.values()) message.node.classList.remove('streaming');
      this.onRunning(false, event.status || 'idle');
      this.onFilesChanged();
    }
  }

  // ----------------------------------------------------------------------------------------
  // Application state
  // ----------------------------------------------------------------------------------------

  const state = {
    sessions: [],
    current: null,        // the open session's SessionInfo
    conversation: null,
    running: false,
    lastSeq: 0,           // highest seq seen for the open session
    watch: null,          // AbortController of the open session's follow stream
    reconnectTimer: null, // the next attempt to reach a server that went away
    shareProvider: false,
    filesPath: '/',
    workersTimer: null,
    online: null,
  };

  function sessionName(info) {
    return (info && info.metadata && info.metadata.name) || 'Untitled session';
  }

  function ago(ms) {
    if (!ms) return '';
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return 'now';
    if (s < 3600) return `${Math.floor(s / 60)}m`;
    if (s < 86400) return `${Math.floor(s / 3600)}h`;
    return `${Math.floor(s / 86400)}d`;
  }

  function duration(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
    return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  }

  function setRunning(running, status) {
    state.running = running;
    $('send').hidden = running;
    $('stop').hidden = !running || REPLAY;
    const dot = $('chat-status');
    dot.className = 'status-dot' + (running ? ' running' : status === 'error' ? ' error' : status === 'aborted' ? ' aborted' : '');
    dot.title = running ? 'running' : (status || 'idle');
    dot.dataset.state = running ? 'running' : (status || 'idle');
  }

  // ----------------------------------------------------------------------------------------
  // Sessions
  // ----------------------------------------------------------------------------------------

  async function loadSessions() {
    try {
      const data = await api('/sessions');
      state.sessions = data.sessions || [];
      setOnline(true);
    } catch (error) {
      if (!(error instanceof ApiError)) setOnline(false);
      return;
    }
    // A rename in progress keeps its input; the list is redrawn when it ends.
    if (!document.querySelector('#sessions input')) renderSessions();
  }

  function setOnline(online) {
    state.online = online;
    const box = $('connection');
    box.textContent = online ? 'Connected' : 'Disconnected: the server is not answering';
    box.classList.toggle('down', !online);
    box.dataset.state = online ? 'connected' : 'disconnected';
  }

  function renderSessions() {
    const list = $('sessions');
    list.replaceChildren();
    for (const info of state.sessions) {
      const active = state.current && state.current.id === info.id;
      const item = el('li', { className: active ? 'active' : '', dataset: { id: info.id }, title: info.id },
        el('span', { className: 'name', text: sessionName(info) }),
        el('span', { className: 'when', text: ago(info.updatedAt || info.createdAt) }));
      if (!REPLAY) {
        item.append(el('span', { className: 'acts' },
          el('button', { type: 'button', title: 'Rename', className: 'rename', text: '✎', onclick: (e) => { e.stopPropagation(); startRename(item, info); } }),
          el('button', { type: 'button', title: 'Delete', className: 'delete', text: '✕', onclick: (e) => { e.stopPropagation(); deleteSession(info); } })));
        item.addEventListener('click', () => { location.hash = `#/session/${info.id}`; });
      }
      list.append(item);
    }
  }

  function startRename(item, info) {
    const input = el('input', { value: sessionName(info), 'aria-label': 'Session name' });
    const name = item.querySelector('.name');
    name.replaceWith(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const value = input.value.trim();
      if (save && value && value !== sessionName(info)) {
        try {
          const data = await api('/sessions/update', { method: 'POST', body: { sessionId: info.id, metadata: { name: value } } });
          replaceSession(data.session);
        } catch (error) { toast(`Rename failed: ${error.message}`, true); }
      }
      renderSessions();
      if (state.current && state.current.id === info.id) renderHeader();
    };
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') finish(true);
      if (e.key === 'Escape') finish(false);
    });
    input.addEventListener('blur', () => finish(true));
    input.addEventListener('click', (e) => e.stopPropagation());
  }

  function replaceSession(info) {
    if (!info) return;
    const index = state.sessions.findIndex((s) => s.id === info.id);
    if (index >= 0) state.sessions[index] = { ...state.sessions[index], ...info };
    else state.sessions.unshift(info);
    if (state.current && state.current.id === info.id) state.current = { ...state.current, ...info };
  }

  async function deleteSession(info) {
    if (!confirm(`Delete "${sessionName(info)}" and its workspace?`)) return;
    const open = state.current && state.current.id === info.id;
    // The delete ends the session's live stream; that end is expected, not a loss to look into.
    if (open) stopWatching();
    try {
      await api('/sessions/delete', { method: 'POST', body: { sessionId: info.id } });
    } catch (error) {
      toast(`Delete failed: ${error.message}`, true);
      if (open && state.current && state.current.id === info.id) watch(info.id);
      return;
    }
    state.sessions = state.sessions.filter((s) => s.id !== info.id);
    if (state.current && state.current.id === info.id) location.hash = '#/';
    renderSessions();
  }

  async function createSession() {
    const data = await api('/sessions/create', { method: 'POST', body: {} });
    replaceSession(data.session);
    renderSessions();
    return data.session;
  }

  // ----------------------------------------------------------------------------------------
  // Chat
  // ----------------------------------------------------------------------------------------

  /** How long to wait between attempts to reach a server that went away. */
  const RECONNECT_MS = 2000;

  function stopWatching() {
    if (state.watch) state.watch.abort();
    state.watch = null;
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
  }

  function renderHeader() {
    const info = state.current;
    $('chat-name').textContent = sessionName(info);
    const model = info && info.metadata && info.metadata.modelConfig;
    $('chat-model').textContent = model ? (model.displayName || `${model.provider}/${model.id}`) : '';
    document.title = `${sessionName(info)} · ${CONFIG.title || 'Agent Server'}`;
  }

  function newConversation() {
    state.conversation = new Conversation($('messages'), {
      onRunning: (running, status) => setRunning(running, status),
      onFilesChanged: () => loadFiles(),
    });
  }

  /** Applies an event of the open session `id` from any stream; false once it is not open. */
  function applyEvent(id, event, seq) {
    if (!state.current || state.current.id !== id) return false;
    state.conversation.apply(event, seq);
    if (seq) state.lastSeq = Math.max(state.lastSeq, seq);
    return true;
  }

  /** The page for a session id that the server does not know (a stale link, a deleted one). */
  function showMissing(id) {
    stopWatching();
    state.current = null;
    renderSessions();
    showView('missing');
    $('missing-id').textContent = id;
    document.title = `Session not found · ${CONFIG.title || 'Agent Server'}`;
  }

  async function openSession(id) {
    stopWatching();
    showView('chat');
    $('share-result').hidden = true;
    let info = state.sessions.find((s) => s.id === id) || { id };
    state.current = info;
    state.lastSeq = 0;
    state.filesPath = '/';
    renderSessions();
    renderHeader();
    newConversation();
    setRunning(false, 'idle');
    try {
      const [events, details, status] = await Promise.all([
        api('/sessions/events', { params: { sessionId: id } }),
        api('/sessions/details', { params: { sessionId: id } }),
        api('/sessions/status', { params: { sessionId: id } }),
      ]);
      if (!state.current || state.current.id !== id) return;
      info = details.session;
      state.current = info;
      replaceSession(info);
      renderHeader();
      renderSessions();
      for (const event of events.events || []) applyEvent(id, event, event.seq);
      const processing = status.status && status.status.isProcessing;
      setRunning(Boolean(processing), status.status && status.status.state);
    } catch (error) {
      if (!state.current || state.current.id !== id) return;
      if (error.status === 404) {
        showMissing(id);
        return;
      }
      toast(`Could not open the session: ${error.message}`, true);
      if (!(error instanceof ApiError)) setOnline(false);
    }
    // From where the stored history ends: a run in progress (another tab, a socket client)
    // continues live, with its streamed deltas.
    watch(id);
    loadFiles();
    $('prompt').focus();
  }

  /**
   * Follows the open session's events from the last one seen, for as long as it is open. The
   * stream only ends by itself when the server goes away (or drains, or the session is
   * deleted), so its end is checked at once.
   */
  async function watch(id) {
    stopWatching();
    const controller = new AbortController();
    state.watch = controller;
    try {
      const response = await fetch(`${API}/sessions/events/stream?${new URLSearchParams({ sessionId: id, after: String(state.lastSeq) })}`, {
        signal: controller.signal, headers: { Accept: 'text/event-stream' },
      });
      if (response.status === 404) {
        if (state.watch === controller) showMissing(id);
        return;
      }
      if (!response.ok) throw new Error(`follow: ${response.status}`);
      setOnline(true);
      await readSse(response, (event, seq) => applyEvent(id, event, seq));
    } catch (error) {
      if (controller.signal.aborted) return;
    } finally {
      if (state.watch === controller) state.watch = null;
    }
    if (controller.signal.aborted || !state.current || state.current.id !== id) return;
    streamLost(id);
  }

  /** The open session's stream ended without the UI ending it: find out why, then recover. */
  async function streamLost(id) {
    try {
      await api('/health');
    } catch {
      setOnline(false);
      reconnect(id);
      return;
    }
    try {
      await api('/sessions/details', { params: { sessionId: id } });
    } catch (error) {
      if (error.status === 404 && state.current && state.current.id === id) {
        showMissing(id);
        return;
      }
    }
    reconnect(id);
  }

  /** Tries again every RECONNECT_MS until the server answers, then follows from the last seq. */
  function reconnect(id) {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(async () => {
      if (!state.current || state.current.id !== id) return;
      try {
        const status = await api('/sessions/status', { params: { sessionId: id } });
        setOnline(true);
        if (status && status.status) setRunning(Boolean(status.status.isProcessing), status.status.state);
      } catch (error) {
        if (error.status === 404) { showMissing(id); return; }
        setOnline(false);
        reconnect(id);
        return;
      }
      watch(id);
    }, RECONNECT_MS);
  }

  /**
   * Sends a query. `fromComposer`: the text is in the composer, which is emptied only once the
   * server has taken the query, so a failed send leaves it there to send again. Resolves to
   * whether the query was taken.
   */
  async function send(text, { fromComposer = false } = {}) {
    const info = state.current;
    if (!info || !text.trim() || state.running) return false;
    const id = info.id;
    setRunning(true, 'executing');
    let response;
    try {
      response = await fetch(`${API}/sessions/query/stream`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify({ sessionId: id, query: text }),
      });
      if (!response.ok) {
        let body = null;
        try { body = await response.json(); } catch { body = null; }
        throw new ApiError(response.status, body, response.statusText);
      }
    } catch (error) {
      const offline = !(error instanceof ApiError);
      toast(`Failed to send: ${offline ? 'the server is not answering' : error.message}`, true);
      setRunning(false, 'idle');
      if (offline) setOnline(false);
      return false;
    }
    if (fromComposer && $('prompt').value === text) $('prompt').value = '';
    if (!info.metadata || !info.metadata.name) {
      // Like the official UI: the first prompt names the session.
      const name = text.length > 50 ? `${text.slice(0, 47)}...` : text;
      api('/sessions/update', { method: 'POST', body: { sessionId: id, metadata: { name } } })
        .then((data) => { replaceSession(data.session); renderSessions(); renderHeader(); })
        .catch(() => {});
    }
    try {
      // The follow stream brings the same events; each is applied once, by its seq.
      await readSse(response, (event, seq) => applyEvent(id, event, seq));
    } catch {
      // The follow stream carries the run on (and notices if the server went away).
    }
    loadSessions();
    return true;
  }

  async function abortRun() {
    if (!state.current) return;
    try {
      const data = await api('/sessions/abort', { method: 'POST', body: { sessionId: state.current.id } });
      if (data && data.success) setRunning(false, 'aborted');
      else if (data && data.reason) toast(data.reason);
    } catch (error) {
      toast(`Stop failed: ${error.message}`, true);
    }
  }

  // ----------------------------------------------------------------------------------------
  // Sharing
  // ----------------------------------------------------------------------------------------

  async function share(upload) {
    if (!state.current) return;
    const id = state.current.id;
    const box = $('share-result');
    try {
      const data = await api('/sessions/share', { method: 'POST', body: { sessionId: id, upload } });
      if (data.url) {
        box.replaceChildren('Shared: ', el('a', { href: data.url, target: '_blank', rel: 'noopener', text: data.url }));
        box.hidden = false;
      } else if (data.html) {
        const blob = new Blob([data.html], { type: 'text/html' });
        const link = el('a', { href: URL.createObjectURL(blob), download: `agent-replay-${id}-${Date.now()}.html` });
        document.body.append(link);
        link.click();
        link.remove();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
        toast('Replay page downloaded');
      }
    } catch (error) {
      toast(`Share failed: ${error.message}`, true);
    }
  }

  async function loadShareConfig() {
    try {
      const data = await api('/share/config');
      state.shareProvider = Boolean(data && data.hasShareProvider);
    } catch { state.shareProvider = false; }
    $('share-upload').hidden = !state.shareProvider;
  }

  // ----------------------------------------------------------------------------------------
  // Workspace files (the file API may be absent on a server without it: say so, nothing more)
  // ----------------------------------------------------------------------------------------

  function formatBytes(bytes) {
    if (!Number.isFinite(bytes)) return '';
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  async function loadFiles() {
    if (REPLAY || !state.current) return;
    const id = state.current.id;
    const list = $('files-list');
    const note = $('files-note');
    $('files-path').textContent = state.filesPath;
    let data;
    try {
      data = await api('/sessions/workspace/files', { params: { sessionId: id, path: state.filesPath } });
    } catch (error) {
      if (!state.current || state.current.id !== id) return;
      list.replaceChildren();
      note.hidden = false;
      note.textContent = error.status === 404 && error.body && error.body.code === 'NOT_FOUND'
        ? 'This server has no workspace file API.'
        : `Files unavailable: ${error.message}`;
      return;
    }
    if (!state.current || state.current.id !== id) return;
    note.hidden = true;
    list.replaceChildren();
    if (state.filesPath !== '/') {
      const parent = state.filesPath.replace(/\/[^/]+\/?$/, '') || '/';
      list.append(el('li', {}, el('a', { href: '#', text: '↩ ..', onclick: (e) => { e.preventDefault(); state.filesPath = parent; loadFiles(); } })));
    }
    const files = data && data.type === 'directory' ? data.files || [] : [];
    if (!files.length) {
      note.hidden = false;
      note.textContent = 'No files yet.';
    }
    for (const file of files) {
      const path = file.path || `${state.filesPath.replace(/\/$/, '')}/${file.name}`;
      const link = file.isDirectory
        ? el('a', { href: '#', text: `📁 ${file.name}`, onclick: (e) => { e.preventDefault(); state.filesPath = path; loadFiles(); } })
        : el('a', { href: `${path}?sessionId=${encodeURIComponent(id)}`, target: '_blank', rel: 'noopener', text: `📄 ${file.name}` });
      list.append(el('li', {}, link, file.isDirectory ? null : el('span', { className: 'size', text: formatBytes(file.size) })));
    }
  }

  // ----------------------------------------------------------------------------------------
  // Workers (operations view)
  // ----------------------------------------------------------------------------------------

  function isolationLevel(health) {
    const value = health && health.isolation;
    if (typeof value === 'string') return value;
    if (value && typeof value === 'object') return value.level || 'unknown';
    return 'unknown';
  }

  async function loadWorkers() {
    let workers;
    let health;
    try {
      [workers, health] = await Promise.all([api('/workers'), api('/system/health')]);
      setOnline(true);
    } catch (error) {
      setOnline(false);
      return;
    }
    const level = isolationLevel(health);
    const cards = $('server-cards');
    const card = (k, v) => el('div', { className: 'card' }, el('div', { className: 'k', text: k }), el('div', { className: 'v', text: String(v) }));
    cards.replaceChildren(
      card('Version', health.version || '?'),
      card('Uptime', duration(health.uptime || 0)),
      card('Sessions', `${health.sessions ? health.sessions.active : 0} live / ${health.sessions ? health.sessions.total : 0}`),
      card('Workers', (workers.workers || []).length),
      card('Isolation', level),
      card('Storage', health.storage ? health.storage.type : '?'),
      card('Model', health.model ? `${health.model.provider}/${health.model.id}` : '?'));
    const body = $('workers-body');
    body.replaceChildren();
    const list = workers.workers || [];
    $('workers-empty').hidden = list.length > 0;
    const names = new Map(state.sessions.map((s) => [s.id, sessionName(s)]));
    for (const worker of list) {
      const uptime = worker.startedAt ? (Date.now() - worker.startedAt) / 1000 : 0;
      const memory = Number.isFinite(worker.rssKib) ? formatBytes(worker.rssKib * 1024) : 'n/a';
      body.append(el('tr', { dataset: { session: worker.sessionId } },
        el('td', {}, el('a', { href: `#/session/${worker.sessionId}`, text: names.get(worker.sessionId) || worker.sessionId }),
          el('div', { className: 'muted small mono', text: worker.sessionId })),
        el('td', { className: 'mono pid', text: String(worker.pid) }),
        el('td', {}, el('span', { className: `pill ${worker.state}`, text: worker.state })),
        el('td', { text: duration(uptime) }),
        el('td', { className: 'rss', text: memory }),
        el('td', { text: level }),
        el('td', { className: 'actions' },
          el('button', { type: 'button', className: 'restart', text: 'Restart', onclick: () => workerAction('restart', worker.sessionId) }),
          el('button', { type: 'button', className: 'stop danger', text: 'Stop', onclick: () => workerAction('stop', worker.sessionId) }))));
    }
  }

  async function workerAction(action, sessionId) {
    try {
      await api(`/sessions/${action}`, { method: 'POST', body: { sessionId } });
      toast(action === 'restart' ? 'Worker restarted' : 'Worker stopped');
    } catch (error) {
      toast(`${action} failed: ${error.message}`, true);
    }
    loadWorkers();
  }

  // ----------------------------------------------------------------------------------------
  // Views and routing (#/, #/session/<id>, #/workers)
  // ----------------------------------------------------------------------------------------

  function showView(name) {
    for (const view of ['home', 'chat', 'workers', 'missing', 'login']) $(`view-${view}`).hidden = view !== name;
    // On a narrow screen the session list folds away once a view is chosen.
    $('sidebar').classList.remove('open');
    $('tab-chat').classList.toggle('active', name !== 'workers');
    $('tab-workers').classList.toggle('active', name === 'workers');
    clearInterval(state.workersTimer);
    state.workersTimer = null;
    if (name === 'workers') {
      loadWorkers();
      state.workersTimer = setInterval(loadWorkers, 2000);
    }
  }

  function route() {
    const hash = location.hash || '#/';
    const session = hash.match(/^#\/session\/([A-Za-z0-9_-]+)/);
    if (session) {
      if (!state.current || state.current.id !== session[1] || $('view-chat').hidden) openSession(session[1]);
      return;
    }
    stopWatching();
    state.current = null;
    renderSessions();
    if (hash.startsWith('#/workers')) showView('workers');
    else showView('home');
  }

  async function startWithPrompt(text) {
    try {
      const info = await createSession();
      location.hash = `#/session/${info.id}`;
      await openSession(info.id);
      send(text);
    } catch (error) {
      toast(`Could not start: ${error.message}`, true);
    }
  }

  function renderWelcome() {
    const title = CONFIG.title || 'Agent Server';
    $('brand-title').textContent = title;
    document.title = title;
    $('welcome-title').textContent = CONFIG.welcomTitle || `Hello!`;
    $('welcome-subtitle').textContent = CONFIG.subtitle || '';
    const prompts = $('welcome-prompts');
    prompts.replaceChildren();
    for (const prompt of Array.isArray(CONFIG.welcomePrompts) ? CONFIG.welcomePrompts : []) {
      if (typeof prompt === 'string') prompts.append(el('button', { type: 'button', text: prompt, onclick: () => startWithPrompt(prompt) }));
    }
  }

  function bindControls() {
    $('new-session').addEventListener('click', async () => {
      try {
        const info = await createSession();
        location.hash = `#/session/${info.id}`;
      } catch (error) { toast(`Could not create a session: ${error.message}`, true); }
    });
    $('composer').addEventListener('submit', (e) => {
      e.preventDefault();
      const text = $('prompt').value;
      if (!text.trim() || state.running) return;
      send(text, { fromComposer: true });
    });
    $('prompt').addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $('composer').requestSubmit();
      }
    });
    $('stop').addEventListener('click', abortRun);
    $('menu').addEventListener('click', () => {
      const open = $('sidebar').classList.toggle('open');
      $('menu').setAttribute('aria-expanded', String(open));
    });
    $('share-download').addEventListener('click', () => share(false));
    $('share-upload').addEventListener('click', () => share(true));
    $('files-refresh').addEventListener('click', loadFiles);
    window.addEventListener('hashchange', route);
  }

  // ----------------------------------------------------------------------------------------
  // Replay mode: a shared page renders its embedded events and calls no API at all
  // ----------------------------------------------------------------------------------------

  function startReplay() {
    const info = window.AGENT_SESSION_DATA || {};
    const events = Array.isArray(window.AGENT_EVENT_STREAM) ? window.AGENT_EVENT_STREAM : [];
    renderWelcome();
    $('new-session').hidden = true;
    $('composer').hidden = true;
    $('files').hidden = true;
    $('tab-workers').hidden = true;
    $('share-download').hidden = true;
    $('share-upload').hidden = true;
    $('replay-note').hidden = false;
    state.sessions = [info];
    state.current = info;
    showView('chat');
    renderSessions();
    renderHeader();
    newConversation();
    setRunning(false, 'idle');
    for (const event of events) state.conversation.apply(event, null);
    setRunning(false, 'idle');
  }

  /**
   * The sign-in screen of a server with auth on: the token goes to `/auth/login` once, which
   * answers with an HttpOnly cookie (the page never keeps the token), then the page starts over.
   */
  function showLogin() {
    $('new-session').hidden = true;
    $('tab-workers').hidden = true;
    showView('login');
    $('login-form').onsubmit = async (e) => {
      e.preventDefault();
      const token = $('login-token').value.trim();
      if (!token) return;
      try {
        await api('/auth/login', { method: 'POST', body: { token } });
        $('login-token').value = '';
        window.location.reload();
      } catch (error) {
        $('login-error').textContent = error.message || 'Sign-in failed';
        $('login-error').hidden = false;
      }
    };
    $('login-token').focus();
  }

  async function start() {
    if (REPLAY) {
      startReplay();
      return;
    }
    try {
      await api('/auth/me');
    } catch (error) {
      if (error.status === 401) {
        showLogin();
        return;
      }
    }
    renderWelcome();
    bindControls();
    loadShareConfig();
    loadSessions().then(route);
    // Like the official UI: a health check every 30 s; the session list is refreshed with it,
    // so sessions made by other clients appear.
    setInterval(() => {
      api('/health').then(() => { setOnline(true); if (!REPLAY) loadSessions(); }, () => setOnline(false));
    }, 30000);
  }

  start();
})();
