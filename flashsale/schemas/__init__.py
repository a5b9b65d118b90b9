"""The HTTP contract's shapes, declared once: bounds, request and response bodies, decoding."""
