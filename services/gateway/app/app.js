// ShCR reference record viewer. Talks to the public FHIR API only
// (`/{care-system}/fhir/...`) with a bearer token held in memory (never in storage or URLs).
// Navigation is in-memory: history entries carry only a view name, never patient data.

const NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number";
const ROLES = [
  ["R8000", "Clinical practitioner access role"],
  ["R8003", "Health professional access role"],
  ["R8008", "Admin and clerical"],
  ["R0260", "General medical practitioner"],
];

// The whole session, in memory only.
const session = { token: null, careSystem: null, org: null, role: null, patient: null, scope: "" };
let patientCache = null; // the patient being viewed (id, resource, break-glass reason)

const main = () => document.getElementById("main");

// ---------- small DOM helpers ----------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const svg = (tag, attrs = {}) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};

function show(title, ...content) {
  const m = main();
  m.replaceChildren(...content);
  document.title = `${title} – ShCR record viewer`;
  m.focus();
}

// ---------- NHS number (Modulus 11) ----------
export function nhsNumberValid(raw) {
  const digits = String(raw).replace(/\s+/g, "");
  if (!/^\d{10}$/.test(digits)) return false;
  let sum = 0;
  for (let i = 0; i < 9; i++) sum += Number(digits[i]) * (10 - i);
  let check = 11 - (sum % 11);
  if (check === 11) check = 0;
  if (check === 10) return false;
  return check === Number(digits[9]);
}
const formatNhs = (n) => n.replace(/\s+/g, "").replace(/^(\d{3})(\d{3})(\d{4})$/, "$1 $2 $3");

// ---------- FHIR access ----------
class FhirError extends Error {
  constructor(status, outcome) {
    super(outcomeText(outcome) || `HTTP ${status}`);
    this.status = status;
    this.outcome = outcome;
  }
}
function outcomeText(o) {
  if (!o || !Array.isArray(o.issue)) return "";
  return o.issue.map((i) => i.diagnostics || (i.details && i.details.text) || i.code).join("; ");
}
async function fhir(path, { breakGlass } = {}) {
  const headers = { Accept: "application/fhir+json", Authorization: `Bearer ${session.token}` };
  if (breakGlass) headers["X-Break-Glass-Reason"] = breakGlass;
  const url = path.startsWith("http") ? path : `/${session.careSystem}/fhir/${path}`;
  const res = await fetch(url, { headers, cache: "no-store", referrerPolicy: "no-referrer" });
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  if (!res.ok) throw new FhirError(res.status, body);
  return body;
}
const entries = (bundle) => (bundle && bundle.entry ? bundle.entry.map((e) => e.resource).filter(Boolean) : []);
const nextLink = (bundle) => {
  const l = bundle && bundle.link && bundle.link.find((x) => x.relation === "next");
  return l ? l.url : null;
};

// ---------- formatting ----------
const codeText = (cc) => {
  if (!cc) return "";
  if (cc.text) return cc.text;
  const c = (cc.coding || [])[0];
  return c ? c.display || c.code || "" : "";
};
const humanName = (p) => {
  const n = (p.name || []).find((x) => x.use === "official") || (p.name || [])[0];
  if (!n) return "(no name)";
  if (n.text) return n.text;
  return `${(n.family || "").toUpperCase()}, ${(n.given || []).join(" ")}`.trim();
};
const nhsOf = (p) => {
  const id = (p.identifier || []).find((i) => i.system === NHS_SYSTEM);
  return id ? formatNhs(id.value) : "";
};
const date = (s) => {
  if (!s) return "";
  const d = new Date(s);
  if (Number.isNaN(d.getTime())) return s;
  return s.length <= 10
    ? d.toLocaleDateString("en-GB", { day: "numeric", month: "short", year: "numeric", timeZone: "UTC" })
    : d.toLocaleString("en-GB", { day: "numeric", month: "short", year: "numeric", hour: "2-digit", minute: "2-digit" });
};
const qty = (q) => (q && q.value !== undefined ? `${q.value} ${q.unit || q.code || ""}`.trim() : "");
const obsValue = (o) => {
  if (o.valueQuantity) return qty(o.valueQuantity);
  if (o.valueString) return o.valueString;
  if (o.valueCodeableConcept) return codeText(o.valueCodeableConcept);
  if (o.component) return o.component.map((c) => `${codeText(c.code)} ${qty(c.valueQuantity)}`).join(", ");
  return "";
};

// ---------- navigation (in memory; history state holds only a view name) ----------
const views = {};
function go(view, push = true) {
  if (push) history.pushState({ view }, "", "/app/");
  (views[view] || views.home)();
}
window.addEventListener("popstate", (e) => {
  const view = (e.state && e.state.view) || "home";
  if (!session.token) return views.signin();
  go(view === "patient" && !patientCache ? "home" : view, false);
});

// ---------- sign in (dev issuer in `shcr dev`) ----------
views.signin = async function () {
  let systems = [];
  try {
    const res = await fetch("/", { headers: { Accept: "application/json" } });
    systems = await res.json();
  } catch { systems = []; }
  const csSel = h("select", { id: "cs", name: "care_system" },
    systems.map((s) => h("option", { value: s.name }, `${s.display_name || s.name} (${s.name})`)));
  const orgSel = h("select", { id: "org", name: "org" });
  const fillOrgs = () => {
    const s = systems.find((x) => x.name === csSel.value);
    orgSel.replaceChildren(...((s && s.members) || []).map((m) => h("option", { value: m }, m)));
  };
  csSel.addEventListener("change", fillOrgs);
  fillOrgs();
  const roleSel = h("select", { id: "role", name: "role" }, ROLES.map(([c, l]) => h("option", { value: c }, `${l} (${c})`)));
  const patientIn = h("input", { id: "patient-id", name: "patient", autocomplete: "off", "aria-describedby": "patient-hint" });
  const error = h("p", { class: "error", role: "alert", hidden: true });

  async function signIn(asPatient) {
    error.hidden = true;
    const body = { care_system: csSel.value, org: orgSel.value, role: roleSel.value };
    if (asPatient) {
      if (!patientIn.value.trim()) { error.textContent = "Enter the patient's record id."; error.hidden = false; patientIn.focus(); return; }
      body.patient = patientIn.value.trim();
    }
    const res = await fetch("/app/dev/token", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), cache: "no-store",
    });
    if (res.status === 404 || res.status === 405) {
      error.textContent = "Dev sign-in is only available under `shcr dev`. This gateway needs SMART App Launch, which this viewer does not do yet.";
      error.hidden = false;
      return;
    }
    const tok = await res.json().catch(() => ({}));
    if (!res.ok) { error.textContent = tok.error_description || `Sign-in failed (HTTP ${res.status}).`; error.hidden = false; return; }
    startSession(tok.access_token);
  }

  // A token minted elsewhere (the `shcr dev` banner, `shcr token`): its claims say where it works.
  const tokenIn = h("textarea", { id: "token", name: "token", rows: 3, autocomplete: "off", spellcheck: "false", "aria-describedby": "token-hint" });
  function pasted() {
    error.hidden = true;
    if (!startSession(tokenIn.value.trim())) { error.textContent = "That is not a ShCR token."; error.hidden = false; tokenIn.focus(); }
    tokenIn.value = "";
  }

  show("Sign in",
    h("h1", {}, "Sign in"),
    h("div", { class: "notice" }, "Development sign-in: this stands in for the identity provider in ",
      h("code", {}, "shcr dev"), " only. The token stays in this page's memory and is gone when you close or reload it."),
    h("form", { class: "card", id: "signin-form", onsubmit: (e) => { e.preventDefault(); signIn(false); } },
      h("h2", {}, "As a clinician"),
      h("label", { for: "cs" }, "Care system"), csSel,
      h("label", { for: "org" }, "Organisation (ODS code)"), orgSel,
      h("label", { for: "role" }, "Role"), roleSel,
      h("div", {}, h("button", { type: "submit", class: "button", id: "signin" }, "Sign in as clinician")),
      h("h2", {}, "Or as a patient"),
      h("label", { for: "patient-id" }, "Patient record id", h("span", { class: "hint", id: "patient-hint" }, "For example demo-patient-1")),
      patientIn,
      h("div", {}, h("button", { type: "button", class: "button secondary", id: "signin-patient", onclick: () => signIn(true) }, "Sign in as this patient")),
      h("h2", {}, "Or with a token"),
      h("label", { for: "token" }, "Bearer token", h("span", { class: "hint", id: "token-hint" }, "From the shcr dev banner or `shcr token`")),
      tokenIn,
      h("div", {}, h("button", { type: "button", class: "button secondary", id: "signin-token", onclick: pasted }, "Sign in with this token")),
      error));
};

/** Decodes a JWT's claims (no verification: the gateway verifies every request). */
export function tokenClaims(token) {
  const parts = String(token).split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
  } catch { return null; }
}

function startSession(token) {
  const c = tokenClaims(token);
  const aud = c && (Array.isArray(c.aud) ? c.aud[0] : c.aud);
  const m = typeof aud === "string" && aud.match(/^urn:shcr:care-system:(.+)$/);
  if (!m) return false;
  const roles = c.nhsid_nrbac_roles || [];
  const role = roles.find((r) => r.person_roleid === c.selected_roleid) || roles[0] || {};
  Object.assign(session, { token, scope: c.scope || "", careSystem: m[1], org: role.org_code || "", role: role.role_code || "", patient: c.patient || null });
  document.getElementById("who").textContent = session.patient
    ? `Signed in as patient ${session.patient} · ${session.careSystem}`
    : `Signed in · ${session.org} · ${session.role} · ${session.careSystem}`;
  document.getElementById("signout").hidden = false;
  go(session.patient ? "mine" : "home");
  return true;
}

// ---------- clinician: find a patient ----------
views.home = function () {
  const nhsIn = h("input", { id: "nhs", name: "nhs", inputmode: "numeric", autocomplete: "off", "aria-describedby": "nhs-hint nhs-error", maxlength: 12 });
  const nhsErr = h("p", { class: "error", id: "nhs-error", role: "alert", hidden: true });
  const validate = (final) => {
    const v = nhsIn.value.replace(/\s+/g, "");
    let msg = "";
    if (/\D/.test(v)) msg = "An NHS number has digits only.";
    else if (v.length > 10) msg = "An NHS number has 10 digits.";
    else if (v.length === 10 && !nhsNumberValid(v)) msg = "This is not a valid NHS number (check digit does not match).";
    else if (final && v.length < 10) msg = "An NHS number has 10 digits.";
    nhsErr.textContent = msg; nhsErr.hidden = !msg;
    nhsIn.setAttribute("aria-invalid", msg ? "true" : "false");
    return !msg;
  };
  nhsIn.addEventListener("input", () => validate(false));
  const familyIn = h("input", { id: "family", name: "family", autocomplete: "off" });
  const birthIn = h("input", { id: "birthdate", name: "birthdate", type: "date" });
  const results = h("div", { id: "results", "aria-live": "polite" });

  async function search(query) {
    results.replaceChildren(h("p", {}, "Searching…"));
    try {
      const bundle = await fhir(`Patient?${query}&_count=20`);
      const found = entries(bundle).filter((r) => r.resourceType === "Patient");
      if (!found.length) { results.replaceChildren(h("p", {}, "No patient found.")); return; }
      results.replaceChildren(h("table", { class: "table" },
        h("caption", {}, `${found.length} patient(s) found`),
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Name"), h("th", { scope: "col" }, "NHS number"), h("th", { scope: "col" }, "Born"), h("th", { scope: "col" }, "Gender"))),
        h("tbody", {}, found.map((p) => h("tr", {},
          h("td", {}, h("a", { href: "#", class: "open-patient", onclick: (e) => { e.preventDefault(); openPatient(p.id); } }, humanName(p))),
          h("td", {}, nhsOf(p)), h("td", {}, date(p.birthDate)), h("td", {}, p.gender || ""))))));
    } catch (e) {
      results.replaceChildren(errorNotice(e, "Search failed"));
    }
  }

  show("Find a patient",
    h("h1", {}, "Find a patient"),
    h("div", { class: "row" },
      h("form", { class: "card", id: "nhs-form", onsubmit: (e) => { e.preventDefault(); if (validate(true)) search(`identifier=${encodeURIComponent(`${NHS_SYSTEM}|${nhsIn.value.replace(/\s+/g, "")}`)}`); else nhsIn.focus(); } },
        h("h2", {}, "By NHS number"),
        h("label", { for: "nhs" }, "NHS number", h("span", { class: "hint", id: "nhs-hint" }, "10 digits, for example 999 000 0018")),
        nhsIn, nhsErr,
        h("div", {}, h("button", { type: "submit", class: "button", id: "nhs-search" }, "Search"))),
      h("form", { class: "card", id: "name-form", onsubmit: (e) => { e.preventDefault(); if (!familyIn.value.trim() || !birthIn.value) { results.replaceChildren(h("p", { class: "error", role: "alert" }, "Enter a family name and a date of birth.")); return; } search(`family=${encodeURIComponent(familyIn.value.trim())}&birthdate=${birthIn.value}`); } },
        h("h2", {}, "By name and date of birth"),
        h("label", { for: "family" }, "Family name"), familyIn,
        h("label", { for: "birthdate" }, "Date of birth"), birthIn,
        h("div", {}, h("button", { type: "submit", class: "button", id: "name-search" }, "Search")))),
    results);
};

function errorNotice(e, what) {
  if (e instanceof FhirError) {
    const why = {
      401: "Your session has expired or was not accepted. Sign in again.",
      403: "You are not allowed to see this.",
      404: "Not found, or this server does not support it yet.",
    }[e.status] || `The server answered ${e.status}.`;
    return h("div", { class: "notice bad", role: "alert" }, h("strong", {}, `${what}: `), why, e.message ? h("span", { class: "muted" }, ` (${e.message})`) : null);
  }
  return h("div", { class: "notice bad", role: "alert" }, `${what}: ${e.message || e}`);
}

// ---------- the patient view ----------
async function openPatient(id, breakGlass) {
  show("Patient record", h("p", {}, "Loading the record…"));
  let patient;
  try {
    patient = await fhir(`Patient/${encodeURIComponent(id)}`, { breakGlass });
  } catch (e) {
    if (e instanceof FhirError && e.status === 403 && !session.patient) return refused(id, e);
    return show("Patient record", errorNotice(e, "Cannot open the record"));
  }
  patientCache = { id, patient, breakGlass };
  history.pushState({ view: "patient" }, "", "/app/");
  renderPatient();
}
views.patient = () => (patientCache ? renderPatient() : views.home());
views.mine = () => (session.patient ? openPatient(session.patient) : views.home());

function refused(id, e) {
  const retry = h("button", { type: "button", class: "button warning", id: "break-glass", onclick: () => askBreakGlass(id) }, "Break glass");
  show("Access refused",
    h("h1", {}, "You cannot see this record"),
    h("div", { class: "notice bad", role: "alert", id: "refused" },
      h("p", {}, h("strong", {}, "Access refused (403). "),
        "There is no legitimate relationship, the patient has refused consent, or the record is withheld as sensitive."),
      e.message ? h("p", { class: "muted" }, `The server said: ${e.message}`) : null),
    h("p", {}, "In an emergency you can break glass. You will be asked for a reason, and the access is recorded and reviewed."),
    retry,
    h("button", { type: "button", class: "button secondary", onclick: () => go("home") }, "Back to search"));
  retry.focus();
}

function askBreakGlass(id) {
  const dlg = document.getElementById("breakglass");
  const form = document.getElementById("bg-form");
  const reason = document.getElementById("bg-reason");
  const err = document.getElementById("bg-error");
  reason.value = ""; err.hidden = true;
  dlg.onclose = () => {
    if (dlg.returnValue !== "confirm") return;
    openPatient(id, reason.value.trim());
  };
  form.onsubmit = (e) => {
    const submitter = e.submitter;
    if (submitter && submitter.value === "confirm" && !reason.value.trim()) {
      e.preventDefault(); err.hidden = false; reason.focus();
    }
  };
  dlg.showModal();
  reason.focus();
}

// One section: a search, rendered by `render`, with "show more" paging and tolerant errors.
function section(id, title, query, render, { breakGlass, emptyText } = {}) {
  const body = h("div", {}, h("p", { class: "muted" }, "Loading…"));
  const card = h("section", { class: "card", id: `section-${id}`, "aria-labelledby": `h-${id}` }, h("h2", { id: `h-${id}` }, title), body);
  let items = [];
  async function load(url) {
    try {
      const bundle = await fhir(url, { breakGlass });
      items = items.concat(entries(bundle));
      const next = nextLink(bundle);
      body.replaceChildren(items.length ? render(items) : h("p", { class: "muted" }, emptyText || `No ${title.toLowerCase()} recorded.`));
      if (next) body.append(h("button", { type: "button", class: "button secondary", onclick: () => load(next) }, "Show more"));
    } catch (e) {
      if (e instanceof FhirError && (e.status === 404 || e.status === 400) && items.length === 0) {
        card.classList.add("unsupported");
        body.replaceChildren(h("p", { class: "muted" }, "Not available from this record store yet."));
      } else body.replaceChildren(errorNotice(e, `Cannot load ${title.toLowerCase()}`));
    }
  }
  load(query);
  return card;
}

const table = (caption, heads, rows) => h("table", { class: "table" },
  h("caption", { class: "visually-hidden" }, caption),
  h("thead", {}, h("tr", {}, heads.map((x) => h("th", { scope: "col" }, x)))),
  h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));

function trendCharts(obs) {
  // Group numeric single-value observations by code; chart those with 2+ points.
  const groups = new Map();
  for (const o of obs) {
    if (!o.valueQuantity || typeof o.valueQuantity.value !== "number") continue;
    const key = codeText(o.code);
    const t = o.effectiveDateTime || (o.effectivePeriod && o.effectivePeriod.start) || o.issued;
    if (!t) continue;
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push({ t: new Date(t).getTime(), v: o.valueQuantity.value, unit: o.valueQuantity.unit || "" });
  }
  const charts = [];
  for (const [name, pts] of groups) {
    if (pts.length < 2) continue;
    pts.sort((a, b) => a.t - b.t);
    const W = 320, H = 120, P = 28;
    const t0 = pts[0].t, t1 = pts[pts.length - 1].t || t0 + 1;
    const vs = pts.map((p) => p.v);
    let lo = Math.min(...vs), hi = Math.max(...vs);
    if (lo === hi) { lo -= 1; hi += 1; }
    const x = (t) => P + ((t - t0) / (t1 - t0 || 1)) * (W - 2 * P);
    const y = (v) => H - P + 8 - ((v - lo) / (hi - lo)) * (H - 2 * P);
    const s = svg("svg", { class: "chart", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `${name}: ${pts.length} readings from ${vs[0]} to ${vs[vs.length - 1]} ${pts[0].unit}` });
    s.append(svg("polyline", { class: "line", points: pts.map((p) => `${x(p.t)},${y(p.v)}`).join(" ") }));
    for (const p of pts) s.append(svg("circle", { class: "pt", cx: x(p.t), cy: y(p.v), r: 3 }));
    const label = (txt, attrs) => { const t = svg("text", attrs); t.textContent = txt; s.append(t); };
    label(`${hi} ${pts[0].unit}`, { x: 2, y: 12 });
    label(`${lo}`, { x: 2, y: H - 4 });
    charts.push(h("figure", { class: "trend" }, s, h("figcaption", {}, `${name} (${pts.length} readings)`)));
  }
  return charts;
}

function renderPatient() {
  const { id, patient, breakGlass } = patientCache;
  const p = patient;
  const opt = { breakGlass };
  const subject = `patient=${encodeURIComponent(id)}`;
  const ids = (p.identifier || []).map((i) => h("li", {}, `${i.system === NHS_SYSTEM ? "NHS number" : i.system}: ${i.system === NHS_SYSTEM ? formatNhs(i.value) : i.value}`));
  const addr = (p.address || [])[0];
  const parts = [
    h("h1", {}, humanName(p)),
    breakGlass ? h("div", { class: "notice bad", role: "status", id: "broke-glass" }, h("strong", {}, "Break-glass access. "), `Reason recorded: ${breakGlass}`) : null,
    session.patient ? h("div", { class: "notice" }, "This is your record as held by your care system. It is read-only.") : null,
    h("section", { class: "card demographics", "aria-labelledby": "h-demo" },
      h("h2", { id: "h-demo" }, "Demographics"),
      h("dl", {},
        h("dt", {}, "NHS number"), h("dd", { id: "nhs-number" }, nhsOf(p) || "not recorded"),
        h("dt", {}, "Born"), h("dd", {}, date(p.birthDate) || "not recorded"),
        h("dt", {}, "Gender"), h("dd", {}, p.gender || "not recorded"),
        addr ? [h("dt", {}, "Address"), h("dd", {}, [...(addr.line || []), addr.city, addr.postalCode].filter(Boolean).join(", "))] : null,
        h("dt", {}, "Identifiers"), h("dd", {}, h("ul", {}, ids)))),
    // Safeguarding and other alerts first.
    (() => { const c = section("flags", "Flags and alerts", `Flag?${subject}&status=active`, (fs) => h("ul", {}, fs.map((f) => h("li", {}, h("strong", {}, codeText(f.code)), f.period && f.period.start ? ` since ${date(f.period.start)}` : ""))), { ...opt, emptyText: "No active flags." }); c.classList.add("flags"); return c; })(),
    h("div", { class: "row" },
      section("problems", "Problems", `Condition?${subject}&_count=50`, (cs) => table("Problems", ["Problem", "Status", "Since"],
        cs.map((c) => [codeText(c.code), codeText(c.clinicalStatus), date(c.onsetDateTime || c.recordedDate)])), opt),
      section("allergies", "Allergies", `AllergyIntolerance?${subject}&_count=50`, (as) => table("Allergies", ["Substance", "Reaction", "Criticality"],
        as.map((a) => [codeText(a.code), (a.reaction || []).map((r) => (r.manifestation || []).map(codeText).join(", ")).join("; "), a.criticality || ""])), { ...opt, emptyText: "No allergies recorded." })),
    section("medications", "Medications", `MedicationRequest?${subject}&_count=50`, (ms) => table("Medications", ["Medication", "Dosage", "Status", "Prescribed"],
      ms.map((m) => [codeText(m.medicationCodeableConcept) || (m.medicationReference && m.medicationReference.display) || "", (m.dosageInstruction || []).map((d) => d.text).filter(Boolean).join("; "), m.status || "", date(m.authoredOn)])), opt),
    section("results", "Recent results", `Observation?${subject}&_count=100`, (os) => {
      const sorted = [...os].sort((a, b) => String(b.effectiveDateTime || "").localeCompare(String(a.effectiveDateTime || "")));
      return h("div", {}, h("div", { class: "row" }, trendCharts(os)),
        table("Results", ["Test", "Value", "When"], sorted.slice(0, 30).map((o) => [codeText(o.code), obsValue(o), date(o.effectiveDateTime || o.issued)])));
    }, opt),
    section("reports", "Reports", `DiagnosticReport?${subject}&_count=20`, (rs) => table("Reports", ["Report", "Status", "Issued"],
      rs.map((r) => [codeText(r.code), r.status || "", date(r.issued || r.effectiveDateTime)])), opt),
    h("div", { class: "row" },
      section("encounters", "Encounters", `Encounter?${subject}&_count=20`, (es) => table("Encounters", ["Type", "Class", "When", "Status"],
        es.map((e) => [(e.type || []).map(codeText).join(", "), (e.class && (e.class.display || e.class.code)) || "", date(e.period && e.period.start), e.status || ""])), opt),
      section("episodes", "Episodes of care", `EpisodeOfCare?${subject}&_count=20`, (es) => table("Episodes", ["Type", "Status", "Since"],
        es.map((e) => [(e.type || []).map(codeText).join(", "), e.status || "", date(e.period && e.period.start)])), opt)),
    section("careplans", "Care plans", `CarePlan?${subject}&_count=20`, (cs) => table("Care plans", ["Plan", "Status", "Period"],
      cs.map((c) => [c.title || (c.category || []).map(codeText).join(", ") || c.description || "", c.status || "", date(c.period && c.period.start)])), opt),
    section("documents", "Documents", `DocumentReference?${subject}&_count=20`, (ds) => table("Documents", ["Document", "Date", "Download"],
      ds.map((d) => [d.description || codeText(d.type), date(d.date), h("span", {}, (d.content || []).map((c) => documentLink(c.attachment, breakGlass)))])), opt),
    section("access-log", session.patient ? "Who has looked at my record" : "Access log", `AuditEvent?${subject}&_count=50&_sort=-date`, (evs) => table("Access log", ["When", "Who", "Organisation", "What", "Break glass"],
      evs.map((e) => auditRow(e))), { ...opt, emptyText: "No access recorded yet." }),
  ];
  show(humanName(p), ...parts.filter(Boolean),
    session.patient ? null : h("button", { type: "button", class: "button secondary", onclick: () => go("home") }, "Find another patient"));
}

function auditRow(e) {
  const agents = e.agent || [];
  const user = agents.find((a) => a.requestor) || agents[0] || {};
  const orgAgent = agents.find((a) => !a.requestor && a.who && a.who.identifier && /ods-organization-code/.test(a.who.identifier.system || "")) || {};
  const ident = (a) => (a.who && (a.who.display || (a.who.identifier && a.who.identifier.value) || a.who.reference)) || a.altId || "";
  const role = (user.role || []).map((r) => codeText(r)).filter(Boolean).join(", ");
  const what = (e.entity || []).map((x) => x.what && x.what.reference).filter(Boolean)[0] || "";
  const interaction = ((e.subtype || [])[0] || {}).code || "";
  const purpose = e.purposeOfEvent || [];
  const bg = purpose.some((c) => (c.coding || []).some((x) => x.code === "BTG"));
  const reason = purpose.map((c) => c.text).filter(Boolean).join("; ");
  return [date(e.recorded), `${ident(user)}${role ? ` (${role})` : ""}`, ident(orgAgent), `${interaction} ${what}`.trim(),
    bg ? h("span", { class: "tag bad" }, `Break glass${reason ? `: ${reason}` : ""}`) : "No"];
}

function documentLink(att, breakGlass) {
  if (!att || !att.url) return h("span", { class: "muted" }, "no file");
  const btn = h("button", { type: "button", class: "link", onclick: async () => {
    // Fetch with the token, then hand the browser a blob: URL (no token or id in a link).
    const headers = { Authorization: `Bearer ${session.token}`, Accept: att.contentType || "*/*" };
    if (breakGlass) headers["X-Break-Glass-Reason"] = breakGlass;
    const url = att.url.startsWith("http") || att.url.startsWith("/") ? att.url : `/${session.careSystem}/fhir/${att.url}`;
    const res = await fetch(url, { headers, cache: "no-store" });
    if (!res.ok) { btn.textContent = `download failed (${res.status})`; return; }
    const blob = await res.blob();
    const a = h("a", { href: URL.createObjectURL(blob), download: att.title || "document" });
    document.body.append(a); a.click(); a.remove();
  } }, att.title || "Download");
  return btn;
}

// ---------- start ----------
document.getElementById("signout").addEventListener("click", () => {
  Object.assign(session, { token: null, careSystem: null, org: null, role: null, patient: null, scope: "" });
  patientCache = null;
  document.getElementById("who").textContent = "";
  document.getElementById("signout").hidden = true;
  history.replaceState({ view: "signin" }, "", "/app/");
  views.signin();
});
history.replaceState({ view: "signin" }, "", "/app/");
views.signin();
