// A latent page from its payload (browse/data.py `payloads`): inline when served, from a shard
// (data/shard_K.js, K = latent div CONFIG.shard) in the static site, picked by the URL's #latent.
window.EXPLAINER_SHARD = window.EXPLAINER_SHARD || {};
function section(root, title){ root.appendChild(el('h2', {}, title)); const d = el('div'); root.appendChild(d); return d; }
function none(root, line){ root.appendChild(el('p', {class: 'muted'}, line)); }
function scoreLine(s){ // [scorer, mode, model, split, score, ci_low, ci_high, baseline, n_snippets]
  let t = s[0] + '/' + (s[1] || '') + ' by ' + (s[2] || '?') + ' on ' + s[3] + ': ' + fmt(s[4]);
  if (s[5] !== null && s[5] !== undefined) t += ' [' + fmt(s[5]) + ', ' + fmt(s[6]) + ']';
  if (s[7] !== null && s[7] !== undefined) t += ' baseline ' + fmt(s[7]);
  if (s[8] !== null && s[8] !== undefined) t += ' (' + s[8] + ' snippets)';
  return t; }
function histogram(root, P){
  const h = P.hist;
  if (!h) { none(root, 'no activation histogram: the sampler stored neither a histogram nor quantiles for this latent'); return; }
  const W = 640, H = 170, L = 40, B = 28, pw = W - L - 10, ph = H - B - 10;
  const edges = h.edges, counts = h.counts, x0 = Math.min(0, edges[0]), x1 = Math.max(edges[edges.length - 1], P.max_act || 0) || 1;
  const X = v => L + (v - x0) / (x1 - x0) * pw;
  const dens = counts.map((c, i) => c / Math.max(edges[i + 1] - edges[i], 1e-9)), peak = Math.max(...dens, 1e-12);
  const s = svg('svg', {width: W, height: H, role: 'img'});
  s.appendChild(svg('rect', {x: L, y: 10, width: pw, height: ph, fill: '#fafafa', stroke: '#ddd'}));
  dens.forEach((d, i) => { const bh = d / peak * ph; const r = svg('rect', {x: X(edges[i]), y: 10 + ph - bh,
    width: Math.max(X(edges[i + 1]) - X(edges[i]) - 0.5, 0.5), height: bh, fill: '#e08a2c'});
    r.appendChild(svg('title', {}, fmt(edges[i]) + '\u2013' + fmt(edges[i + 1]) + ': ' + fmt(counts[i]))); s.appendChild(r); });
  // Where the examples below come from: a tick per quantile example (labelled by bin), top examples in red.
  const bins = {};
  for (const x of P.examples) { if (x.kind !== 'quantile' && x.kind !== 'top') continue;
    const tx = X(x.max), q = x.kind === 'quantile';
    s.appendChild(svg('line', {x1: tx, x2: tx, y1: 10 + ph, y2: 10 + ph + (q ? 8 : 12), stroke: q ? '#2a5bd7' : '#c00', 'stroke-width': 1.5}));
    if (q && x.bin !== null && x.bin !== undefined) (bins[x.bin] = bins[x.bin] || []).push(tx); }
  for (const b in bins) { const xs = bins[b].sort((a, c) => a - c);  // one label per bin, at its middle example
    s.appendChild(svg('text', {x: xs[Math.floor(xs.length / 2)], y: 10 + ph + 18, 'text-anchor': 'middle', fill: '#2a5bd7'}, 'b' + b)); }
  for (let i = 0; i <= 4; i++) { const v = x0 + (x1 - x0) * i / 4;
    s.appendChild(svg('text', {x: X(v), y: H - 1, 'text-anchor': 'middle'}, fmt(v))); }
  root.appendChild(s);
  root.appendChild(el('p', {class: 'muted'}, (h.source === 'histogram'
    ? 'per-token activations over firing tokens (latent_histograms), bar area = tokens'
    : 'per-context max activation between the quantiles ' + h.levels.join(', ') + ' of firing contexts (latents.quantiles; '
      + 'the sampler has not stored a per-token histogram), bar area = contexts')
    + '. Ticks: blue = a quantile example (b = its bin), red = a top example.')); }
function tokens(x, scale){ const d = el('div', {class: 'ex'});
  if (x.start > 0) d.appendChild(el('span', {class: 'muted'}, '\u2026'));
  x.tokens.forEach((t, i) => { const a = x.acts[i] || 0, sp = el('span', {class: 'tok'}, t);
    if (a > 0) { sp.setAttribute('style', 'background:rgba(255,120,0,' + Math.min(1, Math.max(0, scale > 0 ? a / scale : 0)).toFixed(2) + ')');
      sp.setAttribute('title', fmt(a)); }
    d.appendChild(sp); });
  if (x.start + x.tokens.length < x.of) d.appendChild(el('span', {class: 'muted'}, '\u2026'));
  return d; }
function renderLatent(P){
  const root = el('div'); document.title = 'Latent ' + P.latent;
  root.appendChild(el('h1', {}, 'Latent ' + P.latent));
  root.appendChild(el('p', {class: 'muted'}, 'frequency ' + fmt(P.frequency) + ' \u00b7 fired in ' + P.n_contexts + ' contexts \u00b7 max activation '
    + fmt(P.max_act) + ' \u00b7 mean over firing tokens ' + fmt(P.mean_act)));
  const lab = P.label, chosen = lab && lab.explanation_id !== null ? P.explanations.find(e => e.id === lab.explanation_id) : null;
  if (chosen) { root.appendChild(el('div', {class: 'lbl'}, chosen.text));
    root.appendChild(el('p', {class: 'muted'}, 'label chosen by ' + (lab.selected_by || 'no validation score (newest LLM explanation)')
      + (lab.validation !== null ? ', validation ' + fmt(lab.validation) : '') + (lab.simulation !== null ? '; held-out ' + fmt(lab.simulation)
      + (lab.ci_low !== null ? ' [' + fmt(lab.ci_low) + ', ' + fmt(lab.ci_high) + ']' : '') + ' baseline ' + fmt(lab.baseline) : '')
      + (lab.ngram_simulation !== null ? '; n-gram baseline ' + fmt(lab.ngram_simulation) : ''))); }
  histogram(section(root, 'Activation histogram'), P);
  const cols = el('div', {class: 'cols'}); root.appendChild(cols);
  const lg = section(cols.appendChild(el('div')), 'Logit lens');
  if (P.logits === null) none(lg, 'no logit-lens table in this DB (open it once with a writer to migrate)');
  else if (!P.logits.top.length && !P.logits.bottom.length) none(lg, 'no logit-lens rows for this latent');
  else { const t = el('table'); t.appendChild(el('tr')).append(el('th', {}, 'top tokens'), el('th', {}, ''), el('th', {}, 'bottom tokens'), el('th', {}, ''));
    for (let i = 0; i < Math.max(P.logits.top.length, P.logits.bottom.length); i++) { const a = P.logits.top[i] || ['', null], b = P.logits.bottom[i] || ['', null];
      t.appendChild(el('tr')).append(el('td', {class: 'ex'}, a[0]), el('td', {class: 'num'}, fmt(a[1])), el('td', {class: 'ex'}, b[0]), el('td', {class: 'num'}, fmt(b[1]))); }
    lg.appendChild(t); }
  const nb = section(cols.appendChild(el('div')), 'Neighbours');
  if (P.neighbours === null) none(nb, 'no neighbours table in this DB (open it once with a writer to migrate)');
  else if (!P.neighbours.length) none(nb, 'no neighbours stored for this latent');
  else for (const [kind, n, v] of P.neighbours) { const p = el('div'); p.appendChild(el('a', {href: latentHref(n, true)}, 'latent ' + n));
    p.appendChild(el('span', {class: 'muted'}, ' ' + kind + ' ' + fmt(v))); nb.appendChild(p); }
  const ex = section(root, 'Explanations');
  if (!P.explanations.length) none(ex, 'no explanations yet');
  for (const e of P.explanations) { ex.appendChild(el('div', {class: 'lbl'}, e.text));
    ex.appendChild(el('div', {class: 'muted'}, 'by ' + e.explainer + ' / ' + e.model + (chosen && e.id === chosen.id ? ' \u2014 the label' : '')));
    if (!e.scores.length) ex.appendChild(el('div', {class: 'muted'}, 'not scored'));
    for (const s of e.scores) ex.appendChild(el('div', {class: 'muted'}, scoreLine(s))); }
  const xs = section(root, 'Examples');
  if (!P.examples.length) none(xs, 'no examples stored for this latent');
  let cur = null;
  for (const x of P.examples) { const key = x.split + '|' + x.kind + '|' + x.bin;
    if (key !== cur) { cur = key; xs.appendChild(el('div', {class: 'kind'}, x.kind + (x.bin !== null && x.bin !== undefined ? ' bin ' + x.bin : '') + ' \u00b7 ' + x.split)); }
    const d = tokens(x, P.max_act || 0); d.setAttribute('title', 'max ' + fmt(x.max)); xs.appendChild(d); }
  document.getElementById('page').replaceChildren(root); }
async function main(){
  if (CONFIG.mode === 'served') { document.getElementById('back').setAttribute('href', '../');
    renderLatent(JSON.parse(document.getElementById('payload').textContent)); return; }
  const n = Number(location.hash.slice(1));
  if (!location.hash || !Number.isInteger(n) || n < 0) { document.getElementById('page').replaceChildren(el('p', {}, 'add a latent number to the address, e.g. latent.html#0')); return; }
  const k = Math.floor(n / CONFIG.shard);
  try { if (!(k in window.EXPLAINER_SHARD)) await loadScript('data/shard_' + k + '.js'); }
  catch (e) { window.EXPLAINER_SHARD[k] = {}; }
  const P = window.EXPLAINER_SHARD[k][n];
  if (!P) { document.getElementById('page').replaceChildren(el('p', {}, 'latent ' + n + ' is not in this site')); return; }
  renderLatent(P); }
window.addEventListener('hashchange', main);
main();
