// The Account page: sign in with a user name and password (the server sets an HttpOnly session cookie),
// sign out, the credits balance and the ledger (paged, newest first).
import { ApiError, api, clearErrors, showError } from "/static/api.js";

const signinPanel = document.getElementById("signin-panel");
const form = document.getElementById("password-signin");
const profile = document.getElementById("profile");
const ledgerPanel = document.getElementById("ledger-panel");
const ledger = document.getElementById("ledger");
const older = document.getElementById("older");
const status = document.getElementById("status");

let nextBefore = null;

async function load() {
  let me;
  try {
    me = await api("/api/v1/me");
  } catch (err) {
    if (err.status === 401) {
      signinPanel.hidden = false;
      status.textContent = "Not signed in.";
      form.elements.username.focus();
    } else {
      status.textContent = err.message;
    }
    return;
  }
  if (!me.user) {
    status.textContent = me.auth
      ? "Signed in as the local user."
      : "Auth is off on this server: you are the local user, and nothing is charged.";
    return;
  }
  profile.hidden = false;
  document.getElementById("profile-name").textContent = `${me.user} (${me.role})`;
  document.getElementById("balance").textContent = `${me.balance} credits`;
  ledgerPanel.hidden = false;
  await loadLedger();
}

async function loadLedger() {
  const params = new URLSearchParams({ limit: "25" });
  if (nextBefore !== null) params.set("before", String(nextBefore));
  try {
    const page = await api(`/api/v1/me/ledger?${params}`);
    for (const row of page.entries) ledger.append(ledgerRow(row));
    if (!ledger.children.length) {
      const empty = document.createElement("tr");
      const cell = document.createElement("td");
      cell.colSpan = 5;
      cell.textContent = "No entries yet.";
      empty.append(cell);
      ledger.append(empty);
    }
    nextBefore = page.next_before;
    older.hidden = nextBefore === null;
  } catch (err) {
    status.textContent = err.message;
  }
}

function ledgerRow(row) {
  const tr = document.createElement("tr");
  const when = new Date(row.created);
  const cells = [
    Number.isNaN(when.getTime()) ? row.created : when.toLocaleString(),
    row.delta > 0 ? `+${row.delta}` : String(row.delta),
    row.reason,
    row.job_id ? row.job_id.slice(0, 8) : "",
    row.note || "",
  ];
  cells.forEach((text, index) => {
    const td = document.createElement("td");
    td.textContent = text;
    if (index === 1) td.className = row.delta > 0 ? "credit" : "debit";
    if (index === 3 && row.job_id) td.title = row.job_id;
    tr.append(td);
  });
  return tr;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  clearErrors(form);
  const body = { username: form.elements.username.value.trim(), password: form.elements.password.value };
  if (!body.username || !body.password) {
    showError(form, new ApiError(400, "invalid", "enter your user name and password", null));
    return;
  }
  try {
    await api("/api/v1/session", { method: "POST", body });
  } catch (err) {
    showError(form, err);
    form.elements.password.value = "";
    return;
  }
  location.reload();
});

document.getElementById("signout").addEventListener("click", async () => {
  try {
    await fetch("/api/v1/session", { method: "DELETE", credentials: "same-origin" });
  } finally {
    // A token pasted in the header's box is a script-set cookie: forget it here too.
    document.cookie = "spellbook_token=; path=/; Max-Age=0; SameSite=Strict";
    location.reload();
  }
});

older.addEventListener("click", loadLedger);

load();
