// A line chart on a canvas that stays smooth with tens of thousands of points: per pixel column it draws only
// the first, lowest, highest and last value, so the cost of a frame follows the width, not the point count.
export class LineChart {
  constructor(canvas, { label = "", color = "#2f6fd6", log = false } = {}) {
    this.canvas = canvas; this.label = label; this.color = color; this.log = log;
    this.xs = []; this.ys = []; this.pending = false;
  }
  clear() { this.xs = []; this.ys = []; this.schedule(); }
  add(x, y) {
    if (typeof y !== "number" || !isFinite(y)) return;
    this.xs.push(x); this.ys.push(y); this.schedule();
  }
  get count() { return this.xs.length; }
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }
  draw() {
    const c = this.canvas, ctx = c.getContext("2d");
    const ratio = window.devicePixelRatio || 1, w = c.clientWidth || c.width, h = c.clientHeight || c.height;
    if (c.width !== Math.round(w * ratio)) { c.width = Math.round(w * ratio); c.height = Math.round(h * ratio); }
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#69737f"; ctx.font = "11px system-ui";
    ctx.fillText(`${this.label}${this.count ? `  (${this.count} points, last ${this.ys[this.count - 1].toPrecision(4)})` : ""}`, 8, 14);
    if (this.count === 0) return;
    const pad = { l: 48, r: 8, t: 20, b: 18 };
    const ys = this.log ? this.ys.map((v) => Math.log10(Math.max(v, 1e-12))) : this.ys;
    let x0 = this.xs[0], x1 = this.xs[this.count - 1], y0 = Infinity, y1 = -Infinity;
    for (const v of ys) { if (v < y0) y0 = v; if (v > y1) y1 = v; }
    if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += 1; y0 -= 1; }
    const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
    const px = (x) => pad.l + (x - x0) / (x1 - x0) * pw, py = (y) => pad.t + (1 - (y - y0) / (y1 - y0)) * ph;
    ctx.strokeStyle = "#e3e7ec"; ctx.beginPath(); ctx.moveTo(pad.l, pad.t); ctx.lineTo(pad.l, pad.t + ph);
    ctx.lineTo(pad.l + pw, pad.t + ph); ctx.stroke();
    ctx.fillText((this.log ? 10 ** y1 : y1).toPrecision(3), 2, pad.t + 8);
    ctx.fillText((this.log ? 10 ** y0 : y0).toPrecision(3), 2, pad.t + ph);
    ctx.fillText(String(x0), pad.l, h - 4); ctx.fillText(String(x1), pad.l + pw - 30, h - 4);
    ctx.strokeStyle = this.color; ctx.lineWidth = 1.5; ctx.beginPath();
    let column = null, first, low, high, last, started = false;
    const flush = () => {
      if (column === null) return;
      for (const v of [first, low, high, last]) {
        if (!started) { ctx.moveTo(column, py(v)); started = true; } else ctx.lineTo(column, py(v));
      }
    };
    for (let i = 0; i < this.count; i++) {
      const col = Math.round(px(this.xs[i])), v = ys[i];
      if (col !== column) { flush(); column = col; first = low = high = last = v; }
      else { if (v < low) low = v; if (v > high) high = v; last = v; }
    }
    flush(); ctx.stroke();
    this.drawnAt = performance.now();
  }
}
