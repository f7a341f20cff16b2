// End-to-end test of the officer console in headless Chromium, against the
// real `niix` binary: a partner cannot sign in; an officer signs in, sees a
// pushed dual-energy scan appear live in the queue, opens it with the
// keyboard, zooms, switches material colouring and the heat map on,
// dismisses one region and confirms another, and `niix findings --json`
// (gRPC) then holds exactly those verdicts under the officer's identity.
// The server is administration NL, sharing its scans with a second niix (DE)
// under an agreement (planes downsampled to 512 px, plate, containers and
// declarations withheld): DE's officer finds them in DE's console marked
// with their origin, shown as signed, without the withheld fields. A third
// server with 2-second sessions shows an expired session refused.
// Screenshots of the queue, the viewer and the partner view go to
// $SCREENSHOTS (docs/images for the README) or the test's temporary directory.
//
// Run with `make console-test` (builds niix, installs Chromium and
// playwright-core). NIIX_BIN overrides the binary.
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, mkdirSync, writeFileSync, readdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import net from 'node:net';
import assert from 'node:assert/strict';

const repo = resolve(import.meta.dirname, '..');
const bin = process.env.NIIX_BIN || join(repo, 'target/debug/niix');
const ort = process.env.ORT_DYLIB_PATH || join(repo, '.niix/onnxruntime/libonnxruntime.so.1.31.1');

function freePort() {
  return new Promise((ok) => { const s = net.createServer(); s.listen(0, '127.0.0.1', () => { const p = s.address().port; s.close(() => ok(p)); }); });
}
const sha = (t) => createHash('sha256').update(t).digest('hex');
const niix = (args) => execFileSync(bin, args, { env: { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort }, encoding: 'utf8' });

const tmp = mkdtempSync(join(tmpdir(), 'niix-console-'));
// SCREENSHOTS=docs/images refreshes the README's screenshots.
const images = process.env.SCREENSHOTS ? resolve(process.env.SCREENSHOTS) : tmp;
const [grpc, web] = [await freePort(), await freePort()];
const tokens = { officer: 'e2e-officer-token', partner: 'e2e-partner-token', scanner: 'e2e-scanner-token' };
const env = { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort };
const serve = (config, ports) => spawn(bin, ['serve', '--config', config, '--listen', `127.0.0.1:${ports[0]}`, '--metrics-listen', '127.0.0.1:0',
  '--web-listen', `127.0.0.1:${ports[1]}`, '--data', join(config, '..', 'data'), '--models', join(repo, 'fixtures/models')],
  { cwd: repo, env, stdio: ['ignore', 'inherit', 'inherit'] });
const up = async (url) => {
  for (let i = 0; ; i++) {
    try { await fetch(url); return; } catch (e) { if (i > 300) throw new Error(`niix serve at ${url} did not come up`); await new Promise((r) => setTimeout(r, 100)); }
  }
};
const servers = [];

// DE, the partner administration: receives NL's packages (NL's key), its
// officer works in DE's console.
const deDir = join(tmp, 'de');
mkdirSync(deDir);
const [deGrpc, deWeb] = [await freePort(), await freePort()];
const nlKeys = join(tmp, 'nl-keys');
niix(['keys', 'init', '--dir', nlKeys]);
const nlPublic = niix(['keys', 'show', '--dir', nlKeys]).trim();
const deTokens = { officer: 'e2e-de-officer-token', nl: 'e2e-nl-at-de-token' };
writeFileSync(join(tmp, 'nl-at-de.token'), deTokens.nl + '\n');
writeFileSync(join(deDir, 'niix.toml'), `
[analysis]
enabled = false

[[auth.tokens]]
identity = "de-officer-e2e"
role = "officer"
sha256 = "${sha(deTokens.officer)}"

[[auth.tokens]]
identity = "NL"
role = "partner"
sha256 = "${sha(deTokens.nl)}"

[exchange]
administration = "DE"

[[exchange.issuers]]
administration = "NL"
public_key = "${nlPublic}"
`);
servers.push(serve(join(deDir, 'niix.toml'), [deGrpc, deWeb]));
const deUrl = `http://127.0.0.1:${deWeb}/`;
await up(deUrl);

writeFileSync(join(tmp, 'niix.toml'), `
[exchange]
administration = "NL"
signing_key = "${join(nlKeys, 'niix-ed25519.key')}"

[[exchange.agreements]]
name = "NL-DE-E2E"
partner = "DE"
content = "findings_planes"
plane_width = 512
redact = ["vehicle_plate", "container_numbers", "declarations"]

[exchange.agreements.push]
endpoint = "http://127.0.0.1:${deGrpc}"
token_file = "${join(tmp, 'nl-at-de.token')}"

[[auth.tokens]]
identity = "officer-e2e"
role = "officer"
sha256 = "${sha(tokens.officer)}"

[[auth.tokens]]
identity = "DE"
role = "partner"
sha256 = "${sha(tokens.partner)}"

[[auth.tokens]]
identity = "scanner-e2e"
role = "scanner"
sha256 = "${sha(tokens.scanner)}"
`);
servers.push(serve(join(tmp, 'niix.toml'), [grpc, web]));
const url = `http://127.0.0.1:${web}/`;
let browser;
try {
  await up(url);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--no-first-run'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on('pageerror', (e) => { throw e; });
  await page.goto(url);

  // A partner administration cannot open the console.
  await page.fill('#token', tokens.partner);
  await page.click('#login-form button');
  await page.waitForFunction(() => document.getElementById('login-error').textContent.includes('may not sign in'));
  assert.equal(await page.isVisible('#console'), false);

  // The officer signs in; the queue is empty.
  await page.fill('#token', tokens.officer);
  await page.click('#login-form button');
  await page.waitForSelector('#console:not([hidden])');
  assert.match(await page.textContent('#who'), /officer-e2e/);

  // A scanner pushes two dual-energy scans; they appear without reload.
  const synth = join(tmp, 'synth');
  niix(['synth', '--out', synth, '--count', '2', '--seed', '1']);
  const highs = readdirSync(synth).filter((f) => f.endsWith('.high.tif')).sort().map((f) => join(synth, f));
  // With the metadata a scanner sends: site, container, plate, declaration.
  const info = (high) => JSON.parse(readFileSync(high.replace('.high.tif', '.json'), 'utf8'));
  const mrn = (i) => `26NL00000000E2E00${i}`;
  const push = (high, i) => {
    const m = info(high);
    const args = ['push', '--server', `http://127.0.0.1:${grpc}`, '--token', tokens.scanner, '--low-energy', high.replace('.high.tif', '.low.tif'),
      '--site', m.site_id, '--lane', 'L1', '--plate', m.vehicle_plate, '--mrn', mrn(i), '--pixel-spacing', String(m.pixel_spacing_mm), '--energy-kv', '6000'];
    if (m.container_number) args.push('--container', m.container_number);
    return niix([...args, high]).match(/scan (\S+) stored/)[1];
  };
  const other = push(highs[1], 1);
  const id = push(highs[0], 0);
  const { vehicle_plate: plate, container_number: container } = info(highs[0]);
  await page.waitForSelector(`tr[data-id="${id}"] td.decision:text("alarm")`, { timeout: 120000 });
  await page.waitForSelector(`tr[data-id="${other}"] td.decision:text-matches("alarm|clear|unknown")`, { timeout: 120000 });
  await page.screenshot({ path: join(images, 'console-queue.png') });

  // Queue filters, paging and keyboard navigation.
  const listed = () => page.$$eval('#scans tr', (trs) => trs.map((t) => t.dataset.id));
  const filter = async (fields) => {
    for (const [name, value] of Object.entries(fields)) {
      await page.$eval(`#filters [name="${name}"]`, (el, v) => {
        if (el.tagName === 'SELECT' && ![...el.options].some((o) => o.value === v)) el.add(new Option(v, v));
        el.value = v;
      }, value);
    }
    const answered = page.waitForResponse((r) => r.url().includes('/api/scans?'));
    await page.click('#filters button[type=submit]');
    await answered;
    await page.evaluate(() => document.activeElement.blur());
  };
  await filter({ page_size: '1' });
  assert.equal((await listed()).length, 1);
  assert.equal(await page.isVisible('#more'), true, 'a cursor to the next page');
  const more = page.waitForResponse((r) => r.url().includes('page_token='));
  await page.click('#more');
  await more;
  await page.waitForFunction(() => document.querySelectorAll('#scans tr').length === 2);
  assert.deepEqual(new Set(await listed()), new Set([id, other]));
  await filter({ page_size: '50' });
  const order = await listed();
  await page.keyboard.press('j');
  assert.equal(await page.getAttribute(`tr[data-id="${order[1]}"]`, 'class').then((c) => /sel/.test(c)), true, 'j moves down');
  await page.keyboard.press('k');
  assert.equal(await page.getAttribute(`tr[data-id="${order[0]}"]`, 'class').then((c) => /sel/.test(c)), true, 'k moves up');
  await filter({ decision: 'clear' });
  assert.equal((await listed()).includes(id), false, 'an alarm is not among the clear scans');
  await filter({ decision: 'alarm' });
  assert.equal((await listed()).includes(id), true);
  const tomorrow = new Date(Date.now() + 86400000).toISOString().slice(0, 16);
  await filter({ decision: '', from: tomorrow });
  assert.deepEqual(await listed(), [], 'nothing scanned after tomorrow');
  await filter({ from: '', plate: plate.toLowerCase() });
  assert.deepEqual(await listed(), [id], `the plate ${plate} finds its scan`);
  await filter({ plate: '', declaration: mrn(1) });
  assert.deepEqual(await listed(), [other], 'the MRN finds its scan');
  if (container) {
    await filter({ declaration: '', container });
    assert.deepEqual(await listed(), [id], `the container ${container} finds its scan`);
  }
  await filter({ declaration: '', container: '', plate });

  // Open it with the keyboard, zoom, material colouring and heat map.
  await page.keyboard.press('Enter');
  await page.waitForSelector('#viewer:not([hidden])');
  await page.waitForFunction(() => document.querySelectorAll('#regions li').length >= 2);
  await page.keyboard.press('+');
  await page.keyboard.press('+');
  assert.match(await page.textContent('#zoom'), /zoom/);
  await page.keyboard.press('-');
  await page.keyboard.press('-');
  await page.keyboard.press('m');
  assert.equal(await page.isChecked('#material'), true);
  await page.keyboard.press('h');
  assert.equal(await page.isChecked('#heat'), true);
  const tiles = await page.waitForResponse((r) => r.url().includes('/tiles/') && r.url().includes('material=1'));
  assert.equal(tiles.status(), 200);
  const drawn = () => page.waitForFunction(() => document.body.dataset.pending === '0', null, { timeout: 120000 });
  await drawn();

  // Dismiss region 1, confirm region 2, scan confirmed, submit.
  await page.keyboard.press('x');
  await page.keyboard.press('j');
  await page.keyboard.press('y');
  await page.keyboard.press('c');
  await page.keyboard.press('s');
  await page.waitForFunction(() => document.getElementById('operator').textContent.includes('by officer-e2e'));
  await drawn();
  await page.screenshot({ path: join(images, 'console-viewer.png') });

  // Through gRPC: exactly those verdicts, under the signed-in officer.
  const f = JSON.parse(niix(['findings', id, '--json', '--server', `http://127.0.0.1:${grpc}`, '--token', tokens.officer]));
  const reports = f.reports || f.findings?.reports || [];
  const op = reports.filter((r) => /OPERATOR/i.test(String(r.type ?? r.report_type))).pop();
  assert.ok(op, `an operator report in ${JSON.stringify(f).slice(0, 400)}`);
  assert.equal(op.operator_id, 'officer-e2e');
  assert.match(String(op.verdict), /CONFIRMED/i);
  const given = (op.regions || []).filter((r) => r.verdict && !/UNSPECIFIED/i.test(String(r.verdict)))
    .map((r) => [r.id, String(r.verdict).replace(/^VERDICT_/i, '').toLowerCase()]);
  assert.deepEqual(given, [[1, 'dismissed'], [2, 'confirmed']]);

  // Back in the queue the verdict filter finds it adjudicated.
  await page.keyboard.press('Escape');
  await page.waitForSelector('#queue:not([hidden])');
  await filter({ plate: '', verdict: 'confirmed' });
  assert.deepEqual(await listed(), [id]);
  assert.equal(await page.textContent(`tr[data-id="${id}"] td.verdict`), 'confirmed');
  await filter({ verdict: 'none' });
  assert.deepEqual(await listed(), [other]);

  // DE's officer, in DE's console: NL's scan, marked with its origin and
  // shown as signed (planes 4:1), without the fields the agreement withholds.
  const de = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  de.on('pageerror', (e) => { throw e; });
  await de.goto(deUrl);
  await de.fill('#token', deTokens.officer);
  await de.click('#login-form button');
  await de.waitForSelector('#console:not([hidden])');
  const deId = foreignScanId('NL', id);
  for (let i = 0; !(await de.$(`tr[data-id="${deId}"]`)); i++) {
    if (i > 600) throw new Error(`NL's scan ${id} did not reach DE as ${deId}`);
    await new Promise((r) => setTimeout(r, 200));
    if (i % 25 === 24) await de.click('#filters button[type=submit]');
  }
  const row = (cls) => de.textContent(`tr[data-id="${deId}"] td${cls}`);
  assert.equal(await row('.origin'), 'NL (partner)');
  assert.equal(await row('.decision'), 'alarm', "NL's machine decision, as signed");
  assert.equal(await row(':nth-child(3)'), '', 'no container or plate: withheld');
  await de.click(`tr[data-id="${deId}"]`);
  await de.waitForSelector('#viewer:not([hidden])');
  const banner = await de.textContent('#partner');
  for (const part of ['Received from NL', 'agreement NL-DE-E2E', 'package NL.DE.', 'planes downsampled 4:1',
    'Not in the package (withheld by the agreement or not recorded): vehicle plate, container numbers, declarations']) {
    assert.ok(banner.includes(part), `the partner banner says ${JSON.stringify(part)}: ${banner}`);
  }
  const meta = await de.textContent('#meta');
  for (const withheld of [plate, mrn(0), container].filter(Boolean)) assert.ok(!meta.includes(withheld), `${withheld} withheld: ${meta}`);
  assert.match(await de.textContent('#meta'), /origin NL/);
  assert.match(await de.textContent('#plane option'), /512x/, 'the plane as signed, 512 px wide');
  const deRegions = await de.$$eval('#regions li', (li) => li.length);
  assert.ok(deRegions >= 2, "NL's regions");
  const deDrawn = () => de.waitForFunction(() => document.body.dataset.pending === '0', null, { timeout: 120000 });
  const tileOk = de.waitForResponse((r) => r.url().includes(`/api/scans/${deId}/tiles/`) && r.url().includes('material=1'));
  await de.keyboard.press('m');
  assert.equal((await tileOk).status(), 200, 'material colouring of the downsampled pair');
  await deDrawn();
  const lit = await de.$eval('#canvas', (c) => {
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 30) n++;
    return n / (d.length / 4);
  });
  assert.ok(lit > 0.05, `the downsampled scan is drawn (${(lit * 100).toFixed(1)} % of the stage lit)`);
  await de.screenshot({ path: join(images, 'console-partner.png') });
  await de.close();

  // A session past its lifetime is refused: the console asks to sign in again.
  const shortDir = join(tmp, 'short');
  mkdirSync(shortDir);
  const [shortGrpc, shortWeb] = [await freePort(), await freePort()];
  writeFileSync(join(shortDir, 'niix.toml'), `[analysis]\nenabled = false\n\n[web]\nsession_ttl = "2s"\n\n`
    + `[[auth.tokens]]\nidentity = "officer-e2e"\nrole = "officer"\nsha256 = "${sha(tokens.officer)}"\n`);
  servers.push(serve(join(shortDir, 'niix.toml'), [shortGrpc, shortWeb]));
  await up(`http://127.0.0.1:${shortWeb}/`);
  const brief = await browser.newPage();
  brief.on('pageerror', (e) => { throw e; });
  await brief.goto(`http://127.0.0.1:${shortWeb}/`);
  await brief.fill('#token', tokens.officer);
  await brief.click('#login-form button');
  await brief.waitForSelector('#console:not([hidden])');
  const [cookie] = await brief.context().cookies(`http://127.0.0.1:${shortWeb}/`);
  assert.equal(cookie.name, 'niix_session');
  await new Promise((r) => setTimeout(r, 2500));
  // The browser dropped the cookie at its Max-Age; the console asks to sign in.
  await brief.click('#filters button[type=submit]');
  await brief.waitForSelector('#login:not([hidden])');
  assert.match(await brief.textContent('#login-error'), /not signed in/);
  assert.equal(await brief.isVisible('#console'), false);
  // The server refuses the session itself, were the cookie kept or replayed.
  const replay = await fetch(`http://127.0.0.1:${shortWeb}/api/scans`, { headers: { cookie: `${cookie.name}=${cookie.value}` } });
  assert.equal(replay.status, 401);
  assert.match((await replay.json()).error, /session has expired/);
  await brief.close();
  console.log(`console e2e: OK (scan ${id}, at DE ${deId}; screenshots in ${images})`);
} finally {
  if (browser) await browser.close();
  for (const s of servers) s.kill('SIGTERM');
}

// The id under which DE keeps scan `scanId` of `issuer`
// (server/src/exchange/receive.rs, foreign_scan_id): a version-8 UUID from a SHA-256.
function foreignScanId(issuer, scanId) {
  const d = createHash('sha256').update('niix foreign scan\0').update(issuer).update('\0').update(scanId.toLowerCase()).digest().subarray(0, 16);
  d[6] = (d[6] & 0x0f) | 0x80;
  d[8] = (d[8] & 0x3f) | 0x80;
  const h = d.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
