// Socket.IO scenarios against the server, with the real npm socket.io-client.
//
//   node socketio.mjs <scenario> <baseUrl> <sessionId> [pauseMs]
//
// Each scenario prints one JSON report as its last line; the Rust test (tests/tests/socketio.rs)
// asserts on it. Waits have generous limits only so that a broken server cannot hang the test.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { io } from 'socket.io-client';

const [scenario, base, sessionId, pauseMs] = process.argv.slice(2);
const LIMIT_MS = 30000;

// E2E_TOKEN: the harness runs with auth on (tests/src/auth_mode.rs).
const harnessAuth = process.env.E2E_TOKEN ? { auth: { token: process.env.E2E_TOKEN } } : {};

function connect(options = {}) {
  const socket = io(base, { reconnection: false, timeout: LIMIT_MS, ...harnessAuth, ...options });
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (error) => reject(new Error(`connect_error: ${error.message}`)));
  });
}

function once(socket, event, what = event) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${what} within ${LIMIT_MS} ms`)), LIMIT_MS);
    socket.once(event, (payload) => { clearTimeout(timer); resolve(payload); });
  });
}

/**
 * Collects `agent-event`s (the agent events themselves, each with its `seq`) from now until the
 * run's `agent_run_end` and the `agent-status` that follows it, and every `agent-status` sent
 * meanwhile (as `.statuses` of the result). `onEvent` sees each event as it comes.
 */
function collectRun(socket, onEvent = () => {}) {
  const events = [];
  const statuses = [];
  let ended = false;
  return new Promise((resolve, reject) => {
    const stop = () => {
      clearTimeout(timer);
      socket.off('agent-event', onAgentEvent);
      socket.off('agent-status', onStatus);
    };
    const timer = setTimeout(() => {
      stop();
      reject(new Error(`run did not end within ${LIMIT_MS} ms; got ${JSON.stringify(events.map((e) => e.type))}`));
    }, LIMIT_MS);
    function onAgentEvent(event) {
      events.push(event);
      onEvent(event);
      if (event.type === 'agent_run_end') ended = true;
    }
    function onStatus(status) {
      statuses.push(status);
      if (ended) {
        stop();
        resolve(Object.assign(events, { statuses }));
      }
    }
    socket.on('agent-event', onAgentEvent);
    socket.on('agent-status', onStatus);
  });
}

async function join(socket, payload) {
  const status = once(socket, 'agent-status', 'agent-status after join-session');
  socket.emit('join-session', payload);
  return status;
}

const brief = (events) => events.filter((e) => e.seq !== undefined).map((e) => [e.seq, e.type]);
const contents = (events, type) => events.filter((e) => e.type === type).map((e) => e.content);

async function basics() {
  const a = await connect();
  const report = { transport: a.io.engine.transport.name };
  report.pingAckArgs = await new Promise((resolve, reject) => {
    a.timeout(LIMIT_MS).emit('ping', (error, ...args) => (error ? reject(error) : resolve(args.length)));
  });
  const serverStatus = once(a, 'server-status');
  a.emit('get-server-status');
  report.serverStatus = await serverStatus;

  let error = once(a, 'error', 'error for an unknown session');
  a.emit('join-session', 'no-such-session-0000000');
  report.unknownJoin = await error;

  report.joinStatus = await join(a, sessionId);

  let run = collectRun(a);
  a.emit('send-query', { sessionId, query: 'hello socket' });
  const query = await run;
  report.query = query;
  report.queryStatuses = query.statuses;

  run = collectRun(a);
  a.emit('send-query', {
    sessionId,
    stream: true,
    query: 'TOOL write_file {"path":"socket.md","content":"written over socket.io"}',
  });
  report.tool = await run;

  let sawDelta;
  const firstDelta = new Promise((resolve) => { sawDelta = resolve; });
  run = collectRun(a, (event) => { if (event.type === 'assistant_streaming_message') sawDelta(); });
  a.emit('send-query', { sessionId, stream: true, query: 'SLOW 400' });
  await firstDelta;
  const abortResult = once(a, 'abort-result');
  a.emit('abort-query', { sessionId });
  report.abortResult = await abortResult;
  const aborted = await run;
  report.aborted = aborted;
  report.abortedStatuses = aborted.statuses;

  error = once(a, 'error', 'error for a query without text');
  a.emit('send-query', { sessionId });
  report.missingQuery = await error;

  const idle = once(a, 'abort-result');
  a.emit('abort-query', { sessionId });
  report.idleAbort = await idle;

  a.close();
  return report;
}

/** Deleting the session over HTTP tells its sockets. */
async function closed() {
  const a = await connect();
  const report = {};
  report.joinStatus = await join(a, sessionId);
  const notice = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no closed notice')), LIMIT_MS);
    a.on('agent-event', (event) => {
      if (event.type === 'closed') { clearTimeout(timer); resolve(event); }
    });
  });
  const deleted = await fetch(`${base}/api/v1/sessions/delete`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      ...(process.env.E2E_TOKEN ? { Authorization: `Bearer ${process.env.E2E_TOKEN}` } : {}),
    },
    body: JSON.stringify({ sessionId }),
  });
  report.deleteStatus = deleted.status;
  report.closed = await notice;
  a.close();
  return report;
}

async function room() {
  const a = await connect();
  const b = await connect({ transports: ['websocket'] });
  const report = { transports: [a.io.engine.transport.name, b.io.engine.transport.name] };
  await join(a, sessionId);
  await join(b, { sessionId });
  const runA = collectRun(a);
  const runB = collectRun(b);
  a.emit('send-query', { sessionId, stream: true, query: 'SLOW 20' });
  const [eventsA, eventsB] = await Promise.all([runA, runB]);
  report.a = brief(eventsA);
  report.b = brief(eventsB);
  report.answerA = contents(eventsA, 'assistant_message');
  report.answerB = contents(eventsB, 'assistant_message');
  a.close();
  b.close();
  return report;
}

async function late() {
  const a = await connect();
  await join(a, sessionId);
  let firstSeq = null;
  let deltas = 0;
  let deltasAtLateJoin = null;
  let lateJoin;
  const joinedLate = new Promise((resolve) => { lateJoin = resolve; });
  const runA = collectRun(a, (event) => {
    if (firstSeq === null && event.seq !== undefined) firstSeq = event.seq;
    if (event.type === 'assistant_streaming_message' && ++deltas === 5) lateJoin();
  });
  // Long enough never to end by itself: it is aborted once everyone has joined.
  a.emit('send-query', { sessionId, stream: true, query: 'SLOW 2000' });
  await joinedLate;
  deltasAtLateJoin = deltas;
  // Mid-run: b asks for everything after the event before a's first; c asks for nothing old.
  const b = await connect();
  const c = await connect();
  // Listening before joining: the first events may arrive in the same packet as the reply.
  const runB = collectRun(b);
  await join(b, { sessionId, after: firstSeq - 1 });
  const runC = collectRun(c);
  await join(c, { sessionId });
  a.emit('abort-query', { sessionId });
  const [eventsA, eventsB, eventsC] = await Promise.all([runA, runB, runC]);
  const report = {
    firstSeq,
    deltasBeforeLateJoin: deltasAtLateJoin,
    a: brief(eventsA),
    b: brief(eventsB),
    c: brief(eventsC),
  };
  for (const socket of [a, b, c]) socket.close();
  return report;
}

async function restore() {
  const a = await connect();
  const report = {};
  const history = collectRun(a);
  report.joinStatus = await join(a, { sessionId, after: 0 });
  report.history = (await history).map((e) => ({ type: e.type, seq: e.seq, content: e.content }));
  const run = collectRun(a);
  a.emit('send-query', { sessionId, query: 'RECALL' });
  report.recall = contents(await run, 'assistant_message');
  a.close();
  return report;
}

/**
 * One socket per transport sits quiet for `pauseMs` (longer than the server's connection
 * timeouts), then both still receive a run: a WebSocket and a long poll are not idle
 * connections to be closed.
 */
async function quiet() {
  const ws = await connect({ transports: ['websocket'] });
  const poll = await connect({ transports: ['polling'] });
  const report = {
    transports: [ws.io.engine.transport.name, poll.io.engine.transport.name],
    disconnects: [],
  };
  ws.on('disconnect', (reason) => report.disconnects.push(['websocket', reason]));
  poll.on('disconnect', (reason) => report.disconnects.push(['polling', reason]));
  await join(ws, sessionId);
  await join(poll, sessionId);
  await new Promise((resolve) => setTimeout(resolve, Number(pauseMs)));
  const runWs = collectRun(ws);
  const runPoll = collectRun(poll);
  poll.emit('send-query', { sessionId, query: 'after the pause' });
  const [eventsWs, eventsPoll] = await Promise.all([runWs, runPoll]);
  const answers = (events) => events.filter((e) => e.type === 'assistant_message').map((e) => e.content);
  report.answers = [answers(eventsWs), answers(eventsPoll)];
  report.connected = [ws.connected, poll.connected];
  // Our own close below is not a cut.
  ws.off('disconnect');
  poll.off('disconnect');
  ws.close();
  poll.close();
  return report;
}

// ------------------------------------------------------------------------------------------
// The seed's two Socket.IO examples (seeds/000_be99a738e796d6cd.txt, "WebSocket Events" and
// "WebSocket Client"), copied verbatim. Only the server's address and the example's session id
// are replaced when they run, with this server's and a real session's. Each runs as its own ES
// module (as a reader would paste it into a file) with console.log captured.
// ------------------------------------------------------------------------------------------

const SEED_EVENTS = `const socket = io('http://localhost:3000');

// Join a session
socket.emit('join-session', { sessionId: 'session_123' });

// Send query
socket.emit('send-query', {
  sessionId: 'session_123',
  query: 'Hello agent'
});

// Listen for agent events
socket.on('agent-event', (event) => {
  console.log('Agent event:', event);
});
`;

const SEED_CLIENT = `import io from 'socket.io-client';

const socket = io('http://localhost:3000');

socket.emit('join-session', { sessionId: 'abc123' });
socket.emit('send-query', {
  sessionId: 'abc123',
  query: 'What can you help me with?'
});

socket.on('agent-event', (event) => {
  if (event.type === 'assistant_message') {
    console.log('Agent response:', event.content);
  }
});
`;

/**
 * Runs `code` as a module next to this script (so that `socket.io-client` resolves from
 * tests/js/node_modules), with `console.log` recorded, until `done(logs)` holds.
 */
async function runSnippet(code, done) {
  const logs = [];
  const log = console.log;
  console.log = (...args) => logs.push(args);
  const dir = fs.mkdtempSync(path.join(path.dirname(fileURLToPath(import.meta.url)), '.seed-'));
  const file = path.join(dir, 'snippet.mjs');
  fs.writeFileSync(file, code);
  try {
    await import(file);
    const started = Date.now();
    while (!done(logs)) {
      if (Date.now() - started > LIMIT_MS) throw new Error(`the example did not finish: ${JSON.stringify(logs)}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  } finally {
    console.log = log;
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return logs;
}

const address = (code, id) => code.replaceAll('http://localhost:3000', base).replaceAll(id, sessionId);

async function seedEvents() {
  // The seed shows this part without its import (the page imports `io` above it).
  const code = `import { io } from 'socket.io-client';\n${address(SEED_EVENTS, 'session_123')}`;
  const logs = await runSnippet(code, (logs) => logs.some(([, event]) => event && event.type === 'agent_run_end'));
  return {
    labels: [...new Set(logs.map(([label]) => label))],
    events: logs.map(([, event]) => event),
  };
}

async function seedClient() {
  const logs = await runSnippet(address(SEED_CLIENT, 'abc123'), (logs) => logs.length > 0);
  return { logs };
}

// With auth on (tests/tests/auth.rs): argv is <base> <sessionId> <ownerToken> <otherTenantToken>.
// The handshake without a token and with a wrong one is refused; another tenant's token connects
// but finds the session missing, for a join and for a query alike.
async function auth() {
  const [owner, other] = process.argv.slice(5);
  const refusal = async (options) => {
    try {
      const socket = await connect(options);
      socket.close();
      return 'connected';
    } catch (error) {
      return error.message;
    }
  };
  const report = {
    anonymous: await refusal({}),
    wrongToken: await refusal({ auth: { token: `${owner}x` } }),
  };
  const b = await connect({ auth: { token: other } });
  let error = once(b, 'error', 'error after joining another tenant\'s session');
  b.emit('join-session', sessionId);
  report.otherTenant = await error;
  error = once(b, 'error', 'error after querying another tenant\'s session');
  b.emit('send-query', { sessionId, query: 'from-b' });
  report.otherTenantQuery = await error;
  b.close();
  const a = await connect({ auth: { token: owner } });
  report.owner = await join(a, sessionId);
  a.close();
  return report;
}

const scenarios = { basics, closed, room, late, restore, quiet, auth, 'seed-events': seedEvents, 'seed-client': seedClient };
if (!scenarios[scenario]) {
  console.error(`unknown scenario ${scenario}`);
  process.exit(2);
}
try {
  const report = await scenarios[scenario]();
  console.log(JSON.stringify(report));
  process.exit(0);
} catch (error) {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(1);
}
