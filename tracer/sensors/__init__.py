"""Sensors: where denial events come from (BPF probes, Linux audit, recorded JSON)."""
