"""The waiting room (contract v1.1, issue 12): a stock-aware queue in front of a sale."""
