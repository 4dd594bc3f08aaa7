"""End-to-end tests: gateway, fleet and webhook receiver on a real broker and database."""
