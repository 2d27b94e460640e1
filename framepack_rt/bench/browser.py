"""A headless Chromium viewer for ``framepack-rt bench --browser``: what a real page sees.

The page joins the session with its own RTCPeerConnection (not the app's UI), sets
``jitterBufferTarget = 0`` and, for every frame it presents (``requestVideoFrameCallback``), records the
expected display time and the mean luma of the stamp cells, read back from a canvas. Python decodes the
cells with the same code as the aiortc viewer (stream/stamp.py), so both viewers read stamps identically.
Display times are converted from the page's clock (``performance.timeOrigin + t``, epoch ms) to
time.monotonic() through the offset between time.time() and time.monotonic() on this machine.

Drives Debian's /usr/bin/chromium through playwright's Python package (no ``playwright install``).
"""

from __future__ import annotations

import time
from typing import Any

from framepack_rt.bench.report import ViewerRecord
from framepack_rt.stream.stamp import StampLayout, read_cells, unwrap

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",  # on machines whose only interface is lo
]

JOIN = """async ({session, rects, band, token}) => {
  const rec = {offer: null, frames: [], error: null};
  window.__bench = rec;
  const pc = new RTCPeerConnection({iceServers: []});
  window.__benchPc = pc;
  pc.addTransceiver("video", {direction: "recvonly"});
  const video = document.createElement("video");
  video.muted = true; video.autoplay = true; video.playsInline = true;
  document.body.appendChild(video);
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  pc.ontrack = (e) => {
    if ("jitterBufferTarget" in e.receiver) e.receiver.jitterBufferTarget = 0;
    video.srcObject = e.streams[0] || new MediaStream([e.track]);
    video.play().catch((err) => { rec.error = String(err); });
  };
  const onFrame = (now, meta) => {
    const w = video.videoWidth, h = video.videoHeight;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    ctx.drawImage(video, 0, 0, w, h);
    const px = ctx.getImageData(0, 0, w, Math.min(band, h)).data;
    const levels = rects.map(([top, left, rh, rw]) => {
      let sum = 0;
      for (let y = top; y < top + rh; y++) for (let x = left; x < left + rw; x++) {
        const i = (y * w + x) * 4;
        sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      }
      return sum / (rh * rw);
    });
    rec.frames.push([performance.timeOrigin + meta.expectedDisplayTime, w, h, levels]);
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
  });
  rec.offer = performance.timeOrigin + performance.now();
  const headers = {"Content-Type": "application/json"};
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch("/offer", {method: "POST", headers,
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: "offer", session})});
  const answer = await resp.json();
  if (!resp.ok) throw new Error(answer.error);
  await pc.setRemoteDescription(answer);
}"""


class BrowserViewer:
    """One headless Chromium page watching a session; ``start``, let it play, then ``finish`` for its record."""

    def __init__(self, url: str, session: str, height: int, width: int, token: str | None = None) -> None:
        self.url, self.session = url.rstrip("/") + "/", session
        self._token = token
        self.layout = StampLayout.for_size(height, width)
        self._playwright: Any = None
        self._browser: Any = None
        self._page: Any = None

    async def start(self) -> None:
        from playwright.async_api import async_playwright

        self._playwright = await async_playwright().start()
        try:
            self._browser = await self._playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            self._page = await self._browser.new_page()
            await self._page.goto(self.url + "api/health")  # any page of the server's origin: fetch("/offer")
            rects = [list(r) for r in self.layout.centers()]
            band = self.layout.band
            await self._page.evaluate(JOIN, {"session": self.session, "rects": rects, "band": band,
                                                "token": self._token})
        except Exception:  # noqa: BLE001 -- whatever failed (launch, page, offer), do not leak the browser
            await self.close()
            raise

    async def finish(self) -> ViewerRecord:
        """Stop watching and return what the page presented, on time.monotonic()."""
        rec = await self._page.evaluate("window.__bench")
        await self.close()
        if rec.get("error"):
            raise RuntimeError(f"the browser viewer failed: {rec['error']}")
        wall_minus_mono = time.time() - time.monotonic()

        def to_mono(epoch_ms: float) -> float:
            return epoch_ms / 1000 - wall_minus_mono
        arrivals, stamps, last = [], [], None
        for shown, w, h, levels in rec["frames"]:
            code = read_cells(levels) if (h, w) == (self.layout.height, self.layout.width) else None
            if code is not None:
                last = unwrap(code, last)
            arrivals.append(to_mono(shown))
            stamps.append(last if code is not None else None)
        return ViewerRecord("chromium", to_mono(rec["offer"]) if rec["offer"] else float("nan"), arrivals, stamps)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.close()
            self._browser = None
        if self._playwright is not None:
            await self._playwright.stop()
            self._playwright = None
