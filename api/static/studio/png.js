// PNGs dropped on the page: images written by LMD carry their parameters in iTXt chunks named
// lmd:<field> (docs/studio.md); their prompt, settings and layout come back.
import { setLayout } from "./editor.js";
import { matchAspect } from "./form.js";
import { showAlert } from "./messages.js";
import { $ } from "./state.js";

async function pngParameters(file) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const decoder = new TextDecoder();
  const fields = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at), type = decoder.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    if (type === "iTXt" || type === "tEXt") {
      const zero = data.indexOf(0);
      const keyword = decoder.decode(data.subarray(0, zero));
      let text;
      if (type === "tEXt") text = new TextDecoder("latin1").decode(data.subarray(zero + 1));
      else if (data[zero + 1] === 0) {  // uncompressed iTXt: skip language tag and translated keyword
        let p = data.indexOf(0, zero + 3);
        p = data.indexOf(0, p + 1);
        text = decoder.decode(data.subarray(p + 1));
      }
      if (keyword.startsWith("lmd:") && text !== undefined) fields[keyword.slice(4)] = text;
    }
    if (type === "IEND") break;
    at += 12 + length;
  }
  return fields;
}

async function onDrop(e) {
  e.preventDefault();
  const file = e.dataTransfer && e.dataTransfer.files[0];
  if (!file) return;
  try {
    const p = await pngParameters(file);
    if (!p.layout) { showAlert(`${file.name} carries no LMD parameters.`); return; }
    $("prompt").value = p.prompt || "";
    for (const id of ["seed", "steps", "width", "height"]) if (p[id]) $(id).value = p[id];
    if (p.guidance_scale) $("guidance").value = p.guidance_scale;
    for (const id of ["preset", "variant"]) if (p[id] && [...$(id).options].some((o) => o.value === p[id])) $(id).value = p[id];
    matchAspect();
    setLayout(JSON.parse(p.layout), { keepHistory: true });
    showAlert(`Restored the settings and layout of ${file.name}.`, "info");
  } catch (err) { showAlert(`${file.name} could not be read: ${err.message}`); }
}

export function setupDrop() {
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", onDrop);
}
