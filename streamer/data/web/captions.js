// streamer caption page: live captions from /v1/captions, optional microphone via /v1/stream.
//
// No framework and no build step: the daemon serves this file as is, under a
// Content-Security-Policy that forbids inline script, so everything the page
// does lives here. Protocol: README.md, "WebSocket protocol"
// (caption events, auth message, the /v1/stream start/ready/stop exchange).

"use strict";

(() => {
  const MAX_FINALS = 50; // finished lines kept per stream
  // Recent finals per stream asked for on every (re)connect, so that a page
  // opened late (or back after an outage) shows what was said; the server
  // keeps 20 per stream. ?history=N on the page's URL overrides it (0: none).
  const HISTORY = 20;
  const MAX_HISTORY = 100; // the most the server accepts
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  // A connection counts as successful (backoff reset) once it delivered an
  // event or stayed open this long: a server that accepts and immediately
  // closes must not be hammered every half second.
  const STABLE_MS = 3000;
  const SEQ_MEMORY = 256; // recent events remembered per stream to recognise duplicates
  const STOP_TIMEOUT_MS = 20000; // wait for the server's close after {"type":"stop"}
  const STREAM_ID = /^[A-Za-z0-9_.-]{1,64}$/;
  const TARGET_RATE = 16000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    status: $("status"),
    captions: $("captions"),
    placeholder: $("placeholder"),
    settings: $("settings"),
    token: $("token"),
    tokenForm: $("token-form"),
    mic: $("mic"),
    micStream: $("mic-stream"),
    micStatus: $("mic-status"),
    language: $("language"),
    languagePicker: $("language-picker"),
  };
  const pageQuery = new URLSearchParams(location.search);

  // -- helpers -----------------------------------------------------------------------

  function tokenFromFragment() {
    return new URLSearchParams(location.hash.replace(/^#/, "")).get("token") || "";
  }

  function currentToken() {
    return ui.token.value.trim();
  }

  /** ws(s)://same-host/<path>, relative to the page so a path prefix behind a proxy works. */
  function endpoint(path, query) {
    const url = new URL(path, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.search = query ? query.toString() : "";
    url.hash = "";
    return url.href;
  }

  function describeClose(close, opened) {
    const reason = close.reason ? `${close.reason} (${close.code})` : "";
    if (reason) return reason;
    if (close.code === 1006) return opened ? "connection lost" : "server unreachable";
    if (close.code === 1001) return "server going away (1001)";
    return `closed (${close.code})`;
  }

  function setStatus(state, text) {
    ui.status.dataset.state = state;
    ui.status.textContent = text;
  }

  // -- caption panels --------------------------------------------------------------------

  const streams = new Map();

  function panel(name) {
    let s = streams.get(name);
    if (s) return s;
    const section = document.createElement("section");
    section.className = "stream";
    section.dataset.stream = name;
    section.setAttribute("aria-label", `Stream ${name}`);
    const heading = document.createElement("h2");
    heading.textContent = name;
    const lines = document.createElement("div");
    lines.className = "lines";
    // Only finished lines are announced: re-reading a changing partial to a
    // screen reader user on every update would be noise.
    const partial = document.createElement("p");
    partial.className = "partial";
    partial.hidden = true;
    partial.setAttribute("aria-hidden", "true");
    const committed = document.createElement("span");
    committed.className = "committed";
    const tentative = document.createElement("span");
    tentative.className = "tentative";
    partial.append(committed, tentative);
    section.append(heading, lines, partial);
    ui.placeholder.hidden = true;
    ui.captions.append(section);
    s = {
      name, section, lines, partial, committed, tentative,
      lastSeq: -Infinity,
      seen: new Map(), // seq -> fingerprint of the event, last SEQ_MEMORY events
      finalSegment: -Infinity, // newest segment that has its final
      run: undefined, // the daemon's run id (events of a restarted daemon carry a new one)
    };
    streams.set(name, s);
    return s;
  }

  function fingerprint(ev) {
    return JSON.stringify([ev.type, ev.segment, ev.text, ev.start, ev.end]);
  }

  function remember(s, ev) {
    s.seen.set(ev.seq, fingerprint(ev));
    if (s.seen.size > SEQ_MEMORY) s.seen.delete(s.seen.keys().next().value);
    s.lastSeq = ev.seq;
  }

  /**
   * Is this event new? seq grows per stream, so seq <= the last one seen is a
   * duplicate (a redelivery after a reconnect, or the same event from the
   * microphone socket and the caption socket). Except when the numbering
   * started over (daemon restarted, stream id reused): then the event differs
   * from the one seen under that seq, or is older than anything remembered.
   */
  function isNew(s, ev) {
    if (typeof ev.run === "string" && ev.run !== s.run) {
      // A restarted daemon (new run id): seq keeps rising, segments start over.
      if (s.run !== undefined) {
        s.finalSegment = -Infinity;
        hidePartial(s);
      }
      s.run = ev.run;
    }
    if (!Number.isInteger(ev.seq)) return true;
    if (ev.seq > s.lastSeq) {
      remember(s, ev);
      return true;
    }
    const known = s.seen.get(ev.seq);
    if (known === fingerprint(ev)) return false;
    const oldest = s.seen.size ? s.seen.keys().next().value : -Infinity;
    if (known === undefined && ev.seq >= oldest) return false; // superseded, never shown
    // A replayed final (history sent on connecting) under a seq no longer
    // remembered is one shown long ago, not a numbering that started over.
    if (known === undefined && ev.replay === true) return false;
    s.seen.clear();
    s.finalSegment = -Infinity;
    hidePartial(s);
    remember(s, ev);
    return true;
  }

  function stickToBottom(lines, update) {
    const atBottom = lines.scrollHeight - lines.scrollTop - lines.clientHeight < 48;
    update();
    if (atBottom) lines.scrollTop = lines.scrollHeight;
  }

  function hidePartial(s) {
    s.partial.hidden = true;
    s.committed.textContent = "";
    s.tentative.textContent = "";
    delete s.partial.dataset.segment;
    delete s.partial.dataset.seq;
  }

  function showPartial(s, ev) {
    if (ev.segment <= s.finalSegment) return; // that segment is already final
    const text = typeof ev.text === "string" ? ev.text : "";
    let committed = typeof ev.committed === "string" ? ev.committed : "";
    let tentative = typeof ev.tentative === "string" ? ev.tentative : text.slice(committed.length);
    if (committed + tentative !== text && text) {
      committed = "";
      tentative = text;
    }
    s.committed.textContent = committed;
    s.tentative.textContent = tentative;
    s.partial.dataset.segment = String(ev.segment);
    s.partial.dataset.seq = String(ev.seq);
    if (ev.lang) s.partial.lang = ev.lang;
    s.partial.hidden = false;
  }

  function addFinal(s, ev) {
    const segment = Number.isInteger(ev.segment) ? ev.segment : -Infinity;
    const shown = Number(s.partial.dataset.segment);
    if (!s.partial.hidden && !(shown > segment)) hidePartial(s);
    s.finalSegment = Math.max(s.finalSegment, segment);
    const text = typeof ev.text === "string" ? ev.text.trim() : "";
    if (!text) return; // an empty final only clears the partial
    stickToBottom(s.lines, () => {
      const line = document.createElement("p");
      line.className = "final";
      line.dataset.segment = String(ev.segment);
      line.dataset.seq = String(ev.seq);
      if (ev.lang) line.lang = ev.lang;
      if (Number.isFinite(ev.start) && Number.isFinite(ev.end)) {
        line.title = `${ev.start.toFixed(1)}–${ev.end.toFixed(1)} s`;
      }
      line.textContent = text;
      s.lines.append(line);
      while (s.lines.childElementCount > MAX_FINALS) s.lines.firstElementChild.remove();
    });
  }

  function handleEvent(ev) {
    if (!ev || typeof ev !== "object" || typeof ev.stream !== "string") return;
    if (ev.type !== "partial" && ev.type !== "final") return;
    if ((ev.target || "") !== language.chosen) return; // another language (the mic gets all)
    const s = panel(ev.stream);
    if (!isNew(s, ev)) return;
    if (ev.type === "partial") showPartial(s, ev);
    else addFinal(s, ev);
  }

  function parseMessage(data) {
    try {
      return JSON.parse(data);
    } catch {
      return null;
    }
  }

  // -- the caption subscription, reconnecting ----------------------------------------------

  const sub = {
    ws: null, attempt: 0, timer: 0, ticker: 0, openedAt: 0, delivered: false, error: "",
  };

  function clearRetry() {
    clearTimeout(sub.timer);
    clearInterval(sub.ticker);
    sub.timer = sub.ticker = 0;
  }

  function connect() {
    clearRetry();
    const query = new URLSearchParams();
    for (const key of ["streams", "kinds"]) {
      const value = pageQuery.get(key);
      if (value) query.set(key, value);
    }
    const asked = pageQuery.has("history") ? Number(pageQuery.get("history")) : HISTORY;
    const history = Number.isInteger(asked) && asked >= 0 ? Math.min(asked, MAX_HISTORY) : HISTORY;
    query.set("history", String(history));
    if (language.chosen) query.set("targets", language.chosen); // else the source
    if (!sub.attempt) setStatus("connecting", "connecting…");
    let ws;
    try {
      ws = new WebSocket(endpoint("v1/captions", query));
    } catch (err) {
      setStatus("error", `cannot connect: ${err.message}`);
      return;
    }
    sub.ws = ws;
    sub.openedAt = 0;
    sub.delivered = false;
    sub.error = "";
    ws.onopen = () => {
      if (sub.ws !== ws) return;
      const token = currentToken();
      if (token) ws.send(JSON.stringify({ type: "auth", token }));
      sub.openedAt = performance.now();
      setStatus("live", "live");
    };
    ws.onmessage = (msg) => {
      if (sub.ws !== ws || typeof msg.data !== "string") return;
      const m = parseMessage(msg.data);
      if (m && m.type === "error") {
        sub.error = String(m.message || "error"); // the server's reason, sent before its close
        return;
      }
      sub.delivered = true;
      handleEvent(m);
    };
    ws.onclose = (close) => {
      if (sub.ws !== ws) return;
      sub.ws = null;
      const opened = sub.openedAt > 0;
      if (sub.delivered || (opened && performance.now() - sub.openedAt >= STABLE_MS)) {
        sub.attempt = 0;
      }
      const why = sub.error ? `${sub.error} (${close.code})` : describeClose(close, opened);
      if (close.code === 1008) {
        // Policy (bad or missing token): the same request would fail again.
        setStatus("error", `${why}: enter the access token and reconnect`);
        ui.settings.open = true;
        return;
      }
      scheduleReconnect(why);
    };
  }

  function scheduleReconnect(why) {
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(sub.attempt, 16));
    const delay = cap / 2 + (Math.random() * cap) / 2; // "equal jitter"
    sub.attempt += 1;
    const due = performance.now() + delay;
    const tick = () => {
      const seconds = Math.max(1, Math.ceil((due - performance.now()) / 1000));
      setStatus("reconnecting", `reconnecting in ${seconds} s — ${why}`);
    };
    tick();
    sub.ticker = setInterval(tick, 250);
    sub.timer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    sub.attempt = 0;
    const old = sub.ws;
    sub.ws = null;
    if (old) old.close(1000, "reconnecting");
    connect();
  }

  // -- the microphone: AudioWorklet -> /v1/stream, resumed after a broken connection ----
  //
  // The page keeps the microphone's audio from the end of the last final it
  // received. When the socket breaks once the stream runs (the daemon died, a
  // network blip, a load balancer moved it), it reconnects with capped backoff,
  // sends start with resume {seq: last seq received, offset: end of that final}
  // and sends the kept audio again from there, so the captions go on with no
  // gap and no repeat (README "Resuming a stream"). Capture goes on meanwhile.

  const MIC_KEEP_SAMPLES = 120 * TARGET_RATE; // audio kept for a resume at most
  const MIC_RESUME_FOR_MS = 300000; // give up resuming after this long without success
  // Close codes after which the stream is resumed: going away, connection lost,
  // server error, restart, try again later, bad gateway. Others end the stream.
  const RESUME_CODES = new Set([1001, 1006, 1011, 1012, 1013, 1014]);

  const mic = {
    state: "idle", // idle | starting | on | reconnecting | stopping
    ws: null, ctx: null, media: null, source: null, node: null,
    ready: false, stopSent: false, flushed: false, error: "", errorCode: 0, stopTimer: 0,
    stream: "", started: false, lastSeq: null, finalEnd: 0,
    log: [], // [{start, samples: Int16Array}] from the end of the last final on
    total: 0, // samples captured so far (the stream's clock)
    keepFrom: 0, // samples before this have their final
    sent: 0, // the current connection has sent up to here
    from: 0, // where the current connection started sending
    attempt: 0, lostAt: 0, retryTimer: 0,
  };

  function randomStreamId() {
    const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789";
    const bytes = crypto.getRandomValues(new Uint8Array(4));
    return "browser-" + Array.from(bytes, (b) => alphabet[b % alphabet.length]).join("");
  }

  function setMic(state, text, error = false) {
    mic.state = state;
    ui.mic.dataset.state = state;
    const running = state === "on" || state === "stopping" || state === "reconnecting";
    ui.mic.textContent = running ? "Stop" : "Use my microphone";
    ui.mic.disabled = state === "starting" || state === "stopping";
    ui.micStream.disabled = state !== "idle";
    ui.micStatus.dataset.state = error ? "error" : state;
    ui.micStatus.textContent = text;
  }

  function releaseAudio() {
    if (mic.source) mic.source.disconnect();
    if (mic.node) {
      mic.node.port.onmessage = null;
      mic.node.disconnect();
    }
    if (mic.media) for (const track of mic.media.getTracks()) track.stop();
    if (mic.ctx) mic.ctx.close().catch(() => {});
    mic.source = mic.node = mic.media = mic.ctx = null;
  }

  function finishMic(text, error) {
    clearTimeout(mic.stopTimer);
    clearTimeout(mic.retryTimer);
    releaseAudio();
    const ws = mic.ws;
    mic.ws = null;
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "client done");
    Object.assign(mic, {
      ready: false, stopSent: false, flushed: false, error: "", errorCode: 0, started: false,
      lastSeq: null, finalEnd: 0, log: [], total: 0, keepFrom: 0, sent: 0, from: 0,
      attempt: 0, lostAt: 0,
    });
    setMic("idle", text, error);
  }

  function mediaError(err) {
    const name = err && err.name;
    if (name === "NotAllowedError") return "microphone permission denied";
    if (name === "NotFoundError") return "no microphone found";
    if (name === "NotReadableError") return "the microphone is busy or unavailable";
    return `microphone error: ${(err && err.message) || err}`;
  }

  async function startMic() {
    const stream = ui.micStream.value.trim() || randomStreamId();
    if (!STREAM_ID.test(stream)) {
      setMic("idle", "stream name: 1 to 64 of A-Z a-z 0-9 _ . -", true);
      return;
    }
    ui.micStream.value = stream;
    if (!navigator.mediaDevices || !window.AudioWorkletNode) {
      setMic("idle", "the microphone needs a secure page (https:// or localhost)", true);
      return;
    }
    setMic("starting", "asking for the microphone…");
    // Created inside the click so that autoplay rules let it run.
    mic.ctx = new AudioContext();
    try {
      mic.media = await navigator.mediaDevices.getUserMedia({
        audio: {
          channelCount: 1,
          echoCancellation: false,
          noiseSuppression: false,
          autoGainControl: false,
        },
      });
      await mic.ctx.audioWorklet.addModule(new URL("mic-worklet.js", location.href).href);
      mic.source = mic.ctx.createMediaStreamSource(mic.media);
      mic.node = new AudioWorkletNode(mic.ctx, "pcm16k-capture", {
        numberOfInputs: 1,
        numberOfOutputs: 1, // silent, connected to the destination so it is always pulled
        outputChannelCount: [1],
        channelCount: 1,
        channelCountMode: "explicit",
        channelInterpretation: "speakers",
        processorOptions: { targetRate: TARGET_RATE, chunkMs: 100 },
      });
    } catch (err) {
      finishMic(mediaError(err), true);
      return;
    }
    mic.node.port.onmessage = onWorkletMessage;
    mic.stream = stream;
    openStreamSocket();
  }

  /** Drop kept audio that has its final and was sent (the resume point never moves back). */
  function trimLog() {
    const upTo = Math.min(mic.keepFrom, mic.sent);
    while (mic.log.length && mic.log[0].start + mic.log[0].samples.length <= upTo) mic.log.shift();
  }

  function logStart() {
    return mic.log.length ? mic.log[0].start : mic.total;
  }

  /** Send the kept audio from mic.sent on (after ready, and as the worklet delivers). */
  function sendPending() {
    const ws = mic.ws;
    if (!ws || !mic.ready || ws.readyState !== WebSocket.OPEN) return;
    for (const chunk of mic.log) {
      const end = chunk.start + chunk.samples.length;
      if (end <= mic.sent) continue;
      const part = chunk.samples.subarray(Math.max(0, mic.sent - chunk.start));
      ws.send(part.slice().buffer); // little-endian Int16 (the worklet's bytes)
      mic.sent = end;
    }
    trimLog();
    if (mic.flushed && !mic.stopSent && mic.sent === mic.total) {
      mic.stopSent = true;
      ws.send(JSON.stringify({ type: "stop" }));
    }
  }

  function openStreamSocket() {
    const resuming = mic.started;
    if (!resuming) setMic("starting", `opening stream ${mic.stream}…`);
    const ws = new WebSocket(endpoint("v1/stream"));
    ws.binaryType = "arraybuffer";
    mic.ws = ws;
    mic.ready = false;
    mic.stopSent = false;
    mic.error = "";
    mic.errorCode = 0;
    ws.onopen = () => {
      if (mic.ws !== ws) return;
      const start = {
        type: "start", stream: mic.stream, sample_rate: TARGET_RATE, encoding: "pcm_s16le",
        channels: 1,
      };
      const token = currentToken();
      if (token) start.token = token;
      mic.from = Math.max(mic.keepFrom, logStart());
      mic.sent = mic.from; // before any event of this connection trims the log
      if (resuming) {
        const exact = mic.from === Math.round(mic.finalEnd * TARGET_RATE);
        const offset = exact ? mic.finalEnd : mic.from / TARGET_RATE;
        start.resume = { seq: mic.lastSeq === null ? 0 : mic.lastSeq, offset };
      }
      ws.send(JSON.stringify(start));
    };
    ws.onmessage = (msg) => {
      if (mic.ws !== ws || typeof msg.data !== "string") return;
      const m = parseMessage(msg.data);
      if (!m) return;
      if (m.type === "ready") onReady(m, resuming);
      else if (m.type === "error") {
        mic.error = `${m.message || "error"} (${m.code})`;
        mic.errorCode = m.code;
        ui.micStatus.dataset.state = "error";
        ui.micStatus.textContent = mic.error;
      } else onMicEvent(m);
    };
    ws.onclose = (close) => {
      if (mic.ws !== ws) return;
      mic.ws = null;
      mic.ready = false;
      const code = mic.errorCode || close.code;
      if (mic.stopSent && close.code === 1000) {
        finishMic(`stream ${mic.stream} finished`, false);
      } else if (mic.started && RESUME_CODES.has(code)) {
        resumeLater(mic.error || describeClose(close, true));
      } else if (mic.error) {
        finishMic(`stopped: ${mic.error}`, true);
      } else {
        const why = mic.started || close.code !== 1006
          ? describeClose(close, true)
          : "the server refused the audio stream";
        finishMic(`audio stream closed: ${why}`, true);
      }
    };
  }

  function resumeLater(why) {
    const now = performance.now();
    if (!mic.lostAt) mic.lostAt = now;
    if (now - mic.lostAt > MIC_RESUME_FOR_MS) {
      finishMic(`audio stream lost: ${why}; gave up resuming`, true);
      return;
    }
    const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(mic.attempt, 16));
    const delay = cap / 2 + (Math.random() * cap) / 2; // "equal jitter"
    mic.attempt += 1;
    if (mic.state !== "stopping") {
      setMic("reconnecting", `${why}; resuming stream ${mic.stream} in ${Math.ceil(delay / 1000)} s`);
    }
    mic.retryTimer = setTimeout(openStreamSocket, delay);
  }

  function onReady(m, resuming) {
    mic.ready = true;
    mic.attempt = 0;
    mic.lostAt = 0;
    mic.stream = m.stream;
    ui.micStatus.dataset.stream = m.stream;
    if (!mic.started) {
      mic.started = true;
      mic.source.connect(mic.node);
      mic.node.connect(mic.ctx.destination);
      mic.ctx.resume().catch(() => {});
    }
    if (mic.state !== "stopping") {
      const rate = mic.ctx.sampleRate;
      const how = resuming ? `resumed at ${(mic.from / TARGET_RATE).toFixed(1)} s` : "streaming";
      setMic("on", `${how} as ${m.stream} (${rate} Hz → ${TARGET_RATE} Hz)`);
    }
    sendPending();
  }

  /** An event of the microphone's own stream: note the last seq and where finals end. */
  function onMicEvent(m) {
    // (The highest: a translation's final may come after a later partial of the source.)
    if (Number.isInteger(m.seq) && (mic.lastSeq === null || m.seq > mic.lastSeq)) {
      mic.lastSeq = m.seq;
    }
    if (m.type === "final" && Number.isFinite(m.end) && m.end > mic.finalEnd) {
      mic.finalEnd = m.end;
      mic.keepFrom = Math.max(mic.keepFrom, Math.round(m.end * TARGET_RATE));
      trimLog();
    }
    handleEvent(m); // (duplicates of the subscription's copies are dropped there)
  }

  function onWorkletMessage(event) {
    if (event.data instanceof ArrayBuffer) {
      if (!mic.started || mic.flushed) return;
      const samples = new Int16Array(event.data);
      mic.log.push({ start: mic.total, samples });
      mic.total += samples.length;
      while (mic.log.length && mic.total - mic.log[0].start > MIC_KEEP_SAMPLES) {
        mic.log.shift(); // away too long: the oldest audio goes
      }
      if (mic.sent < logStart()) mic.sent = logStart();
      sendPending();
    } else if (event.data && event.data.type === "flushed") {
      mic.flushed = true;
      sendPending();
    }
  }

  function stopMic() {
    if (!mic.started) {
      finishMic("cancelled", false);
      return;
    }
    setMic("stopping", "finishing the last sentence…");
    // No more audio in; the worklet posts what it buffered, then "flushed",
    // and only once all of it is sent (after a resume, if need be) does
    // "stop" go out: the tail is not lost.
    mic.source.disconnect();
    mic.node.port.postMessage({ type: "flush" });
    mic.stopTimer = setTimeout(() => finishMic("the server did not close in time", true),
      STOP_TIMEOUT_MS);
  }

  // -- the language picker: the source, or one of the daemon's translation targets ----------
  //
  // The daemon lists its targets in <meta name="streamer-targets">; ?target=de
  // on the page's URL picks one (and is kept there, so a reload shows the same).

  const language = { chosen: "" };

  function setupLanguages() {
    const meta = document.querySelector('meta[name="streamer-targets"]');
    const targets = ((meta && meta.content) || "").split(",").filter(Boolean);
    for (const target of targets) {
      const option = document.createElement("option");
      option.value = option.textContent = target;
      ui.language.append(option);
    }
    const asked = pageQuery.get("target") || "";
    language.chosen = targets.includes(asked) ? asked : "";
    ui.language.value = language.chosen;
    ui.languagePicker.hidden = !targets.length;
    ui.language.addEventListener("change", () => {
      language.chosen = ui.language.value;
      if (language.chosen) pageQuery.set("target", language.chosen);
      else pageQuery.delete("target");
      const url = new URL(location.href);
      url.search = pageQuery.toString();
      window.history.replaceState(null, "", url.href);
      for (const s of streams.values()) s.section.remove(); // other text: start afresh
      streams.clear();
      ui.placeholder.hidden = false;
      reconnectNow(); // history=N brings the recent finals in that language
    });
  }

  // -- wiring --------------------------------------------------------------------------------

  ui.token.value = tokenFromFragment();
  ui.micStream.value = randomStreamId();
  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    reconnectNow();
  });
  window.addEventListener("hashchange", () => {
    const token = tokenFromFragment();
    if (token && token !== currentToken()) {
      ui.token.value = token;
      reconnectNow();
    }
  });
  window.addEventListener("online", () => {
    if (!sub.ws) reconnectNow();
  });
  ui.mic.addEventListener("click", () => {
    if (mic.state === "idle") startMic();
    else if (mic.state === "on" || mic.state === "reconnecting") stopMic();
  });
  setMic("idle", "");
  setupLanguages();
  connect();
})();
