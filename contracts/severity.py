"""The one vocabulary of alert severities and of the word "alert", in Vietnamese and English.

Operators read Vietnamese first. Before this module the boards called the
mildest severity "Cảnh báo" (warning), the same word as an alert itself, so
"Cảnh báo: Cảnh báo" was possible. Here each severity has its own word on a
four-step scale (Nghiêm trọng > Cao > Trung bình > Thấp) and "Cảnh báo" is
kept for the noun alert only. The CLI tables, the Grafana boards and
notifications take their labels from here (``severity_label``); nothing else
spells a severity in Vietnamese.

Pure data: rendering and colours are the callers' business.
"""

from __future__ import annotations

from typing import Final

import msgspec

from contracts.schema import SEVERITIES


class SeverityName(msgspec.Struct, frozen=True, kw_only=True):
    vi: str
    en: str

    @property
    def label(self) -> str:
        """Vietnamese first, English after: "Cao / Major"."""
        return f"{self.vi} / {self.en}"


# contracts.schema.SEVERITIES order, most urgent first.
SEVERITY_NAMES: Final[dict[str, SeverityName]] = dict(
    zip(
        SEVERITIES,
        (
            SeverityName(vi="Nghiêm trọng", en="Critical"),
            SeverityName(vi="Cao", en="Major"),
            SeverityName(vi="Trung bình", en="Minor"),
            SeverityName(vi="Thấp", en="Warning"),
        ),
        strict=True,
    )
)
# The noun "alert": used for alerts, never for a severity.
ALERT_VI: Final = "Cảnh báo"
ALERT_EN: Final = "Alert"


def severity_label(severity: str) -> str:
    """ "Nghiêm trọng / Critical" for ``critical``; an unknown name is returned as it is."""
    name = SEVERITY_NAMES.get(severity)
    return severity if name is None else name.label
