// The JSON API, as the page calls it. Relative URLs, so the console also works when the
// service sits under a path prefix. When the service asks for a read token (401), the
// sign-in dialog opens once; the server then sets a session cookie, and every waiting
// call is retried.
import { byId } from "./dom.js";

let signingIn = null;

export class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

export async function getJSON(path, params = {}) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(name, value);
  }
  const url = query.size ? `${path}?${query}` : path;
  for (;;) {
    const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.status === 401) {
      await signIn();
      continue;
    }
    if (!response.ok) throw new ApiError(response.status, await detail(response));
    return response.json();
  }
}

async function detail(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch {
    return response.statusText;
  }
}

// One dialog for every call that met a 401; resolves once a token was accepted.
function signIn() {
  if (!signingIn) {
    signingIn = new Promise((resolve) => {
      const dialog = byId("sign-in");
      const form = byId("sign-in-form");
      const error = byId("sign-in-error");
      const onSubmit = async (event) => {
        event.preventDefault();
        const token = byId("sign-in-token").value;
        const response = await fetch("session", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          credentials: "same-origin",
          body: JSON.stringify({ token }),
        });
        if (response.ok) {
          form.removeEventListener("submit", onSubmit);
          form.reset();
          error.hidden = true;
          dialog.close();
          byId("sign-out").hidden = false;
          signingIn = null;
          resolve();
        } else {
          error.textContent = response.status === 401 ? "That token is not accepted." : `Sign-in failed (${response.status}).`;
          error.hidden = false;
        }
      };
      form.addEventListener("submit", onSubmit);
      // The dialog cannot be dismissed: nothing here works without a token.
      dialog.addEventListener("cancel", (event) => event.preventDefault());
      dialog.showModal();
      byId("sign-in-token").focus();
    });
  }
  return signingIn;
}

export async function signOut() {
  await fetch("session", { method: "DELETE", credentials: "same-origin" });
  window.location.reload();
}

// Whether this browser holds a session (so that "Sign out" shows after a reload).
export async function sessionState() {
  const response = await fetch("session", { headers: { Accept: "application/json" }, credentials: "same-origin" });
  return response.ok ? response.json() : { required: false, signed_in: false };
}

export async function ready() {
  try {
    const response = await fetch("health/ready", { credentials: "same-origin" });
    return response.ok;
  } catch {
    return false;
  }
}
