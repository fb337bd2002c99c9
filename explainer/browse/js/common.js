// Shared by the index and latent pages. Every element is built with textContent / setAttribute /
// createElementNS: data from the DB is text, never markup.
const CONFIG = JSON.parse(document.getElementById('config').textContent);
const SVGNS = 'http://www.w3.org/2000/svg';
function el(tag, attrs, text){ const e = document.createElement(tag);
  for (const k in (attrs||{})) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text); return e; }
function svg(tag, attrs, text){ const e = document.createElementNS(SVGNS, tag);
  for (const k in (attrs||{})) e.setAttribute(k, String(attrs[k]));
  if (text !== undefined) e.textContent = String(text); return e; }
function fmt(v){ if (v===null || v===undefined) return '';
  return typeof v==='number' ? String(Number.isInteger(v) ? v : Number(v.toPrecision(3))) : String(v); }
function latentHref(n, fromLatentPage){ n = Number(n);
  if (CONFIG.mode === 'served') return (fromLatentPage ? '' : 'latent/') + n;
  return 'latent.html#' + n; }
// file:// pages cannot fetch(); a script element with a src can, so static data comes as .js files.
function loadScript(src){ return new Promise((ok, fail) => { const s = document.createElement('script');
  s.setAttribute('src', src); s.onload = ok; s.onerror = () => fail(new Error('cannot load ' + src));
  document.head.appendChild(s); }); }
