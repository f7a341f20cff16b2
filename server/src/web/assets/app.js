// niix officer console (no dependencies). See docs/officers.md.
'use strict';
const $ = (id) => document.getElementById(id);
let csrf = null;
async function api(method, path, body) {
  const headers = {};
  if (method !== 'GET') headers['x-niix-csrf'] = csrf || '';
  if (body !== undefined) headers['content-type'] = 'application/json';
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), credentials: 'same-origin' });
  const j = await r.json().catch(() => ({}));
  if (r.status === 401) showLogin(j.error);
  if (!r.ok) throw new Error(j.error || r.statusText);
  return j;
}
function showLogin(msg) {
  $('console').hidden = true; $('login').hidden = false; $('logout').hidden = true; $('who').textContent = '';
  $('login-error').textContent = msg || '';
  fetch('/api/certificate').then((r) => r.json()).then((c) => { $('cert-login').hidden = !c.presented; }).catch(() => {});
}
function signedIn(s) {
  csrf = s.csrf; $('who').textContent = `— ${s.identity} (${s.role})`; $('logout').hidden = false;
  $('login').hidden = true; $('console').hidden = false; loadQueue(true); listen();
}
$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  try { signedIn(await api('POST', '/api/login', { token: $('token').value })); $('token').value = ''; }
  catch (err) { $('login-error').textContent = err.message; }
});
// Over mutual TLS the browser may have presented an officer's certificate.
$('cert-button').addEventListener('click', async () => {
  try { signedIn(await api('POST', '/api/login', { certificate: true })); }
  catch (err) { $('login-error').textContent = err.message; }
});
$('logout').addEventListener('click', async () => { await api('POST', '/api/logout').catch(() => {}); showLogin('signed out'); });

// Queue
let rows = [], sel = 0, next = '';
function filters() {
  const f = new FormData($('filters')); const q = new URLSearchParams();
  for (const [k, v] of f) if (v) q.set(k, (k === 'from' || k === 'to') ? new Date(v).toISOString().replace(/\.\d+Z$/, 'Z') : v);
  return q;
}
async function loadQueue(reset) {
  const q = filters(); if (!reset && next) q.set('page_token', next);
  const page = await api('GET', '/api/scans?' + q);
  // A live reload keeps the selected scan selected.
  const keep = reset && rows[sel] ? rows[sel].scan_id : null;
  if (reset) { rows = []; sel = 0; }
  rows = rows.concat(page.scans); next = page.next_page_token; $('more').hidden = !next;
  if (keep) sel = Math.max(0, rows.findIndex((r) => r.scan_id === keep));
  drawQueue();
}
function drawQueue() {
  const tb = $('scans'); tb.textContent = '';
  rows.forEach((s, i) => {
    const tr = document.createElement('tr'); tr.dataset.id = s.scan_id;
    if (i === sel) tr.className = 'sel';
    if (s.decision === 'alarm') tr.classList.add('alarm');
    const when = new Date((s.received_at || 0) * 1000).toISOString().replace('T', ' ').slice(0, 19);
    const ids = [...s.container_numbers, s.vehicle_plate].filter(Boolean).join(' ');
    for (const [cls, v] of [['', when], ['', s.site_id], ['', ids], s.origin ? ['origin foreign', `${s.origin} (partner)`] : ['origin', 'own'], ['', s.status], ['decision', s.decision || ''], ['', s.decision ? s.score.toFixed(2) : ''], ['verdict', s.verdict || '']]) {
      const td = document.createElement('td'); td.textContent = v; if (cls) td.className = cls; tr.appendChild(td);
    }
    tr.addEventListener('click', () => { sel = i; openScan(s.scan_id); });
    tb.appendChild(tr);
  });
}
$('filters').addEventListener('submit', (e) => { e.preventDefault(); loadQueue(true).catch(alert); });
$('more').addEventListener('click', () => loadQueue(false));
let source = null;
function listen() {
  if (source) source.close();
  source = new EventSource('/api/events');
  source.onmessage = () => { if (!$('queue').hidden) loadQueue(true); };
  source.onopen = () => { if (!$('queue').hidden) loadQueue(true); };
}

// Viewer: a canvas drawing the tile pyramid of the chosen plane.
const T = 256;
let heat = null, overlayImg = null;
let scan = null, view = { scale: 1, x: 0, y: 0 }, tileImgs = new Map(), verdicts = {}, scanVerdict = null, regionSel = 0;
async function openScan(id) {
  scan = await api('GET', '/api/scans/' + encodeURIComponent(id));
  $('queue').hidden = true; $('viewer').hidden = false;
  verdicts = {}; scanVerdict = null; regionSel = 0; tileImgs.clear(); heat = null;
  $('scan-title').textContent = id;
  const s = scan.scan;
  const when = (t) => t ? new Date(t * 1000).toISOString().replace('T', ' ').slice(0, 19) + ' UTC' : '';
  $('meta').textContent = [`site ${s.site_id} ${s.lane_id}`, [...s.container_numbers, s.vehicle_plate].filter(Boolean).join(' '),
    s.declarations.join(' '), `scanned ${when(s.scan_time)}`, `origin ${s.origin || 'own'}`, scan.scanner || '', scan.remarks || '']
    .filter((x) => x && x.trim()).join(' · ');
  const pa = scan.partner;
  $('partner').hidden = !pa;
  if (pa) {
    const image = { full_planes: 'the full planes', downsampled: `planes downsampled ${pa.downsampled}:1`, overlay: 'the overlay image only',
      full_planes_pending: 'full planes (not received yet)', none: 'findings only, no image' }[pa.image] || pa.image;
    // What the signed package leaves empty: withheld by the agreement (or never recorded).
    const absent = [['vehicle plate', s.vehicle_plate], ['container numbers', s.container_numbers.length], ['declarations', s.declarations.length],
      ['scanner', scan.scanner], ['remarks', scan.remarks]].filter(([, v]) => !v).map(([k]) => k);
    $('partner').textContent = `Received from ${pa.origin}${pa.first_origin ? ` (scanned by ${pa.first_origin})` : ''} under agreement ${pa.agreement}, `
      + `package ${pa.package_id} signed ${when(pa.issued_at)}: shown as signed, ${image}.`
      + (absent.length ? ` Not in the package (withheld by the agreement or not recorded): ${absent.join(', ')}.` : '');
  }
  overlayImg = null;
  $('plane').textContent = '';
  scan.planes.forEach((p) => { const o = document.createElement('option'); o.value = p.index; o.textContent = `${p.index}: ${p.kind} ${p.width}x${p.height}`; $('plane').appendChild(o); });
  $('material').disabled = !scan.dual_energy;
  $('calibration').textContent = scan.material_calibration ? `calibration: ${scan.material_calibration}` : '';
  const m = scan.machine;
  $('machine').textContent = m ? `${m.decision} score ${m.score.toFixed(3)} ${m.algorithm || ''}` : 'not analysed yet';
  drawRegions(); drawOperator(scan.operator);
  $('tdr-machine').href = `/api/scans/${encodeURIComponent(id)}/tdr?report=machine`;
  $('tdr-operator').href = `/api/scans/${encodeURIComponent(id)}/tdr?report=operator`;
  fit(); draw();
}
function plane() { return scan.planes[Number($('plane').value) || 0]; }
function fit() {
  const st = $('stage'), p = plane();
  if (!p) return;
  view.scale = Math.min(st.clientWidth / p.width, st.clientHeight / p.height);
  // Centred in the stage.
  view.x = -(st.clientWidth / view.scale - p.width) / 2; view.y = -(st.clientHeight / view.scale - p.height) / 2;
}
// A foreign scan held without planes: the partner's signed overlay, or a note.
function drawWithoutPlanes(g, c) {
  if (scan.partner && scan.partner.image === 'overlay') {
    if (!overlayImg) { overlayImg = new Image(); overlayImg.onload = redraw; overlayImg.src = `/api/scans/${encodeURIComponent(scan.scan.scan_id)}/overlay.png`; }
    if (overlayImg.complete && overlayImg.naturalWidth) {
      const k = Math.min(c.width / overlayImg.naturalWidth, c.height / overlayImg.naturalHeight);
      g.drawImage(overlayImg, 0, 0, overlayImg.naturalWidth * k, overlayImg.naturalHeight * k);
    }
    document.body.dataset.pending = overlayImg.complete ? 0 : 1;
  } else {
    g.fillStyle = '#ccc'; g.font = '16px sans-serif';
    g.fillText('No image: the sharing agreement gives findings only.', 20, 40);
    document.body.dataset.pending = 0;
  }
  $('zoom').textContent = '';
}
function tileQuery() {
  const q = new URLSearchParams();
  if ($('wl').value && $('wh').value) { q.set('wl', $('wl').value); q.set('wh', $('wh').value); }
  if ($('gamma').value && $('gamma').value !== '1') q.set('gamma', $('gamma').value);
  if ($('invert').checked) q.set('invert', '1');
  if ($('material').checked) q.set('material', '1');
  if ($('edge').checked) q.set('edge', '1');
  return q.toString();
}
// Images arriving together are drawn together: one redraw per 30 ms, not
// one per image (each redraw paints every visible tile again).
let drawSoon = null;
function redraw() { if (!drawSoon) drawSoon = setTimeout(() => { drawSoon = null; draw(); }, 30); }
function draw() {
  if (!scan) return;
  const st = $('stage'), c = $('canvas'), p = plane();
  c.width = st.clientWidth; c.height = st.clientHeight;
  const g = c.getContext('2d'); g.fillStyle = '#000'; g.fillRect(0, 0, c.width, c.height);
  if (!p) { drawWithoutPlanes(g, c); return; }
  // Regions and the heat map are in pixels of the plane as scanned; a
  // partner's downsampled share is f times smaller.
  const f = p.downsampled || 1;
  const top = p.levels - 1;
  const level = Math.max(0, Math.min(top, Math.floor(Math.log2(1 / view.scale))));
  const span = T * (1 << level), q = tileQuery();
  let pending = 0;
  const x0 = Math.max(0, Math.floor(view.x / span)), y0 = Math.max(0, Math.floor(view.y / span));
  const x1 = Math.min(Math.ceil(p.width / span), Math.ceil((view.x + c.width / view.scale) / span));
  const y1 = Math.min(Math.ceil(p.height / span), Math.ceil((view.y + c.height / view.scale) / span));
  for (let ty = y0; ty < y1; ty++) for (let tx = x0; tx < x1; tx++) {
    const url = `/api/scans/${encodeURIComponent(scan.scan.scan_id)}/tiles/${p.index}/${level}/${tx}/${ty}.png?${q}`;
    let img = tileImgs.get(url);
    if (!img) { img = new Image(); img.onload = redraw; img.onerror = redraw; img.src = url; tileImgs.set(url, img); }
    if (!img.complete) pending++;
    if (img.complete && img.naturalWidth) {
      g.drawImage(img, (tx * span - view.x) * view.scale, (ty * span - view.y) * view.scale, img.naturalWidth * (1 << level) * view.scale, img.naturalHeight * (1 << level) * view.scale);
    }
  }
  const m = scan.machine;
  if ($('heat').checked && m && m.heatmap_stride && m.plane_index === p.index) {
    if (!heat) { heat = new Image(); heat.onload = redraw; heat.src = `/api/scans/${encodeURIComponent(scan.scan.scan_id)}/heatmap.png`; }
    if (!heat.complete) pending++;
    if (heat.complete && heat.naturalWidth) {
      g.globalAlpha = Number($('opacity').value) / 100;
      g.imageSmoothingEnabled = true;
      const s = m.heatmap_stride / f;
      g.drawImage(heat, -view.x * view.scale, -view.y * view.scale, heat.naturalWidth * s * view.scale, heat.naturalHeight * s * view.scale);
      g.globalAlpha = 1;
    }
  }
  if ($('boxes').checked && scan.machine) {
    scan.machine.regions.forEach((r, i) => {
      const v = verdicts[r.id];
      g.strokeStyle = v === 'dismissed' ? '#888' : v === 'confirmed' ? '#f33' : i === regionSel ? '#ff0' : '#f90';
      g.lineWidth = 2;
      g.strokeRect((r.x / f - view.x) * view.scale, (r.y / f - view.y) * view.scale, r.width / f * view.scale, r.height / f * view.scale);
      g.fillStyle = g.strokeStyle; g.font = '12px sans-serif';
      g.fillText(`#${r.id} ${r.max_score.toFixed(2)} ${r.category}`, (r.x / f - view.x) * view.scale, (r.y / f - view.y) * view.scale - 3);
    });
  }
  // Images still loading (the end-to-end test waits for 0).
  document.body.dataset.pending = pending;
  ruler(g, p, c);
  $('zoom').textContent = `zoom ${(view.scale * 100).toFixed(0)}% level ${level}`;
}
// A scale bar in millimetres from the plane's pixel spacing (when known).
function ruler(g, p, c) {
  const mmPerPx = p.pixel_spacing_mm[0];
  if (!mmPerPx) return;
  const target = 150 / view.scale * mmPerPx; // mm across about 150 screen pixels
  const step = [1, 2, 5].flatMap((m) => [1, 10, 100, 1000, 10000].map((e) => m * e)).filter((v) => v <= target).pop() || 1;
  const len = step / mmPerPx * view.scale;
  const x = c.width - len - 20, y = c.height - 20;
  g.fillStyle = '#fff'; g.fillRect(x, y, len, 3); g.fillRect(x, y - 6, 2, 9); g.fillRect(x + len - 2, y - 6, 2, 9);
  g.font = '12px sans-serif'; g.fillText(step >= 1000 ? `${step / 1000} m` : `${step} mm`, x, y - 8);
}
function zoomAt(factor, cx, cy) {
  const px = view.x + cx / view.scale, py = view.y + cy / view.scale;
  view.scale = Math.min(8, Math.max(0.005, view.scale * factor));
  view.x = px - cx / view.scale; view.y = py - cy / view.scale; draw();
}
$('stage').addEventListener('wheel', (e) => { e.preventDefault(); const r = $('stage').getBoundingClientRect(); zoomAt(e.deltaY < 0 ? 1.25 : 0.8, e.clientX - r.left, e.clientY - r.top); }, { passive: false });
let drag = null;
$('canvas').addEventListener('mousedown', (e) => { drag = { x: e.clientX, y: e.clientY }; });
window.addEventListener('mouseup', () => { drag = null; });
window.addEventListener('mousemove', (e) => { if (!drag) return; view.x -= (e.clientX - drag.x) / view.scale; view.y -= (e.clientY - drag.y) / view.scale; drag = { x: e.clientX, y: e.clientY }; draw(); });
for (const id of ['wl', 'wh', 'gamma', 'invert', 'material', 'edge', 'boxes', 'heat', 'opacity']) $(id).addEventListener('change', draw);
$('plane').addEventListener('change', () => { fit(); draw(); });
window.addEventListener('resize', draw);
function drawRegions() {
  const ol = $('regions'); ol.textContent = '';
  (scan.machine ? scan.machine.regions : []).forEach((r, i) => {
    const li = document.createElement('li'); if (i === regionSel) li.className = 'sel';
    li.textContent = `#${r.id} ${r.category} score ${r.max_score.toFixed(2)} ${r.width_mm ? r.width_mm.toFixed(0) + 'x' + r.height_mm.toFixed(0) + ' mm' : ''} `;
    const v = document.createElement('span'); v.className = 'v'; v.textContent = verdicts[r.id] || ''; li.appendChild(v);
    for (const [label, verdict] of [['confirm', 'confirmed'], ['dismiss', 'dismissed']]) {
      const b = document.createElement('button'); b.textContent = label; b.dataset.region = r.id; b.dataset.rv = verdict;
      b.addEventListener('click', () => { verdicts[r.id] = verdict; drawRegions(); draw(); }); li.appendChild(b);
    }
    li.addEventListener('click', () => { regionSel = i; drawRegions(); draw(); });
    ol.appendChild(li);
  });
}
function drawOperator(o) {
  $('operator').textContent = o ? `${o.verdict} by ${o.operator_id}` + o.regions.filter((r) => r.verdict).map((r) => ` · #${r.id} ${r.verdict}`).join('') + (o.comment ? ` — ${o.comment}` : '') : 'none yet';
}
document.querySelectorAll('[data-verdict]').forEach((b) => b.addEventListener('click', () => { scanVerdict = b.dataset.verdict; document.querySelectorAll('[data-verdict]').forEach((x) => { x.style.outline = x === b ? '2px solid #ff0' : ''; }); }));
async function submit() {
  $('adjudicate-error').textContent = '';
  const regions = Object.entries(verdicts).map(([id, verdict]) => ({ id: Number(id), verdict }));
  const verdict = scanVerdict || (regions.some((r) => r.verdict === 'confirmed') ? 'confirmed' : 'dismissed');
  try {
    const o = await api('POST', `/api/scans/${encodeURIComponent(scan.scan.scan_id)}/adjudicate`, { verdict, comment: $('comment').value, regions });
    drawOperator(o);
  } catch (err) { $('adjudicate-error').textContent = err.message; }
}
$('submit').addEventListener('click', submit);
$('back').addEventListener('click', back);
function back() { $('viewer').hidden = true; $('queue').hidden = false; scan = null; loadQueue(true); }

document.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'INPUT' || e.target.tagName === 'TEXTAREA' || e.target.tagName === 'SELECT') return;
  if (!$('queue').hidden && rows.length) {
    if (e.key === 'j') { sel = Math.min(rows.length - 1, sel + 1); drawQueue(); }
    else if (e.key === 'k') { sel = Math.max(0, sel - 1); drawQueue(); }
    else if (e.key === 'Enter') openScan(rows[sel].scan_id);
    else if (e.key === '/') { e.preventDefault(); $('filters').querySelector('input').focus(); }
    return;
  }
  if (!scan) return;
  const regs = scan.machine ? scan.machine.regions : [];
  const r = regs[regionSel];
  switch (e.key) {
    case 'Escape': back(); break;
    case 'm': if (scan.dual_energy) { $('material').checked = !$('material').checked; draw(); } break;
    case 'e': $('edge').checked = !$('edge').checked; draw(); break;
    case 'i': $('invert').checked = !$('invert').checked; draw(); break;
    case 'b': $('boxes').checked = !$('boxes').checked; draw(); break;
    case 'h': $('heat').checked = !$('heat').checked; draw(); break;
    case '+': zoomAt(1.25, $('stage').clientWidth / 2, $('stage').clientHeight / 2); break;
    case '-': zoomAt(0.8, $('stage').clientWidth / 2, $('stage').clientHeight / 2); break;
    case 'j': regionSel = Math.min(regs.length - 1, regionSel + 1); drawRegions(); draw(); break;
    case 'k': regionSel = Math.max(0, regionSel - 1); drawRegions(); draw(); break;
    case 'y': if (r) { verdicts[r.id] = 'confirmed'; drawRegions(); draw(); } break;
    case 'x': if (r) { verdicts[r.id] = 'dismissed'; drawRegions(); draw(); } break;
    case 'c': scanVerdict = 'confirmed'; break;
    case 'd': scanVerdict = 'dismissed'; break;
    case 'n': scanVerdict = 'inconclusive'; break;
    case 's': submit(); break;
  }
});
api('GET', '/api/session').then(signedIn).catch(() => showLogin());
