"""Differential privacy: accounting, the site ledger, DP-SGD training, audits (no Flower)."""
