"""What the boards show people: VN_AQI bands and colours, severities, labels, time zone.

The VN_AQI bands are Decision 1459/QD-TCMT's (as in ``alerts.aqi``), with
the Vietnamese names shown on every AQI panel; the alerts job computes the
index itself and stores the band's Vietnamese name with each result. A test
checks this table against the alerts job's own.
"""

from __future__ import annotations

from typing import Final

import msgspec

from contracts.catalog import PRINTER_STATUS_LABELS
from contracts.schema import SEVERITIES
from contracts.severity import severity_label

TIMEZONE: Final = "Asia/Ho_Chi_Minh"


class AqiBand(msgspec.Struct, frozen=True):
    low: int  # the band's lowest index value
    name_vi: str
    name_en: str
    rgb: tuple[int, int, int]

    @property
    def colour(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.rgb)


VN_AQI_BANDS: Final = (
    AqiBand(0, "Tốt", "Good", (0, 228, 0)),
    AqiBand(51, "Trung bình", "Moderate", (255, 255, 0)),
    AqiBand(101, "Kém", "Poor", (255, 126, 0)),
    AqiBand(151, "Xấu", "Bad", (255, 0, 0)),
    AqiBand(201, "Rất xấu", "Very bad", (143, 63, 151)),
    AqiBand(301, "Nguy hại", "Hazardous", (126, 0, 35)),
)

# Grafana's named colours, most urgent first (contracts.schema.SEVERITIES order).
SEVERITY_COLOURS: Final = dict(
    zip(SEVERITIES, ("dark-red", "red", "orange", "yellow"), strict=True)
)
# The shared vocabulary (contracts.severity): "Cảnh báo" is the alert, never a severity.
SEVERITY_LABELS: Final = {s: severity_label(s) for s in SEVERITIES}
ALERT_STATE_LABELS: Final = {
    "active_unack": "Đang xảy ra, chưa xác nhận",
    "active_ack": "Đang xảy ra, đã xác nhận",
    "cleared_unack": "Đã hết, chưa xác nhận",
    "cleared_ack": "Đã hết, đã xác nhận",
}

_PRINTER_VI: Final = {
    "ok": ("Bình thường", "green"),
    "paper_low": ("Sắp hết giấy", "yellow"),
    "paper_out": ("Hết giấy", "red"),
    "jam": ("Kẹt giấy", "red"),
    "offline": ("Mất kết nối", "purple"),
}
# code -> (label, colour), in the catalog's code order.
PRINTER_STATUS: Final = tuple(_PRINTER_VI[label] for label in PRINTER_STATUS_LABELS)

POLLUTANT_LABELS: Final = {
    "pm25": "PM2.5",
    "pm10": "PM10",
    "o3": "O₃",
    "no2": "NO₂",
    "so2": "SO₂",
    "co": "CO",
}
