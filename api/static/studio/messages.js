// What the page says: the alert line, errors at their fields, the API key dialog.
import { $, KEY_STORAGE, state } from "./state.js";

export function showAlert(text, kind = "error") {
  const el = $("alert");
  el.textContent = text;
  el.className = kind === "info" ? "info" : "";
  el.hidden = !text;
}

export function clearFieldErrors() {
  document.querySelectorAll(".field-error").forEach((el) => { el.textContent = ""; });
  document.querySelectorAll("[aria-invalid=true]").forEach((el) => el.removeAttribute("aria-invalid"));
}

// A 422's field names as the form's element ids (negative_prompt -> negative-prompt).
const FIELD_IDS = { negative_prompt: "negative-prompt", guidance_scale: "guidance" };

export function showError(err) {
  if (err && err.name === "AbortError") return;
  if (err && err.status === 422 && Array.isArray(err.detail)) {
    for (const d of err.detail) {
      const field = Array.isArray(d.loc) ? d.loc[1] : null;
      const id = FIELD_IDS[field] || field;
      const slot = id && $(`err-${id}`);
      if (slot) {
        slot.textContent = d.msg;
        const input = $(id);
        if (input) input.setAttribute("aria-invalid", "true");
      }
    }
  }
  showAlert(err instanceof Error ? err.message : String(err));
}

export function askKey(reason) {
  $("key-reason").textContent = reason || "This service needs an API key. This tab keeps it until it is closed.";
  $("key-input").value = state.key;
  $("key-remember").checked = !!localStorage.getItem(KEY_STORAGE);
  $("key-button").hidden = false;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// onSaved: what to do once a key is there (read the gallery, restore the address).
export function setupKeyDialog(onSaved) {
  $("key-button").addEventListener("click", () => askKey());
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue !== "save") return;
    state.key = $("key-input").value.trim();
    const remember = $("key-remember").checked;
    keepKey(state.key, remember);
    state.blobs.clear();
    showAlert(remember ? "API key saved; this device remembers it." : "API key saved for this tab only.", "info");
    onSaved();
  });
}

// One place holds the key: localStorage when asked to remember it on this device, else this
// tab's sessionStorage. Unticking the box forgets a remembered key; an empty key clears both.
function keepKey(key, remember) {
  sessionStorage.removeItem(KEY_STORAGE);
  localStorage.removeItem(KEY_STORAGE);
  if (key) (remember ? localStorage : sessionStorage).setItem(KEY_STORAGE, key);
}
