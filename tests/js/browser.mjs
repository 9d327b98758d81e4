// Headless Chromium (Debian's, driven by playwright-core) against the server's web UIs.
//
//   node browser.mjs official <baseUrl> <artifactsDir>
//   node browser.mjs builtin  <baseUrl> <artifactsDir>
//   node browser.mjs builtin-states <baseUrl> <artifactsDir> <serverPid>   (kills the server)
//   node browser.mjs replay   <htmlFile or share link URL> <artifactsDir> <name> <text>...
//   node browser.mjs interrupted <baseUrl> <artifactsDir> <serverPid>
//   node browser.mjs workspace <pageUrl> <artifactsDir> <name>
//   node browser.mjs cross-origin <baseUrl> <artifactsDir>
//
// With E2E_TOKEN set (a server with auth on: tests/tests/auth.rs, or the harness's
// E2E_AUTH=token), `official` signs in through `/api/v1/auth/login` (the cookie is then the
// page's) and `builtin` through the built-in UI's sign-in screen, before doing anything else.
//
// Each scenario prints one JSON report as its last line; the Rust tests (tests/tests/browser.rs,
// tests/tests/share.rs) assert on it. Screenshots go to <artifactsDir>/<scenario>-*.png.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { chromium } from 'playwright-core';

const [scenario, target, artifacts, ...rest] = process.argv.slice(2);
const LIMIT_MS = 30000;
/** The official UI's stop button while it considers the agent running (in each of its
 * desktop and mobile layouts). */
const OFFICIAL_STOP = 'div.w-3.h-3.bg-current.rounded-sm';
/** The official UI's share button (the three-dots "share" icon in its header). */
const OFFICIAL_SHARE = 'button:has(svg circle[cx="18"][cy="5"])';
const TOOL_PROMPT = 'TOOL write_file {"path":"notes.md","content":"# Notes\\nhello from the agent"}';
const HELLO = 'Hello from Chromium';

/** Profiles of launched browsers, removed at exit even when a scenario fails. */
const profiles = [];
process.on('exit', () => {
  for (const profile of profiles) fs.rmSync(profile, { recursive: true, force: true });
});

/** A fresh headless Chromium with its own profile directory, removed on close. */
async function launch() {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'e2e-chromium-'));
  profiles.push(profile);
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
    viewport: { width: 1400, height: 900 },
    acceptDownloads: true,
  });
  context.setDefaultTimeout(LIMIT_MS);
  const page = context.pages()[0] || await context.newPage();
  return {
    context,
    page,
    close: async () => {
      await context.close();
      fs.rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Records API failures and the bodies of query streams the page reads. */
function watch(page) {
  const seen = { apiErrors: [], streams: [], pageErrors: [], console: [] };
  page.on('pageerror', (error) => seen.pageErrors.push(String(error)));
  page.on('console', (message) => {
    seen.console.push(`${message.type()}: ${message.text().slice(0, 300)}`);
    if (seen.console.length > 40) seen.console.shift();
  });
  page.on('response', async (response) => {
    const url = response.url();
    if (url.includes('/api/') && response.status() >= 400) {
      seen.apiErrors.push(`${response.status()} ${response.request().method()} ${new URL(url).pathname}`);
    }
    if (url.endsWith('/api/v1/sessions/query/stream')) {
      seen.streams.push(response.text().catch((error) => `unreadable: ${error}`));
    }
  });
  return seen;
}

/** Counts of each event type in SSE bodies. */
async function streamTypes(seen) {
  const bodies = await Promise.all(seen.streams);
  return bodies.map((body) => {
    const counts = {};
    for (const line of body.split('\n')) {
      if (!line.startsWith('data: ')) continue;
      try {
        const type = JSON.parse(line.slice(6)).type;
        counts[type] = (counts[type] || 0) + 1;
      } catch { /* a partial line cannot happen once the body is complete */ }
    }
    return counts;
  });
}

/**
 * Waits until the official UI's composer shows its send button again (it has seen the run end).
 * If it never does, the error carries what the page and the server knew: which events each
 * query stream delivered, the server's status for the session, and the page's last console
 * lines, so that a failure on a loaded CI machine can be told apart from a server fault.
 */
async function untilOfficialIdle(page, seen, sessionId) {
  try {
    await page.waitForFunction((stop) => !document.querySelector(stop), OFFICIAL_STOP);
  } catch (error) {
    const pending = new Promise((resolve) => setTimeout(() => resolve('still open'), 2000));
    const streams = await Promise.all(
      seen.streams.map((body) => Promise.race([body, pending]).then((text) => {
        if (typeof text !== 'string' || text === 'still open') return text;
        return text.split('\n').filter((l) => l.startsWith('data: '))
          .map((l) => { try { return JSON.parse(l.slice(6)).type; } catch { return 'partial'; } });
      })),
    );
    const status = await page.request
      .get(`${target}/api/v1/sessions/status?sessionId=${sessionId}`)
      .then(async (r) => `${r.status()} ${await r.text()}`, (e) => `unreachable: ${e}`);
    await shot(page, 'official-stuck').catch(() => {});
    throw new Error(`${error.message}\n${JSON.stringify({
      status, streams, apiErrors: seen.apiErrors, pageErrors: seen.pageErrors, console: seen.console,
    }, null, 1)}`);
  }
}

const shot = (page, name) => page.screenshot({ path: path.join(artifacts, `${name}.png`) });

const TOKEN = process.env.E2E_TOKEN;

async function official() {
  const { context, page, close } = await launch();
  const seen = watch(page);
  if (TOKEN) {
    // The official UI has no sign-in of its own; the cookie set here is the browser's.
    const login = await context.request.post(`${target}/api/v1/auth/login`, { data: { token: TOKEN } });
    if (!login.ok()) throw new Error(`login: ${login.status()} ${await login.text()}`);
  }
  await page.goto(`${target}/`);
  await page.locator('textarea').first().fill(TOOL_PROMPT);
  await page.keyboard.press('Control+Enter');
  await page.waitForURL(/\/[A-Za-z0-9_-]{21}$/);
  const sessionId = new URL(page.url()).pathname.slice(1);
  await page.getByText('tool said: Successfully wrote').first().waitFor();
  await page.getByText('Write File').first().waitFor();
  // The second prompt goes through the chat view's composer.
  await page.locator('textarea').first().fill(HELLO);
  await page.keyboard.press('Control+Enter');
  await page.getByText(`echo: ${HELLO}`).first().waitFor();
  // The composer's stop button (a small square) gives way to the send button once the UI
  // has seen agent_run_end.
  await untilOfficialIdle(page, seen, sessionId);
  await shot(page, 'official-chat');
  const beforeReload = {
    toolChip: await page.getByText('Write File').count(),
    fileView: await page.getByText('hello from the agent').count(),
  };
  await page.reload();
  await page.getByText(`echo: ${HELLO}`).first().waitFor();
  await page.getByText('tool said: Successfully wrote').first().waitFor();
  await page.getByText('Write File').first().waitFor();
  await shot(page, 'official-reload');
  const afterReload = {
    user: await page.getByText(HELLO, { exact: true }).count(),
    toolChip: await page.getByText('Write File').count(),
  };
  // The UI's own share dialog: "Download HTML" saves the replay page the server builds.
  await page.locator(OFFICIAL_SHARE).first().click();
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.getByRole('button', { name: /Download HTML/i }).first().click(),
  ]);
  const replayFile = path.join(artifacts, 'official-replay.html');
  await download.saveAs(replayFile);
  const report = {
    sessionId,
    download: { suggested: download.suggestedFilename(), file: replayFile },
    beforeReload,
    afterReload,
    streams: await streamTypes(seen),
    apiErrors: seen.apiErrors,
    pageErrors: seen.pageErrors,
  };
  await close();
  return report;
}

async function builtin() {
  const { context, page, close } = await launch();
  const seen = watch(page);
  page.on('dialog', (dialog) => dialog.accept());
  await page.goto(`${target}/`);
  if (TOKEN) {
    await page.locator('#view-login:not([hidden])').waitFor();
    await page.locator('#login-token').fill(TOKEN);
    await page.locator('#login-submit').click();
    await page.locator('#new-session:not([hidden])').waitFor();
    await page.locator('#view-login[hidden]').waitFor({ state: 'attached' });
    // The 401 that brought up the sign-in screen is not a failure.
    seen.apiErrors.length = 0;
  }
  await page.locator('#new-session').click();
  await page.waitForURL(/#\/session\//);
  const sessionId = new URL(page.url()).hash.replace('#/session/', '');

  await page.locator('#prompt').fill(TOOL_PROMPT);
  await page.keyboard.press('Enter');
  await page.locator('.tool.done').first().waitFor();
  await page.getByText('tool said: Successfully wrote').first().waitFor();
  await page.locator('#send:not([hidden])').waitFor();
  await page.locator('#prompt').fill(HELLO);
  await page.keyboard.press('Enter');
  await page.getByText(`echo: ${HELLO}`).first().waitFor();
  await page.locator('#chat-status[data-state="idle"]').waitFor();
  await page.locator('#files-note:not([hidden]), #files-list li').first().waitFor();
  await shot(page, 'builtin-chat');
  const filesNote = await page.locator('#files-note').textContent();
  const files = await page.locator('#files-list li').allTextContents();

  await page.reload();
  await page.getByText(`echo: ${HELLO}`).first().waitFor();
  await page.locator('.tool.done').first().waitFor();
  await shot(page, 'builtin-reload');
  const afterReload = {
    user: await page.locator('.msg.user').count(),
    assistant: await page.locator('.msg.assistant').count(),
    tools: await page.locator('.tool.done').count(),
    toolName: await page.locator('.tool .tool-name').first().textContent(),
  };

  // Rename from the sidebar.
  await page.locator(`#sessions li[data-id="${sessionId}"] .rename`).click();
  await page.locator('#sessions li input').fill('Renamed by Chromium');
  await page.keyboard.press('Enter');
  await page.locator(`#sessions li[data-id="${sessionId}"] .name`, { hasText: 'Renamed by Chromium' }).waitFor();

  // Download the replay page, then open it from the file as a user would.
  const [download] = await Promise.all([page.waitForEvent('download'), page.locator('#share-download').click()]);
  const replayFile = path.join(artifacts, 'builtin-replay.html');
  await download.saveAs(replayFile);
  const replayPage = await context.newPage();
  const replayRequests = [];
  replayPage.on('request', (request) => { if (!request.url().startsWith('file:') && !request.url().startsWith('data:')) replayRequests.push(request.url()); });
  await replayPage.goto(pathToFileURL(replayFile).href);
  await replayPage.getByText(`echo: ${HELLO}`).waitFor();
  await replayPage.locator('.tool.done').first().waitFor();
  await shot(replayPage, 'builtin-replay');
  const replay = {
    title: await replayPage.locator('#chat-name').textContent(),
    tools: await replayPage.locator('.tool.done').count(),
    composerHidden: await replayPage.locator('#composer').isHidden(),
    requests: replayRequests,
  };
  await replayPage.close();

  // The operations view: this session's worker, then restart and stop it.
  await page.locator('#tab-workers').click();
  const row = page.locator(`#workers-body tr[data-session="${sessionId}"]`);
  await row.waitFor();
  await page.locator('#server-cards .card').first().waitFor();
  await shot(page, 'builtin-workers');
  const pidBefore = (await row.locator('.pid').textContent()).trim();
  const worker = {
    pidBefore,
    rss: (await row.locator('.rss').textContent()).trim(),
    cells: (await row.locator('td').allTextContents()).map((t) => t.trim()),
    cards: (await page.locator('#server-cards .card').allTextContents()).map((t) => t.trim()),
  };
  await row.locator('button.restart').click();
  await page.waitForFunction(
    ([id, before]) => {
      const cell = document.querySelector(`#workers-body tr[data-session="${id}"] .pid`);
      return cell && cell.textContent.trim() !== before;
    },
    [sessionId, pidBefore],
  );
  worker.pidAfterRestart = (await row.locator('.pid').textContent()).trim();
  await row.locator('button.stop').click();
  await row.waitFor({ state: 'detached' });
  worker.rowsAfterStop = await page.locator('#workers-body tr').count();

  // A second session, deleted from the sidebar.
  await page.locator('#tab-chat').click();
  await page.locator('#new-session').click();
  await page.waitForFunction((id) => location.hash.startsWith('#/session/') && !location.hash.endsWith(id), sessionId);
  const doomed = new URL(page.url()).hash.replace('#/session/', '');
  await page.locator(`#sessions li[data-id="${doomed}"] .delete`).click();
  await page.locator(`#sessions li[data-id="${doomed}"]`).waitFor({ state: 'detached' });

  const report = {
    sessionId,
    deleted: doomed,
    filesNote,
    files,
    afterReload,
    replay,
    worker,
    streams: await streamTypes(seen),
    apiErrors: seen.apiErrors,
    pageErrors: seen.pageErrors,
  };
  await close();
  return report;
}

/** An answer with every Markdown feature the built-in UI renders, and two attacks. The echo
 * model answers `echo: <this>`, so the first line is a plain paragraph. */
const MARKDOWN = [
  'Report',
  '',
  '# Heading one',
  '## Heading two',
  '',
  '- first item',
  '- second item',
  '',
  '1. step one',
  '2. step two',
  '',
  '| name | value |',
  '|------|-------|',
  '| alpha | 1 |',
  '| beta | 2 |',
  '',
  'Visit [the docs](https://example.com/docs) or [click me](javascript:window.__pwned=true).',
  '',
  '```js',
  'const answer = 42;',
  '```',
  '',
  '<img src="x" onerror="window.__pwned=true"><script>window.__pwned=true</script>',
].join('\n');
const UNKNOWN_SESSION = 'NoSuchSession_0000000';
const UNSENT = 'This text must survive a failed send';

/** Layout facts at the current viewport: horizontal overflow of the page and of the chat. */
function layout(page) {
  return page.evaluate(() => {
    const root = document.documentElement;
    const messages = document.getElementById('messages');
    const right = (id) => {
      const node = document.getElementById(id);
      const rect = node.getBoundingClientRect();
      return node.offsetParent === null ? null : Math.ceil(rect.right);
    };
    return {
      width: window.innerWidth,
      pageOverflow: Math.max(root.scrollWidth - root.clientWidth, document.body.scrollWidth - document.body.clientWidth),
      messagesOverflow: messages.offsetParent === null ? 0 : messages.scrollWidth - messages.clientWidth,
      promptRight: right('prompt'),
      sendRight: right('send'),
      sessionsShown: getComputedStyle(document.getElementById('sessions')).display !== 'none',
    };
  });
}

/** The computed colours that make a scheme. */
function colours(page) {
  return page.evaluate(() => ({
    body: getComputedStyle(document.body).backgroundColor,
    text: getComputedStyle(document.body).color,
    bubble: getComputedStyle([...document.querySelectorAll('.msg.assistant .bubble')].pop()).backgroundColor,
  }));
}

/**
 * The built-in UI's states, each asserted by the Rust test from this report and each left as a
 * screenshot: rendered Markdown (with its attacks defused and a working copy button), the
 * dark scheme, a 390 px wide phone, an unknown session in the URL, then the server killed: the
 * "disconnected" indicator, and a failed send that keeps its text.
 */
async function builtinStates() {
  const [serverPid] = rest;
  const { context, page, close } = await launch();
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: target });
  const seen = watch(page);
  const report = {};

  await page.goto(`${target}/`);
  await page.locator('#new-session').click();
  await page.waitForURL(/#\/session\//);
  const sessionId = new URL(page.url()).hash.replace('#/session/', '');
  report.sessionId = sessionId;
  await page.locator('#prompt').fill(MARKDOWN);
  await page.keyboard.press('Enter');
  await page.locator('.msg.assistant .bubble table').waitFor();
  await page.locator('#chat-status[data-state="idle"]').waitFor();
  // Give the image time to fail to load: an onerror that survived would run then.
  await page.waitForFunction(() => [...document.querySelectorAll('.msg.assistant img')].every((i) => i.complete));
  report.markdown = await page.evaluate(() => {
    const bubble = [...document.querySelectorAll('.msg.assistant .bubble')].pop();
    const texts = (selector) => [...bubble.querySelectorAll(selector)].map((n) => n.textContent.trim());
    return {
      headings: [...bubble.querySelectorAll('h1, h2, h3')].map((h) => [h.tagName, h.textContent]),
      items: texts('ul > li'),
      steps: texts('ol > li'),
      cells: texts('table th, table td'),
      tableScrolls: bubble.querySelectorAll('.table-scroll > table').length,
      links: [...bubble.querySelectorAll('a')].map((a) => ({
        text: a.textContent, href: a.getAttribute('href'), target: a.getAttribute('target'), rel: a.getAttribute('rel'),
      })),
      code: [...bubble.querySelectorAll('.code-block')].map((b) => ({
        text: b.querySelector('pre').textContent, copy: Boolean(b.querySelector('button.copy')),
      })),
      images: [...bubble.querySelectorAll('img')].map((i) => ({ src: i.getAttribute('src'), onerror: i.getAttribute('onerror') })),
      scripts: bubble.querySelectorAll('script').length,
      pwned: window.__pwned === true,
    };
  });
  await page.locator('.msg.assistant .code-block button.copy').first().click();
  await page.locator('.msg.assistant .code-block button.copy', { hasText: 'Copied' }).first().waitFor();
  report.markdown.clipboard = await page.evaluate(() => navigator.clipboard.readText());
  await shot(page, 'builtin-markdown');

  await page.emulateMedia({ colorScheme: 'dark' });
  report.dark = await colours(page);
  await shot(page, 'builtin-dark');
  await page.emulateMedia({ colorScheme: 'light' });
  report.light = await colours(page);

  await page.setViewportSize({ width: 390, height: 844 });
  report.narrow = await layout(page);
  await shot(page, 'builtin-narrow');
  await page.locator('#menu').click();
  report.narrowMenu = await layout(page);
  await shot(page, 'builtin-narrow-menu');
  await page.locator('#tab-workers').click();
  await page.locator('#server-cards .card').first().waitFor();
  report.narrowWorkers = await layout(page);
  await page.setViewportSize({ width: 1400, height: 900 });
  report.apiErrorsBefore = [...seen.apiErrors];

  // An unknown session in the URL, loaded fresh.
  await page.goto('about:blank');
  await page.goto(`${target}/#/session/${UNKNOWN_SESSION}`);
  await page.locator('#view-missing:not([hidden])').waitFor();
  report.missing = {
    heading: await page.locator('#view-missing h1').textContent(),
    id: await page.locator('#missing-id').textContent(),
    chatHidden: await page.locator('#view-chat').isHidden(),
  };
  await shot(page, 'builtin-not-found');
  // Playwright reports responses on its own schedule: wait until the 404s have arrived.
  const started = Date.now();
  while (seen.apiErrors.length === report.apiErrorsBefore.length && Date.now() - started < LIMIT_MS) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  report.apiErrorsMissing = seen.apiErrors.slice(report.apiErrorsBefore.length);
  await page.close();

  // The server goes away. The page's clock is paused first, so no timer (the 30 s health
  // poll, a retry) can fire: only the end of the session's live stream can tell the page.
  const live = await context.newPage();
  const liveErrors = [];
  live.on('pageerror', (error) => liveErrors.push(String(error)));
  await live.clock.install();
  await live.goto(`${target}/#/session/${sessionId}`);
  await live.locator('.msg.assistant .bubble table').waitFor();
  await live.locator('#connection[data-state="connected"]').waitFor();
  // A little ahead of the page's now: pausing at a time the page clock has already passed
  // (it runs on while this script talks to the browser) is refused. Half a second holds no
  // timer of the page's (its health poll is 30 s apart).
  await live.clock.pauseAt(await live.evaluate(() => Date.now() + 500));
  process.kill(Number(serverPid), 'SIGKILL');
  await live.locator('#connection[data-state="disconnected"]').waitFor();
  report.disconnected = await live.locator('#connection').textContent();
  await shot(live, 'builtin-disconnected');

  // A send while the server is gone fails, and the text stays for another try.
  await live.locator('#prompt').fill(UNSENT);
  await live.keyboard.press('Enter');
  await live.locator('#toast.error:not([hidden])').waitFor();
  report.failedSend = {
    prompt: await live.locator('#prompt').inputValue(),
    toast: await live.locator('#toast').textContent(),
    sendShown: await live.locator('#send').isVisible(),
  };
  await shot(live, 'builtin-send-failed');
  report.pageErrors = [...seen.pageErrors, ...liveErrors];
  await close();
  return report;
}

async function replay() {
  const [name, ...texts] = rest;
  const { page, close } = await launch();
  const requests = [];
  // A share link (`/s/<token>`) is served by the server; a downloaded page is a file.
  const url = /^https?:/.test(target) ? target : pathToFileURL(target).href + '?replay=1';
  page.on('request', (request) => {
    if (request.url().startsWith('http') && request.url() !== url) requests.push(request.url());
  });
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error)));
  await page.goto(url);
  for (const text of texts) await page.getByText(text).first().waitFor();
  await shot(page, name);
  const report = { found: texts, requests, pageErrors: errors };
  await close();
  return report;
}

/** The longest `t0 t1 ... tN` (the echo model's `SLOW` answer) the page shows, and how many
 * times the page shows one. */
async function slowAnswer(page) {
  return page.evaluate(() => {
    const found = document.body.innerText.match(/\bt0( t\d+)*/g) || [];
    return {
      text: found.reduce((a, b) => (b.length > a.length ? b : a), ''),
      occurrences: found.length,
    };
  });
}

/** Polls the server until it answers (again). */
async function waitForServer(base) {
  const deadline = Date.now() + LIMIT_MS;
  while (Date.now() < deadline) {
    try {
      const response = await fetch(`${base}/api/v1/sessions`);
      if (response.ok) return;
    } catch { /* not listening yet */ }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`${base} did not come back`);
}

/** The official UI streams an answer; the server is killed (SIGKILL) in the middle and a new
 * one takes over on the same port (the Rust test starts it); then the page is reloaded. */
async function interrupted() {
  const [pid] = rest;
  const { page, close } = await launch();
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error)));
  await page.goto(`${target}/`);
  await page.locator('textarea').first().fill('SLOW 200');
  await page.keyboard.press('Control+Enter');
  await page.waitForURL(/\/[A-Za-z0-9_-]{21}$/);
  const sessionId = new URL(page.url()).pathname.slice(1);
  await page.getByText(/t0 t1 t2 t3 t4 t5 t6 t7 t8 t9 t10 t11 t12/).first().waitFor();
  const before = await slowAnswer(page);
  process.kill(Number(pid), 'SIGKILL');
  await waitForServer(target);
  // Losing its server, the UI leaves the session for its home page; the user comes back to the
  // session's address (a reload of the session page).
  const urlAfterCrash = page.url();
  // Its failed requests while the server was down are not what this checks.
  errors.length = 0;
  await page.goto(`${target}/${sessionId}`);
  await page.getByText('The server stopped during the run').first().waitFor();
  await page.getByText(/t0 t1 t2/).first().waitFor();
  await page.waitForFunction((stop) => !document.querySelector(stop), OFFICIAL_STOP);
  await shot(page, 'official-interrupted');
  const report = {
    sessionId,
    before,
    after: await slowAnswer(page),
    notes: await page.getByText('The server stopped during the run').count(),
    urlAfterCrash,
    pageErrors: errors,
  };
  await close();
  return report;
}

/** Opens a workspace file served by the server, as a user following a link would, and
 * reports what the page could do: the requests it made, whether it was downloaded instead of
 * shown, its title and text. */
async function workspace() {
  const [name] = rest;
  const { page, close } = await launch();
  const requests = [];
  page.on('request', (request) => requests.push(new URL(request.url()).pathname));
  const downloads = [];
  page.on('download', (download) => downloads.push(download.suggestedFilename()));
  const errors = [];
  page.on('pageerror', (error) => errors.push(String(error)));
  let shown = true;
  let failure = null;
  try {
    // Network idle: a script that fetches (and reports what it read) has had its chance.
    await page.goto(target, { waitUntil: 'networkidle' });
  } catch (error) {
    shown = false;
    failure = String(error).split('\n')[0];
  }
  // A download starts asynchronously; give its event a moment to arrive.
  if (!shown) await page.waitForTimeout(500);
  let title = '';
  let text = '';
  if (shown) {
    title = await page.title();
    text = await page.evaluate(() => (document.body ? document.body.innerText : ''));
    await shot(page, name);
  }
  const report = { shown, failure, downloads, requests, title, text, pageErrors: errors };
  await close();
  return report;
}

/**
 * A page served from another loopback port (another local app, or a page the operator
 * visits) trying to read and drive the server: every attempt must fail, and the report says
 * how each one did.
 */
async function crossOrigin() {
  const http = await import('node:http');
  const hostile = http.createServer((request, response) => {
    response.writeHead(200, { 'content-type': 'text/html' });
    response.end('<!doctype html><title>elsewhere</title><p>hi</p>');
  });
  await new Promise((resolve) => hostile.listen(0, '127.0.0.1', resolve));
  const origin = `http://127.0.0.1:${hostile.address().port}`;
  const { page, close } = await launch();
  await page.goto(`${origin}/`);
  const report = await page.evaluate(async (base) => {
    const attempt = async (f) => {
      try {
        const response = await f();
        return { status: response.status, type: response.type, body: await response.text() };
      } catch (error) {
        return { error: String(error) };
      }
    };
    return {
      origin: location.origin,
      list: await attempt(() => fetch(`${base}/api/v1/sessions`)),
      createJson: await attempt(() => fetch(`${base}/api/v1/sessions/create`, {
        method: 'POST', headers: { 'content-type': 'application/json' }, body: '{}',
      })),
      // A "simple" request: no preflight, sent whatever the answer; the server must refuse it.
      createText: await attempt(() => fetch(`${base}/api/v1/sessions/create`, {
        method: 'POST', mode: 'no-cors', headers: { 'content-type': 'text/plain' }, body: '{}',
      })),
      oneshotText: await attempt(() => fetch(`${base}/api/v1/oneshot/query`, {
        method: 'POST', mode: 'no-cors', headers: { 'content-type': 'text/plain' },
        body: '{"query":"from another page"}',
      })),
    };
  }, target);
  await close();
  hostile.close();
  return report;
}

const scenarios = {
  'cross-origin': crossOrigin,
  official,
  builtin,
  'builtin-states': builtinStates,
  replay,
  workspace,
  interrupted,
};
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
