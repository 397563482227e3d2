// Drawing surfaces of the Create page: the sketch pad (img2img's start picture) and the mask pad (inpaint).
// Both draw with pointer events (mouse, pen, touch) and keep an undo/redo history of snapshots.

// Pointer positions in the canvas's own pixels (it is shown scaled by CSS).
function canvasPoint(canvas, event) {
  const rect = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * canvas.width) / rect.width,
    y: ((event.clientY - rect.top) * canvas.height) / rect.height,
  };
}

// Screen pixels → canvas pixels, so a brush size means the same on screen whatever the canvas resolution.
function pixelsPerScreenPixel(canvas) {
  const rect = canvas.getBoundingClientRect();
  return rect.width ? canvas.width / rect.width : 1;
}

function trackPointer(canvas, { down, move, up }) {
  let active = null;
  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || active !== null) return;
    event.preventDefault();
    active = event.pointerId;
    canvas.setPointerCapture(event.pointerId);
    down(canvasPoint(canvas, event));
  });
  canvas.addEventListener("pointermove", (event) => {
    if (event.pointerId !== active) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
    for (const each of events.length ? events : [event]) move(canvasPoint(canvas, each));
  });
  const end = (event) => {
    if (event.pointerId !== active) return;
    active = null;
    up();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

// Snapshots before each change; a new change drops the redo branch.
class History {
  constructor(limit = 30) {
    this.limit = limit;
    this.past = [];
    this.future = [];
  }

  record(snapshot) {
    this.past.push(snapshot);
    if (this.past.length > this.limit) this.past.shift();
    this.future = [];
  }

  undo(current) {
    if (!this.past.length) return null;
    this.future.push(current);
    return this.past.pop();
  }

  redo(current) {
    if (!this.future.length) return null;
    this.past.push(current);
    return this.future.pop();
  }

  reset() {
    this.past = [];
    this.future = [];
  }
}

export function hexToRgb(hex) {
  const value = parseInt(hex.slice(1), 16);
  return [(value >> 16) & 255, (value >> 8) & 255, value & 255];
}

// Sketch pad: brush strokes and bucket fill in any colour; its pixels become the init image.
export class SketchPad {
  constructor(canvas, { onChange = () => {} } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.history = new History();
    this.onChange = onChange;
    this.colour = "#dc2828";
    this.size = 24; // screen pixels
    this.tool = "brush"; // brush | fill
    this.last = null;
    this.ready = false; // true once it has a size and a background
    trackPointer(canvas, {
      down: (point) => this.down(point),
      move: (point) => this.move(point),
      up: () => this.up(),
    });
  }

  // A blank canvas of width x height filled with `background` (the shapes world's white).
  reset(width, height, { background = "#f5f5f5", keepHistory = false } = {}) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx.fillStyle = background;
    this.ctx.fillRect(0, 0, width, height);
    if (!keepHistory) this.history.reset();
    this.ready = true;
    this.onChange();
  }

  // A picture as the start: drawn at width x height, pixel for pixel when it is scaled up (no blur).
  load(picture, width, height) {
    this.record();
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx.imageSmoothingEnabled = picture.width > width;
    this.ctx.drawImage(picture, 0, 0, width, height);
    this.ready = true;
    this.onChange();
  }

  snapshot() {
    return this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
  }

  restore(snapshot) {
    this.canvas.width = snapshot.width;
    this.canvas.height = snapshot.height;
    this.ctx.putImageData(snapshot, 0, 0);
    this.onChange();
  }

  record() {
    this.history.record(this.snapshot());
  }

  undo() {
    const snapshot = this.history.undo(this.snapshot());
    if (snapshot) this.restore(snapshot);
  }

  redo() {
    const snapshot = this.history.redo(this.snapshot());
    if (snapshot) this.restore(snapshot);
  }

  down(point) {
    this.record();
    if (this.tool === "fill") {
      this.fill(point);
      return;
    }
    const ctx = this.ctx;
    ctx.fillStyle = this.colour;
    ctx.beginPath();
    ctx.arc(point.x, point.y, this.lineWidth() / 2, 0, Math.PI * 2);
    ctx.fill();
    this.last = point;
  }

  move(point) {
    if (!this.last) return;
    const ctx = this.ctx;
    ctx.strokeStyle = this.colour;
    ctx.lineWidth = this.lineWidth();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(this.last.x, this.last.y);
    ctx.lineTo(point.x, point.y);
    ctx.stroke();
    this.last = point;
  }

  up() {
    if (this.last || this.tool === "fill") this.onChange();
    this.last = null;
  }

  lineWidth() {
    return Math.max(1, this.size * pixelsPerScreenPixel(this.canvas));
  }

  // Bucket fill: the connected area of colours near the one clicked (so soft stroke edges fill too).
  fill(point, tolerance = 96) {
    const { width, height } = this.canvas;
    const x0 = Math.floor(point.x);
    const y0 = Math.floor(point.y);
    if (x0 < 0 || y0 < 0 || x0 >= width || y0 >= height) return;
    const image = this.snapshot();
    const data = image.data;
    const start = (y0 * width + x0) * 4;
    const target = [data[start], data[start + 1], data[start + 2]];
    const [r, g, b] = hexToRgb(this.colour);
    const limit = tolerance * tolerance;
    const seen = new Uint8Array(width * height);
    const stack = [y0 * width + x0];
    while (stack.length) {
      const index = stack.pop();
      if (seen[index]) continue;
      seen[index] = 1;
      const offset = index * 4;
      const dr = data[offset] - target[0];
      const dg = data[offset + 1] - target[1];
      const db = data[offset + 2] - target[2];
      if (dr * dr + dg * dg + db * db > limit) continue;
      data[offset] = r;
      data[offset + 1] = g;
      data[offset + 2] = b;
      data[offset + 3] = 255;
      const x = index % width;
      if (x > 0) stack.push(index - 1);
      if (x < width - 1) stack.push(index + 1);
      if (index >= width) stack.push(index - width);
      if (index < width * (height - 1)) stack.push(index + width);
    }
    this.ctx.putImageData(image, 0, 0);
  }

  toDataURL() {
    return this.canvas.toDataURL("image/png");
  }
}

// Mask pad: one bit per pixel of the picture (its own size), shown as a tint over it. White = repaint.
export class MaskPad {
  constructor(canvas, { onChange = () => {} } = {}) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.history = new History();
    this.onChange = onChange;
    this.size = 32; // screen pixels
    this.tool = "brush"; // brush | eraser
    this.mask = new Uint8Array(0);
    this.last = null;
    trackPointer(canvas, {
      down: (point) => this.down(point),
      move: (point) => this.move(point),
      up: () => this.up(),
    });
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.mask = new Uint8Array(width * height);
    this.history.reset();
    this.render();
  }

  isEmpty() {
    return !this.mask.some((bit) => bit);
  }

  record() {
    this.history.record(this.mask.slice());
  }

  undo() {
    const previous = this.history.undo(this.mask.slice());
    if (previous) {
      this.mask = previous;
      this.render();
    }
  }

  redo() {
    const next = this.history.redo(this.mask.slice());
    if (next) {
      this.mask = next;
      this.render();
    }
  }

  invert() {
    this.record();
    this.mask = this.mask.map((bit) => 1 - bit);
    this.render();
  }

  clear() {
    this.record();
    this.mask.fill(0);
    this.render();
  }

  down(point) {
    this.record();
    this.stamp(point);
    this.last = point;
    this.render();
  }

  move(point) {
    if (!this.last) return;
    // Stamps along the segment, close enough together to leave no gaps.
    const radius = this.radius();
    const distance = Math.hypot(point.x - this.last.x, point.y - this.last.y);
    const steps = Math.max(1, Math.ceil(distance / Math.max(0.25, radius / 2)));
    for (let i = 1; i <= steps; i++) {
      const t = i / steps;
      this.stamp({ x: this.last.x + (point.x - this.last.x) * t, y: this.last.y + (point.y - this.last.y) * t });
    }
    this.last = point;
    this.render();
  }

  up() {
    this.last = null;
  }

  radius() {
    return (this.size * pixelsPerScreenPixel(this.canvas)) / 2;
  }

  // Every pixel whose centre is within the brush; at least the pixel under the pointer.
  stamp(point) {
    const { width, height } = this.canvas;
    const value = this.tool === "eraser" ? 0 : 1;
    const radius = this.radius();
    const px = Math.floor(point.x);
    const py = Math.floor(point.y);
    if (px >= 0 && py >= 0 && px < width && py < height) this.mask[py * width + px] = value;
    const x0 = Math.max(0, Math.floor(point.x - radius));
    const x1 = Math.min(width - 1, Math.ceil(point.x + radius));
    const y0 = Math.max(0, Math.floor(point.y - radius));
    const y1 = Math.min(height - 1, Math.ceil(point.y + radius));
    for (let y = y0; y <= y1; y++) {
      for (let x = x0; x <= x1; x++) {
        if ((x + 0.5 - point.x) ** 2 + (y + 0.5 - point.y) ** 2 <= radius * radius) this.mask[y * width + x] = value;
      }
    }
  }

  render() {
    const { width, height } = this.canvas;
    if (!width || !height) return;
    const image = this.ctx.createImageData(width, height);
    for (let i = 0; i < this.mask.length; i++) {
      if (this.mask[i]) image.data.set([255, 64, 160, 150], i * 4);
    }
    this.ctx.putImageData(image, 0, 0);
    this.onChange();
  }

  // The mask as the API takes it: a PNG the picture's size, white where it is to be drawn again.
  toDataURL() {
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    const image = ctx.createImageData(width, height);
    for (let i = 0; i < this.mask.length; i++) {
      const v = this.mask[i] ? 255 : 0;
      image.data.set([v, v, v, 255], i * 4);
    }
    ctx.putImageData(image, 0, 0);
    return out.toDataURL("image/png");
  }
}
