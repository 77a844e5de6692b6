// PNGs dropped on the page: images written by LMD carry their parameters in iTXt chunks named
// lmd:<field> (docs/studio.md); their prompt, settings and layout come back.
import { setLayout } from "./editor.js";
import { matchAspect } from "./form.js";
import { showAlert } from "./messages.js";
import { $ } from "./state.js";

// --- PNG text bounds: the rules of grounded_sd/image_parameters.py read_text_chunks (lmd info) ---
// Only uncompressed tEXt/iTXt chunks named lmd:*, each <= 256 KiB, all <= 1 MiB, in <= 10,000
// chunks; JSON nested <= 16 deep; pixels never decoded. The page reads files up to 64 MiB whole.
const PNG_LIMITS = { file: 64 * 1024 * 1024, chunk: 256 * 1024, total: 1024 * 1024, chunks: 10000, depth: 16 };

async function pngParameters(file) {
  if (file.size > PNG_LIMITS.file) throw new Error("it is larger than any PNG LMD writes (64 MiB)");
  const bytes = new Uint8Array(await file.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const decoder = new TextDecoder();
  if (bytes.length < 8 || bytes[1] !== 0x50 || bytes[2] !== 0x4e || bytes[3] !== 0x47) throw new Error("not a PNG file");
  const fields = {};
  let total = 0;
  for (let at = 8, n = 0; ; n++) {
    if (n >= PNG_LIMITS.chunks) throw new Error(`it has more than ${PNG_LIMITS.chunks} chunks`);
    if (at + 8 > bytes.length) throw new Error("the PNG is cut short");
    const length = view.getUint32(at), type = decoder.decode(bytes.subarray(at + 4, at + 8));
    if (type === "IEND") break;
    const data = bytes.subarray(at + 8, at + 8 + length);
    const zero = data.indexOf(0);
    const keyword = decoder.decode(data.subarray(0, zero < 0 ? Math.min(80, data.length) : zero));
    if ((type === "iTXt" || type === "tEXt") && keyword.startsWith("lmd:")) {
      total += length;
      if (length > PNG_LIMITS.chunk || total > PNG_LIMITS.total) throw new Error("a text chunk is larger than LMD ever writes");
      if (data.length < length) throw new Error("the PNG is cut short");
      let text;
      if (type === "tEXt") text = new TextDecoder("latin1").decode(data.subarray(zero + 1));
      else if (data[zero + 1] === 0) {  // uncompressed iTXt: skip language tag and translated keyword
        let p = data.indexOf(0, zero + 3);
        p = data.indexOf(0, p + 1);
        text = decoder.decode(data.subarray(p + 1));
      }
      if (text !== undefined) fields[keyword.slice(4)] = text;
    }
    at += 12 + length;
  }
  if (fields.layout && jsonDepth(fields.layout) > PNG_LIMITS.depth) throw new Error("its layout is nested too deeply");
  return fields;
}

function jsonDepth(text) {
  let depth = 0, deepest = 0, inString = false, escaped = false;
  for (const c of text) {
    if (inString) { if (escaped) escaped = false; else if (c === "\\") escaped = true; else if (c === '"') inString = false; }
    else if (c === '"') inString = true;
    else if (c === "[" || c === "{") deepest = Math.max(deepest, ++depth);
    else if (c === "]" || c === "}") depth--;
  }
  return deepest;
}
// --- end of PNG text bounds ---

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
