// Type declarations for microturn-widget.js (the <microturn-widget> custom element). See web/README.md.

export type MicroturnState = "idle" | "connecting" | "listening" | "muted" | "reconnecting" | "error";

export type MicroturnErrorCode =
  | "permission_denied" | "no_microphone" | "microphone_busy" | "camera_unavailable" | "server_unreachable"
  | "session_expired" | "not_allowed" | "server_busy" | "token_failed" | "connection_failed" | "connection_lost"
  | "unsupported" | "server_error" | "not_connected";

/** What `POST /v1/sessions` on the gateway returns; a `token-url` endpoint returns the same JSON. */
export interface MicroturnSessionGrant {
  session_id: string;
  token: string;
  expires_in: number;
  ice_servers: RTCIceServer[];
  offer_url: string;
  micro_turn_ms: number;
  /** One-use token for `POST {server}/v1/sessions/{id}/resume` after a lost connection (rotates on each resume). */
  resume_token?: string;
  resume_url?: string;
  /** Optional: the gateway's base URL, when the backend picks it (overrides the `server` attribute). */
  server?: string;
}

export interface MicroturnSession {
  sessionId: string;
  token: string;
  server: string;
  microTurnMs: number;
}

export interface MicroturnStateDetail { state: MicroturnState; previous: MicroturnState; }
export interface MicroturnSessionDetail {
  sessionId: string;
  server: string;
  /** True when this is the same session back after a lost connection (see `microturn-resume`). */
  resumed: boolean;
}
export interface MicroturnResumeDetail {
  sessionId: string;
  server: string;
  /** The last micro-turn whose caption/event had arrived; the gateway replays what came after it. */
  lastTurn: number;
}
export interface MicroturnCaptionDetail { turn: number; text: string; }
export interface MicroturnTaskDetail { turn: number; name: string; data: Record<string, unknown>; }
export interface MicroturnErrorDetail {
  code: MicroturnErrorCode;
  /** Plain words, fit to show to a person. */
  message: string;
  /** True when the error ended the session. */
  fatal: boolean;
  /** Technical detail for logs. */
  detail: string;
}
export interface MicroturnStatsDetail {
  /** Data-channel round trip to the gateway (ICE round trip until the first pong), ms. */
  rttMs: number | null;
  /** Expected delay from speaking to hearing the reply: one micro-turn + round trip + jitter, ms. */
  latencyMs: number | null;
  jitterMs: number | null;
  /** Fraction (0–1) of the reply audio's packets lost. */
  packetLoss: number;
  quality: "good" | "fair" | "poor";
  microTurnMs: number;
  bytesSent: number;
}

export interface MicroturnEventMap {
  "microturn-state": CustomEvent<MicroturnStateDetail>;
  "microturn-session": CustomEvent<MicroturnSessionDetail>;
  "microturn-resume": CustomEvent<MicroturnResumeDetail>;
  "microturn-caption": CustomEvent<MicroturnCaptionDetail>;
  "microturn-task": CustomEvent<MicroturnTaskDetail>;
  "microturn-error": CustomEvent<MicroturnErrorDetail>;
  "microturn-stats": CustomEvent<MicroturnStatsDetail>;
}

export declare const ERROR_MESSAGES: Readonly<Record<MicroturnErrorCode, string>>;

export declare class MicroturnError extends Error {
  readonly code: MicroturnErrorCode;
  readonly fatal: boolean;
  readonly detail: string;
}

export declare class MicroturnWidget extends HTMLElement {
  /** Mint sessions yourself (replaces `token-url`). */
  tokenProvider: (() => Promise<MicroturnSessionGrant>) | null;
  /**
   * Tried before the built-in resume after a lost connection; return true when you brought the session back
   * yourself. It gets the session with its current `resumeToken` (null when none).
   */
  resumeHandler: ((previous: MicroturnSession & { resumeToken: string | null }) => Promise<boolean>) | null;
  audioConstraints: MediaTrackConstraints;
  videoConstraints: MediaTrackConstraints;

  readonly state: MicroturnState;
  readonly connected: boolean;
  readonly muted: boolean;
  readonly cameraOn: boolean;
  readonly session: MicroturnSession | null;
  readonly remoteStream: MediaStream | null;
  readonly server: string;

  connect(): Promise<void>;
  disconnect(): Promise<void>;
  mute(muted?: boolean): void;
  setCamera(on: boolean): Promise<void>;
  sendText(text: string): boolean;

  addEventListener<K extends keyof MicroturnEventMap>(
    type: K, listener: (this: MicroturnWidget, ev: MicroturnEventMap[K]) => unknown,
    options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject,
    options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof MicroturnEventMap>(
    type: K, listener: (this: MicroturnWidget, ev: MicroturnEventMap[K]) => unknown,
    options?: boolean | EventListenerOptions): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject,
    options?: boolean | EventListenerOptions): void;
}

declare global {
  interface HTMLElementTagNameMap { "microturn-widget": MicroturnWidget; }
  interface HTMLElementEventMap extends MicroturnEventMap {}
}
