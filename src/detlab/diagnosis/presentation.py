"""How a finding reads: five columns in plain words, the same on the console, in the sweep report and
on the results page.

- finding: its name in words (``Detector.title``), "(a note)" for a note;
- when: epoch, step and stage;
- cause: why the pattern happens;
- evidence: what was seen, with its numbers;
- what to do: the run's own overrides to try, with their current values.

The columns come from a finding's record (``Finding.to_dict``, as summary.json holds it). A record written
before findings carried their words takes the title and the cause from its detector's class.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from detlab.diagnosis.detector import Detector
from detlab.diagnosis.registry import get_detector

FINDING_HEADER = ("finding", "when", "cause", "evidence", "what to do")


def _detector(record: Mapping[str, Any]) -> Optional[type[Detector]]:
    try:
        return get_detector(str(record.get("detector", "")))
    except KeyError:
        return None


def is_note(record: Mapping[str, Any]) -> bool:
    """A note on a run that learns (severity "note"), not a failure pattern."""
    severity = record.get("severity")
    return severity == "note" if severity else not record.get("failure", True)


def finding_title(record: Mapping[str, Any]) -> str:
    """The finding's name in words: ``random large boxes``; ``under-confidence (a note)``."""
    cls = _detector(record)
    title = record.get("title") or (cls.display_title() if cls else str(record.get("detector", "?")).replace("_", " "))
    return f"{title} (a note)" if is_note(record) else str(title)


def finding_when(record: Mapping[str, Any]) -> str:
    """``epoch 2, step 50 (early stage)``: the parts the record has."""
    parts = [f"{key} {record[key]}" for key in ("epoch", "step") if record.get(key) is not None]
    text = ", ".join(parts) or "-"
    return f"{text} ({record['stage']} stage)" if record.get("stage") else text


def finding_cause(record: Mapping[str, Any]) -> str:
    cls = _detector(record)
    return str(record.get("cause") or (cls.cause if cls else "") or "-")


def finding_columns(record: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    """(finding, when, cause, evidence, what to do) of a finding's record (``FINDING_HEADER``)."""
    return (finding_title(record), finding_when(record), finding_cause(record), str(record.get("message") or "-"),
            str(record.get("remedy") or "-"))


def finding_line(record: Mapping[str, Any]) -> str:
    """The console line of a new finding: ``[diagnosis] random large boxes (epoch 2, step 50, mid stage)
    | cause: ... | evidence: ... | what to do: ...``."""
    title, when, cause, evidence, remedy = finding_columns(record)
    return f"[diagnosis] {title}, {when} | cause: {cause} | evidence: {evidence} | what to do: {remedy}"
