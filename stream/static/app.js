// framepack-rt live page: one RTCPeerConnection per Start (recvonly video + the "control" data channel).
// aiortc takes no trickled candidates, so the offer is posted only once ICE gathering is complete. The server
// probes only candidates it can use (unicast; mDNS names unless it allows them); the STUN servers it names in
// /api/config give this browser a public candidate too.
// Access: ?token=... (the server's token, when it has one) is moved out of the address bar into this tab's
// sessionStorage and sent as "Authorization: Bearer"; ?session=ID&key=K is a view-only join link.
"use strict";

class LivePage {
  constructor() {
    this.$ = (id) => document.getElementById(id);
    this.pc = null;
    this.channel = null;
    this.session = null;
    const params = new URLSearchParams(location.search);
    this.joinId = params.get("session");
    this.joinKey = params.get("key");
    this.token = params.get("token") || sessionStorage.getItem("framepack-token");
    if (params.has("token")) {
      // Keep the token out of the address bar, history and shared links; this tab still has it.
      sessionStorage.setItem("framepack-token", this.token);
      params.delete("token");
      const query = params.toString();
      history.replaceState(null, "", location.pathname + (query ? `?${query}` : ""));
    }
    this.role = null;
    this.viewKey = null;
    this.imageDataUrl = null;
    this.nextId = 1;
    this.rtt = null;
    this.framesDecoded = 0; // from getStats (inbound-rtp), polled once a second
    this.framesPainted = 0; // from requestVideoFrameCallback
    this.messages = []; // last server messages, for debugging and tests
    this.timers = [];
    this.iceServers = []; // the server's STUN servers (from /api/config), so this browser finds its public address
    this.bind();
    this.configLoaded = this.loadConfig();
  }

  bind() {
    const $ = this.$;
    $("start").addEventListener("click", () => this.start());
    $("stop").addEventListener("click", () => this.stopSession());
    $("pause").addEventListener("click", () => this.togglePause());
    $("prompt-form").addEventListener("submit", (e) => { e.preventDefault(); this.sendPrompt(); });
    $("image").addEventListener("change", (e) => this.pickImage(e.target.files[0]));
    $("image-clear").addEventListener("click", () => this.clearImage());
    $("copy-link").addEventListener("click", () => this.copyJoinLink());
    const video = $("video");
    video.addEventListener("resize", () => {
      // Fit the frame to the stream's shape; upscale small (tiny-model) frames without blurring them.
      if (video.videoWidth && video.videoHeight) {
        const frame = $("video-frame");
        frame.style.aspectRatio = `${video.videoWidth} / ${video.videoHeight}`;
        frame.style.maxWidth = `calc((100vh - 250px) * ${video.videoWidth / video.videoHeight})`;
      }
      video.classList.toggle("pixelated", video.videoWidth < 256);
    });
    if (this.joinId) {
      $("image-card").hidden = true; // a viewer joins a running generator: its start image is fixed
      $("start").textContent = "Join";
      $("session-label").textContent = `session ${this.joinId}`;
      // The id comes from the URL: text, never markup (a crafted link must not run script in this page).
      const bold = document.createElement("b");
      bold.textContent = "Join";
      $("overlay-text").replaceChildren("Press ", bold, ` to watch session ${this.joinId}.`);
    }
  }

  async loadConfig() {
    try {
      const config = await (await fetch("/api/config")).json();
      if (config.default_prompt) this.$("prompt").placeholder = config.default_prompt;
      if (config.max_prompt_chars) this.$("prompt").maxLength = config.max_prompt_chars;
      if (Array.isArray(config.ice_servers)) this.iceServers = config.ice_servers.map((urls) => ({ urls }));
      if (config.token_required && !this.token && !(this.joinId && this.joinKey)) {
        this.showError("this server needs a token: open the link you were given (it ends in ?token=...)");
      }
    } catch (err) {
      this.showError(`server not reachable: ${err}`);
    }
  }

  // -- connection ---------------------------------------------------------------------------------------
  async start() {
    this.hangUp();
    this.showError(null);
    this.setStatus("connecting", "connecting");
    this.$("start").disabled = true;
    await this.configLoaded;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pc = pc;
    pc.addTransceiver("video", { direction: "recvonly" });
    const channel = pc.createDataChannel("control");
    this.channel = channel;
    channel.onmessage = (e) => this.onMessage(e.data);
    channel.onopen = () => this.ping();
    pc.ontrack = (e) => this.onTrack(e);
    pc.onconnectionstatechange = () => {
      if (pc !== this.pc) return;
      if (pc.connectionState === "failed") this.setStatus("error", "connection failed");
      if (pc.connectionState === "connected") this.setStatus("live", "live");
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await this.iceGatheringComplete(pc);
      const body = { sdp: pc.localDescription.sdp, type: pc.localDescription.type };
      if (this.joinId) {
        body.session = this.joinId;
        if (this.joinKey) body.key = this.joinKey;
      } else {
        const prompt = this.$("prompt").value.trim();
        if (prompt) body.prompt = prompt;
        if (this.imageDataUrl) body.image = this.imageDataUrl;
      }
      const headers = { "Content-Type": "application/json" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      const resp = await fetch("/offer", { method: "POST", headers, body: JSON.stringify(body) });
      const answer = await resp.json();
      if (!resp.ok) throw new Error(answer.error || `HTTP ${resp.status}`);
      this.session = answer.session;
      this.role = answer.role;
      this.viewKey = answer.view_key || this.joinKey;
      await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
      this.$("session-label").textContent = `session ${this.session}${this.role === "view" ? " · view only" : ""}`;
      this.$("copy-link").hidden = false;
      this.setControlsEnabled(this.role !== "view");
      this.$("start").textContent = this.joinId ? "Rejoin" : "Restart";
      this.timers.push(setInterval(() => this.ping(), 2000), setInterval(() => this.pollStats(), 1000));
    } catch (err) {
      this.setStatus("error", "error");
      this.showError(`could not start: ${err.message || err}`);
      this.hangUp();
    } finally {
      this.$("start").disabled = false;
    }
  }

  iceGatheringComplete(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const check = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", check);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", check);
      setTimeout(resolve, 3000); // post what we have rather than hang if gathering never completes
    });
  }

  onTrack(e) {
    const video = this.$("video");
    // Play what arrives at once: the stream is live, a jitter buffer only adds delay.
    if ("jitterBufferTarget" in e.receiver) e.receiver.jitterBufferTarget = 0;
    video.srcObject = e.streams[0] || new MediaStream([e.track]);
    video.play().catch(() => {});
    this.$("overlay").hidden = true;
    if ("requestVideoFrameCallback" in video) {
      const onFrame = () => { this.framesPainted++; video.requestVideoFrameCallback(onFrame); };
      video.requestVideoFrameCallback(onFrame);
    }
  }

  setControlsEnabled(enabled) {
    // A view-only connection cannot steer (the server refuses it anyway): say so instead of failing.
    this.$("pause").disabled = this.$("stop").disabled = !enabled;
    this.$("prompt").disabled = this.$("send").disabled = !enabled;
    if (!enabled) this.note("view only: this link lets you watch, not change the prompt");
  }

  hangUp() {
    this.timers.forEach(clearInterval);
    this.timers = [];
    if (this.pc) this.pc.close();
    this.pc = this.channel = null;
  }

  send(message) {
    if (!this.channel || this.channel.readyState !== "open") return false;
    this.channel.send(JSON.stringify(message));
    return true;
  }

  // -- controls -----------------------------------------------------------------------------------------
  sendPrompt() {
    const input = this.$("prompt");
    const text = input.value.trim();
    if (!text) return;
    if (!this.channel) { this.start(); return; } // Enter before Start: start with this prompt
    const id = `p${this.nextId++}`;
    if (this.send({ type: "prompt", text, id })) this.note(`sent “${text}”…`);
  }

  togglePause() {
    const pausing = this.$("pause").textContent === "Pause";
    this.send({ type: pausing ? "pause" : "resume" });
  }

  stopSession() {
    this.send({ type: "stop" });
    this.$("pause").disabled = this.$("stop").disabled = true;
  }

  pickImage(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      this.imageDataUrl = reader.result;
      this.$("start-thumb").src = reader.result;
      this.$("image-clear").hidden = false;
    };
    reader.readAsDataURL(file);
  }

  clearImage() {
    this.imageDataUrl = null;
    this.$("image").value = "";
    this.$("start-thumb").src = "/api/default-image";
    this.$("image-clear").hidden = true;
  }

  copyJoinLink() {
    // The view key, never the token: whoever gets this link can watch this session and nothing else.
    const key = this.viewKey ? `&key=${encodeURIComponent(this.viewKey)}` : "";
    const link = `${location.origin}/?session=${encodeURIComponent(this.session)}${key}`;
    if (navigator.clipboard) navigator.clipboard.writeText(link).catch(() => {});
    this.note(`join link: ${link}`);
  }

  ping() { this.send({ type: "ping", t: performance.now() }); }

  // -- server messages ----------------------------------------------------------------------------------
  onMessage(raw) {
    let msg;
    try { msg = JSON.parse(raw); } catch { return; }
    this.messages.push(msg);
    if (this.messages.length > 200) this.messages.shift();
    const $ = this.$;
    switch (msg.type) {
      case "hello":
        this.onState(msg);
        if (msg.prompt && !$("prompt").value) $("prompt").placeholder = msg.prompt;
        break;
      case "pong":
        this.rtt = performance.now() - msg.t;
        $("st-rtt").textContent = `${this.rtt.toFixed(1)} ms`;
        break;
      case "ack":
        this.note(`“${msg.prompt}” applies from section ${msg.section}`, true);
        break;
      case "prompt_live":
        this.note(`new prompt on screen after ${(msg.latency_ms / 1000).toFixed(2)} s (section ${msg.section})`, true);
        break;
      case "progress":
        $("gen-label").textContent = `section ${msg.section} · step ${msg.step}/${msg.steps}`;
        $("progress-bar").style.width = `${(100 * msg.step) / msg.steps}%`;
        break;
      case "preview":
        $("preview").src = msg.image;
        $("preview").hidden = false;
        $("preview-empty").hidden = true;
        break;
      case "section":
        this.addSection(msg);
        $("st-section").textContent = `#${msg.index} · ${Math.round(msg.ms)} ms`;
        break;
      case "stats":
        this.showStats(msg);
        break;
      case "state":
        this.onState(msg);
        break;
      case "error":
        this.showError(msg.message);
        break;
    }
  }

  onState(msg) {
    const labels = { running: "live", paused: "paused", stopped: "stopped", finished: "finished", error: "error",
      closed: "closed" };
    const cls = { running: "live", paused: "paused", error: "error" }[msg.state] || "ended";
    this.setStatus(cls, labels[msg.state] || msg.state);
    this.$("pause").textContent = msg.state === "paused" ? "Resume" : "Pause";
    if (this.role === "view") this.$("pause").disabled = this.$("stop").disabled = true;
    if (msg.state === "closed" && msg.detail) this.showError(`session closed: ${msg.detail}`);
    if (!["running", "paused"].includes(msg.state)) {
      this.$("pause").disabled = this.$("stop").disabled = true;
      this.$("gen-label").textContent = labels[msg.state] || msg.state;
      this.$("progress-bar").style.width = "0";
    }
  }

  addSection(msg) {
    const list = this.$("sections");
    const previous = list.firstElementChild;
    const li = document.createElement("li");
    const changed = previous && previous.dataset.prompt !== msg.prompt;
    li.dataset.prompt = msg.prompt;
    if (changed) li.classList.add("changed");
    li.innerHTML = '<span class="idx"></span><span class="prompt-text"></span><span class="ms"></span>';
    li.children[0].textContent = `#${msg.index}`;
    li.children[1].textContent = msg.prompt;
    li.children[1].title = `frames ${msg.frames[0]}–${msg.frames[1]} · ${msg.steps_run} steps run, ${msg.steps_skipped} skipped`;
    li.children[2].textContent = `${Math.round(msg.ms)} ms`;
    list.prepend(li);
    while (list.children.length > 60) list.lastElementChild.remove();
  }

  showStats(s) {
    const $ = this.$;
    $("st-fps").textContent = `${s.gen_fps.toFixed(1)} / ${s.play_fps.toFixed(1)} fps`;
    $("st-buffer").textContent = `${s.buffer} fr · ${(s.buffer_ms / 1000).toFixed(2)} s`;
    $("st-buffer").classList.toggle("warn", s.buffering);
    const badge = $("badge");
    badge.hidden = !(s.buffering || s.state === "paused");
    badge.textContent = s.state === "paused" ? "PAUSED" : "BUFFERING · generation slower than playback";
  }

  async pollStats() {
    if (!this.pc) return;
    const report = await this.pc.getStats();
    report.forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") this.framesDecoded = r.framesDecoded || 0;
    });
    this.$("st-decoded").textContent = String(this.framesDecoded);
  }

  // -- UI helpers ---------------------------------------------------------------------------------------
  setStatus(cls, text) {
    const pill = this.$("status");
    pill.className = `pill ${cls}`;
    pill.textContent = text;
  }

  note(text, ok = false) {
    const el = this.$("prompt-note");
    el.textContent = text;
    el.classList.toggle("ok", ok);
  }

  showError(text) {
    const el = this.$("error");
    el.hidden = !text;
    el.textContent = text || "";
  }
}

window.framepack = new LivePage();
