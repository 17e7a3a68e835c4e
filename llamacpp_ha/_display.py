"""How a balancer shows itself: an HTML table in Jupyter, a text table in a terminal."""

from __future__ import annotations

from html import escape

from ._snapshot import BackendSnapshot, BalancerSnapshot

__all__ = ["render_html", "render_text"]

_PAD = "padding:2px 10px"
_STATE_COLORS = {
    "healthy": "#1a7f37",
    "loading": "#9a6700",
    "dead": "#cf222e",
    "unknown": "#59636e",
    "unloaded": "#59636e",
}


def _affinity_rate(snapshot: BalancerSnapshot) -> str:
    hits, misses = snapshot.counters.affinity_hits, snapshot.counters.affinity_misses
    return f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"


def _summary(snapshot: BalancerSnapshot) -> str:
    counters = snapshot.counters
    return (
        f"policy {snapshot.policy} · queue {snapshot.queue_depth} · in flight {snapshot.in_flight} · "
        f"requests {counters.requests} · retries {counters.retries} · affinity held {_affinity_rate(snapshot)}"
    )


def _bar(used: int, other: int, total: int) -> str:
    cells = []
    for i in range(total):
        color = "#0969da" if i < used else "#8c959f" if i < used + other else "#eaeef2"
        cells.append(
            f'<span style="display:inline-block;width:10px;height:14px;margin-right:2px;'
            f'border-radius:2px;background:{color}"></span>'
        )
    return "".join(cells)


def _cell(content: str, style: str = "", tag: str = "td", title: str = "") -> str:
    tip = f" title='{escape(title)}'" if title else ""
    return f"<{tag} style='text-align:left;{_PAD};{style}'{tip}>{content}</{tag}>"


def _state(b: BackendSnapshot) -> str:
    if b.is_router and b.state == "healthy":
        return "router"
    return b.state + (" (sleeping)" if b.sleeping else "")


def _models(b: BackendSnapshot) -> str:
    """A router's line tells how many models it has; each of them has a line of its own."""
    if b.is_router:
        return b.reason.removeprefix("router: ")
    return ", ".join(b.models) or "-"


def render_html(snapshot: BalancerSnapshot) -> str:
    head = "".join(_cell(h, tag="th") for h in ("backend", "state", "slots", "models", "requests", "errors"))
    rows = []
    for b in snapshot.backends:
        slots = (
            "-"
            if b.is_router
            else f"{_bar(b.in_flight, b.external, b.capacity)} {b.in_flight + b.external}/{b.capacity}"
        )
        cells = [
            _cell(escape(b.name), title=b.url),
            _cell(escape(_state(b)), style=f"color:{_STATE_COLORS.get(b.state, '#59636e')};font-weight:600"),
            _cell(slots),
            _cell(escape(_models(b))),
            _cell(str(b.requests)),
            _cell(str(b.errors)),
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<div><b>llamacpp-ha</b> "
        f"<span style='color:#59636e'>{escape(_summary(snapshot))}</span>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def render_text(snapshot: BalancerSnapshot) -> str:
    header = ("backend", "state", "slots", "models", "requests", "errors")
    rows = [
        (
            b.name,
            _state(b),
            "-"
            if b.is_router
            else "#" * b.in_flight + "." * max(0, b.capacity - b.in_flight) + f" {b.in_flight}/{b.capacity}",
            _models(b),
            str(b.requests),
            str(b.errors),
        )
        for b in snapshot.backends
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]
    return "\n".join([f"llamacpp-ha: {_summary(snapshot)}", *lines])
