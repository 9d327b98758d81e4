// Socket.IO scenarios against the server, with the real npm socket.io-client.
//
//   node socketio.mjs <scenario> <baseUrl> <sessionId> [pauseMs]
//
// Each scenario prints one JSON report as its last line; the Rust test (tests/tests/socketio.rs)
// asserts on it. Waits have generous limits only so that a broken server cannot hang the test.
import { io } from 'socket.io-client';

const [scenario, base, sessionId, pauseMs] = process.argv.slice(2);
const LIMIT_MS = 30000;

function connect(options = {}) {
  const socket = io(base, { reconnection: false, timeout: LIMIT_MS, ...options });
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
 * Collects `agent-event`s from now until the run ends (the `agent-status` with
 * isProcessing:false that `agent_run_end` becomes; the one that follows an `aborted` notice
 * has the same seq as that notice and is not the end). `onEvent` sees each payload as it comes.
 */
function collectRun(socket, onEvent = () => {}) {
  const events = [];
  let abortedSeq = null;
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      socket.off('agent-event', handler);
      reject(new Error(`run did not end within ${LIMIT_MS} ms; got ${JSON.stringify(events.map((e) => e.type))}`));
    }, LIMIT_MS);
    function handler(payload) {
      events.push(payload);
      onEvent(payload);
      if (payload.type === 'aborted' && payload.seq !== undefined) abortedSeq = payload.seq;
      if (payload.type === 'agent-status' && payload.data && payload.data.isProcessing === false
          && payload.seq !== undefined && payload.seq !== abortedSeq) {
        clearTimeout(timer);
        socket.off('agent-event', handler);
        resolve(events);
      }
    }
    socket.on('agent-event', handler);
  });
}

async function join(socket, payload) {
  const status = once(socket, 'agent-status', 'agent-status after join-session');
  socket.emit('join-session', payload);
  return status;
}

const brief = (events) => events.filter((e) => e.seq !== undefined).map((e) => [e.seq, e.type]);

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
  report.query = await run;

  run = collectRun(a);
  a.emit('send-query', {
    sessionId,
    stream: true,
    query: 'TOOL write_file {"path":"socket.md","content":"written over socket.io"}',
  });
  report.tool = await run;

  // The aborted notice goes to the room beside the event log, so it may come after the run's
  // end: it is watched on its own.
  const abortedNotice = new Promise((resolve) => {
    a.on('agent-event', (payload) => { if (payload.type === 'aborted') resolve(payload); });
  });
  let sawDelta;
  const firstDelta = new Promise((resolve) => { sawDelta = resolve; });
  run = collectRun(a, (payload) => { if (payload.type === 'streaming_message') sawDelta(); });
  a.emit('send-query', { sessionId, stream: true, query: 'SLOW 400' });
  await firstDelta;
  const abortResult = once(a, 'abort-result');
  a.emit('abort-query', { sessionId });
  report.abortResult = await abortResult;
  report.aborted = await run;
  report.abortedNotice = await abortedNotice;

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
    a.on('agent-event', (payload) => {
      if (payload.type === 'closed') { clearTimeout(timer); resolve(payload); }
    });
  });
  const deleted = await fetch(`${base}/api/v1/sessions/delete`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
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
  report.answerA = eventsA.filter((e) => e.type === 'answer').map((e) => e.data.text);
  report.answerB = eventsB.filter((e) => e.type === 'answer').map((e) => e.data.text);
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
  const runA = collectRun(a, (payload) => {
    if (firstSeq === null && payload.seq !== undefined) firstSeq = payload.seq;
    if (payload.type === 'streaming_message' && ++deltas === 5) lateJoin();
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
  report.history = (await history).map((e) => ({ type: e.type, seq: e.seq, data: e.data }));
  const run = collectRun(a);
  a.emit('send-query', { sessionId, query: 'RECALL' });
  report.recall = (await run).filter((e) => e.type === 'answer').map((e) => e.data.text);
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
  const answers = (events) => events.filter((e) => e.type === 'answer').map((e) => e.data.text);
  report.answers = [answers(eventsWs), answers(eventsPoll)];
  report.connected = [ws.connected, poll.connected];
  // Our own close below is not a cut.
  ws.off('disconnect');
  poll.off('disconnect');
  ws.close();
  poll.close();
  return report;
}

const scenarios = { basics, closed, room, late, restore, quiet };
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
