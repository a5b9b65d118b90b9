"""Servers flashsale starts itself: embedded Redis/PostgreSQL, the Sentinel topology."""
