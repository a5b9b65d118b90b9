"""The commerce flow around a reservation: orders, payment, saga, gateway, logistics."""
