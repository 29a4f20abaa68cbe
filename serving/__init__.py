"""serving — Redis-backed per-user parameters, ONNX Runtime scoring, HTTP service."""
