// The prompt form: the limits and defaults (GET /limits), what this deployment can run, the settings of a request.
import { getJSON } from "./api.js";
import { askKey, showAlert } from "./messages.js";
import { $, sleep, state } from "./state.js";

const ASPECTS = { "1:1": 1, "4:3": 4 / 3, "3:4": 3 / 4, "3:2": 3 / 2, "2:3": 2 / 3, "16:9": 16 / 9, "9:16": 9 / 16 };

export async function loadLimits() {
  for (;;) {
    try {
      state.limits = await getJSON("/limits");
      break;
    } catch (err) {
      showAlert(`${err.message} Retrying…`);
      await sleep(2000);
    }
  }
  const L = state.limits;
  showAlert("");
  $("prompt").maxLength = L.max_prompt_chars;
  $("hint-prompt").textContent = `Up to ${L.max_prompt_chars} characters. Ctrl+Enter: Generate.`;
  for (const id of ["width", "height"]) Object.assign($(id), { min: L.min_size, max: L.max_size, step: L.size_multiple });
  $("hint-size").textContent = `Width and height: ${L.min_size}–${L.max_size} px, multiples of ${L.size_multiple}.`;
  $("seed").max = L.max_seed;
  $("hint-seed").textContent = `0–${L.max_seed}; empty: the session's seed (a new session draws one).`;
  $("steps").max = L.max_steps;
  $("steps").value = L.default_steps;
  $("hint-steps").textContent = `1–${L.max_steps}; the reference uses ${L.default_steps}.`;
  Object.assign($("guidance"), { max: L.max_guidance_scale, placeholder: String(L.default_guidance_scale) });
  $("hint-guidance").textContent = `Classifier-free guidance, 0–${L.max_guidance_scale}; empty: ${L.default_guidance_scale}.`;
  $("instruction").maxLength = L.max_instruction_chars;
  offerCapabilities(L);
  $("key-button").hidden = !L.auth;
  if (L.auth && !state.key) askKey();
}

// Offer only what the live render workers can run; name the model and the scheduler.
// With several models (LMD_MODELS) the model select chooses, and the rest follows that model's workers.
function offerCapabilities(L) {
  const options = (id, values, chosen) => {
    const pick = values.includes(chosen) ? chosen : values[0];
    $(id).replaceChildren(...values.map((v) => new Option(v, v, v === pick, v === pick)));
  };
  const models = L.models || [];
  $("model-wrap").hidden = models.length < 2;
  if (models.length > 1 && !models.includes($("model").value)) options("model", models, L.model);
  const chosen = models.length > 1 ? $("model").value : null;
  const R = chosen ? (L.render_by_model || {})[chosen] || null : L.render;
  options("preset", L.presets, L.preset);
  options("variant", R ? R.variants : L.variants, L.variant);
  const conditionings = R ? [...R.conditionings] : [];
  if (!conditionings.includes(L.conditioning)) conditionings.unshift(L.conditioning);  // the default (a trained connector too)
  options("conditioning", conditionings, L.conditioning);
  $("refine-wrap").hidden = !(R && R.refiner);
  const info = $("model-info");
  info.classList.toggle("warning", !R);
  if (R) {
    info.textContent = `Renders with ${R.model} (scheduler ${R.scheduler}, set by the service).`;
    $("hint-variant").textContent = R.variants.includes("lmd_plus") ? "lmd; sd = plain SD baseline; lmd_plus = with GLIGEN"
      : "lmd; sd = plain SD baseline (lmd_plus needs a GLIGEN model, which this service has not)";
  } else if (chosen && L.render_workers) {
    info.textContent = `No render worker serves model ${chosen}: its renders wait until one starts (lmd worker --queues render.${chosen}).`;
  } else if (L.render_workers === 0) {
    info.textContent = "No render worker is running: renders wait in the queue until one starts (lmd worker --queues render).";
  } else if (L.render_workers === null) {
    info.textContent = "What the render workers can run is unknown right now (the service's store did not answer).";
  } else {
    info.textContent = "The render workers do not say what they can run (an older version): every variant is offered.";
  }
}

const numberField = (id) => {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
};

// The render settings of a request, as the form holds them (unset fields left to the service).
export function renderSettings() {
  const body = {
    width: numberField("width"), height: numberField("height"), steps: numberField("steps"),
    preset: $("preset").value || null, variant: $("variant").value || null,
  };
  for (const [field, id] of [["seed", "seed"], ["guidance_scale", "guidance"]]) {
    const value = numberField(id);
    if (value !== null) body[field] = value;
  }
  const negative = $("negative-prompt").value.trim();
  if (negative) body.negative_prompt = negative;
  const conditioning = $("conditioning").value;
  if (conditioning && state.limits && conditioning !== state.limits.conditioning) body.conditioning = conditioning;
  if (!$("refine-wrap").hidden) body.refine = $("refine").checked;
  if (!$("model-wrap").hidden && $("model").value) body.model = $("model").value;
  return body;
}

// The form shows a job's settings (a turn opened from the address, the gallery or the timeline).
export function showSettings(view) {
  for (const [id, value] of [["width", view.width], ["height", view.height], ["seed", view.seed], ["steps", view.steps],
    ["guidance", view.guidance_scale], ["negative-prompt", view.negative_prompt]]) $(id).value = value ?? "";
  for (const [id, value] of [["model", view.model], ["preset", view.preset], ["variant", view.variant], ["conditioning", view.conditioning]]) {
    if ([...$(id).options].some((o) => o.value === value)) $(id).value = value;
  }
  matchAspect();
}

export function size() {
  const w = numberField("width"), h = numberField("height");
  return { w: w > 0 ? w : 512, h: h > 0 ? h : 512 };
}

// An aspect preset keeps the longer side and sets the other, on the size grid and within the limits.
function applyAspect() {
  const chosen = $("aspect").value;
  const ratio = ASPECTS[chosen];
  if (!ratio) return;
  const L = state.limits || { min_size: 64, max_size: 1024, size_multiple: 8 };
  const { w, h } = size();
  const long = Math.max(w, h);
  const snap = (v) => Math.min(L.max_size, Math.max(L.min_size, Math.round(v / L.size_multiple) * L.size_multiple));
  $("width").value = snap(ratio >= 1 ? long : long * ratio);
  $("height").value = snap(ratio >= 1 ? long / ratio : long);
  $("width").dispatchEvent(new Event("input"));  // the editor follows the new size
  $("aspect").value = chosen;  // the preset asked for, even where the 8 px grid rounds it (64×40 for 16:9)
}

export function matchAspect() {
  const { w, h } = size();
  const name = Object.keys(ASPECTS).find((k) => Math.abs(ASPECTS[k] - w / h) < 0.02);
  $("aspect").value = name || "custom";
}

export function setupForm() {
  $("model").addEventListener("change", () => state.limits && offerCapabilities(state.limits));
  $("aspect").replaceChildren(...Object.keys(ASPECTS).map((k) => new Option(k, k)), new Option("custom", "custom"));
  $("aspect").addEventListener("change", applyAspect);
  for (const id of ["width", "height"]) $(id).addEventListener("input", matchAspect);
  matchAspect();
  $("dice").addEventListener("click", () => {
    const max = state.limits ? state.limits.max_seed : 2 ** 32 - 1;
    $("seed").value = String(Math.floor(Math.random() * (max + 1)));
  });
}
