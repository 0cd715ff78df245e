"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const STREAMS = D.streams.map(s => s.name);
const INPUT = Object.fromEntries(D.streams.map(s => [s.name, s.input]));
const BY_ID = new Map(D.latents.map(e => [e.l, e]));
const DEEP = D.depths.length ? D.depths.length - 1 : -1;
const KIND_TITLE = {joint: "joint codes", per_stream: "per-stream codes"};
let sortCol = 0, sortDir = 1, kind = "joint", shown = [];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const k of kids) if (k !== null && k !== undefined) e.append(k instanceof Node ? k : String(k));
  return e;
}
function fmt(x, d = 3) { return x === null || x === undefined ? "" : x.toFixed(d); }
function int(x) { return x === null || x === undefined ? "" : String(x); }
function num(x) { return x === null || x === undefined ? "" : (Number.isInteger(x) ? String(x) : x.toFixed(1)); }
function pct(x) { return x === null || x === undefined ? "" : (100 * x).toFixed(1) + "%"; }
function label(i) { const l = D.labels[i]; return l ? l[1] : "?"; }

const COLS = [
  {title: "latent", num: true, get: e => e.l, show: e => el("a", {href: "#latent-" + e.l, text: "#" + e.l})},
  {title: "agreed name", get: e => e.agreed},
  ...STREAMS.flatMap(s => [
    {title: s + " name", get: e => e.name[s]},
    {title: s + " purity", num: true, get: e => e.purity[s], fmt: x => fmt(x, 2)},
  ]),
  ...STREAMS.map(s => ({title: s + " text name", get: e => e.text[s]})),
  {title: "Jaccard d" + (D.depths[DEEP] ?? "") + " joint", num: true, get: e => e.jac.joint[DEEP]},
  {title: "Jaccard d" + (D.depths[DEEP] ?? "") + " per-stream", num: true, get: e => e.jac.per_stream[DEEP]},
  {title: "pattern", get: e => e.pattern.joint, show: e => el("span", {class: "pill " + e.pattern.joint, title: "fires in: " + e.alive_in.joint + " (per-stream codes: " + e.alive_in.per_stream + ")", text: e.pattern.joint})},
  ...STREAMS.map(s => ({title: "freq " + s, num: true, get: e => e.freq[s], fmt: pct})),
];

function header() {
  document.getElementById("title").textContent = D.title;
  document.title = D.title;
  const sha = D.model_sha256 ? ", model " + D.model_sha256.slice(0, 12) : "";
  document.getElementById("meta").textContent =
    `L=${D.L}, k=${D.k}, topk=${D.topk}, method=${D.method}${sha}; streams: ` +
    D.streams.map(s => `${s.name} (${s.input})`).join(", ") +
    `. Names and top samples: ${D.concepts_split} split (${D.n_concepts_split} samples, names from the top ${D.top_n_names}, purity >= ${D.purity_threshold}); ` +
    `frequencies, Jaccard, retrieval: ${D.eval_split} split (${D.summary.n_eval} samples).`;
  const t = document.getElementById("summary");
  t.append(el("tr", {}, el("th", {}, ""), ...Object.keys(KIND_TITLE).map(k => el("th", {text: KIND_TITLE[k]}))));
  const rows = [
    ["live latents", k => int(D.summary.n_live[k])],
    ["agreeing names", k => int(D.summary.agreeing[k])],
    ...D.depths.map(d => ["mean Jaccard d" + d + " (live)", k => fmt(D.summary.jaccard_live[k][String(d)])]),
    ["L0 per stream", k => { const v = D.summary.l0[k]; return v ? STREAMS.map(s => s + " " + fmt(v[s], 1)).join(", ") : ""; }],
  ];
  for (const [name, f] of rows) t.append(el("tr", {}, el("td", {text: name}), ...Object.keys(KIND_TITLE).map(k => el("td", {text: f(k)}))));
}

function renderHead() {
  const tr = el("tr");
  COLS.forEach((c, i) => {
    const cls = i === sortCol ? (sortDir > 0 ? "sorted-asc" : "sorted-desc") : null;
    tr.append(el("th", {class: cls, "data-col": i, title: "sort by " + c.title, onclick: () => {
      if (sortCol === i) sortDir = -sortDir; else { sortCol = i; sortDir = 1; }
      renderHead(); renderRows();
    }}, c.title));
  });
  const thead = document.querySelector("#latents thead");
  thead.replaceChildren(tr);
}

function compare(a, b) {
  const c = COLS[sortCol], x = c.get(a), y = c.get(b);
  const ex = x === null || x === undefined || x === "", ey = y === null || y === undefined || y === "";
  if (ex || ey) return ex && ey ? a.l - b.l : (ex ? 1 : -1);  // empty cells last
  const r = c.num ? x - y : String(x).localeCompare(String(y));
  return r ? sortDir * r : a.l - b.l;
}

function matches(e, q) { return !q || e.search.includes(q); }

function renderRows() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  shown = D.latents.filter(e => matches(e, q)).sort(compare);
  const body = document.querySelector("#latents tbody");
  const cur = currentLatent();
  body.replaceChildren(...shown.map(e => {
    const tr = el("tr", {"data-latent": e.l, class: e.l === cur ? "current" : null, onclick: ev => {
      if (ev.target.tagName !== "A") location.hash = "#latent-" + e.l;
    }});
    for (const c of COLS) {
      const v = c.get(e);
      tr.append(el("td", {class: c.num ? "num" : null}, c.show ? c.show(e) : (c.fmt ? c.fmt(v) : (c.num ? fmt(v) : (v ?? "")))));
    }
    return tr;
  }));
  document.getElementById("count").textContent = `${shown.length} of ${D.latents.length} live latents (L = ${D.L})`;
}

function currentLatent() {
  const m = /^#latent-(\d+)$/.exec(location.hash);
  return m ? Number(m[1]) : null;
}

function thumb(row, extra) {
  const s = D.samples[String(row)];
  const tip = s ? `${s.caption} [${s.id}]; labels: ${s.labels.map(label).join(", ")}` : String(row);
  const img = s && s.img ? el("img", {src: s.img, alt: s.caption, loading: "lazy"}) : el("div", {class: "noimg", text: "no image"});
  return el("figure", {title: tip + (extra ? "; " + extra : ""), class: null}, img, el("figcaption", {text: s ? s.caption : row}));
}

function distBlock(title, dist) {
  const box = el("div");
  box.append(el("div", {class: "muted", text: `${title} (n = ${dist.n})`}));
  if (!dist.n) return box;
  const grid = el("div", {class: "dist"});
  let listed = 0;
  for (const [li, c] of dist.labels) {
    listed += c;
    grid.append(el("span", {text: label(li), title: D.labels[li] ? D.labels[li][0] : ""}),
      el("div", {}, el("div", {class: "b", style: `width:${(100 * c / dist.n).toFixed(1)}%`})),
      el("span", {text: `${c} (${pct(c / dist.n)})`}));
  }
  box.append(grid);
  return box;
}

function statsTable(e) {
  const t = el("table", {class: "data"});
  t.append(el("tr", {}, ...["stream", "codes", "name", "dominant label", "purity", "text name", "top terms (z of the first)", "zero-shot name", `firings (${D.concepts_split})`, `freq (${D.eval_split}, joint)`].map(h => el("th", {text: h}))));
  for (const s of STREAMS) for (const k of Object.keys(KIND_TITLE)) {
    const v = e.kinds[k].stream[s];
    t.append(el("tr", {}, el("td", {text: `${s} (${INPUT[s]})`}), el("td", {text: KIND_TITLE[k]}), el("td", {text: v.name}),
      el("td", {text: v.label === null ? "" : label(v.label), title: v.label === null ? null : D.labels[v.label][0]}), el("td", {class: "num", text: fmt(v.purity, 3)}),
      el("td", {class: "text-name", text: v.text}), el("td", {text: v.words.join(", ") + (v.words.length ? ` (${fmt(v.text_score, 1)})` : "")}),
      el("td", {text: v.zero_shot || ""}),
      el("td", {class: "num", text: int(v.n_active)}), el("td", {class: "num", text: k === "joint" ? pct(e.freq[s]) : ""})));
  }
  const g = el("table", {class: "data"});
  g.append(el("tr", {}, el("th", {text: "codes"}), ...D.depths.map(d => el("th", {text: "Jaccard d" + d})), el("th", {text: "pattern"}), el("th", {text: "fires in"})));
  for (const k of Object.keys(KIND_TITLE)) g.append(el("tr", {}, el("td", {text: KIND_TITLE[k]}), ...e.jac[k].map(x => el("td", {class: "num", text: fmt(x)})),
    el("td", {}, el("span", {class: "pill " + e.pattern[k], text: e.pattern[k]})), el("td", {text: e.alive_in[k]})));
  const u = el("div", {class: "muted", text: `joint codes: firing entropy ${fmt(e.fe)}, co-firing ${fmt(e.cofire)}; agreed name (per-stream codes): ${e.kinds.per_stream.agreed || "none"}`});
  return el("div", {}, t, el("div", {style: "height:8px"}), g, u);
}

function renderPanel() {
  const panel = document.getElementById("panel");
  const l = currentLatent();
  document.querySelectorAll("#latents tbody tr").forEach(tr => tr.classList.toggle("current", Number(tr.dataset.latent) === l));
  if (l === null) { panel.hidden = true; panel.replaceChildren(); return; }
  const e = BY_ID.get(l);
  const close = el("button", {id: "close", title: "close (Esc)", onclick: () => { history.pushState("", document.title, location.pathname + location.search); renderPanel(); }}, "close");
  const i = shown.findIndex(x => x.l === l);
  const prev = el("button", {id: "prev", disabled: i <= 0 ? "disabled" : null, onclick: () => { location.hash = "#latent-" + shown[i - 1].l; }}, "\u2190 prev");
  const next = el("button", {id: "next", disabled: i < 0 || i >= shown.length - 1 ? "disabled" : null, onclick: () => { location.hash = "#latent-" + shown[i + 1].l; }}, "next \u2192");
  const texts = e ? [...new Set(STREAMS.map(s => e.text[s]).filter(Boolean))] : [];
  const title = el("h2", {}, `Latent #${l}` + (e && e.agreed ? ": " + e.agreed : texts.length ? ` (text: ${texts.join(" / ")})` : ""));
  panel.replaceChildren(el("div", {class: "bar"}, title, prev, next, close));
  panel.hidden = false;
  panel.dataset.latent = l;
  if (!e) { panel.append(el("p", {text: l < D.L ? `Latent ${l} never fires on the ${D.eval_split} split (dead).` : `No latent ${l} (L = ${D.L}).`})); return; }
  const toggle = el("div", {class: "bar"}, el("span", {class: "muted", text: "top samples and label counts from:"}),
    ...Object.keys(KIND_TITLE).map(k => el("button", {class: k === kind ? "on" : null, "data-kind": k, onclick: () => { kind = k; renderPanel(); }}, KIND_TITLE[k])));
  panel.append(el("h3", {text: "Statistics"}), statsTable(e), el("h3", {text: "Top samples"}), toggle);
  for (const s of STREAMS) {
    const v = e.kinds[kind].stream[s];
    const sec = el("section", {class: "stream", "data-stream": s});
    sec.append(el("h3", {text: `${s} (${INPUT[s]}): ${v.name || "unnamed"}` + (v.purity !== null ? `, purity ${fmt(v.purity, 2)}` : "") +
      `; text: ${v.text || "none"}`}));
    if (!v.top.length) sec.append(el("p", {class: "muted", text: `never fires on the ${D.concepts_split} split`}));
    else if (INPUT[s] === "image") sec.append(el("div", {class: "thumbs"}, ...v.top.map(([row, a]) => thumb(row, "activation " + fmt(a)))));
    else sec.append(el("ol", {class: "captions"}, ...v.top.map(([row, a]) => el("li", {}, D.samples[String(row)].caption, el("span", {class: "act", text: fmt(a)})))));
    sec.append(el("div", {class: "cols"}, distBlock(`labels of the top ${D.top_n_names}`, v.dist_top), distBlock("labels of all firings", v.dist_all)));
    panel.append(sec);
  }
  panel.scrollTop = 0;
}

function renderRetrieval() {
  const m = D.retrieval.metrics;
  const box = document.getElementById("retrieval-metrics");
  if (m.length) {
    const t = el("table", {class: "data"});
    t.append(el("tr", {}, ...["query", "gallery", "representation", "R@1", "R@5", "R@10", "median rank", "MRR"].map(h => el("th", {text: h}))));
    for (const r of m) t.append(el("tr", {}, el("td", {text: r.query || "\u2014"}), el("td", {text: r.gallery || "\u2014"}), el("td", {text: r.representation}),
      ...["R@1", "R@5", "R@10", "median_rank", "MRR"].map(k => el("td", {class: "num", text: k === "median_rank" ? num(r[k]) : fmt(r[k])}))));
    box.append(el("p", {class: "muted", text: `Per-stream codes (each stream its own top-k), ${D.eval_split} split, cosine similarity; chance = a random ranking.`}), t);
  }
  const ex = document.getElementById("retrieval-examples");
  if (!D.retrieval.examples.length) { ex.append(el("p", {class: "muted", text: "No examples: they need a caption stream, an image stream and figures.queries > 0."})); return; }
  for (const g of D.retrieval.examples) {
    ex.append(el("h3", {text: `${g.query} captions \u2192 ${g.gallery} images`}));
    for (const it of g.items) {
      const s = D.samples[String(it.row)];
      const found = it.top.map(([row, sim]) => { const f = thumb(row, "similarity " + fmt(sim)); if (row === it.row) f.classList.add("hit"); f.append(el("div", {class: "muted", text: fmt(sim, 2)})); return f; });
      ex.append(el("div", {class: "query"},
        el("div", {}, el("b", {text: "\u201c" + s.caption + "\u201d"}), el("span", {class: "muted", text: `  correct image: rank ${it.rank}` + (it.ties ? ` (tied with ${it.ties})` : "")})),
        el("div", {class: "row"}, el("div", {}, el("div", {class: "muted", text: "correct"}), thumb(it.row)),
          el("div", {}, el("div", {class: "muted", text: `top ${it.top.length}`}), el("div", {class: "thumbs"}, ...found)))));
    }
  }
}

function renderLocalisation() {
  const L = D.localisation, box = document.getElementById("localisation-metrics");
  if (!L) { box.append(el("p", {class: "muted", text: "No localisation outputs (reports/localise/metrics.json and overlays.npz are missing): run `dvc repro localise`."})); return; }
  for (const n of L.notes) box.append(el("p", {class: "muted", text: n}));
  if (L.metrics.length) {
    const t = el("table", {class: "data", id: "localisation-table"});
    t.append(el("tr", {}, ...["method", L.ap_label, "mIoU"].map(h => el("th", {text: h}))));
    for (const r of L.metrics) t.append(el("tr", {"data-method": r.method, class: r.chance ? "muted" : null},
      el("td", {text: r.chance ? r.method + " (baseline)" : r.method}), el("td", {class: "num", text: fmt(r.ap)}), el("td", {class: "num", text: fmt(r.miou)})));
    box.append(el("p", {class: "muted", text: "A text query names a region of the image; each method's heat map for it is binarised with Otsu's threshold and compared with the query's ground-truth mask (AP over the queries ranked by the method's score, and mean IoU)."}), t);
  }
  const qs = document.getElementById("localisation-queries");
  if (L.queries.length) qs.append(el("h3", {text: "Overlays"}), el("p", {class: "muted", text: "green: the ground-truth mask; colours: the heat map (red: high); white: its Otsu mask."}));
  for (const q of L.queries) {
    const panels = [el("div", {class: "locpanel"}, el("img", {src: q.img, alt: "the image and the mask"}), el("div", {class: "muted", text: "image and mask"}))];
    for (const p of q.panels) panels.push(el("div", {class: "locpanel", "data-method": p.method},
      el("img", {src: p.img, alt: p.method + " heat map"}), el("div", {text: `${p.method}, IoU ${fmt(p.iou, 2)}`})));
    qs.append(el("div", {class: "query loc"}, el("div", {}, el("b", {text: "\u201c" + q.text + "\u201d"})), el("div", {class: "row"}, ...panels)));
  }
}

function placeholder() {
  const n = new Map();
  for (const e of D.latents) for (const w of e.search.split("\n")) if (w) n.set(w, (n.get(w) || 0) + 1);
  const best = [...n.entries()].sort((a, b) => b[1] - a[1])[0];
  if (best) document.getElementById("search").placeholder = `Search concept names (e.g. ${best[0]})`;
}

header();
placeholder();
renderHead();
renderRows();
renderRetrieval();
renderLocalisation();
let pending = null;
document.getElementById("search").addEventListener("input", () => {
  clearTimeout(pending);
  pending = setTimeout(() => { renderRows(); if (currentLatent() !== null) renderPanel(); }, 60);
});
window.addEventListener("hashchange", renderPanel);
document.addEventListener("keydown", ev => { if (ev.key === "Escape" && currentLatent() !== null) document.getElementById("close").click(); });
renderPanel();
