// The demo page: the <microturn-widget> in same-origin mode (it mints its own session), plus a log of its events.
const widget = document.getElementById("widget");
const log = document.getElementById("events");
const lines = [];

function show(text) {
  lines.push(`${new Date().toLocaleTimeString()}  ${text}`);
  if (lines.length > 12) lines.shift();
  log.textContent = lines.join("\n");
}

widget.addEventListener("microturn-state", (e) => show(`state ${e.detail.previous} → ${e.detail.state}`));
widget.addEventListener("microturn-session", (e) => show(`session ${e.detail.sessionId}`));
widget.addEventListener("microturn-task", (e) => show(`task ${e.detail.name} ${JSON.stringify(e.detail.data)}`));
widget.addEventListener("microturn-error", (e) => show(`error ${e.detail.code}: ${e.detail.message}`));
widget.addEventListener("microturn-stats", (e) => {
  const s = e.detail;
  show(`stats ${s.quality}, round trip ${s.rttMs ?? "?"} ms, expected reply latency ~${s.latencyMs ?? "?"} ms, `
    + `loss ${(100 * s.packetLoss).toFixed(1)} %`);
});
