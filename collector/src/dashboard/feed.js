// The connection to the collector's feed (/ws, protocol in collector/FEED.md): connects
// with the page's filter and `since` = 15 minutes ago, changes the subscription on the
// live connection when the filter changes, and reconnects with backoff when it drops (a
// collector restart), each time asking again for the last 15 minutes.
export const FILTER_KEYS = ["namespace", "workload", "pod", "node", "profile", "direction",
                            "route", "method", "process"];

export class Feed {
  /**
   * handlers: onDocument(doc), onSubscribed(frame), onState(state, detail),
   * onLoginNeeded(). `range` is how far back (ms) each subscription replays.
   */
  constructor(handlers, range) {
    this.handlers = handlers;
    this.range = range;
    this.filter = {};
    this.socket = null;
    this.backoff = 500;
    this.attempt = 0;
    this.reconnects = 0;
    this.missedTotal = 0;     // every item the collector dropped for this page
    this.missedHere = 0;      // on the current connection
  }

  query() {
    const params = new URLSearchParams();
    params.set("kind", "windows");
    for (const key of FILTER_KEYS) for (const value of this.filter[key] || []) params.append(key, value);
    params.set("since", String(Date.now() - this.range));
    return params.toString();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const socket = new WebSocket(scheme + location.host + "/ws?" + this.query());
    this.socket = socket;
    let opened = false;
    this.handlers.onState("connecting", this.attempt ? "attempt " + (this.attempt + 1) : "");
    socket.onopen = () => {
      opened = true;
      if (this.attempt > 0) this.reconnects += 1;
      this.attempt = 0;
      this.backoff = 500;
      this.missedHere = 0;
      this.handlers.onState("live", "");
    };
    socket.onmessage = (event) => {
      let doc;
      try { doc = JSON.parse(event.data); } catch (error) { console.warn("bad feed frame", error); return; }
      if (doc.type === "missed") {
        this.missedHere = doc.missed_total ?? this.missedHere + doc.missed;
        this.missedTotal += doc.missed;
      }
      if (doc.type === "subscribed") this.handlers.onSubscribed(doc);
      else this.handlers.onDocument(doc);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return; // replaced on purpose
      this.socket = null;
      const retry = () => {
        this.attempt += 1;
        const wait = this.backoff;
        this.backoff = Math.min(this.backoff * 2, 8000);
        this.handlers.onState("down", `retrying in ${(wait / 1000).toFixed(1)} s` +
          (event.code && event.code !== 1006 ? ` (closed ${event.code} ${event.reason})` : ""));
        setTimeout(() => this.connect(), wait);
      };
      if (opened) { retry(); return; }
      // Refused before opening: the browser hides the HTTP status, so ask the page
      // itself whether the session is still good (401 means: log in again).
      fetch("/", { cache: "no-store", credentials: "same-origin" })
        .then((answer) => answer.status === 401 ? this.handlers.onLoginNeeded() : retry())
        .catch(retry);
    };
  }

  /** New filter: a `subscribe` message on the live connection (or the next connect). */
  subscribe(filter) {
    this.filter = filter;
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify({
        type: "subscribe", filter, kind: "windows",
        history: { since_unix_ms: Date.now() - this.range },
      }));
    }
  }
}
