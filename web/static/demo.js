// The demo page: one session with the gateway that served this page (mic, optional camera, data channel).
const $ = (id) => document.getElementById(id);
let pc = null;
let channel = null;
let session = null;
window.microturnDemo = { captions: [], inboundEnergy: 0, state: "idle" };

function setState(state, detail) {
  window.microturnDemo.state = state;
  $("state").dataset.state = state;
  $("state").textContent = detail ? `${state}: ${detail}` : state;
}

function addCaption(text) {
  window.microturnDemo.captions.push(text);
  const line = document.createElement("div");
  line.textContent = text;
  $("captions").append(line);
  while ($("captions").childElementCount > 50) $("captions").firstChild.remove();
  $("captions").scrollTop = $("captions").scrollHeight;
}

function watchLevel(stream) {
  const ctx = new AudioContext();
  const analyser = ctx.createAnalyser();
  ctx.createMediaStreamSource(stream).connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  setInterval(() => {
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const v of data) sum += v * v;
    window.microturnDemo.inboundEnergy += sum / data.length;
  }, 50);
}

async function connect() {
  $("connect").disabled = true;
  setState("connecting");
  try {
    const media = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false },
      video: $("camera").checked ? { width: 160, height: 120, frameRate: 5 } : false,
    });
    const created = await fetch("/v1/sessions", { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
    session = await created.json();
    if (!created.ok) throw new Error(session.error.message);
    pc = new RTCPeerConnection({ iceServers: session.ice_servers });
    for (const track of media.getTracks()) pc.addTrack(track, media);
    channel = pc.createDataChannel("microturn");
    channel.onmessage = (e) => {
      const msg = JSON.parse(e.data);
      if (msg.type === "caption") addCaption(msg.text);
      else if (msg.type === "error") addCaption(`error: ${msg.message}`);
      else if (msg.type === "event") addCaption(`event: ${msg.name}`);
    };
    channel.onopen = () => { $("text").disabled = false; $("send").disabled = false; };
    pc.ontrack = (e) => { $("remote").srcObject = e.streams[0] || new MediaStream([e.track]); watchLevel($("remote").srcObject); };
    pc.onconnectionstatechange = () => {
      if (pc === null) return;
      if (pc.connectionState === "connected") setState("connected");
      if (pc.connectionState === "failed") setState("error", "connection failed");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") resolve();
      pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && resolve();
    });
    const answered = await fetch(session.offer_url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${session.token}` },
      body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }),
    });
    const answer = await answered.json();
    if (!answered.ok) throw new Error(answer.error.message);
    await pc.setRemoteDescription(answer);
    $("disconnect").disabled = false;
  } catch (err) {
    setState("error", err.message);
    $("connect").disabled = false;
  }
}

async function disconnect() {
  if (session) {
    await fetch(`/v1/sessions/${session.session_id}`, { method: "DELETE", headers: { Authorization: `Bearer ${session.token}` } });
  }
  if (pc) { pc.getSenders().forEach((s) => s.track && s.track.stop()); pc.close(); pc = null; }
  session = null;
  setState("idle");
  $("connect").disabled = false;
  $("disconnect").disabled = true;
  $("text").disabled = true;
  $("send").disabled = true;
}

$("connect").addEventListener("click", connect);
$("disconnect").addEventListener("click", disconnect);
$("textform").addEventListener("submit", (e) => {
  e.preventDefault();
  if (channel && channel.readyState === "open" && $("text").value.trim()) {
    channel.send(JSON.stringify({ type: "text", text: $("text").value }));
    $("text").value = "";
  }
});
