"""What the status server says to probes and to people: ``/healthz``, ``/readyz`` (pure rules
over the status entries) and the page at ``/``.

The page is one self-contained HTML document (no external asset, works offline): inline CSS and
an inline script that fetches ``/status`` and ``/healthz`` every second and renders with
``textContent`` only, so a hostile plugin name or status text is shown as text, never markup.
A Content-Security-Policy allows exactly that script (by hash) and requests to this server.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from .output import safe_text

OK, UNAVAILABLE = 200, 503
HEALTHY_STATES = frozenset({"starting", "running", "backoff", "stopping", "stopped", "standby"})


def _name(entry: Mapping[str, Any]) -> str:
    return safe_text(str(entry.get("name", "?")))


def _describe_end(entry: Mapping[str, Any]) -> str:
    why = f" ({safe_text(str(entry['ended_by']))})" if entry.get("ended_by") else ""
    if entry.get("signal"):
        return f"killed by {entry['signal']}{why}"
    if entry.get("exit_code") is not None:
        return f"exited with code {entry['exit_code']}{why}"
    if entry.get("error"):
        return safe_text(str(entry["error"]))
    return "ended"


def _first(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more


def health(status: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
    """``/healthz``: 200 while every plugin that should run is running or waiting to restart
    within its policy (also ``starting``, ``standby``, and ``stopped`` by an operator or a stop);
    503 with one line naming the first that is not: ``failed`` (it gave up), or ``exited`` after
    a failure and not restarted.  A plugin that exited with code 0 is done, not unhealthy."""
    problems = []
    for entry in status:
        if entry.get("change") == "removed":
            continue
        state = str(entry.get("state"))
        if state in HEALTHY_STATES:
            continue
        if state == "exited" and entry.get("returncode") in (0, None):
            continue
        if state == "failed":
            why = safe_text(str(entry.get("error") or _describe_end(entry)))
            problems.append(f"plugin {_name(entry)} failed ({why}; gave up)")
        else:
            problems.append(f"plugin {_name(entry)} {_describe_end(entry)} and is not restarted")
    if not problems:
        return OK, "ok"
    return UNAVAILABLE, _first(problems)


def readiness(status: Iterable[Mapping[str, Any]]) -> tuple[int, str]:
    """``/readyz``: 200 once every ``ready: notify`` plugin has sent READY=1 in its current run;
    503 naming the first that has not.  A plugin on ``standby`` (another launcher of the host
    runs it), removed, or done (exited with code 0) does not hold readiness back."""
    problems = []
    for entry in status:
        if entry.get("ready_mode") != "notify" or entry.get("ready"):
            continue
        state = str(entry.get("state"))
        if entry.get("change") == "removed" or state == "standby" or (
                state == "exited" and entry.get("returncode") == 0):
            continue
        problems.append(f"plugin {_name(entry)} is not ready ({state}; no READY=1 yet)")
    if not problems:
        return OK, "ready"
    return UNAVAILABLE, _first(problems)


_SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "" : String(value);
  if (cls) el.className = cls;
  return el;
}
const LIVE = ["starting", "running", "stopping"];
function uptime(entry, now) {
  if (!entry.started_at || !LIVE.includes(entry.state)) return "";
  let s = Math.max(0, Math.floor(now - entry.started_at));
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600);
  const m = Math.floor(s % 3600 / 60); s = s % 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}
function ready(entry) {
  if (entry.ready) return "yes";
  return entry.ready_mode === "notify" ? "waiting" : "";
}
function render(status, health) {
  const now = Date.now() / 1000;
  const rows = document.createDocumentFragment();
  for (const e of status) {
    const tr = document.createElement("tr");
    tr.dataset.state = e.state;
    tr.appendChild(text("td", e.name, "name"));
    tr.appendChild(text("td", e.state, "state " + e.state));
    tr.appendChild(text("td", ready(e)));
    tr.appendChild(text("td", e.restarts, "num"));
    tr.appendChild(text("td", uptime(e, now), "num"));
    tr.appendChild(text("td", LIVE.includes(e.state) ? e.pid : "", "num"));
    const detail = [e.status_text, e.holder ? "held by " + e.holder : null, e.ended_by,
                    e.error]
      .filter((x) => x).join(" \u2014 ");
    tr.appendChild(text("td", detail));
    const lines = text("td", "", "lines");
    for (const line of (e.last_lines || [])) lines.appendChild(text("div", line));
    tr.appendChild(lines);
    rows.appendChild(tr);
  }
  $("plugins").replaceChildren(rows);
  $("empty").hidden = status.length > 0;
  $("health").textContent = health.text;
  $("health").className = health.ok ? "ok" : "bad";
  $("updated").textContent = "updated " + new Date().toLocaleTimeString();
}
async function refresh() {
  try {
    const [s, h] = await Promise.all([fetch("/status", {cache: "no-store"}),
                                      fetch("/healthz", {cache: "no-store"})]);
    render(await s.json(), {ok: h.ok, text: (await h.text()).trim()});
  } catch (err) {
    $("health").textContent = "launcher not answering (" + err + ")";
    $("health").className = "bad";
  }
}
refresh();
setInterval(refresh, 1000);
"""

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f24;background:#fff}
h1{font-size:1.3em;margin:0 0 .3em}
#bar{display:flex;gap:1em;align-items:baseline;margin-bottom:1em}
#health{padding:.2em .6em;border-radius:4px;font-weight:600}
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}
#updated{color:#59636e;font-size:.9em}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35em .6em;border-bottom:1px solid #d1d9e0;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
td.name{font-family:ui-monospace,monospace;word-break:break-all}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.lines{font:12px/1.3 ui-monospace,monospace;color:#59636e;white-space:pre-wrap;
  word-break:break-all;max-width:40em}
.state{font-weight:600}.running{color:#116329}.starting,.backoff,.stopping{color:#9a6700}
.failed{color:#a40e26}.standby,.stopped,.exited{color:#59636e}
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>plugin-launcher status</title>
<style>{style}</style></head>
<body>
<h1>plugin-launcher</h1>
<div id="bar"><span id="health">loading\u2026</span><span id="updated"></span>
<span><a href="/status">/status</a> <a href="/metrics">/metrics</a>
<a href="/healthz">/healthz</a> <a href="/readyz">/readyz</a></span></div>
<noscript><p>This page needs JavaScript; <a href="/status">/status</a> has the same data.</p>
</noscript>
<table><thead><tr><th>plugin</th><th>state</th><th>ready</th><th>restarts</th><th>uptime</th>
<th>pid</th><th>status</th><th>last lines</th></tr></thead><tbody id="plugins"></tbody></table>
<p id="empty" hidden>No plugin runs in this launcher.</p>
<script>{script}</script>
</body></html>
"""

PAGE = _PAGE.format(style=_STYLE, script=_SCRIPT).encode("utf-8")
_HASH = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode()
PAGE_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Content-Security-Policy": (f"default-src 'none'; script-src 'sha256-{_HASH}'; "
                                "style-src 'unsafe-inline'; connect-src 'self'; "
                                "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}
