"""Envoy's access logs: formats (``format``), filters (``filters``), the buffered file writer
(``sink``) and the run-time logs the HCM, the TCP proxy and listeners call (``logger``)."""
