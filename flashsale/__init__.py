"""flashsale: a high-concurrency flash-sale inventory service."""

__version__ = "0.1.0"
