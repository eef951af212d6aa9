"""Grafana dashboards as code, provisioning files and the push to a running Grafana."""
