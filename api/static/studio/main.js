// The LMD studio: a page on top of the public HTTP API only (docs/service.md, docs/studio.md), no
// build step: ES modules the browser loads as they are.
//   state.js     the page's state and the buttons that follow it
//   api.js       the API client (key in a header, server-sent events read with fetch, polling)
//   messages.js  the alert line, errors at their fields, the API key dialog
//   form.js      the prompt form: limits, what the render workers can run, a request's settings
//   editor.js    the layout editor
//   render.js    plan, generate, render, refine; progress, previews and the result
//   turns.js     the session's turns and compare
//   gallery.js   the key's sessions
//   address.js   the page's address (?session=&turn=): reload, back/forward, shared links
//   png.js       PNGs dropped on the page
import { restoreAddress, setupAddress } from "./address.js";
import { renderEditor, setupEditor } from "./editor.js";
import { loadLimits, setupForm } from "./form.js";
import { refreshGallery, setupGallery } from "./gallery.js";
import { setupKeyDialog } from "./messages.js";
import { setupDrop } from "./png.js";
import { setupRender } from "./render.js";
import { setupTurns } from "./turns.js";
import { state } from "./state.js";

// What needs the key: the gallery and the session the address names.
function openWhereTheAddressIs() {
  refreshGallery();
  restoreAddress();
}

async function setup() {
  setupForm();
  setupEditor();
  setupRender();
  setupTurns();
  setupGallery();
  setupAddress();
  setupDrop();
  setupKeyDialog(openWhereTheAddressIs);
  renderEditor();
  await loadLimits();
  if (!state.limits.auth || state.key) openWhereTheAddressIs();
  document.body.dataset.ready = "true";
}

setup();
