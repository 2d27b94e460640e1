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
    this.controlKey = null; // from the offer's answer, with control: release the session, download its video
    this.config = {}; // /api/config: defaults, limits, recording
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
    $("timeline-form").addEventListener("submit", (e) => { e.preventDefault(); this.sendTimeline(); });
    $("image").addEventListener("change", (e) => this.pickImage(e.target.files[0]));
    $("image-clear").addEventListener("click", () => this.clearImage());
    $("copy-link").addEventListener("click", () => this.copyJoinLink());
    // Reload or close: let go of this page's session at once (the server would keep it for --grace otherwise).
    window.addEventListener("pagehide", () => this.release(true));
    const video = $("video");
    video.addEventListener("resize", () => {
      // Fit the frame to the stream's shape; small frames scale up smoothly (style.css), not in blocks.
      if (video.videoWidth && video.videoHeight) {
        const frame = $("video-frame");
        frame.style.aspectRatio = `${video.videoWidth} / ${video.videoHeight}`;
        frame.style.maxWidth = `calc((100vh - 250px) * ${video.videoWidth / video.videoHeight})`;
      }
    });
    if (this.joinId) {
      $("image-card").hidden = true; // a viewer joins a running generator: its start image is fixed
      $("settings-card").hidden = true; // ... and so are its settings
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
      this.config = config;
      if (config.default_prompt && !this.$("prompt").value) this.$("prompt").value = config.default_prompt;
      if (config.start) this.fillStartSettings(config.start);
      if (Array.isArray(config.loras)) this.showLoras(config.loras);
      if (config.max_prompt_chars) this.$("prompt").maxLength = config.max_prompt_chars;
      this.fillTransition(config);
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
    const previous = [this.session, this.controlKey];
    this.hangUp();
    this.resetSessionView();
    this.showError(null);
    this.setStatus("connecting", "connecting");
    this.$("start").disabled = true;
    await this.configLoaded;
    await this.release(false, ...previous); // before the new offer: its place is free when that arrives
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
      this.startMessages = null; // set below for a new session: sent once its channel says hello
      if (this.joinId) {
        body.session = this.joinId;
        if (this.joinKey) body.key = this.joinKey;
      } else {
        const prompt = this.$("prompt").value.trim();
        const parsed = this.parsePrompt(prompt); // weighted prompts start from their first, then blend (onHello)
        if (prompt) body.prompt = parsed.prompts ? parsed.prompts[0].text : prompt;
        this.startMessages = this.messagesAtStart(parsed);
        if (this.imageDataUrl) body.image = this.imageDataUrl;
        Object.assign(body, this.startSettings());
      }
      const headers = { "Content-Type": "application/json" };
      if (this.token) headers.Authorization = `Bearer ${this.token}`;
      const resp = await fetch("/offer", { method: "POST", headers, body: JSON.stringify(body) });
      const answer = await resp.json();
      if (!resp.ok) throw new Error(answer.error || `HTTP ${resp.status}`);
      this.session = answer.session;
      this.role = answer.role;
      this.viewKey = answer.view_key || this.joinKey;
      this.controlKey = answer.control_key || null;
      await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
      this.$("session-label").textContent = `session ${this.session}${this.role === "view" ? " · view only" : ""}`;
      this.$("copy-link").hidden = false;
      this.setControlsEnabled(this.role !== "view");
      this.$("start").textContent = this.joinId ? "Rejoin" : "Restart";
      this.timers.push(setInterval(() => this.ping(), 2000), setInterval(() => this.pollStats(), 1000));
      if (this.config && this.config.cluster) this.watchEnd(this.session);
    } catch (err) {
      this.setStatus("error", "error");
      this.showError(`could not start: ${err.message || err}`);
      this.hangUp();
    } finally {
      this.$("start").disabled = false;
    }
  }

  // On a cluster (Ray Serve) a viewer whose replica died hears it from the ingress: the control channel died too.
  async watchEnd(session) {
    const key = this.viewKey ? `&key=${encodeURIComponent(this.viewKey)}` : "";
    const headers = this.token ? { Authorization: `Bearer ${this.token}` } : {};
    while (this.session === session) {
      try {
        const resp = await fetch(`/api/sessions/${encodeURIComponent(session)}/end?wait=25${key}`, { headers });
        if (this.session !== session || resp.status === 404 || resp.status === 401) return;
        if (!resp.ok) throw new Error(`HTTP ${resp.status}`); // the ingress restarting: ask again
        const end = await resp.json();
        if (end.state === "closed") return; // its own control channel said why
        if (end.state === "lost") {
          this.setStatus("error", "error");
          this.showError(`session lost: ${end.reason}`);
          return;
        }
      } catch (err) {
        await new Promise((resolve) => setTimeout(resolve, 2000)); // the ingress restarting: ask again
      }
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
    for (const id of ["transition", "timeline", "timeline-apply"]) this.$(id).disabled = !enabled;
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
    const message = { type: "prompt", ...this.parsePrompt(text), id: `p${this.nextId++}` };
    const transition = this.transitionSections();
    if (transition !== null) message.transition = transition;
    if (this.send(message)) this.note(`sent “${text}”…`);
  }

  // -- transitions, weighted prompts, timelines ---------------------------------------------------------
  fillTransition(config) {
    const input = this.$("transition");
    if (Number.isInteger(config.max_transition_sections)) input.max = String(config.max_transition_sections);
    if (Number.isInteger(config.transition_sections)) input.value = String(config.transition_sections);
  }

  transitionSections() {
    // The field's whole number of sections; null (left out: the server's default) when empty or not a number.
    const value = this.$("transition").value.trim();
    return /^\d+$/.test(value) ? Number(value) : null;
  }

  parsePrompt(text) {
    // "a cat:0.7 | a dog:0.3" -> {prompts: [{text, weight}, ...]} (a part without ":weight" weighs 1);
    // anything without "|" is one plain prompt, colons and all.
    if (!text.includes("|")) return { text };
    const prompts = text.split("|").map((part) => part.trim()).filter(Boolean).map((part) => {
      const m = part.match(/^(.*\S)\s*:\s*(\d*\.?\d+)$/);
      return m ? { text: m[1].trim(), weight: Number(m[2]) } : { text: part, weight: 1 };
    });
    return prompts.length ? { prompts } : { text };
  }

  messagesAtStart(parsed) {
    // What a new session is sent once its control channel says hello: weighted prompts, the timeline typed.
    const messages = [];
    if (parsed.prompts && parsed.prompts.length > 1) messages.push({ type: "prompt", prompts: parsed.prompts, transition: 0, id: `p${this.nextId++}` });
    const schedule = this.$("timeline").value.trim();
    if (schedule) messages.push(this.timelineMessage(schedule));
    return messages;
  }

  timelineMessage(schedule) {
    const message = { type: "timeline", schedule, id: `t${this.nextId++}` };
    const transition = this.transitionSections();
    if (transition !== null) message.transition = transition;
    return message;
  }

  sendTimeline() {
    const schedule = this.$("timeline").value.trim();
    if (!this.channel) { this.start(); return; } // Apply before Start: start, then send it (onHello)
    if (this.send(this.timelineMessage(schedule))) this.note(schedule ? "timeline sent…" : "clearing the timeline…");
  }

  onTimelineAck(msg) {
    if (!msg.timeline.length) { this.note(`timeline cleared from section ${msg.section}`, true); return; }
    const parts = msg.timeline.map((e) => `${e.seconds} s → ${e.section === null ? "not used" : `section ${e.section}`}`);
    this.note(`timeline from section ${msg.section}: ${parts.join(", ")}`, true);
  }

  togglePause() {
    const pausing = this.$("pause").textContent === "Pause";
    this.send({ type: pausing ? "pause" : "resume" });
  }

  stopSession() {
    this.send({ type: "stop" });
    this.$("pause").disabled = this.$("stop").disabled = true;
  }

  async pickImage(file) {
    if (!file) return;
    const problem = await this.checkImage(file);
    if (problem) {
      this.$("image").value = "";
      this.showError(problem);
      return;
    }
    this.showError(null);
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

  // -- LoRA: one slider per loaded adapter; a change is this session's scale from the next section on ----
  showLoras(loras) {
    const box = this.$("loras");
    box.replaceChildren();
    for (const lora of loras) {
      const label = document.createElement("label");
      label.className = "wide";
      const value = document.createElement("b");
      value.textContent = Number(lora.scale).toFixed(2);
      const slider = document.createElement("input");
      Object.assign(slider, { type: "range", min: "-1", max: "2", step: "0.05", value: String(lora.scale) });
      slider.dataset.lora = lora.name;
      slider.disabled = Boolean(lora.fused); // merged into the weights at load: fixed
      slider.title = lora.fused ? "fused at load (--fuse-lora): fixed" : "this session's scale";
      slider.addEventListener("input", () => { value.textContent = Number(slider.value).toFixed(2); });
      slider.addEventListener("change", () => this.sendLora(lora.name, Number(slider.value)));
      label.append(`${lora.name} `, value, slider); // the name as text, never markup
      box.append(label);
    }
    this.$("lora-card").hidden = loras.length === 0;
  }

  sendLora(name, scale) {
    if (this.send({ type: "lora", name, scale, id: `l${this.nextId++}` })) this.note(`LoRA ${name} → ${scale}…`);
  }

  onLoraAck(msg) {
    const slider = [...this.$("loras").querySelectorAll("input")].find((s) => s.dataset.lora === msg.name);
    if (slider) { // another viewer of this session may have moved it
      slider.value = String(msg.scale);
      slider.previousElementSibling.textContent = Number(msg.scale).toFixed(2);
    }
    this.note(`LoRA ${msg.name} at ${msg.scale} from section ${msg.section}`, true);
  }

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
        if (msg.prompt && !$("prompt").value) $("prompt").value = msg.prompt;
        if (this.role !== "view") (this.startMessages || []).forEach((m) => this.send(m));
        this.startMessages = null;
        if (msg.settings) this.showSettingsInUse(msg.settings);
        break;
      case "pong":
        this.rtt = performance.now() - msg.t;
        $("st-rtt").textContent = `${this.rtt.toFixed(1)} ms`;
        break;
      case "ack":
        if (Array.isArray(msg.timeline)) { this.onTimelineAck(msg); break; }
        this.note(`“${msg.prompt}” applies from section ${msg.section}` +
                  (msg.transition > 1 ? `, blended in over ${msg.transition} sections` : ""), true);
        break;
      case "lora_ack":
        this.onLoraAck(msg);
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
        this.updateDownload(true);
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
    const labels = { starting: "starting", running: "live", paused: "paused", stopped: "stopped",
      finished: "finished", error: "error", closed: "closed" };
    const cls = { starting: "connecting", running: "live", paused: "paused", error: "error" }[msg.state] || "ended";
    this.setStatus(cls, labels[msg.state] || msg.state);
    this.$("pause").textContent = msg.state === "paused" ? "Resume" : "Pause";
    if (this.role === "view") this.$("pause").disabled = this.$("stop").disabled = true;
    if (msg.state === "closed" && msg.detail) this.showError(`session closed: ${msg.detail}`);
    if (msg.state === "running" && this.$("gen-label").textContent === labels.starting) {
      this.$("gen-label").textContent = "waiting for the first step"; // the encoders ran; sampling begins
    }
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

  // -- session life: release, start settings, recording, image checks --------------------------------------
  release(keepalive, session = this.session, key = this.controlKey) {
    // DELETE /api/sessions/ID ends a session this page started (its control key proves control), so Restart
    // and reload never leave the previous one holding a place until the server's grace period ends. A page that
    // joined someone's session (a link, even with the token) only hangs up: the session is not its to end.
    if (!session || !key || this.joinId) return Promise.resolve();
    if (session === this.session) this.controlKey = null;
    const headers = {};
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const url = `/api/sessions/${encodeURIComponent(session)}?key=${encodeURIComponent(key)}`;
    const done = fetch(url, { method: "DELETE", headers, keepalive }).catch(() => {});
    // Never hang a Restart on it: after 3 s the new offer goes anyway.
    return Promise.race([done, new Promise((resolve) => setTimeout(resolve, 3000))]);
  }

  resetSessionView() {
    // Everything that belongs to the previous session goes: its sections, link, preview, download, settings.
    const $ = this.$;
    this.session = this.controlKey = this.role = null;
    this.viewKey = this.joinKey;
    $("sections").replaceChildren();
    $("copy-link").hidden = true;
    $("session-label").textContent = this.joinId ? `session ${this.joinId}` : "no session";
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
    $("preview-empty").hidden = false;
    $("gen-label").textContent = "–";
    $("progress-bar").style.width = "0";
    $("st-section").textContent = "–";
    $("badge").hidden = true;
    this.updateDownload(false);
    this.note("The prompt steers the video from the next section on.");
  }

  fillStartSettings(start) {
    const $ = this.$;
    const set = (id, value, max) => {
      if (value !== null && value !== undefined) $(id).value = value;
      if (max) $(id).max = max;
    };
    set("set-seed", start.seed);
    set("set-steps", start.steps, start.max_steps);
    set("set-cfg", start.cfg, start.max_cfg);
    set("set-window", start.window, start.max_window);
    const select = $("set-bucket");
    for (const [h, w] of start.buckets || []) {
      const option = document.createElement("option");
      option.value = `${h}x${w}`;
      option.textContent = `${w} × ${h}`;
      select.append(option);
    }
  }

  startSettings() {
    // The fields as the offer's seed, steps, cfg, window and bucket; an empty field is left to the server.
    const $ = this.$;
    const number = (id, parse) => {
      const value = parse($(id).value);
      return Number.isFinite(value) ? value : undefined;
    };
    const settings = {
      seed: number("set-seed", (v) => parseInt(v, 10)),
      steps: number("set-steps", (v) => parseInt(v, 10)),
      cfg: number("set-cfg", parseFloat),
      window: number("set-window", (v) => parseInt(v, 10)),
      bucket: $("set-bucket").value || undefined,
    };
    return Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== undefined));
  }

  showSettingsInUse(s) {
    const parts = [`seed ${s.seed}`, `${s.steps ?? "?"} steps`, `CFG ${s.cfg ?? "?"}`, `window ${s.window}`];
    if (s.bucket) parts.push(`${s.bucket[1]} × ${s.bucket[0]}`);
    // A fast decoder may draw larger frames than the model generates at: say both.
    if (s.frame && s.bucket && (s.frame[0] !== s.bucket[0] || s.frame[1] !== s.bucket[1])) {
      parts.push(`shown at ${s.frame[1]} × ${s.frame[0]}`);
    }
    this.$("settings-in-use").textContent = `in use: ${parts.join(" · ")}`;
  }

  updateDownload(available) {
    // Download MP4 of everything recorded so far: with control, or as a viewer where the server allows it.
    const link = this.$("download");
    const recording = this.config.recording || {};
    const key = this.controlKey || (recording.for_viewers ? this.viewKey : null);
    const allowed = recording.enabled && this.session && (this.controlKey || recording.for_viewers);
    link.hidden = !(available && allowed);
    if (link.hidden) { link.removeAttribute("href"); return; }
    const query = key ? `?key=${encodeURIComponent(key)}` : "";
    link.href = `/api/sessions/${encodeURIComponent(this.session)}/video.mp4${query}`;
  }

  async checkImage(file) {
    // What the server would refuse at Start, said when the file is picked: type, size, pixels, decoding.
    const types = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
    const mb = (bytes) => (bytes / 2 ** 20).toFixed(1);
    if (!types.includes(file.type)) {
      return `${file.name}: not a PNG, JPEG, WebP, GIF or BMP image; pick one of those`;
    }
    if (this.config.max_image_bytes && file.size > this.config.max_image_bytes) {
      return `${file.name} is ${mb(file.size)} MB; this server takes start images up to ${mb(this.config.max_image_bytes)} MB`;
    }
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch {
      return `${file.name} could not be decoded as an image (damaged or not what its name says); pick another`;
    }
    const { width, height } = bitmap;
    bitmap.close();
    if (this.config.max_image_pixels && width * height > this.config.max_image_pixels) {
      return `${file.name} is ${width} × ${height} pixels; this server takes at most ${this.config.max_image_pixels} pixels`;
    }
    return null;
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
