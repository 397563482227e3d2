// Sign-in when the server requires auth: the token is kept as the `spellbook_token` cookie, which the API
// reads for fetch, <img> and EventSource alike.
import { api } from "/static/api.js";

const form = document.getElementById("signin");

async function whoAmI() {
  const who = document.getElementById("who");
  try {
    const me = await api("/api/v1/me");
    who.textContent = me.user ? `${me.user}${me.balance !== null ? ` · ${me.balance} credits` : ""}` : "";
  } catch (err) {
    who.textContent = err.status === 401 ? "not signed in" : err.message;
  }
}

if (form) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = form.elements.token.value.trim();
    const secure = location.protocol === "https:" ? "; Secure" : "";
    document.cookie = `spellbook_token=${encodeURIComponent(token)}; path=/; SameSite=Strict${secure}`;
    form.elements.token.value = "";
    location.reload();
  });
  whoAmI();
}
