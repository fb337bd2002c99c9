// The index: one page of rows at a time. Served: /api/latents does filter, search, sort and paging in
// SQL. Static: rows come in chunks (data/index_K.js, in the default order); a sort or filter loads all.
const COLS = ['latent','explanation','explainer','validation','simulation','ci_low','ci_high','ngram_simulation','frequency','max_act','spread'];
const state = {sort: 'spread', desc: false, offset: 0, limit: 50};
window.EXPLAINER_INDEX = window.EXPLAINER_INDEX || {};
function params(){ const p = {sort: state.sort, desc: state.desc ? '1' : '0', offset: String(state.offset), limit: String(state.limit)};
  for (const k of ['q','explainer','min_freq','max_freq','min_score']) { const v = document.getElementById(k).value.trim(); if (v) p[k] = v; }
  return p; }
async function chunk(k){ if (!(k in window.EXPLAINER_INDEX)) await loadScript('data/index_' + k + '.js');
  return window.EXPLAINER_INDEX[k].map(a => Object.fromEntries(COLS.map((c, i) => [c, a[i]]))); }
async function staticPage(p){
  const size = CONFIG.chunk, n = CONFIG.total;
  const plain = !p.q && !p.explainer && !p.min_freq && !p.max_freq && !p.min_score && p.sort === 'spread' && p.desc === '0';
  if (plain) { const rows = []; const off = Number(p.offset), lim = Number(p.limit);
    for (let k = Math.floor(off / size); k * size < Math.min(n, off + lim); k++) rows.push(...(await chunk(k)).map((r, i) => [k * size + i, r]));
    return {total: n, rows: rows.filter(([i]) => i >= off && i < off + lim).map(([, r]) => r)}; }
  let all = []; for (let k = 0; k * size < n; k++) all = all.concat(await chunk(k));
  const q = (p.q || '').toLowerCase();
  all = all.filter(r => (!q || String(r.explanation || '').toLowerCase().includes(q) || String(r.latent) === q)
    && (!p.explainer || r.explainer === p.explainer)
    && (!p.min_freq || r.frequency >= Number(p.min_freq)) && (!p.max_freq || r.frequency <= Number(p.max_freq))
    && (!p.min_score || (r.validation !== null && r.validation >= Number(p.min_score))));
  const key = p.sort, sign = p.desc === '1' ? -1 : 1;
  all.sort((a, b) => { const x = a[key], y = b[key]; if (x === y) return a.latent - b.latent;
    if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1; return (x < y ? -1 : 1) * sign; });
  return {total: all.length, rows: all.slice(Number(p.offset), Number(p.offset) + Number(p.limit))}; }
async function servedPage(p){ const r = await fetch('api/latents?' + new URLSearchParams(p));
  const j = await r.json(); if (!r.ok) throw new Error(j.error || ('HTTP ' + r.status)); return j; }
function cell(tr, text, cls){ const td = el('td', cls ? {class: cls} : {}, text); tr.appendChild(td); return td; }
let seq = 0;
async function render(){
  const mine = ++seq, p = params();
  let res; try { res = await (CONFIG.mode === 'served' ? servedPage(p) : staticPage(p)); }
  catch (e) { document.getElementById('count').textContent = 'error: ' + e.message; return; }
  if (mine !== seq) return;  // a newer request is on its way
  document.getElementById('count').textContent = res.total + ' latents';
  document.getElementById('pos').textContent = res.total ? ' ' + (state.offset + 1) + '\u2013' + (state.offset + res.rows.length) + ' of ' + res.total : '';
  document.getElementById('prev').disabled = state.offset === 0;
  document.getElementById('next').disabled = state.offset + state.limit >= res.total;
  document.getElementById('body').replaceChildren(...res.rows.map(r => {
    const tr = el('tr'); cell(tr, '').appendChild(el('a', {href: latentHref(r.latent)}, r.latent));
    const full = fmt(r.explanation), td = cell(tr, full.length > 300 ? full.slice(0, 300) + '\u2026' : full, 'expl');
    if (full.length > 300) td.setAttribute('title', full);  // the latent page shows it whole
    cell(tr, fmt(r.explainer));
    cell(tr, fmt(r.validation), 'num'); cell(tr, fmt(r.simulation), 'num');
    cell(tr, (r.ci_low === null || r.ci_low === undefined) ? '' : fmt(r.ci_low) + '\u2013' + fmt(r.ci_high), 'num');
    for (const k of ['ngram_simulation', 'frequency', 'max_act']) cell(tr, fmt(r[k]), 'num');
    return tr; }));
}
document.querySelectorAll('th[data-k]').forEach(th => th.onclick = () => {
  if (state.sort === th.dataset.k) state.desc = !state.desc; else { state.sort = th.dataset.k; state.desc = true; }
  state.offset = 0; render(); });
for (const k of ['q','explainer','min_freq','max_freq','min_score']) document.getElementById(k).oninput = () => { state.offset = 0; render(); };
document.getElementById('prev').onclick = () => { state.offset = Math.max(0, state.offset - state.limit); render(); };
document.getElementById('next').onclick = () => { state.offset += state.limit; render(); };
render();
