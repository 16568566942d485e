// AudioWorklet processor: microphone audio -> 16 kHz mono int16 little-endian chunks.
//
// The AudioContext runs at whatever rate the device has (44.1 or 48 kHz
// usually); the server wants 16 kHz. Resampling is area averaging: each
// output sample is the mean of the input over its own 1/16000 s interval,
// with the fractional position carried across render quanta, so no sample
// is lost or counted twice at quantum boundaries. The averaging is a box
// low-pass (weak, but enough for speech recognition); from a rate below
// 16 kHz it degrades to sample-and-hold. Chunks of `chunkMs` are posted to
// the main thread as transferable ArrayBuffers; a "flush" message posts what
// is buffered followed by {type: "flushed"}.

"use strict";

class Pcm16kCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    this.outRate = opts.targetRate || 16000;
    this.ratio = sampleRate / this.outRate; // input samples per output sample
    this.need = this.ratio; // input still needed to complete the current output sample
    this.acc = 0; // weighted sum over the current output interval
    const chunkMs = opts.chunkMs || 100;
    this.chunk = new Int16Array(Math.max(1, Math.round((this.outRate * chunkMs) / 1000)));
    this.fill = 0;
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") {
        this.post(this.fill);
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  emit(value) {
    const x = value > 1 ? 1 : value < -1 ? -1 : value;
    this.chunk[this.fill++] = Math.round(x < 0 ? x * 32768 : x * 32767);
    if (this.fill === this.chunk.length) this.post(this.fill);
  }

  post(count) {
    if (count === 0) return;
    // Explicit little-endian bytes: the wire format does not depend on the host.
    const buffer = new ArrayBuffer(count * 2);
    const view = new DataView(buffer);
    for (let i = 0; i < count; i++) view.setInt16(i * 2, this.chunk[i], true);
    this.port.postMessage(buffer, [buffer]);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || input.length === 0) return true; // nothing connected right now
    const channel = input[0]; // the node downmixes to one channel (channelCount 1)
    for (let i = 0; i < channel.length; i++) {
      const x = channel[i];
      let left = 1; // the part of this input sample not yet assigned to an output
      while (left >= this.need) {
        this.acc += x * this.need;
        left -= this.need;
        this.emit(this.acc / this.ratio);
        this.acc = 0;
        this.need = this.ratio;
      }
      this.acc += x * left;
      this.need -= left;
    }
    return true;
  }
}

registerProcessor("pcm16k-capture", Pcm16kCapture);
