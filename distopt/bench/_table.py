"""One table renderer for the ``distopt bench`` commands (markdown or aligned text)."""

from __future__ import annotations

from collections.abc import Sequence


def render(
    title: str,
    head: Sequence[str],
    rows: Sequence[Sequence[str]],
    fmt: str,
    notes: Sequence[str] = (),
) -> str:
    """``title`` over a table of ``rows`` under ``head``, then ``notes``; ``fmt`` is md or text."""
    if fmt == "md":
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines + ([""] + list(notes) if notes else []))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + list(notes))
