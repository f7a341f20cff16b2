// Officer console numbers (issue #28), printed, never asserted: click in the
// queue to first full screen of a 2048x6144 dual-energy scan, tile latency
// p50/p99 when rendered and when cached (server LRU, browser cache bypassed),
// and the server's RSS growth for one officer's session. Drives headless
// Chromium against the real `niix` binary: `make console-bench` (release).
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, writeFileSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import net from 'node:net';

const repo = resolve(import.meta.dirname, '..');
const bin = process.env.NIIX_BIN || join(repo, 'target/release/niix');
const ort = process.env.ORT_DYLIB_PATH || join(repo, '.niix/onnxruntime/libonnxruntime.so.1.31.1');
const freePort = () => new Promise((ok) => { const s = net.createServer(); s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => ok(p)); }); });
const niix = (args) => execFileSync(bin, args, { env: { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort }, encoding: 'utf8' });
const rss = (pid) => Number(readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]) / 1024;
const pct = (xs, q) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor(q * s.length))]; };

const tmp = mkdtempSync(join(tmpdir(), 'niix-console-bench-'));
const token = 'bench-officer-token';
writeFileSync(join(tmp, 'niix.toml'), `[[auth.tokens]]\nidentity = "officer-bench"\nrole = "officer"\nsha256 = "${createHash('sha256').update(token).digest('hex')}"\n\n[[auth.tokens]]\nidentity = "scanner-bench"\nrole = "scanner"\nsha256 = "${createHash('sha256').update('bench-scanner').digest('hex')}"\n`);
const [grpc, web, metrics] = [await freePort(), await freePort(), await freePort()];
const server = spawn(bin, ['serve', '--config', join(tmp, 'niix.toml'), '--listen', `127.0.0.1:${grpc}`, '--metrics-listen', `127.0.0.1:${metrics}`,
  '--web-listen', `127.0.0.1:${web}`, '--data', join(tmp, 'data'), '--models', join(repo, 'fixtures/models')],
  { cwd: repo, env: { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort }, stdio: ['ignore', 'inherit', 'inherit'] });
const url = `http://127.0.0.1:${web}/`;
let browser;
try {
  for (let i = 0; ; i++) { try { await fetch(url); break; } catch { if (i > 300) throw new Error('niix serve did not come up'); await new Promise((r) => setTimeout(r, 100)); } }
  const synth = join(tmp, 'synth');
  niix(['synth', '--out', synth, '--count', '1', '--seed', '7']);
  const high = join(synth, readdirSync(synth).find((f) => f.endsWith('.high.tif')));
  const id = niix(['push', '--server', `http://127.0.0.1:${grpc}`, '--token', 'bench-scanner', '--low-energy', high.replace('.high.tif', '.low.tif'), high]).match(/scan (\S+) stored/)[1];
  niix(['findings', id, '--wait', '--server', `http://127.0.0.1:${grpc}`, '--token', token]);
  const before = rss(server.pid);
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(url);
  await page.fill('#token', token);
  await page.click('#login-form button');
  await page.waitForSelector(`tr[data-id="${id}"]`);
  const t0 = Date.now();
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => document.body.dataset.pending === '0' && !document.getElementById('viewer').hidden, null, { timeout: 300000 });
  const firstScreen = Date.now() - t0;
  // Zoom through the scan so that many tiles are rendered: in to level 1,
  // material colours, out to level 2, edges, then in to full resolution
  // (level 0) with both still on.
  for (const key of ['+', '+', '+', 'm', '-', 'e', '+', '+', '+', '+']) {
    await page.keyboard.press(key);
    await page.waitForFunction(() => document.body.dataset.pending === '0', null, { timeout: 300000 });
  }
  // duration: from the page asking for the tile to its last byte (includes
  // waiting for one of the browser's six connections); sent: from the
  // request going out to the last byte (the server's answer time).
  const tiles = await page.evaluate(() => performance.getEntriesByType('resource').filter((e) => e.name.includes('/tiles/'))
    .map((e) => [e.name, e.duration, e.responseEnd - e.requestStart, Object.fromEntries(e.serverTiming.map((t) => [t.name, t.duration]))]));
  const rendered = tiles.map(([, d]) => d);
  const sent = tiles.map(([, , r]) => r);
  const cached = await page.evaluate(async (urls) => {
    const out = [];
    for (const u of urls) { const t = performance.now(); await (await fetch(u, { cache: 'no-store' })).arrayBuffer(); out.push(performance.now() - t); }
    return out;
  }, tiles.map(([u]) => u));
  const after = rss(server.pid);
  const f = (x) => x.toFixed(1);
  console.log(`console_bench (binary ${bin})`);
  console.log(`  click to first screen, 2048x6144 dual-energy: ${firstScreen} ms   (target <= 300 ms)`);
  console.log(`  tiles rendered: ${rendered.length}, p50 ${f(pct(rendered, 0.5))} ms, p99 ${f(pct(rendered, 0.99))} ms   (target p99 <= 80 ms)`);
  const level = (u) => Number(u.match(/\/tiles\/\d+\/(\d+)\//)[1]);
  for (const [what, keep] of [['levels 1 and up', (l) => l > 0], ['level 0', (l) => l === 0]]) {
    const d = tiles.filter(([u]) => keep(level(u))).map(([, x]) => x);
    console.log(`    ${what}: ${d.length}, p50 ${f(pct(d, 0.5))} ms, p99 ${f(pct(d, 0.99))} ms`);
  }
  console.log(`    from the request going out: p50 ${f(pct(sent, 0.5))} ms, p99 ${f(pct(sent, 0.99))} ms (without the wait for a browser connection)`);
  const onServer = (name) => tiles.map(([, , , t]) => t[name]).filter((d) => d !== undefined);
  console.log(`    on the server (Server-Timing p50 / p99 ms): ${['total', 'scope', 'decoded', 'wait', 'render', 'cpu']
    .map((n) => `${n} ${f(pct(onServer(n), 0.5))} / ${f(pct(onServer(n), 0.99))}`).join(', ')}`);
  console.log(`  tiles cached:   ${cached.length}, p50 ${f(pct(cached, 0.5))} ms, p99 ${f(pct(cached, 0.99))} ms   (target p99 <= 20 ms)`);
  console.log(`  server RSS: ${f(before)} MB before the session, ${f(after)} MB after: +${f(after - before)} MB   (target < 50 MB)`);
  const m = await (await fetch(`http://127.0.0.1:${metrics}/metrics`)).text();
  const metric = (name) => Number((m.match(new RegExp(`^${name} (\\S+)`, 'm')) || [])[1]);
  console.log(`  decoded levels held: ${f(metric('niix_console_decoded_bytes') / 1048576)} MiB of ${metric('niix_console_decoded_planes_total')} planes`);
} finally {
  if (browser) await browser.close();
  server.kill('SIGTERM');
}
