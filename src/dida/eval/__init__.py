"""Metrics, whole and sliding-window inference, dataset evaluation."""
