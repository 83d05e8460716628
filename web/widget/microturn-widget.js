/**
 * <microturn-widget> — talk to a microturn gateway from any web page.
 *
 * A dependency-free ES module (no build step). Embed it with two lines:
 *
 *   <script type="module" src="https://gateway.example/widget/microturn-widget.js"></script>
 *   <microturn-widget token-url="/api/microturn-token"></microturn-widget>
 *
 * Attributes
 *   server       the gateway's base URL; default: the origin this script was loaded from
 *   token-url    an endpoint of *your* backend that POSTs to the gateway's /v1/sessions server-side and returns
 *                its JSON ({session_id, token, offer_url, ice_servers, ...}); without it the widget calls
 *                {server}/v1/sessions itself (same-origin / development mode)
 *   camera       "on": camera on when connecting; "off" (default): off, can be turned on; "none": no camera
 *   autoconnect  connect as soon as the element is on the page (opt-in; by default nothing starts without a click)
 *   reconnect    how many times to reconnect after the connection drops (default 3; 0 turns it off); each try
 *                first resumes the same session (POST {server}/v1/sessions/{id}/resume with the resume token) and
 *                only starts a new session when the gateway says it cannot be resumed (401/403/404)
 *
 * State (the `state` property, reflected to the `state` attribute of the element):
 *   idle → connecting → listening ⇄ muted → (reconnecting → listening) → idle;  any → error (press Connect again)
 *
 * Events (CustomEvent, bubbling, composed; the payload is `event.detail`):
 *   microturn-state    {state, previous}                 every state change
 *   microturn-session  {sessionId, server, resumed}      a session is connected (again, after a reconnect)
 *   microturn-resume   {sessionId, server, lastTurn}     the same session is back after a lost connection
 *   microturn-caption  {turn, text}                      what the model said in micro-turn `turn`
 *   microturn-task     {turn, name, data}                something the model did (e.g. a background task)
 *   microturn-error    {code, message, fatal}            `message` is plain words, fit to show to a person
 *   microturn-stats    {rttMs, latencyMs, jitterMs, packetLoss, quality, microTurnMs, bytesSent}  every 2 s
 *
 * Privacy: mute sets the microphone track's `enabled` to false at once (the browser then sends digital silence,
 * never the microphone's sound); camera off removes the camera track from the connection and stops the camera.
 */

const TAG = "microturn-widget";
const SCRIPT_ORIGIN = new URL(import.meta.url).origin;
const STATS_EVERY_MS = 2000;
const ICE_GATHER_MAX_MS = 2500;
const DISCONNECTED_GRACE_MS = 4000;
const MAX_CAPTIONS = 50;

/** Plain-words messages for every error the widget reports (code → message). */
export const ERROR_MESSAGES = Object.freeze({
  permission_denied: "Microphone access is blocked. Allow the microphone for this site in your browser, then press Connect.",
  no_microphone: "No microphone was found. Plug one in, then press Connect.",
  microphone_busy: "Your microphone is being used by another app. Close that app, then press Connect.",
  camera_unavailable: "The camera could not be started, so the call goes on with sound only.",
  server_unreachable: "Can't reach the voice service. Check your internet connection, then press Connect.",
  session_expired: "Your session has expired. Press Connect to start a new one.",
  not_allowed: "This website is not allowed to use the voice service.",
  server_busy: "The voice service is busy right now. Please try again in a minute.",
  token_failed: "This website could not start a voice session. Please try again later.",
  connection_failed: "The call could not be set up. A firewall or VPN may be blocking it.",
  connection_lost: "The connection was lost and could not be restored. Press Connect to try again.",
  unsupported: "This browser can't make voice calls here (it needs WebRTC and a secure https:// page).",
  server_error: "The voice service had a problem. Please try again.",
  not_connected: "Connect first, then send your message.",
});

/** An error with a stable `code`, a plain-words `message`, and whether it ended the session (`fatal`). */
export class MicroturnError extends Error {
  constructor(code, { fatal = true, detail = "" } = {}) {
    super(ERROR_MESSAGES[code] || ERROR_MESSAGES.server_error);
    this.name = "MicroturnError";
    this.code = code in ERROR_MESSAGES ? code : "server_error";
    this.fatal = fatal;
    this.detail = detail; // technical detail for logs; never shown in the widget
  }
}

/** getUserMedia failures → MicroturnError. */
function mediaError(err) {
  const name = err && err.name;
  if (name === "NotAllowedError" || name === "SecurityError") return new MicroturnError("permission_denied");
  if (name === "NotFoundError" || name === "OverconstrainedError") return new MicroturnError("no_microphone");
  if (name === "NotReadableError" || name === "AbortError") return new MicroturnError("microphone_busy");
  return new MicroturnError("unsupported", { detail: String(err) });
}

/** A fetch to the gateway or the token endpoint; failures → MicroturnError. */
async function requestJson(url, init, { tokenEndpoint = false } = {}) {
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    // a network error, or a cross-origin answer without CORS headers (an origin the gateway refuses)
    throw new MicroturnError(tokenEndpoint ? "token_failed" : "server_unreachable", { detail: String(err) });
  }
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = {};
  }
  if (response.ok) return body;
  const code = (body.error && body.error.code) || "";
  const detail = `${response.status} ${code} ${(body.error && body.error.message) || ""}`.trim();
  if (tokenEndpoint) throw new MicroturnError("token_failed", { detail });
  if (code === "origin_not_allowed" || code === "api_key_invalid") throw new MicroturnError("not_allowed", { detail });
  if (code === "token_invalid" || code === "unknown_session" || code === "resume_refused" || response.status === 401) {
    throw new MicroturnError("session_expired", { detail });
  }
  if (response.status === 503) throw new MicroturnError("server_busy", { detail });
  throw new MicroturnError("server_error", { detail });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const STYLE = `
:host { --microturn-accent: #2f5bea; --microturn-bg: #ffffff; --microturn-fg: #1b1b1f; --microturn-muted: #6b6b76;
  --microturn-danger: #b3261e; --microturn-live: #c62828; --microturn-ok: #0a7d32; --microturn-radius: 12px;
  --microturn-font: system-ui, -apple-system, "Segoe UI", sans-serif; --microturn-caption-bg: #f4f4f7;
  display: block; max-width: 28rem; font-family: var(--microturn-font); color: var(--microturn-fg); }
:host([hidden]) { display: none; }
.panel { background: var(--microturn-bg); border: 1px solid color-mix(in srgb, var(--microturn-fg) 15%, transparent);
  border-radius: var(--microturn-radius); padding: .9rem; display: grid; gap: .7rem; }
.status { display: flex; align-items: center; gap: .5rem; flex-wrap: wrap; font-size: .95rem; }
.dot { width: .75rem; height: .75rem; border-radius: 50%; background: var(--microturn-muted); flex: none; }
:host([state="listening"]) .mic .dot { background: var(--microturn-live); animation: pulse 1.4s ease-in-out infinite; }
:host([state="connecting"]) .mic .dot, :host([state="reconnecting"]) .mic .dot { background: var(--microturn-accent); }
:host([state="error"]) .mic .dot { background: var(--microturn-danger); }
@keyframes pulse { 50% { opacity: .35; } }
@media (prefers-reduced-motion: reduce) { :host([state="listening"]) .mic .dot { animation: none; } }
.indicator { display: inline-flex; align-items: center; gap: .35rem; font-weight: 600; }
.camera { color: var(--microturn-live); }
.camera .dot { background: currentColor; }
.quality { margin-left: auto; color: var(--microturn-muted); font-size: .85rem; }
.buttons { display: flex; gap: .5rem; flex-wrap: wrap; }
button { font: inherit; border-radius: calc(var(--microturn-radius) / 1.5); padding: .45rem .9rem; cursor: pointer;
  border: 1px solid var(--microturn-accent); background: transparent; color: var(--microturn-accent); }
button.primary { background: var(--microturn-accent); color: #fff; }
button[aria-pressed="true"] { background: var(--microturn-fg); border-color: var(--microturn-fg); color: var(--microturn-bg); }
button:disabled { opacity: .45; cursor: not-allowed; }
button:focus-visible, input:focus-visible { outline: 3px solid var(--microturn-accent); outline-offset: 2px; }
.error { margin: 0; color: var(--microturn-danger); font-weight: 600; }
.captions { min-height: 4.5rem; max-height: 12rem; overflow-y: auto; background: var(--microturn-caption-bg);
  border-radius: calc(var(--microturn-radius) / 1.5); padding: .5rem .6rem; font-size: .95rem; line-height: 1.35; }
.captions:empty::before { content: attr(data-placeholder); color: var(--microturn-muted); }
.own { color: var(--microturn-muted); }
form { display: flex; gap: .5rem; }
input { flex: 1; font: inherit; padding: .45rem .6rem; border-radius: calc(var(--microturn-radius) / 1.5);
  border: 1px solid color-mix(in srgb, var(--microturn-fg) 25%, transparent); background: var(--microturn-bg); color: inherit; }
video { width: 8rem; border-radius: calc(var(--microturn-radius) / 1.5); background: #000; }
[hidden] { display: none !important; }
`;

const TEMPLATE = `
<div class="panel" part="panel">
  <div class="status" part="status">
    <span class="indicator mic" part="indicator mic-indicator"><span class="dot"></span><span class="state-text"></span></span>
    <span class="indicator camera" part="indicator camera-indicator" hidden><span class="dot"></span>Camera on</span>
    <span class="quality" part="quality"></span>
  </div>
  <video class="preview" part="preview" muted playsinline autoplay hidden aria-label="Your camera, as sent"></video>
  <div class="buttons">
    <button type="button" class="connect primary" part="button connect-button">Connect</button>
    <button type="button" class="mute" part="button mute-button" aria-pressed="false">Mute</button>
    <button type="button" class="camera-toggle" part="button camera-button" aria-pressed="false">Camera</button>
  </div>
  <p class="error" part="error" role="alert" hidden></p>
  <div class="captions" part="captions" role="log" aria-live="polite" aria-label="Captions" tabindex="0"
       data-placeholder="Captions appear here."></div>
  <form part="text-form">
    <input part="text-input" aria-label="Message to the assistant" placeholder="Type a message…" maxlength="2000" autocomplete="off">
    <button type="submit" part="button send-button">Send</button>
  </form>
  <audio class="remote" autoplay hidden></audio>
</div>`;

const STATE_TEXT = {
  idle: "Not connected",
  connecting: "Connecting…",
  listening: "Listening",
  muted: "Muted — nothing is sent",
  reconnecting: "Reconnecting…",
  error: "Not connected",
};

/** The <microturn-widget> element. Its public methods and properties are the programmatic API. */
export class MicroturnWidget extends HTMLElement {
  /**
   * Optional: `async () => sessionJson` to mint a session yourself (e.g. with your own auth headers); it
   * replaces `token-url`.
   */
  tokenProvider = null;
  /**
   * Optional: `async ({sessionId, token, resumeToken, server}) => boolean`, tried before the built-in resume
   * after a lost connection; return true when you brought the session back yourself.
   */
  resumeHandler = null;
  /** Microphone constraints passed to getUserMedia. */
  audioConstraints = { echoCancellation: true, noiseSuppression: false, autoGainControl: false };
  /** Camera constraints passed to getUserMedia. */
  videoConstraints = { width: 320, height: 240, frameRate: 10 };

  #state = "idle";
  #muted = false;
  #cameraWanted = false;
  #mic = null; // MediaStreamTrack (audio)
  #camera = null; // MediaStreamTrack (video) while the camera is on
  #pc = null;
  #channel = null;
  #audioSender = null;
  #videoSender = null;
  #session = null; // {sessionId, token, resumeToken, server, microTurnMs}
  #lastTurn = -1; // the largest `turn` of any caption or event received in this session
  #seen = new Set(); // recent "type|turn|text" keys: a resume may replay what already arrived
  #resuming = false;
  #userStopped = true;
  #timers = new Set();
  #pings = new Map();
  #pingId = 0;
  #rttMs = null;
  #statsTimer = null;
  #ui = {};
  #onPageHide = () => this.#deleteSession(true);

  constructor() {
    super();
    const root = this.attachShadow({ mode: "open" });
    // A constructed style sheet is not an inline style, so a strict CSP style-src needs no 'unsafe-inline'.
    if ("adoptedStyleSheets" in root) {
      const sheet = new CSSStyleSheet();
      sheet.replaceSync(STYLE);
      root.adoptedStyleSheets = [sheet];
      root.innerHTML = TEMPLATE;
    } else {
      root.innerHTML = `<style>${STYLE}</style>${TEMPLATE}`;
    }
    const q = (selector) => root.querySelector(selector);
    this.#ui = {
      stateText: q(".state-text"), cameraBadge: q(".camera"), quality: q(".quality"), preview: q(".preview"),
      connect: q(".connect"), mute: q(".mute"), camera: q(".camera-toggle"), error: q(".error"),
      captions: q(".captions"), form: q("form"), input: q("input"), send: q("form button"), audio: q(".remote"),
    };
    this.#ui.connect.addEventListener("click", () => (this.connected || this.#busy ? this.disconnect() : this.connect()));
    this.#ui.mute.addEventListener("click", () => this.mute(!this.#muted));
    this.#ui.camera.addEventListener("click", () => this.setCamera(!this.#cameraWanted));
    this.#ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (this.sendText(this.#ui.input.value)) this.#ui.input.value = "";
    });
  }

  connectedCallback() {
    this.#cameraWanted = this.getAttribute("camera") === "on";
    this.#render();
    window.addEventListener("pagehide", this.#onPageHide);
    if (this.hasAttribute("autoconnect")) this.connect();
  }

  disconnectedCallback() {
    window.removeEventListener("pagehide", this.#onPageHide);
    if (this.#state !== "idle") this.disconnect();
  }

  // -- public API ---------------------------------------------------------------------------------------------

  /** "idle" | "connecting" | "listening" | "muted" | "reconnecting" | "error" */
  get state() { return this.#state; }
  /** True while a session is up (listening or muted). */
  get connected() { return this.#state === "listening" || this.#state === "muted"; }
  get muted() { return this.#muted; }
  get cameraOn() { return this.#camera !== null && this.#camera.readyState === "live"; }
  /** The current session ({sessionId, token, server, microTurnMs}), or null. */
  get session() {
    if (!this.#session) return null;
    const { resumeToken, ...session } = this.#session; // the resume token is a secret the page need not see
    return session;
  }
  /** The audio coming back from the model (a MediaStream), or null. */
  get remoteStream() { return this.#ui.audio.srcObject || null; }
  /** The gateway's base URL this widget talks to. */
  get server() { return (this.getAttribute("server") || SCRIPT_ORIGIN).replace(/\/+$/, ""); }

  /** Ask for the microphone (and camera), mint a session and connect. Resolves when connected or failed. */
  async connect() {
    if (this.connected || this.#busy) return;
    this.#userStopped = false;
    this.#showError(null);
    this.#setState("connecting");
    try {
      if (!window.RTCPeerConnection || !navigator.mediaDevices) throw new MicroturnError("unsupported");
      await this.#openMic();
      if (this.#cameraWanted) await this.#openCamera();
      await this.#startSession();
    } catch (err) {
      this.#fail(err);
    }
  }

  /** End the session: the gateway is told at once, the microphone and camera are released. */
  async disconnect() {
    this.#userStopped = true;
    const deleting = this.#deleteSession(false);
    this.#teardownPeer();
    this.#releaseMedia();
    this.#setState("idle");
    await deleting;
  }

  /** Mute (true) or unmute (false) the microphone; takes effect at the track immediately. */
  mute(muted = true) {
    this.#muted = Boolean(muted);
    if (this.#mic) this.#mic.enabled = !this.#muted;
    this.#control(this.#muted ? "mute" : "unmute");
    if (this.connected) this.#setState(this.#muted ? "muted" : "listening");
    this.#render();
  }

  /** Turn the camera on or off; off stops the camera and sends no more video frames at once. */
  async setCamera(on) {
    if (this.getAttribute("camera") === "none") return;
    this.#cameraWanted = Boolean(on);
    if (!this.#cameraWanted) {
      if (this.#videoSender) await this.#videoSender.replaceTrack(null);
      this.#stopCamera();
      this.#control("camera_off");
    } else if (this.#state !== "idle" && this.#state !== "error") {
      await this.#openCamera();
      if (this.#videoSender && this.#camera) await this.#videoSender.replaceTrack(this.#camera);
      if (this.#camera) this.#control("camera_on");
    }
    this.#render();
  }

  /** Send typed text to the model; returns false (and reports `not_connected`) when there is no session. */
  sendText(text) {
    const clean = String(text || "").trim();
    if (!clean) return false;
    if (!this.#channel || this.#channel.readyState !== "open") {
      this.#emitError(new MicroturnError("not_connected", { fatal: false }));
      return false;
    }
    this.#channel.send(JSON.stringify({ type: "text", text: clean.slice(0, 2000) }));
    this.#addCaption(`You: ${clean}`, true);
    return true;
  }

  // -- media --------------------------------------------------------------------------------------------------

  get #busy() { return this.#state === "connecting" || this.#state === "reconnecting"; }

  async #openMic() {
    if (this.#mic && this.#mic.readyState === "live") return;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: this.audioConstraints, video: false });
    } catch (err) {
      throw mediaError(err);
    }
    this.#mic = stream.getAudioTracks()[0];
    this.#mic.enabled = !this.#muted;
    this.#mic.addEventListener("ended", () => !this.#userStopped && this.#fail(new MicroturnError("no_microphone")));
  }

  async #openCamera() {
    if (this.#camera && this.#camera.readyState === "live") return;
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ video: this.videoConstraints, audio: false });
      this.#camera = stream.getVideoTracks()[0];
      this.#ui.preview.srcObject = stream;
    } catch (err) {
      this.#cameraWanted = false;
      this.#emitError(new MicroturnError("camera_unavailable", { fatal: false, detail: String(err) }));
    }
  }

  #stopCamera() {
    if (this.#camera) this.#camera.stop();
    this.#camera = null;
    this.#ui.preview.srcObject = null;
  }

  #releaseMedia() {
    if (this.#mic) this.#mic.stop();
    this.#mic = null;
    this.#stopCamera();
  }

  // -- session ------------------------------------------------------------------------------------------------

  async #mint() {
    if (this.tokenProvider) return this.tokenProvider();
    const tokenUrl = this.getAttribute("token-url");
    if (tokenUrl) {
      return requestJson(tokenUrl, { method: "POST", credentials: "same-origin", headers: { Accept: "application/json" } },
        { tokenEndpoint: true });
    }
    return requestJson(`${this.server}/v1/sessions`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
    });
  }

  /** Mint a session and connect a new peer connection with the current tracks. */
  async #startSession() {
    const minted = await this.#mint();
    if (this.#userStopped) return;
    this.#lastTurn = -1;
    this.#seen.clear();
    await this.#negotiate(minted, (minted.server || this.server).replace(/\/+$/, ""));
  }

  /** Connect a new peer connection with the current tracks, with a grant from /v1/sessions or /resume. */
  async #negotiate(grant, server) {
    this.#session = { sessionId: grant.session_id, token: grant.token, resumeToken: grant.resume_token || null,
      server, microTurnMs: grant.micro_turn_ms || 200 };
    const pc = new RTCPeerConnection({ iceServers: grant.ice_servers || [] });
    this.#pc = pc;
    const stream = new MediaStream([this.#mic]);
    this.#audioSender = pc.addTrack(this.#mic, stream);
    this.#videoSender = null;
    if (this.getAttribute("camera") !== "none") {
      this.#videoSender = pc.addTransceiver(this.#camera || "video", { direction: "sendonly", streams: [stream] }).sender;
    }
    this.#channel = pc.createDataChannel("microturn");
    this.#channel.onmessage = (event) => this.#onMessage(event.data);
    this.#channel.onopen = () => {
      if (this.#muted) this.#control("mute");
      this.#render();
    };
    this.#channel.onclose = () => pc === this.#pc && this.#lost("the data channel closed");
    pc.ontrack = (event) => {
      if (event.track.kind !== "audio") return;
      this.#ui.audio.srcObject = event.streams[0] || new MediaStream([event.track]);
      this.#ui.audio.play().catch(() => {});
    };
    pc.onconnectionstatechange = () => this.#onConnectionState(pc);

    await pc.setLocalDescription(await pc.createOffer());
    await this.#iceGathered(pc);
    const answer = await requestJson(`${server}/v1/sessions/${encodeURIComponent(this.#session.sessionId)}/offer`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${this.#session.token}` },
      body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }),
    });
    if (pc !== this.#pc) return;
    await pc.setRemoteDescription(answer);
  }

  /** The gateway takes no trickled candidates: wait until gathering is done (or give up after a while). */
  #iceGathered(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { clearTimeout(timer); resolve(); };
      const timer = setTimeout(done, ICE_GATHER_MAX_MS);
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
    });
  }

  #onConnectionState(pc) {
    if (pc !== this.#pc) return;
    const state = pc.connectionState;
    if (state === "connected") {
      this.#setState(this.#muted ? "muted" : "listening");
      this.#emit("microturn-session", { sessionId: this.#session.sessionId, server: this.#session.server,
        resumed: this.#resuming });
      this.#startStats();
    } else if (state === "failed" || state === "closed") {
      this.#lost(`connection ${state}`);
    } else if (state === "disconnected") {
      this.#later(() => pc === this.#pc && pc.connectionState === "disconnected" && this.#lost("connection lost"),
        DISCONNECTED_GRACE_MS);
    }
  }

  #onMessage(raw) {
    let msg;
    try {
      msg = JSON.parse(raw);
    } catch {
      return;
    }
    if ((msg.type === "caption" || msg.type === "event") && !this.#firstTime(msg)) return;
    if (msg.type === "caption") {
      this.#addCaption(msg.text);
      this.#emit("microturn-caption", { turn: msg.turn, text: msg.text });
    } else if (msg.type === "event") {
      this.#emit("microturn-task", { turn: msg.turn, name: msg.name, data: msg.data || {} });
    } else if (msg.type === "error") {
      this.#emitError(new MicroturnError("server_error", { fatal: false, detail: `${msg.code}: ${msg.message}` }));
    } else if (msg.type === "pong" && this.#pings.has(msg.id)) {
      this.#rttMs = performance.now() - this.#pings.get(msg.id);
      this.#pings.delete(msg.id);
    } else if (msg.type === "reconnect") {
      this.#lost(`the gateway asked to move: ${msg.reason || "draining"}`); // a planned move (gateway drain)
    } else if (msg.type === "session" && this.#session) {
      this.#session.microTurnMs = msg.micro_turn_ms || this.#session.microTurnMs;
    }
  }

  /** True the first time a caption/event arrives (a resume replays what the gateway is unsure was delivered). */
  #firstTime(msg) {
    const key = `${msg.type}|${msg.turn}|${msg.type === "caption" ? msg.text : msg.name}`;
    if (this.#seen.has(key)) return false;
    this.#seen.add(key);
    for (const old of this.#seen) {
      if (this.#seen.size <= 512) break;
      this.#seen.delete(old);
    }
    if (Number.isInteger(msg.turn)) this.#lastTurn = Math.max(this.#lastTurn, msg.turn);
    return true;
  }

  /** The connection dropped without the user asking: resume if possible, else reconnect as a new session. */
  async #lost(reason) {
    if (this.#userStopped || this.#state === "reconnecting" || this.#state === "error") return;
    const previous = this.#session;
    const wasConnected = this.connected;
    this.#teardownPeer();
    const attempts = Number(this.getAttribute("reconnect") ?? 3);
    if (!wasConnected || !(attempts > 0)) {
      this.#fail(new MicroturnError(wasConnected ? "connection_lost" : "connection_failed", { detail: reason }));
      return;
    }
    this.#setState("reconnecting");
    let lastError = new MicroturnError("connection_lost", { detail: reason });
    for (let attempt = 0; attempt < attempts && !this.#userStopped; attempt += 1) {
      await sleep(Math.min(8000, 500 * 2 ** attempt));
      if (this.#userStopped) return;
      try {
        const resumed = await this.#resume(previous);
        if (resumed) return;
        // No resume: the old session is gone for good; start a new one (freeing the old one when the gateway
        // was never asked: after a refused resume it is gone, or another tab holds it now).
        if (resumed === null) this.#deleteSession(true, previous);
        else if (previous === this.#session) this.#session = null;
        this.#addCaption("(reconnected as a new session)", true);
        await this.#startSession();
        await this.#waitConnected();
        return;
      } catch (err) {
        lastError = err instanceof MicroturnError ? err : new MicroturnError("connection_lost", { detail: String(err) });
        this.#teardownPeer();
        if (["permission_denied", "not_allowed", "no_microphone"].includes(lastError.code)) break;
      }
    }
    if (!this.#userStopped) this.#fail(lastError);
  }

  /**
   * Bring `previous` back on a new peer connection: the gateway's resume flow (the integrator's `resumeHandler`
   * first, if any). True: resumed. False: the gateway refused (401/403/404: the session is gone or resumed
   * elsewhere). Null: no resume was possible (no resume token). Other failures (503, network) throw: retry later.
   */
  async #resume(previous) {
    if (!previous) return null;
    if (this.resumeHandler && (await this.resumeHandler({ ...previous }))) return true;
    if (!previous.resumeToken) return null;
    const lastTurn = this.#lastTurn;
    let grant;
    try {
      grant = await requestJson(`${previous.server}/v1/sessions/${encodeURIComponent(previous.sessionId)}/resume`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${previous.resumeToken}` },
        body: JSON.stringify({ last_turn: lastTurn }),
      });
    } catch (err) {
      if (err.code === "session_expired") return false;
      throw err; // server_busy (503) or unreachable: the caller backs off and tries again
    }
    // the old resume token is used up: a retry (if this negotiation fails) resumes with the rotated one
    Object.assign(previous, { token: grant.token, resumeToken: grant.resume_token || null });
    if (this.#userStopped) return true;
    this.#resuming = true;
    try {
      await this.#negotiate(grant, previous.server);
      await this.#waitConnected();
    } finally {
      this.#resuming = false;
    }
    this.#emit("microturn-resume", { sessionId: this.#session.sessionId, server: this.#session.server, lastTurn });
    return true;
  }

  #waitConnected() {
    const pc = this.#pc;
    return new Promise((resolve, reject) => {
      const check = () => {
        if (pc !== this.#pc) reject(new MicroturnError("connection_lost"));
        else if (pc.connectionState === "connected") resolve();
        else if (pc.connectionState === "failed" || pc.connectionState === "closed") {
          reject(new MicroturnError("connection_failed"));
        } else this.#later(check, 100);
      };
      check();
    });
  }

  #deleteSession(keepalive, session = this.#session) {
    if (!session) return Promise.resolve();
    if (session === this.#session) this.#session = null;
    return fetch(`${session.server}/v1/sessions/${encodeURIComponent(session.sessionId)}`, {
      method: "DELETE", keepalive, headers: { Authorization: `Bearer ${session.token}` },
    }).catch(() => {});
  }

  #teardownPeer() {
    for (const timer of this.#timers) clearTimeout(timer);
    this.#timers.clear();
    clearInterval(this.#statsTimer);
    this.#statsTimer = null;
    const pc = this.#pc;
    this.#pc = null;
    this.#channel = null;
    this.#audioSender = null;
    this.#videoSender = null;
    this.#pings.clear();
    this.#rttMs = null;
    if (pc) pc.close();
    this.#ui.audio.srcObject = null;
  }

  #fail(err) {
    const error = err instanceof MicroturnError ? err : new MicroturnError("server_error", { detail: String(err) });
    this.#userStopped = true;
    this.#deleteSession(true);
    this.#teardownPeer();
    this.#releaseMedia();
    this.#setState("error");
    this.#emitError(error);
  }

  // -- statistics ---------------------------------------------------------------------------------------------

  #startStats() {
    clearInterval(this.#statsTimer);
    this.#statsTimer = setInterval(() => this.#sampleStats(), STATS_EVERY_MS);
  }

  async #sampleStats() {
    const pc = this.#pc;
    if (!pc || !this.#session) return;
    if (this.#channel && this.#channel.readyState === "open") {
      const id = (this.#pingId += 1);
      this.#pings.set(id, performance.now());
      this.#channel.send(JSON.stringify({ type: "ping", id }));
    }
    let iceRtt = null;
    let jitter = null;
    let lost = 0;
    let received = 0;
    let bytesSent = 0;
    (await pc.getStats()).forEach((s) => {
      if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded" && s.currentRoundTripTime !== undefined) {
        iceRtt = s.currentRoundTripTime * 1000;
      } else if (s.type === "inbound-rtp" && s.kind === "audio") {
        jitter = (s.jitter || 0) * 1000;
        lost += s.packetsLost || 0;
        received += s.packetsReceived || 0;
      } else if (s.type === "outbound-rtp") {
        bytesSent += s.bytesSent || 0;
      }
    });
    if (pc !== this.#pc) return;
    const rttMs = this.#rttMs ?? iceRtt;
    const packetLoss = lost + received > 0 ? lost / (lost + received) : 0;
    let quality = "good";
    if (packetLoss > 0.05 || (rttMs ?? 0) > 400) quality = "poor";
    else if (packetLoss > 0.01 || (rttMs ?? 0) > 200) quality = "fair";
    const microTurnMs = this.#session.microTurnMs;
    const latencyMs = rttMs === null ? null : Math.round(microTurnMs + rttMs + (jitter ?? 0));
    const stats = { rttMs: rttMs === null ? null : Math.round(rttMs), latencyMs, jitterMs: jitter, packetLoss, quality,
      microTurnMs, bytesSent };
    this.#ui.quality.textContent = `Connection ${quality}${latencyMs === null ? "" : ` · ~${latencyMs} ms`}`;
    this.#emit("microturn-stats", stats);
  }

  // -- state and UI -------------------------------------------------------------------------------------------

  /** The one place the state changes; emits only on a real change. */
  #setState(state) {
    if (state === this.#state) return;
    const previous = this.#state;
    this.#state = state;
    this.setAttribute("state", state);
    this.#render();
    this.#emit("microturn-state", { state, previous });
  }

  #render() {
    const ui = this.#ui;
    const live = this.connected || this.#busy;
    ui.stateText.textContent = STATE_TEXT[this.#state];
    ui.connect.textContent = live ? "Disconnect" : "Connect";
    ui.connect.classList.toggle("primary", !live);
    ui.mute.setAttribute("aria-pressed", String(this.#muted));
    ui.mute.title = this.#muted ? "Microphone off: press to unmute" : "Press to mute the microphone";
    const noCamera = this.getAttribute("camera") === "none";
    ui.camera.hidden = noCamera;
    ui.camera.setAttribute("aria-pressed", String(this.#cameraWanted));
    ui.camera.title = this.#cameraWanted ? "Camera on: press to turn it off" : "Press to turn the camera on";
    ui.cameraBadge.hidden = !this.cameraOn;
    ui.preview.hidden = !this.cameraOn;
    const open = Boolean(this.#channel && this.#channel.readyState === "open");
    ui.input.disabled = !open;
    ui.send.disabled = !open;
    if (!this.connected) ui.quality.textContent = "";
  }

  #addCaption(text, own = false) {
    const line = document.createElement("div");
    line.setAttribute("part", own ? "caption own-caption" : "caption");
    if (own) line.className = "own";
    line.textContent = text;
    const box = this.#ui.captions;
    box.append(line);
    while (box.childElementCount > MAX_CAPTIONS) box.firstElementChild.remove();
    box.scrollTop = box.scrollHeight;
  }

  #showError(error) {
    this.#ui.error.hidden = !error;
    this.#ui.error.textContent = error ? error.message : "";
  }

  #emitError(error) {
    if (error.fatal || error.code === "camera_unavailable") this.#showError(error);
    this.#emit("microturn-error", { code: error.code, message: error.message, fatal: error.fatal, detail: error.detail });
  }

  #control(name) {
    if (this.#channel && this.#channel.readyState === "open") {
      this.#channel.send(JSON.stringify({ type: "control", name, data: {} }));
    }
  }

  #later(fn, ms) {
    const timer = setTimeout(() => { this.#timers.delete(timer); fn(); }, ms);
    this.#timers.add(timer);
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail, bubbles: true, composed: true }));
  }
}

if (!customElements.get(TAG)) customElements.define(TAG, MicroturnWidget);
