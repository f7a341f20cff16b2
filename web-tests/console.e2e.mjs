// End-to-end test of the officer console in headless Chromium, against the
// real `niix` binary: a partner cannot sign in; an officer signs in, sees a
// pushed dual-energy scan appear live in the queue, opens it with the
// keyboard, zooms, switches material colouring and the heat map on,
// dismisses one region and confirms another, and `niix findings --json`
// (gRPC) then holds exactly those verdicts under the officer's identity.
// Screenshots of the queue and the viewer go to $SCREENSHOTS (docs/images
// for the README) or the test's temporary directory.
//
// Run with `make console-test` (builds niix, installs Chromium and
// playwright-core). NIIX_BIN overrides the binary.
import { chromium } from 'playwright-core';
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, writeFileSync, readdirSync, readFileSync } from 'node:fs';
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
const niix = (args, env = {}) => execFileSync(bin, args, { env: { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort, ...env }, encoding: 'utf8' });

const tmp = mkdtempSync(join(tmpdir(), 'niix-console-'));
// SCREENSHOTS=docs/images refreshes the README's screenshots.
const images = process.env.SCREENSHOTS ? resolve(process.env.SCREENSHOTS) : tmp;
const [grpc, web] = [await freePort(), await freePort()];
const tokens = { officer: 'e2e-officer-token', partner: 'e2e-partner-token', scanner: 'e2e-scanner-token' };
writeFileSync(join(tmp, 'niix.toml'), `
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
const server = spawn(bin, ['serve', '--config', join(tmp, 'niix.toml'), '--listen', `127.0.0.1:${grpc}`, '--metrics-listen', '127.0.0.1:0',
  '--web-listen', `127.0.0.1:${web}`, '--data', join(tmp, 'data'), '--models', join(repo, 'fixtures/models')],
  { cwd: repo, env: { ...process.env, NIIX_LOG: 'warn', ORT_DYLIB_PATH: ort }, stdio: ['ignore', 'inherit', 'inherit'] });
const url = `http://127.0.0.1:${web}/`;
let browser;
try {
  for (let i = 0; ; i++) {
    try { await fetch(url); break; } catch (e) { if (i > 200) throw new Error('niix serve did not come up'); await new Promise((r) => setTimeout(r, 100)); }
  }
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
  console.log(`console e2e: OK (scan ${id}; screenshots in ${images})`);
} finally {
  if (browser) await browser.close();
  server.kill('SIGTERM');
}
