"""The site: ClientApp, DP trainer and privacy ledger."""
