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
  $("key-reason").textContent = reason || "This service needs an API key. It is kept in this browser only.";
  $("key-input").value = state.key;
  $("key-button").hidden = false;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// onSaved: what to do once a key is there (read the gallery, restore the address).
export function setupKeyDialog(onSaved) {
  $("key-button").addEventListener("click", () => askKey());
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue !== "save") return;
    state.key = $("key-input").value.trim();
    if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
    else localStorage.removeItem(KEY_STORAGE);
    state.blobs.clear();
    showAlert("API key saved in this browser.", "info");
    onSaved();
  });
}
